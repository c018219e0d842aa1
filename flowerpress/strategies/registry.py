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

from typing import Any

from flowerpress.registry import Registry, parse_args
from flowerpress.strategies.base import Strategy, StrategyError
from flowerpress.strategies.fedavg import FedAvg, FedAvgM, FedProx
from flowerpress.strategies.fedopt import FedAdagrad, FedAdam, FedYogi
from flowerpress.strategies.robust import Krum, Median, MultiKrum, TrimmedMean

#: The strategies selectable by name (the spec grammar is flowerpress.registry's).
STRATEGIES: Registry[Strategy] = Registry(
    "strategy", Strategy, error=StrategyError, reserved=("flwr",))  # type: ignore[type-abstract]
#: The registry's own mapping (tests save and restore it).
_REGISTRY = STRATEGIES._classes


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
    STRATEGIES.register(name, cls, force=force)


def available_strategies() -> list[str]:
    """Return the registered strategy names, sorted."""
    return STRATEGIES.names()


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
    if head == "flwr":
        return _build_flwr(text, rest)
    if head and "." not in head and STRATEGIES.get(head) is None:
        raise StrategyError(
            f"unknown strategy {head!r}; available: {', '.join(available_strategies())} "
            "(or flwr:NAME, or package.module:ClassName)"
        )
    return STRATEGIES.build(text)


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
    cls = getattr(flwr_strategies, name)
    kwargs: dict[str, Any] = parse_args(spec, cls, args, kind="strategy", error=StrategyError)
    try:
        inner = cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise StrategyError(f"strategy {spec!r}: {exc}") from exc
    return FlwrStrategy.wrap(inner)


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
