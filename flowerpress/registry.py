"""Registries by name and the one spec grammar of every extension point.

Tasks, strategies, codec stages and DP mechanisms are named the same way in
the run config, the CLI and Python::

    spec  := NAME [":" args]            a registered name (no ".")
           | MODULE ":" CLASS [":" args] MODULE contains a "." (an import path)
    args  := ARG "=" VALUE ("," ARG "=" VALUE)*

``ARG`` may use ``-`` for ``_``. Each ``VALUE`` is converted to the type
annotated on the class's constructor (``int``, ``float``, ``bool``, ``str``,
or one of them ``| None``, where ``none`` means ``None``). A registry refuses
a duplicate name unless ``force=True`` (as Opacus' ``register_accountant``).

Plug-in modules (the run-config key ``plugins``) register a user's names in
every process that parses specs: :func:`import_plugins` imports each module
once per process, on the server, on every node and in the CLI, before any spec
is parsed, so a short name means the same everywhere.
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
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_SCALARS: tuple[type, ...] = (bool, int, float, str)
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


class SpecError(ValueError):
    """A spec names something that does not exist or has a bad argument."""


class PluginError(ValueError):
    """A plug-in module named in ``plugins`` is not a module name or fails to import."""


#: Builds an object from its class and the spec's converted keyword arguments.
Factory = Callable[[type[Any], dict[str, Any]], Any]


def _direct(cls: type[Any], kwargs: dict[str, Any]) -> Any:
    return cls(**kwargs)


class Registry(Generic[T]):
    """Named classes of one extension point, built from spec strings.

    Parameters
    ----------
    kind : str
        What the registry holds ("strategy", "task"): used in every message.
    base : type
        Every registered or imported class must subclass it.
    error : type[ValueError]
        The exception raised for a bad spec (a ``ValueError`` subclass).
    reserved : tuple[str, ...]
        Names no registration may take (e.g. ``flwr``).
    """

    def __init__(self, kind: str, base: type[T], *, error: type[ValueError] = SpecError,
                 reserved: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self.base = base
        self.error = error
        self.reserved = reserved
        self._classes: dict[str, type[T]] = {}

    def register(self, name: str, cls: type[T], *, force: bool = False) -> None:
        """Make ``cls`` selectable as ``NAME[:ARG=VALUE,...]``.

        Raises
        ------
        ValueError
            If the name is taken (and ``force`` is false) or malformed.
        TypeError
            If ``cls`` is not a subclass of the registry's base.
        """
        if not _NAME.match(name) or name in self.reserved:
            reserved = "".join(f" and not {r!r}" for r in self.reserved)
            raise ValueError(f"{self.kind} name {name!r} must be lower-case letters, digits, "
                             f"'-' or '_'{reserved}")
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise TypeError(f"cls must be a {self.base.__name__} subclass, got {cls!r}")
        if name in self._classes and not force:
            raise ValueError(f"{self.kind} {name!r} is already registered "
                             f"({self._classes[name].__qualname__}); pass force=True to replace it")
        self._classes[name] = cls

    def unregister(self, name: str) -> None:
        """Remove a registration (tests restore registries with it)."""
        self._classes.pop(name, None)

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._classes)

    def get(self, name: str) -> type[T] | None:
        """The class registered as ``name``, or None."""
        return self._classes.get(name)

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        """Restore the registrations on exit (for tests that register their own)."""
        saved = dict(self._classes)
        try:
            yield
        finally:
            self._classes.clear()
            self._classes.update(saved)

    def resolve(self, spec: str) -> tuple[type[T], str]:
        """The class a spec names and its argument text."""
        text = spec.strip()
        head, _, rest = text.partition(":")
        if not head:
            raise self.error(f"empty {self.kind} spec {spec!r}; available: "
                             f"{', '.join(self.names())}")
        if "." in head:
            class_name, _, args = rest.partition(":")
            return self._import(text, head, class_name), args
        cls = self._classes.get(head)
        if cls is None:
            raise self.error(f"unknown {self.kind} {head!r}; available: "
                             f"{', '.join(self.names())} (or package.module:ClassName)")
        return cls, rest

    def build(self, spec: str, factory: Factory = _direct) -> T:
        """Build the object a spec names (``factory(cls, kwargs)``, default ``cls(**kwargs)``)."""
        cls, args = self.resolve(spec)
        kwargs = parse_args(spec, cls, args, kind=self.kind, error=self.error)
        try:
            obj: T = factory(cls, kwargs)
        except (ValueError, TypeError) as exc:
            raise self.error(f"{self.kind} {spec.strip()!r}: {exc}") from exc
        return obj

    def _import(self, spec: str, module_name: str, class_name: str) -> type[T]:
        if not class_name:
            raise self.error(f"{self.kind} {spec!r}: an import path needs a class, e.g. "
                             f"{module_name}:ClassName")
        try:
            with _cwd_on_path():
                module = importlib.import_module(module_name)
        except ImportError as exc:
            raise self.error(f"{self.kind} {spec!r}: cannot import {module_name!r}: {exc}"
                             ) from exc
        cls = getattr(module, class_name, None)
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            found = sorted(n for n, v in vars(module).items() if isinstance(v, type)
                           and issubclass(v, self.base) and not inspect.isabstract(v))
            raise self.error(f"{self.kind} {spec!r}: {module_name} has no "
                             f"{self.base.__name__} subclass {class_name!r}; "
                             f"found: {', '.join(found) or 'none'}")
        return cls


@contextlib.contextmanager
def _cwd_on_path() -> Iterator[None]:
    # Console scripts put their own bin/ first on sys.path, not the working
    # directory; user code next to the run (examples/...) should import.
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


def spec_parameters(cls: type) -> tuple[dict[str, tuple[type, bool]], list[str]]:
    """The spec-settable constructor parameters, and the required ones a spec cannot set."""
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


def _convert(spec: str, name: str, raw: str, kind: tuple[type, bool], *, what: str,
             error: type[ValueError]) -> Any:
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
        raise error(f"{what} {spec!r}: argument {name}={raw!r} is not a valid {expected}"
                    ) from None


def parse_args(spec: str, cls: type, args: str, *, kind: str = "spec",
               error: type[ValueError] = SpecError) -> dict[str, Any]:
    """Keyword arguments for ``cls`` from the ``ARG=VALUE,...`` text of a spec."""
    settable, missing = spec_parameters(cls)
    allowed = ", ".join(sorted(settable)) or "none"
    if missing:
        raise error(f"{kind} {spec!r}: {cls.__name__} needs argument(s) a spec cannot give: "
                    f"{', '.join(missing)}")
    kwargs: dict[str, Any] = {}
    for item in filter(None, (a.strip() for a in args.split(","))):
        key, eq, value = item.partition("=")
        name = key.strip().replace("-", "_")
        if not eq:
            raise error(f"{kind} {spec!r}: expected ARG=VALUE, got {item!r}; allowed: {allowed}")
        if name not in settable:
            raise error(f"{kind} {spec!r}: unknown argument {key.strip()!r}; allowed: {allowed}")
        if name in kwargs:
            raise error(f"{kind} {spec!r}: argument {name!r} given twice")
        kwargs[name] = _convert(spec, name, value.strip(), settable[name], what=kind, error=error)
    return kwargs


# --- plug-in modules ---------------------------------------------------------------------

_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
#: Plug-in modules this process could not import, with the line that says why. Python
#: forgets a module whose import failed, so importing it again would run its
#: registrations a second time and report a duplicate name instead of the cause.
_FAILED: dict[str, str] = {}


def plugin_modules(text: str) -> tuple[str, ...]:
    """The module names of a ``plugins`` value (comma-separated; empty items skipped).

    Raises
    ------
    PluginError
        An item is not a dotted module name, or is given twice.
    """
    names: list[str] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if not _MODULE.match(item):
            raise PluginError(f"plug-in {item!r} is not a module name; expected "
                              "comma-separated dotted names, e.g. mypkg.codecs,mypkg.strategies")
        if item in names:
            raise PluginError(f"plug-in module {item!r} is named twice")
        names.append(item)
    return tuple(names)


def import_plugins(text: str) -> tuple[str, ...]:
    """Import the plug-in modules ``text`` names, once per process; return their names.

    Each module registers its tasks, strategies, codec stages or DP mechanisms
    at import, the way the built-ins do. A module already imported is not run
    again (registries refuse duplicates), and one that failed fails again with
    the same line. Modules are imported with the working directory on
    ``sys.path``, like ``package.module:Class`` specs.

    Raises
    ------
    PluginError
        One line naming the module and the cause (``ModuleNotFoundError``, or
        whatever its import raised, e.g. a name that is already registered).
    """
    names = plugin_modules(text)
    for name in names:
        if name in _FAILED:
            raise PluginError(_FAILED[name])
        if name in sys.modules:
            continue
        try:
            with _cwd_on_path():
                importlib.import_module(name)
        except Exception as exc:  # the user's module: any error is its import failing
            reason = " ".join(str(exc).split()) or "no message"
            _FAILED[name] = (f"cannot import plug-in module {name!r}: "
                             f"{type(exc).__name__}: {reason}")[:500]
            raise PluginError(_FAILED[name]) from exc
    return names
