"""Strategy registry and the ``strategy`` spec parser.

Spec grammar (run-config key ``strategy``, CLI ``--set strategy=...``)::

    spec     := "flwr:" NAME [":" args]              Flower's flwr.serverapp.strategy.NAME
              | MODULE ":" CLASS [":" args]          MODULE contains a "." (import path)
              | NAME [":" args]                      a registered name (no ".")
    args     := ARG "=" VALUE ("," ARG "=" VALUE)*

Disambiguation: the text before the first ``:`` decides. ``flwr`` selects
the Flower adapter; text containing a dot is a module path (so a user module
must live in a package or be named with its package, e.g.
``examples.custom_strategy.norm_bounded_mean:NormBoundedMean``); anything
else is a registered name. ``ARG`` may use ``-`` for ``_``
(``num-malicious-nodes``). Each ``VALUE`` is converted to the type annotated
on the class's constructor (``int``, ``float``, ``bool``, ``str``, or one of
them ``| None``, where ``none`` means ``None``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import os
import re
import sys
import types
import typing
from collections.abc import Iterator
from typing import Any

from flowerpress.strategies.base import Strategy, StrategyError
from flowerpress.strategies.fedavg import FedAvg, FedAvgM, FedProx
from flowerpress.strategies.fedopt import FedAdagrad, FedAdam, FedYogi
from flowerpress.strategies.robust import Krum, Median, MultiKrum, TrimmedMean

_REGISTRY: dict[str, type[Strategy]] = {}
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_SCALARS: tuple[type, ...] = (bool, int, float, str)
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def register_strategy(name: str, cls: type[Strategy], *, force: bool = False) -> None:
    """Make ``cls`` selectable as ``strategy=NAME[:ARG=VALUE,...]``.

    Parameters
    ----------
    name : str
        Lower-case name: letters, digits, ``-`` and ``_``; not ``flwr``.
    cls : type[Strategy]
        A :class:`~flowerpress.strategies.Strategy` subclass whose constructor
        takes keyword arguments with scalar annotations and defaults.
    force : bool
        Replace an existing registration instead of refusing it.

    Raises
    ------
    ValueError
        If the name is taken (and ``force`` is false) or malformed.
    TypeError
        If ``cls`` is not a Strategy subclass.
    """
    if not _NAME.match(name) or name == "flwr":
        raise ValueError(
            f"strategy name {name!r} must be lower-case letters, digits, '-' or '_' and not 'flwr'"
        )
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise TypeError(f"cls must be a Strategy subclass, got {cls!r}")
    if name in _REGISTRY and not force:
        raise ValueError(
            f"strategy {name!r} is already registered ({_REGISTRY[name].__qualname__}); "
            "pass force=True to replace it"
        )
    _REGISTRY[name] = cls


def available_strategies() -> list[str]:
    """Return the registered strategy names, sorted."""
    return sorted(_REGISTRY)


def build_strategy(spec: str) -> Strategy:
    """Build a strategy from a spec string (grammar in this module's docstring).

    Examples: ``"fedavg"``, ``"fedprox:mu=0.1"``, ``"multikrum:f=2,m=5"``,
    ``"flwr:FedMedian"``, ``"flwr:Krum:num-malicious-nodes=2"``,
    ``"examples.custom_strategy.norm_bounded_mean:NormBoundedMean:max_norm=5"``.

    Raises
    ------
    StrategyError
        (a ``ValueError``) with one line naming what exists or which
        arguments are allowed.
    """
    text = spec.strip()
    head, _, rest = text.partition(":")
    if not head:
        raise StrategyError(
            f"empty strategy spec {spec!r}; available: {', '.join(available_strategies())}"
        )
    if head == "flwr":
        return _build_flwr(text, rest)
    if "." in head:
        return _build_import(text, head, rest)
    cls = _REGISTRY.get(head)
    if cls is None:
        raise StrategyError(
            f"unknown strategy {head!r}; available: {', '.join(available_strategies())} "
            "(or flwr:NAME, or package.module:ClassName)"
        )
    strategy: Strategy = _construct(text, cls, rest)
    return strategy


def _build_flwr(spec: str, rest: str) -> Strategy:
    from flwr.serverapp import strategy as flwr_strategies

    from flowerpress.strategies.flwr_adapter import FlwrStrategy

    name, _, args = rest.partition(":")
    names = sorted(
        n
        for n in getattr(flwr_strategies, "__all__", dir(flwr_strategies))
        if isinstance(getattr(flwr_strategies, n, None), type)
        and issubclass(getattr(flwr_strategies, n), flwr_strategies.Strategy)
        and n != "Strategy"
    )
    if name not in names:
        raise StrategyError(
            f"unknown Flower strategy {name!r} in {spec!r}; available: {', '.join(names)}"
        )
    inner = _construct(spec, getattr(flwr_strategies, name), args)
    return FlwrStrategy.wrap(inner)


@contextlib.contextmanager
def _cwd_on_path() -> Iterator[None]:
    # Console scripts put their own bin/ first on sys.path, not the working
    # directory; user strategies next to the run (examples/...) should import.
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.append(cwd)
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(cwd)


def _build_import(spec: str, module_name: str, rest: str) -> Strategy:
    class_name, _, args = rest.partition(":")
    if not class_name:
        raise StrategyError(
            f"strategy {spec!r}: import path needs a class, e.g. {module_name}:ClassName"
        )
    try:
        with _cwd_on_path():
            module = importlib.import_module(module_name)
    except ImportError as exc:
        raise StrategyError(f"strategy {spec!r}: cannot import {module_name!r}: {exc}") from exc
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        found = sorted(
            n
            for n, v in vars(module).items()
            if isinstance(v, type) and issubclass(v, Strategy) and not inspect.isabstract(v)
        )
        raise StrategyError(
            f"strategy {spec!r}: {module_name} has no Strategy subclass {class_name!r}; "
            f"found: {', '.join(found) or 'none'}"
        )
    strategy: Strategy = _construct(spec, cls, args)
    return strategy


def _type_hints(cls: type) -> dict[str, Any]:
    target: Any = cls
    if not dataclasses.is_dataclass(cls):
        # The constructor that inspect.signature() reports: the nearest in the MRO.
        target = next((vars(k)["__init__"] for k in cls.__mro__ if "__init__" in vars(k)), cls)
    try:
        return typing.get_type_hints(target)
    except Exception:  # unresolvable forward references: fall back to defaults
        return {}


def _scalar_type(annotation: Any, default: Any) -> tuple[type, bool] | None:
    """Return (scalar type, accepts None) for a settable parameter, else None."""
    if annotation in _SCALARS:
        return annotation, False
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(members) < len(typing.get_args(annotation))
        if len(members) == 1 and members[0] in _SCALARS:
            return members[0], optional
        return None
    if annotation is inspect.Parameter.empty or annotation is Any:
        if default is inspect.Parameter.empty or default is None:
            return str, default is None
        if isinstance(default, _SCALARS):
            return type(default), False
    return None


def _parameters(cls: type) -> tuple[dict[str, tuple[type, bool]], list[str]]:
    """Return the spec-settable parameters and the required ones a spec cannot set."""
    hints = _type_hints(cls)
    settable: dict[str, tuple[type, bool]] = {}
    unsettable_required: list[str] = []
    try:
        params = list(inspect.signature(cls).parameters.values())
    except (TypeError, ValueError):
        params = []
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
            continue
        kind = _scalar_type(hints.get(p.name, p.annotation), p.default)
        if kind is None:
            if p.default is p.empty:
                unsettable_required.append(p.name)
        else:
            settable[p.name] = kind
    return settable, unsettable_required


def _convert(spec: str, name: str, raw: str, kind: tuple[type, bool]) -> Any:
    typ, optional = kind
    low = raw.strip().lower()
    if optional and low in ("none", "null"):
        return None
    try:
        if typ is bool:
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError(raw)
        if typ is int:
            return int(raw)
        if typ is float:
            return float(raw)
        return raw
    except ValueError:
        expected = typ.__name__ + (" or none" if optional else "")
        raise StrategyError(
            f"strategy {spec!r}: argument {name}={raw!r} is not a valid {expected}"
        ) from None


def _construct(spec: str, cls: type, args: str) -> Any:
    settable, missing = _parameters(cls)
    allowed = ", ".join(sorted(settable)) or "none"
    if missing:
        raise StrategyError(
            f"strategy {spec!r}: {cls.__name__} needs argument(s) a spec cannot give: "
            f"{', '.join(missing)}"
        )
    kwargs: dict[str, Any] = {}
    for item in filter(None, (a.strip() for a in args.split(","))):
        key, eq, value = item.partition("=")
        name = key.strip().replace("-", "_")
        if not eq:
            raise StrategyError(
                f"strategy {spec!r}: expected ARG=VALUE, got {item!r}; allowed: {allowed}"
            )
        if name not in settable:
            raise StrategyError(
                f"strategy {spec!r}: unknown argument {key.strip()!r}; allowed: {allowed}"
            )
        if name in kwargs:
            raise StrategyError(f"strategy {spec!r}: argument {name!r} given twice")
        kwargs[name] = _convert(spec, name, value.strip(), settable[name])
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise StrategyError(f"strategy {spec!r}: {exc}") from exc


for _name, _cls in (
    ("fedavg", FedAvg),
    ("fedprox", FedProx),
    ("fedavgm", FedAvgM),
    ("fedadagrad", FedAdagrad),
    ("fedadam", FedAdam),
    ("fedyogi", FedYogi),
    ("median", Median),
    ("trimmed-mean", TrimmedMean),
    ("krum", Krum),
    ("multikrum", MultiKrum),
):
    register_strategy(_name, _cls)
