"""Open registries of DP mechanisms, clipping rules and privacy accountants.

Each extension point is a small abstract interface and a registry by name that refuses
duplicates unless ``force=True`` (as Opacus' ``register_accountant`` and
:func:`flowerpress.strategies.registry.register_strategy`). The built-ins register
themselves exactly as user code does::

    from flowerpress.privacy.registry import DpMechanism, register_mechanism

    class Shuffled(DpMechanism):
        trust_model = "..."
        def device_noise_multiplier(self, noise, *, cohort_size):
            return noise / cohort_size ** 0.5

    register_mechanism("shuffled", Shuffled)   # now "dp=shuffled:clip=1,noise=1" parses

This module imports nothing heavy: a device imports it, the server's accountants (which
need ``dp_accounting``) register when :mod:`flowerpress.privacy.accounting` is imported,
which :func:`make_accountant` does on first use.
"""

from __future__ import annotations

import importlib
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeVar

if TYPE_CHECKING:
    from flowerpress.privacy.settings import DpSettings

Relation = Literal["replace-one", "zero-out"]
ReleaseSampling = Literal["none", "fixed", "poisson"]
RELATIONS: tuple[Relation, ...] = ("replace-one", "zero-out")
RELEASE_SAMPLINGS: tuple[ReleaseSampling, ...] = ("none", "fixed", "poisson")

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


# -- what accountants compose ----------------------------------------------------------


@dataclass(frozen=True)
class GaussianRelease:
    """One Gaussian release, possibly amplified by sampling, in units of its sensitivity.

    Parameters
    ----------
    noise_multiplier : float
        Noise std divided by the L2 sensitivity under ``relation`` (> 0). Under
        ``replace-one`` a clipped update moves a sum by up to ``2C``, so std ``z*C`` is
        multiplier ``z/2``; under ``zero-out`` (Kairouz et al. 2021, "Practical and
        Private (Deep) Learning without Sampling or Shuffling", Def. 1.1) it is ``z``.
    relation : {"replace-one", "zero-out"}
        Neighbouring relation between federations (client level).
    sampling : {"none", "fixed", "poisson"}
        ``none``: the client is known to be in the release (no amplification).
        ``fixed``: a uniform sample of ``sample_size`` of ``population`` without
        replacement (Wang, Balle & Kasiviswanathan 2019). ``poisson``: every client
        independently with ``probability``.
    """

    noise_multiplier: float
    relation: Relation
    sampling: ReleaseSampling = "none"
    population: int = 1
    sample_size: int = 1
    probability: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0.0):
            raise ValueError(
                f"noise_multiplier must be a finite number > 0, got {self.noise_multiplier!r}"
            )
        if self.relation not in RELATIONS:
            raise ValueError(f"relation must be one of {RELATIONS}, got {self.relation!r}")
        if self.sampling not in RELEASE_SAMPLINGS:
            raise ValueError(f"sampling must be one of {RELEASE_SAMPLINGS}, got {self.sampling!r}")
        if not (1 <= self.sample_size <= self.population):
            raise ValueError(
                f"sample_size must be in [1, population={self.population}], "
                f"got {self.sample_size!r}"
            )
        if not (0.0 < self.probability <= 1.0):
            raise ValueError(f"probability must be in (0, 1], got {self.probability!r}")

    def to_json(self) -> dict[str, Any]:
        """Plain JSON value; :meth:`from_json` inverts it exactly."""
        return asdict(self)

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> GaussianRelease:
        """Parse :meth:`to_json` output (ValueError on anything else)."""
        try:
            return cls(
                noise_multiplier=float(value["noise_multiplier"]),
                relation=value["relation"],
                sampling=value["sampling"],
                population=int(value["population"]),
                sample_size=int(value["sample_size"]),
                probability=float(value["probability"]),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"privacy state: malformed release {value!r}") from exc


# -- interfaces --------------------------------------------------------------------------


class DpMechanism(ABC):
    """Where the Gaussian noise of DP-FedAvg is added (McMahan et al. 2018).

    A mechanism is stateless; it is registered by class and built without arguments.
    """

    #: One sentence for results.json: whom the noise protects a client against.
    trust_model: ClassVar[str] = ""
    #: True: every update is private on its own, so the accountant charges each
    #: participating client per released update and never credits the aggregate
    #: (local DP). False: the aggregate carries the noise (distributed DP).
    per_update: ClassVar[bool] = False

    @abstractmethod
    def device_noise_multiplier(self, noise: float, *, cohort_size: int) -> float:
        """Noise std / clip that one device adds to its own update (or count).

        Parameters
        ----------
        noise : float
            Multiplier the whole mechanism targets (``z_u``, or ``sigma_b`` for counts).
        cohort_size : int
            Number of devices the round's train message went to.
        """


class ClipRule(ABC):
    """How the clip norm evolves and what it costs in noise."""

    #: True: devices release a noised clip indicator ``1[norm <= C]``.
    releases_indicator: ClassVar[bool] = False

    @abstractmethod
    def update_noise_multiplier(self, settings: DpSettings) -> float:
        """Multiplier ``z_u`` the *update* carries so that all releases cost ``z``."""

    @abstractmethod
    def next_clip(self, clip: float, indicators: Sequence[float], settings: DpSettings) -> float:
        """Clip of the next round from this round's (noised) indicators."""


class Accountant(ABC):
    """Composes :class:`GaussianRelease` values and converts them to (epsilon, delta)."""

    @abstractmethod
    def supports(self, release: GaussianRelease) -> bool:
        """Whether this accountant analyses ``release`` exactly as stated."""

    @abstractmethod
    def compose(self, release: GaussianRelease, count: int = 1) -> None:
        """Add ``count`` independent ``release`` events (ValueError if unsupported)."""

    @abstractmethod
    def get_epsilon(self, delta: float) -> float:
        """Epsilon at ``delta`` of everything composed so far."""

    @abstractmethod
    def describe(self) -> str:
        """Library, version and method, for results.json."""


# -- registries ----------------------------------------------------------------------------

T = TypeVar("T")


class _Registry(Generic[T]):
    def __init__(self, what: str, base: type) -> None:
        # ``type`` rather than ``type[T]``: the bases are abstract (mypy type-abstract).
        self.what = what
        self.base = base
        self.entries: dict[str, type[T]] = {}

    def register(self, name: str, cls: type[T], *, force: bool) -> None:
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(
                f"{self.what} name {name!r} must be lower-case letters, digits, '-' or '_'"
            )
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise TypeError(f"cls must be a {self.base.__name__} subclass, got {cls!r}")
        if name in self.entries and not force:
            raise ValueError(
                f"{self.what} {name!r} is already registered "
                f"({self.entries[name].__qualname__}); pass force=True to replace it"
            )
        self.entries[name] = cls

    def get(self, name: str) -> type[T]:
        cls = self.entries.get(name)
        if cls is None:
            raise ValueError(
                f"unknown {self.what} {name!r}; available: {', '.join(sorted(self.entries))}"
            )
        return cls


_MECHANISMS: _Registry[DpMechanism] = _Registry("DP mechanism", DpMechanism)
_CLIPPING: _Registry[ClipRule] = _Registry("clipping rule", ClipRule)
_ACCOUNTANTS: _Registry[Accountant] = _Registry("privacy accountant", Accountant)


def register_mechanism(name: str, cls: type[DpMechanism], *, force: bool = False) -> None:
    """Make ``cls`` selectable as ``dp=NAME:clip=...,noise=...``.

    Raises
    ------
    ValueError
        The name is malformed, or taken and ``force`` is false.
    TypeError
        ``cls`` is not a :class:`DpMechanism` subclass.
    """
    _MECHANISMS.register(name, cls, force=force)


def get_mechanism(name: str) -> DpMechanism:
    """The registered mechanism ``name`` (ValueError listing the names if unknown)."""
    return _MECHANISMS.get(name)()


def available_mechanisms() -> list[str]:
    """Registered mechanism names, sorted."""
    return sorted(_MECHANISMS.entries)


def register_clipping(name: str, cls: type[ClipRule], *, force: bool = False) -> None:
    """Make ``cls`` selectable as ``dp=...,clipping=NAME`` (same errors as above)."""
    _CLIPPING.register(name, cls, force=force)


def get_clipping(name: str) -> ClipRule:
    """The registered clipping rule ``name``."""
    return _CLIPPING.get(name)()


def available_clippings() -> list[str]:
    """Registered clipping-rule names, sorted."""
    return sorted(_CLIPPING.entries)


def _load_builtin_accountants() -> None:
    # The built-in accountants need dp_accounting: server side only, imported on demand.
    importlib.import_module("flowerpress.privacy.accounting")


def register_accountant(name: str, cls: type[Accountant], *, force: bool = False) -> None:
    """Make ``cls`` selectable as ``ServerPrivacy(..., accountant=NAME)``."""
    _ACCOUNTANTS.register(name, cls, force=force)


def make_accountant(name: str) -> Accountant:
    """A fresh instance of the registered accountant ``name``."""
    _load_builtin_accountants()
    return _ACCOUNTANTS.get(name)()


def available_accountants() -> list[str]:
    """Registered accountant names, sorted (imports the built-ins)."""
    _load_builtin_accountants()
    return sorted(_ACCOUNTANTS.entries)
