"""Server-side privacy accounting with Google's ``dp_accounting`` (RDP and PLD).

Neighbouring federations differ in the data of one client (client-level DP). What one
round releases, and so what is composed, depends on three things the run states up
front and the accountant never guesses:

- the **mechanism** (registry: ``distributed``, ``local``, a user's): distributed noise
  protects the aggregate, local noise each update;
- the **sampling scheme** that actually drew the cohort:

  ``fixed``
      m of n uniformly without replacement from the OS CSPRNG. Amplified:
      ``SampledWithoutReplacementDpEvent(n, m, GaussianDpEvent(z/2))`` under
      replace-one (Wang, Balle & Kasiviswanathan 2019), RDP only (the PLD accountant
      does not implement this event).
  ``poisson``
      every client independently with probability q (DP-FedAvg, McMahan et al. 2018).
      ``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` under zero-out (``REPLACE_SPECIAL``:
      a client's update replaced by zero, sensitivity C; Kairouz et al. 2021 Def. 1.1),
      accounted exactly with the PLD accountant (Koskela et al. 2020, Doroshenko et al.
      2022) and with RDP (Mironov, Talwar & Zhang 2019); both are reported.
  ``predictable``
      the cohort can be derived from a published seed: no amplification; each client is
      charged a plain Gaussian per actual participation and the worst client is reported.

- whether the strategy is a **weighted sum** of the updates. If not (median, Krum, a
  user's rule), only the per-update noise protects a client, so every participating
  client is charged its own update's Gaussian per participation.

Replace-one moves a sum of clipped updates by up to 2C, so a noise std of ``z*C`` is a
Gaussian with multiplier ``z/2``; under zero-out the sensitivity is C and the multiplier z.
"""

from __future__ import annotations

import copy
import functools
import math
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import replace
from importlib.metadata import version
from typing import Any

import dp_accounting
import numpy as np
from dp_accounting.pld import privacy_loss_distribution
from dp_accounting.rdp import RdpAccountant
from dp_accounting.rdp.rdp_privacy_accountant import DEFAULT_RDP_ORDERS, compute_epsilon
from numpy.typing import NDArray

from flowerpress.privacy.keys import (
    CONFIG_CLIENTS_PER_ROUND,
    CONFIG_CLIP,
    CONFIG_DP,
    METRIC_CLIP_INDICATOR,
    SAMPLING_SCHEMES,
    Sampling,
)
from flowerpress.privacy.mechanisms import DP_NOISE_TAIL, dp_update_bound
from flowerpress.privacy.mod import device_noise_multiplier
from flowerpress.privacy.registry import (
    Accountant,
    GaussianRelease,
    Relation,
    get_clipping,
    get_mechanism,
    make_accountant,
    register_accountant,
)
from flowerpress.privacy.settings import DpSettings, parse_dp

__all__ = [
    "CALIBRATION_ORDERS",
    "CONFIG_CLIP",
    "CONFIG_DP",
    "METRIC_CLIP_INDICATOR",
    "SAMPLING_DESCRIPTIONS",
    "ClientId",
    "PldAccountant",
    "RdpGaussianAccountant",
    "ServerPrivacy",
    "epsilon_after",
    "noise_multiplier_for",
]

ClientId = int | str

SAMPLING_DESCRIPTIONS: dict[str, str] = {
    "fixed": "fixed-size: m of n uniformly without replacement, drawn from the OS CSPRNG",
    "poisson": "Poisson: each client joins independently with probability q = m/n",
    "predictable": (
        "predictable: the cohort is derivable from a published seed; no amplification "
        "by sampling"
    ),
}
_RELATION_TEXT: dict[str, str] = {
    "replace-one": "replace-one client (sensitivity 2C)",
    "zero-out": "zero-out client: its update replaced by zero (sensitivity C)",
}
_DP_RELATION = {
    "replace-one": dp_accounting.NeighboringRelation.REPLACE_ONE,
    "zero-out": dp_accounting.NeighboringRelation.REPLACE_SPECIAL,
}
SEEDED_REASON = (
    "rng=seeded: the noise is derived from the run seed, so anyone who knows it can "
    "subtract the noise; this run is not differentially private (epsilon = infinity). "
    "nominal_epsilon is what the accounting would give for secret noise."
)
_STATE_VERSION = 2

# A subset of the accountant's orders for calibration: epsilon is a minimum over orders,
# so a subset can only over-estimate it and calibrated noise never overshoots the target.
CALIBRATION_ORDERS: tuple[float, ...] = tuple(
    float(o)
    for o in DEFAULT_RDP_ORDERS
    if o < 3.0
    or (o <= 11 and float(2 * o).is_integer())
    or o in (12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 63)
)


# -- accountants --------------------------------------------------------------------------


def dp_event(release: GaussianRelease) -> dp_accounting.DpEvent:
    """The ``dp_accounting`` event that states ``release`` exactly."""
    gaussian = dp_accounting.GaussianDpEvent(release.noise_multiplier)
    if release.sampling == "fixed" and release.sample_size < release.population:
        return dp_accounting.SampledWithoutReplacementDpEvent(
            source_dataset_size=release.population,
            sample_size=release.sample_size,
            event=gaussian,
        )
    if release.sampling == "poisson" and release.probability < 1.0:
        return dp_accounting.PoissonSampledDpEvent(release.probability, gaussian)
    return gaussian  # "none", or a "sample" of everyone: no amplification


@functools.lru_cache(maxsize=1024)
def _release_rdp(release: GaussianRelease, orders: tuple[float, ...]) -> tuple[float, ...]:
    """RDP vector of one release, from dp_accounting; memoized.

    The sampled-without-replacement RDP costs ~0.3 s per evaluation and a run repeats the
    same release every round, so accountants add cached vectors exactly as
    ``RdpAccountant.compose`` does internally (``self._rdp += count * ...``).
    """
    accountant = RdpAccountant(
        orders=list(orders), neighboring_relation=_DP_RELATION[release.relation]
    )
    accountant.compose(dp_event(release))
    return tuple(float(v) for v in accountant.rdp)


class RdpGaussianAccountant(Accountant):
    """Rényi DP (Mironov 2017) with dp_accounting's ``RdpAccountant``.

    Supports every :class:`GaussianRelease` the ledger produces: plain Gaussians,
    sampling without replacement under replace-one (Wang, Balle & Kasiviswanathan 2019)
    and Poisson sampling under zero-out (Mironov, Talwar & Zhang 2019).
    """

    def __init__(self, orders: Sequence[float] | None = None) -> None:
        self.orders = tuple(float(o) for o in (orders or DEFAULT_RDP_ORDERS))
        self._rdp = np.zeros(len(self.orders), dtype=np.float64)

    def supports(self, release: GaussianRelease) -> bool:
        """Plain, fixed-size (replace-one) and Poisson (zero-out) Gaussians."""
        if release.sampling == "fixed" and release.sample_size < release.population:
            return release.relation == "replace-one"
        if release.sampling == "poisson" and release.probability < 1.0:
            return release.relation == "zero-out"
        return True

    def compose(self, release: GaussianRelease, count: int = 1) -> None:
        """Add ``count`` copies of ``release`` to the RDP vector."""
        if not self.supports(release):
            raise ValueError(f"rdp accountant: unsupported release {release!r}")
        self._rdp = self._rdp + count * np.asarray(_release_rdp(release, self.orders))

    def get_epsilon(self, delta: float) -> float:
        """Epsilon at ``delta`` (Canonne, Kamath & Steinke 2020 conversion, as dp_accounting)."""
        return _rdp_epsilon(self._rdp, self.orders, delta)

    def describe(self) -> str:
        """Library and method."""
        return f"dp_accounting {version('dp-accounting')} RdpAccountant"


def _rdp_epsilon(rdp: NDArray[np.float64], orders: Sequence[float], delta: float) -> float:
    if not np.any(rdp):
        return 0.0
    return float(compute_epsilon(np.asarray(orders), rdp, delta)[0])


@functools.lru_cache(maxsize=256)
def _release_pld(
    release: GaussianRelease, interval: float
) -> privacy_loss_distribution.PrivacyLossDistribution:
    """PLD of one release, built as dp_accounting's ``PLDAccountant`` builds it; memoized.

    Building a subsampled-Gaussian PLD costs seconds; composing built ones is cheap.
    """
    if release.sampling == "fixed" and release.sample_size < release.population:
        raise ValueError("pld accountant: sampling without replacement is not supported")
    q = release.probability if release.sampling == "poisson" else 1.0
    # dp_accounting's PLD under REPLACE_ONE compares N(-s, sigma^2) with N(+s, sigma^2):
    # its ``sensitivity`` is the per-record bound and the means differ by 2s, while its
    # RDP accountant reads a GaussianDpEvent multiplier against the whole difference.
    # Our multipliers are against the whole difference (2C), so s = 1/2 here; passing
    # s = 1 would silently charge twice the sensitivity.
    sensitivity = 0.5 if release.relation == "replace-one" else 1.0
    return privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=release.noise_multiplier,
        sensitivity=sensitivity,
        value_discretization_interval=interval,
        sampling_prob=q,
        neighboring_relation=_DP_RELATION[release.relation],
    )


#: Rounds composed one at a time onto the last composition of a release before
#: ``self_compose`` (FFT powers, O(log count) convolutions) is cheaper.
_COMPOSE_STEPS = 16
#: Distinct releases whose last composition is kept (each one or two PMFs of about
#: 10^5 floats).
_COMPOSED_KEPT = 32
_composed: dict[tuple[GaussianRelease, float],
                tuple[int, privacy_loss_distribution.PrivacyLossDistribution]] = {}
_EPSILONS_KEPT = 256
_epsilons: dict[tuple[tuple[tuple[GaussianRelease, int], ...], float, float], float] = {}
#: Both caches are shared by the ledgers of every ServerApp thread in the process.
_cache_lock = threading.Lock()


def _release_pld_composed(
    release: GaussianRelease, count: int, interval: float
) -> privacy_loss_distribution.PrivacyLossDistribution:
    """``count`` compositions of one release's PLD.

    A ledger asks for 1, 2, 3, ... rounds of the same release, so the last
    composition of each release is kept and extended by one ``compose`` per round
    (about 0.05 s), as dp_accounting's ``PLDAccountant`` composes one event per
    round, instead of rebuilding ``self_compose(count)`` every round (0.3-0.5 s).
    Both are pessimistic: they differ by about 1e-11 in epsilon.
    """
    single = _release_pld(release, interval)
    if count == 1:
        return single
    key = (release, interval)
    with _cache_lock:
        last = _composed.get(key)
    if last is not None and 0 <= count - last[0] <= _COMPOSE_STEPS:
        done, pld = last
        for _ in range(count - done):
            pld = pld.compose(single)
    else:
        pld = single.self_compose(count)
    with _cache_lock:
        _composed.pop(key, None)
        _composed[key] = (count, pld)  # the most recently used last
        while len(_composed) > _COMPOSED_KEPT:
            del _composed[next(iter(_composed))]
    return pld


class PldAccountant(Accountant):
    """Privacy loss distributions, as dp_accounting's ``PLDAccountant`` (pessimistic).

    Numerically tight for plain and Poisson-subsampled Gaussians (Koskela, Jälkö &
    Honkela 2020; Doroshenko et al. 2022, "Connect the Dots"). dp_accounting has no PLD
    for sampling without replacement, so ``fixed`` releases are not supported. All
    releases composed into one instance must share a neighbouring relation. The same
    PLDs as ``PLDAccountant`` builds, memoized per distinct release; each release's
    last composition is extended by one ``compose`` per round, as ``PLDAccountant``
    composes one event per round, and epsilon is memoized per ledger, so a round
    costs one composition and one ``get_epsilon_for_delta``, not a rebuild.
    """

    def __init__(self, value_discretization_interval: float = 1e-4) -> None:
        self.value_discretization_interval = value_discretization_interval
        self._counts: Counter[GaussianRelease] = Counter()

    def supports(self, release: GaussianRelease) -> bool:
        """Plain and Poisson Gaussians with one relation."""
        if release.sampling == "fixed" and release.sample_size < release.population:
            return False
        poisson = release.sampling == "poisson" and release.probability < 1.0
        if poisson and release.relation != "zero-out":
            return False
        return all(r.relation == release.relation for r in self._counts)

    def compose(self, release: GaussianRelease, count: int = 1) -> None:
        """Compose ``count`` copies of ``release``."""
        if not self.supports(release):
            raise ValueError(f"pld accountant: unsupported release {release!r}")
        self._counts[release] += count

    def get_epsilon(self, delta: float) -> float:
        """Epsilon at ``delta`` (an upper bound: pessimistic discretization)."""
        if not self._counts:
            return 0.0
        key = tuple(self._counts.items())
        interval = self.value_discretization_interval
        # A round's budget check, its charge and the report alongside another
        # accountant ask for the same ledger; each costs a pass over the PMF in Python.
        memo = (key, delta, interval)
        with _cache_lock:
            cached = _epsilons.get(memo)
        if cached is not None:
            return cached
        pld = None
        for release, count in key:
            part = _release_pld_composed(release, count, interval)
            pld = part if pld is None else pld.compose(part)
        assert pld is not None
        epsilon = float(pld.get_epsilon_for_delta(delta))
        with _cache_lock:
            _epsilons[memo] = epsilon
            while len(_epsilons) > _EPSILONS_KEPT:
                del _epsilons[next(iter(_epsilons))]
        return epsilon

    def describe(self) -> str:
        """Library and method."""
        return f"dp_accounting {version('dp-accounting')} PLD (pessimistic, as PLDAccountant)"


register_accountant("rdp", RdpGaussianAccountant)
register_accountant("pld", PldAccountant)


# -- calibration ----------------------------------------------------------------------------


def _check_common(
    *, delta: float, num_clients: int, clients_per_round: int, rounds: int | None = None
) -> None:
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"num_clients must be an int >= 1, got {num_clients!r}")
    if (
        isinstance(clients_per_round, bool)
        or not isinstance(clients_per_round, int)
        or not (1 <= clients_per_round <= num_clients)
    ):
        raise ValueError(
            f"clients_per_round must be an int in [1, num_clients={num_clients}], "
            f"got {clients_per_round!r}"
        )
    # A delta of 1/n or more allows "release one client's data in the clear".
    if not (0.0 < delta < 1.0 / num_clients):
        raise ValueError(
            f"delta must be in (0, 1/num_clients = {1.0 / num_clients:g}), got {delta!r}"
        )
    if rounds is not None and (
        isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1
    ):
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")


def _check_sampling(sampling: str) -> None:
    if sampling not in SAMPLING_SCHEMES:
        raise ValueError(
            f"sampling must be one of {', '.join(SAMPLING_SCHEMES)}, got {sampling!r}"
        )


def _relation(sampling: str) -> Relation:
    return "zero-out" if sampling == "poisson" else "replace-one"


def _unit(relation: Relation) -> float:
    """Sensitivity of a sum of C-clipped updates, in units of C."""
    return 1.0 if relation == "zero-out" else 2.0


def full_round_release(
    *,
    noise_multiplier: float,
    num_clients: int,
    clients_per_round: int,
    mode: str = "distributed",
    sampling: str = "fixed",
    weighted_sum: bool = True,
) -> GaussianRelease:
    """What one round with all ``clients_per_round`` replies costs its worst client.

    Distributed mode with a weighted sum: the aggregate (std ``z*C``), amplified by
    ``fixed`` or ``poisson`` sampling. Otherwise (local mode, ``predictable`` sampling, or
    no weighted sum): one Gaussian release per participation, no amplification.
    """
    _check_sampling(sampling)
    mechanism = get_mechanism(mode)
    relation = _relation(sampling)
    unit = _unit(relation)
    if mechanism.per_update or not weighted_sum:
        share = mechanism.device_noise_multiplier(noise_multiplier, cohort_size=clients_per_round)
        return GaussianRelease(share / unit, relation)
    aggregate = mechanism.device_noise_multiplier(
        noise_multiplier, cohort_size=clients_per_round
    ) * math.sqrt(clients_per_round)
    if sampling == "fixed":
        return GaussianRelease(
            aggregate / unit, relation, "fixed", num_clients, clients_per_round
        )
    if sampling == "poisson":
        return GaussianRelease(
            aggregate / unit, relation, "poisson", probability=clients_per_round / num_clients
        )
    return GaussianRelease(aggregate / unit, relation)


def epsilon_after(
    *,
    noise_multiplier: float,
    rounds: int,
    delta: float,
    num_clients: int,
    clients_per_round: int,
    mode: str = "distributed",
    sampling: str = "fixed",
    weighted_sum: bool = True,
    orders: Sequence[float] | None = None,
) -> float:
    """RDP epsilon at ``delta`` after ``rounds`` full rounds, for the worst client.

    Per-participation releases (local mode, ``predictable`` sampling, no weighted sum)
    assume a client that took part in every round.
    """
    _check_common(
        delta=delta, num_clients=num_clients, clients_per_round=clients_per_round, rounds=rounds
    )
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0.0):
        raise ValueError(f"noise_multiplier must be a finite number > 0, got {noise_multiplier!r}")
    release = full_round_release(
        noise_multiplier=noise_multiplier,
        num_clients=num_clients,
        clients_per_round=clients_per_round,
        mode=mode,
        sampling=sampling,
        weighted_sum=weighted_sum,
    )
    accountant = RdpGaussianAccountant(orders)
    accountant.compose(release, rounds)
    return accountant.get_epsilon(delta)


def noise_multiplier_for(
    target_epsilon: float,
    *,
    delta: float,
    rounds: int,
    num_clients: int,
    clients_per_round: int,
    mode: str = "distributed",
    sampling: str = "fixed",
    weighted_sum: bool = True,
    rtol: float = 1e-3,
) -> float:
    """Smallest noise multiplier (to ``rtol``) whose epsilon after ``rounds`` <= target.

    Binary search over the RDP accountant on a subset of its orders
    (:data:`CALIBRATION_ORDERS`), which over-estimates epsilon, and always returns the
    upper end of the bracket: the result never overshoots ``target_epsilon`` under the
    RDP accountant :class:`ServerPrivacy` uses (PLD, reported for Poisson sampling, is
    tighter still).

    Parameters
    ----------
    target_epsilon : float
        Budget at ``delta`` after ``rounds`` rounds (> 0).
    delta, rounds, num_clients, clients_per_round
        As in :class:`ServerPrivacy`; ``rounds`` >= 1.
    mode, sampling, weighted_sum
        As in :class:`ServerPrivacy`.
    rtol : float
        Relative width of the final bracket.
    """
    if not (math.isfinite(target_epsilon) and target_epsilon > 0.0):
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}")
    if not (0.0 < rtol < 1.0):
        raise ValueError(f"rtol must be in (0, 1), got {rtol!r}")

    def eps(z: float) -> float:
        return epsilon_after(
            noise_multiplier=z,
            rounds=rounds,
            delta=delta,
            num_clients=num_clients,
            clients_per_round=clients_per_round,
            mode=mode,
            sampling=sampling,
            weighted_sum=weighted_sum,
            orders=CALIBRATION_ORDERS,
        )

    hi = 1.0
    while eps(hi) > target_epsilon:
        hi *= 2.0
        if hi > 1e7:
            raise ValueError(f"target_epsilon {target_epsilon!r} is unreachable (noise > 1e7)")
    lo = hi / 2.0
    while eps(lo) <= target_epsilon:
        hi, lo = lo, lo / 2.0
        if lo < 1e-4:
            return hi
    while hi - lo > rtol * hi:
        mid = math.sqrt(lo * hi)
        if eps(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi


# -- the ledger --------------------------------------------------------------------------


def _check_int(name: str, value: object, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (
        hi is not None and value > hi
    ):
        bound = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be an int {bound}, got {value!r}")
    return value


def _check_client_id(value: object) -> ClientId:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"participants must be stable client ids (int or str), got {value!r}")
    return value


class ServerPrivacy:
    """Privacy ledger of a DP-FedAvg run: clip schedule and epsilon actually spent.

    Implements the accounting of McMahan et al. 2018 ("Learning Differentially Private
    Recurrent Language Models") for the sampling scheme that ran (module docstring), and
    the adaptive clip of Andrew et al. 2021 ("Differentially Private Learning with
    Adaptive Clipping") whose clip-count release is charged through the effective
    multiplier ``z`` (the update itself carries ``z_u = (z^-2 - (2 sigma_b)^-2)^(-1/2)``).

    Parameters
    ----------
    settings : DpSettings
        Parsed ``dp`` spec (mechanism, clip rule, z, rng).
    num_clients : int
        Population size n the server samples from.
    clients_per_round : int
        ``fixed``/``predictable``: cohort size m; ``poisson``: expected cohort size, so
        q = m/n.
    delta : float
        Target delta in (0, 1/num_clients).
    max_epsilon : float or None
        Budget; :meth:`can_run_round` says False before a round whose *worst case* would
        exceed it. ``None`` = no budget.
    sampling : {"fixed", "poisson", "predictable"}
        How the server draws every cohort (see the module docstring). The server must
        draw exactly so; the accountant cannot check it.
    weighted_sum : bool
        The strategy releases a weighted sum of the updates with data-independent weights
        (FedAvg with constant ``num-examples``). False (median, Krum, a user's rule):
        every participating client is charged its own update's Gaussian
        (``z/sqrt(m)`` in distributed mode, ``z`` in local mode) per participation.
    min_replies : int
        Fewest valid replies the server aggregates; the budget check assumes every other
        cohort member drops out (aggregate noise ``z*sqrt(min_replies/m)``).
    accountant : str or None
        Registered accountant that decides ``epsilon`` and the budget; default ``pld``
        for Poisson sampling, ``rdp`` otherwise. Every other registered accountant that
        supports the releases is reported alongside in :meth:`privacy_block`.
    """

    def __init__(
        self,
        settings: DpSettings,
        *,
        num_clients: int,
        clients_per_round: int,
        delta: float,
        max_epsilon: float | None,
        sampling: Sampling = "fixed",
        weighted_sum: bool = True,
        min_replies: int = 1,
        accountant: str | None = None,
    ) -> None:
        if not isinstance(settings, DpSettings):
            raise ValueError(f"settings must be DpSettings, got {type(settings).__name__}")
        _check_common(delta=delta, num_clients=num_clients, clients_per_round=clients_per_round)
        if max_epsilon is not None and not (math.isfinite(max_epsilon) and max_epsilon > 0):
            raise ValueError(
                f"max_epsilon must be None (no budget) or a finite number > 0, got {max_epsilon!r}"
            )
        _check_sampling(sampling)
        if not isinstance(weighted_sum, bool):
            raise ValueError(f"weighted_sum must be a bool, got {weighted_sum!r}")
        _check_int("min_replies", min_replies, 1, clients_per_round)
        if settings.adaptive and settings.count_noise is None:
            settings = replace(settings, count_noise=max(clients_per_round / 20.0, settings.noise))
        self.settings = settings
        self.mechanism = get_mechanism(settings.mode)
        self.clip_rule = get_clipping(settings.clipping)
        self.num_clients = num_clients
        self.clients_per_round = clients_per_round
        self.delta = delta
        self.max_epsilon = max_epsilon
        self.sampling: Sampling = sampling
        self.weighted_sum = weighted_sum
        self.min_replies = min_replies
        self.relation: Relation = _relation(sampling)
        self.update_noise_multiplier = self.clip_rule.update_noise_multiplier(settings)
        # Per-client ledger: the mechanism protects each update (local), the cohort is
        # public (predictable), or the strategy is not a weighted sum.
        self.per_client = self.mechanism.per_update or not weighted_sum or sampling == "predictable"
        default = "pld" if sampling == "poisson" else "rdp"
        self.accountant_name = accountant if accountant is not None else default
        probe = make_accountant(self.accountant_name)
        sample = full_round_release(
            noise_multiplier=settings.noise, num_clients=num_clients,
            clients_per_round=clients_per_round, mode=settings.mode, sampling=sampling,
            weighted_sum=weighted_sum,
        )
        if not probe.supports(sample):
            raise ValueError(
                f"accountant {self.accountant_name!r} does not support {sampling} sampling "
                f"with mode {settings.mode} (release {sample})"
            )
        self._clip = settings.clip
        self._sent_cohort = clients_per_round  # what the last train_config told devices
        self._rounds = 0
        self._history: list[GaussianRelease] = []  # aggregate ledger: one per round
        self._aggregate = probe
        self._clients: dict[ClientId, Counter[float]] = {}  # per-client ledger
        self._participation: Counter[ClientId] = Counter()
        self._nominal = 0.0
        self._exceeded = False
        self._by_accountant: tuple[int, dict[str, float | None]] | None = None

    # -- per round ---------------------------------------------------------------------

    @property
    def clip(self) -> float:
        """Clip norm the next round uses."""
        return self._clip

    @property
    def private(self) -> bool:
        """False when the noise is reproducible by others (``rng=seeded``)."""
        return self.settings.rng != "seeded"

    @property
    def epsilon(self) -> float:
        """Epsilon at ``delta`` spent so far; ``inf`` under ``rng=seeded``."""
        return self._nominal if self.private else math.inf

    @property
    def nominal_epsilon(self) -> float:
        """Epsilon the accounting gives if the noise is secret (equals :attr:`epsilon`
        unless ``rng=seeded``)."""
        return self._nominal

    @property
    def epsilon_json(self) -> float | None:
        """:attr:`epsilon` for JSON: ``None`` (with :attr:`epsilon_reason`) if infinite."""
        eps = self.epsilon
        return eps if math.isfinite(eps) else None

    @property
    def epsilon_reason(self) -> str | None:
        """Why :attr:`epsilon` is infinite, else ``None``."""
        return None if self.private else SEEDED_REASON

    def train_config(
        self, server_round: int, *, cohort_size: int | None = None
    ) -> dict[str, int | float | str | bool]:
        """Keys to add to the train ConfigRecord of ``server_round``.

        ``"dp"``: canonical spec (count-noise resolved), ``"dp-clip"``: current clip,
        ``"clients-per-round"``: the size of the cohort this message goes to (default
        ``clients_per_round``), from which each device sizes its share of the noise; it
        must be the real cohort so fewer devices never mean less noise than accounted.
        The message must also carry ``"server-round"`` and ``"seed"`` (``rng=seeded``).
        """
        if isinstance(server_round, bool) or not isinstance(server_round, int):
            raise ValueError(f"server_round must be an int, got {server_round!r}")
        if cohort_size is None and self.sampling == "poisson":
            raise ValueError("cohort_size is required with poisson sampling (its size varies)")
        cohort = self._cohort(cohort_size)
        self._sent_cohort = cohort
        return {
            CONFIG_DP: self.settings.to_spec(),
            CONFIG_CLIP: float(self._clip),
            CONFIG_CLIENTS_PER_ROUND: cohort,
        }

    def _cohort(self, cohort_size: int | None) -> int:
        if cohort_size is None:
            return self.clients_per_round
        return _check_int("cohort_size", cohort_size, 1, self.num_clients)

    def _noise_shares(self, cohort: int, aggregated: int, *, topped_up: bool) -> int:
        """Noise shares the accountant may count in a sum of ``aggregated`` replies.

        Each device adds the share of a cohort of ``H = ceil(honest * cohort)``; up to
        ``cohort - H`` of the replies may carry none (``honest`` in the spec). The
        client charged is honest and in the sum, so at least ``max(1, k - (c - H))``
        shares are there; a top-up restores all ``H``.
        """
        honest = self.settings.noise_cohort(cohort)
        if topped_up:
            return honest
        return max(1, aggregated - (cohort - honest))

    def _release(
        self, *, cohort: int, aggregated: int, population: int, topped_up: bool = False
    ) -> GaussianRelease:
        """What one round releases, per charged client (per-client) or in aggregate."""
        unit = _unit(self.relation)
        z = self.settings.noise
        share = self.mechanism.device_noise_multiplier(
            z, cohort_size=self.settings.noise_cohort(cohort))
        if self.mechanism.per_update or not self.weighted_sum:
            return GaussianRelease(share / unit, self.relation)
        aggregate = share * math.sqrt(self._noise_shares(cohort, aggregated,
                                                         topped_up=topped_up))
        if self.sampling == "fixed":
            return GaussianRelease(aggregate / unit, self.relation, "fixed", population, cohort)
        if self.sampling == "poisson":
            q = self.clients_per_round / self.num_clients
            return GaussianRelease(aggregate / unit, self.relation, "poisson", probability=q)
        return GaussianRelease(aggregate / unit, self.relation)

    def _client_epsilon(
        self, releases: Counter[float], accountant: str | None = None
    ) -> float:
        acc = make_accountant(accountant or self.accountant_name)
        for multiplier in sorted(releases):
            acc.compose(GaussianRelease(multiplier, self.relation), releases[multiplier])
        return acc.get_epsilon(self.delta)

    def _worst_client(self) -> Counter[float]:
        # Composed Gaussians are one Gaussian with sigma^-2 = sum sigma_r^-2 (Dong, Roth
        # & Su 2022, GDP), so the worst client is the one with the largest sum.
        worst: Counter[float] = Counter()
        worst_load = -1.0
        for releases in self._clients.values():
            load = sum(count / m**2 for m, count in releases.items())
            if load > worst_load:
                worst, worst_load = releases, load
        return worst

    def peek_epsilon(
        self,
        *,
        cohort_size: int | None = None,
        population: int | None = None,
        topped_up: bool = False,
    ) -> float:
        """Nominal epsilon after one more round in its worst case.

        The worst case: only ``min_replies`` of the cohort's replies are aggregated
        (unless the server tops the noise up, ``topped_up=True``), and, for per-client
        ledgers, the round's cohort includes the client charged most so far.
        """
        if cohort_size is None and self.sampling == "poisson":
            cohort_size = self.num_clients  # a Poisson cohort can be everyone: worst case
        cohort = self._cohort(cohort_size)
        n_r = self.num_clients if population is None else population
        _check_int("population", n_r, cohort, self.num_clients)
        release = self._release(
            cohort=cohort, aggregated=min(self.min_replies, cohort), population=n_r,
            topped_up=topped_up,
        )
        if self.per_client:
            worst = Counter(self._worst_client())
            worst[release.noise_multiplier] += 1
            return self._client_epsilon(worst)
        trial = copy.deepcopy(self._aggregate)
        trial.compose(release)
        return trial.get_epsilon(self.delta)

    def can_run_round(
        self,
        *,
        cohort_size: int | None = None,
        population: int | None = None,
        topped_up: bool = False,
    ) -> tuple[bool, str]:
        """Whether the next round stays within ``max_epsilon`` in its worst case.

        Pass the cohort the round will use (``cohort_size``; for Poisson sampling draw it
        first, else the worst case ``num_clients`` is assumed) and the number of nodes it
        is drawn from (``population``). Under ``rng=seeded`` the check uses the nominal
        epsilon.
        """
        if self.max_epsilon is None:
            return True, ""
        nxt = self.peek_epsilon(cohort_size=cohort_size, population=population,
                                topped_up=topped_up)
        if nxt > self.max_epsilon:
            return False, (
                f"privacy budget: the next round could bring epsilon to {nxt:.4g} "
                f"> max-epsilon {self.max_epsilon:g} at delta {self.delta:g} "
                f"(worst case {self.min_replies} valid "
                f"replies; spent so far {self._nominal:.4g})"
            )
        return True, ""

    def topup_std(self, aggregated: int, *, cohort_size: int | None = None) -> float:
        """Std the server may add to the *sum* of updates when replies are missing.

        Distributed mode: c devices each add ``z_u*C/sqrt(H)`` (``H = c`` unless
        ``honest < 1``); with only ``aggregated = k`` of them summed, of which
        ``c - H`` may carry no noise, the aggregate lacks
        ``z_u*C*sqrt(1 - max(1, k-(c-H))/H)``. Adding it on the
        server (trusted for the aggregate view) and passing ``topped_up=True`` to
        :meth:`end_round` keeps the accounted multiplier at z.
        """
        cohort = self._cohort(cohort_size)
        _check_int("aggregated", aggregated, 0, cohort)
        if self.mechanism.per_update:
            return 0.0
        honest = self.settings.noise_cohort(cohort)
        present = self._noise_shares(cohort, aggregated, topped_up=False) if aggregated else 0
        missing = max(0.0, (honest - present) / honest)
        return self.update_noise_multiplier * self._clip * math.sqrt(missing)

    def update_bound(self, elements: int) -> float:
        """The server's L2 bound on one accepted update of the round being collected.

        ``C + sigma (sqrt(d) + 20)`` (:func:`flowerpress.privacy.mechanisms.dp_update_bound`),
        with ``C`` the clip and ``sigma`` the noise std the last :meth:`train_config`
        asked one device for. It holds whatever a device claims; an honest update
        exceeds it with probability at most ``exp(-200)`` (docs/privacy.md).
        """
        std = device_noise_multiplier(self.settings, cohort_size=self._sent_cohort) * self._clip
        return dp_update_bound(clip=self._clip, noise_std=std, elements=elements)

    def end_round(
        self,
        participants: Sequence[ClientId],
        reply_metrics: Sequence[Mapping[str, float | int]],
        *,
        aggregated: int | None = None,
        topped_up: bool = False,
        cohort_size: int | None = None,
        population: int | None = None,
        aggregated_ids: Sequence[ClientId] | None = None,
    ) -> float:
        """Account one finished round and update the clip.

        Parameters
        ----------
        participants : sequence of int or str
            Stable ids (e.g. partition ids) of every client that was sent the round's
            train message and may have released a noised update, whether or not its
            reply arrived or was valid.
        reply_metrics : sequence of mappings
            The replies' MetricRecords; ``"dp-clip-indicator"`` drives the adaptive clip.
        aggregated : int or None
            Replies summed into the model; default ``len(participants)``. 0 when the
            model was not updated (e.g. fewer than ``min_replies``).
        topped_up : bool
            The server added :meth:`topup_std` noise to the sum.
        cohort_size : int or None
            Size of the cohort the train message went to (the ``clients-per-round`` the
            devices sized their noise by); default: the one the last
            :meth:`train_config` sent.
        population : int or None
            Number of nodes the cohort was drawn from; default ``num_clients``. A cohort
            of everyone available is not amplified.
        aggregated_ids : sequence or None
            Which participants were aggregated (``predictable`` sampling charges only
            them); default: all participants.

        Returns
        -------
        float
            Epsilon at ``delta`` spent so far (``inf`` under ``rng=seeded``).
        """
        ids = [_check_client_id(p) for p in participants]
        if len(set(ids)) != len(ids):
            raise ValueError("participants must be distinct client ids")
        cohort = self._cohort(cohort_size if cohort_size is not None else self._sent_cohort)
        if len(ids) > cohort:
            raise ValueError(f"participants ({len(ids)}) exceed cohort_size={cohort}")
        n_r = self.num_clients if population is None else population
        _check_int("population", n_r, cohort, self.num_clients)
        k = len(ids) if aggregated is None else aggregated
        _check_int("aggregated", k, 0, len(ids) if ids else 0)
        per_update = self.mechanism.per_update or not self.weighted_sum
        charged = ids
        if aggregated_ids is not None and not per_update:
            charged = [_check_client_id(i) for i in aggregated_ids]
            distinct = set(charged)
            if not distinct <= set(ids) or len(distinct) != len(charged) or len(charged) != k:
                raise ValueError(
                    f"aggregated_ids must be {k} distinct participants, got {aggregated_ids!r}"
                )
        indicators = [
            float(m[METRIC_CLIP_INDICATOR]) for m in reply_metrics if METRIC_CLIP_INDICATOR in m
        ]
        if not all(math.isfinite(b) for b in indicators):
            raise ValueError(f"{METRIC_CLIP_INDICATOR} values must be finite")
        # Validated: from here on the ledger changes.
        clip_used = self._clip
        self._rounds += 1
        # Without per-update releases, a round that aggregated nothing released nothing
        # data-dependent (dropouts are assumed independent of the private data).
        if ids and (per_update or k > 0):
            release = self._release(cohort=cohort, aggregated=k, population=n_r,
                                    topped_up=topped_up)
            if self.per_client:
                for client in charged:
                    self._clients.setdefault(client, Counter())[release.noise_multiplier] += 1
                self._nominal = self._client_epsilon(self._worst_client())
            else:
                self._aggregate.compose(release)
                self._history.append(release)
                self._nominal = self._aggregate.get_epsilon(self.delta)
        self._participation.update(ids)
        if self.max_epsilon is not None and self._nominal > self.max_epsilon:
            self._exceeded = True
        if self.clip_rule.releases_indicator:
            self._clip = self.clip_rule.next_clip(clip_used, indicators, self.settings)
        return self.epsilon

    # -- reporting and persistence -----------------------------------------------------

    def epsilons_by_accountant(self) -> dict[str, float | None]:
        """Nominal epsilon under every registered accountant that supports the releases.

        ``None`` for accountants that do not support them.
        """
        from flowerpress.privacy.registry import available_accountants

        if self._by_accountant is not None and self._by_accountant[0] == self._rounds:
            return dict(self._by_accountant[1])
        out: dict[str, float | None] = {}
        for name in available_accountants():
            try:
                if self.per_client:
                    out[name] = self._client_epsilon(self._worst_client(), name)
                else:
                    acc = make_accountant(name)
                    for release in self._history:
                        acc.compose(release)
                    out[name] = acc.get_epsilon(self.delta)
            except (ValueError, TypeError, NotImplementedError):
                out[name] = None
        self._by_accountant = (self._rounds, out)
        return dict(out)

    def privacy_block(self) -> dict[str, Any]:
        """The ``privacy`` block of results.json (valid JSON: no infinities)."""
        s = self.settings
        if self.per_client:
            unit = (
                "worst-case client: one plain Gaussian per participation, no amplification"
                + (" (per released update)" if self.mechanism.per_update or not self.weighted_sum
                   else " (aggregate of a predictable cohort)")
            )
        else:
            unit = "the aggregate, once per round, amplified by the sampling scheme"
        if not self.weighted_sum and not self.mechanism.per_update:
            unit += (
                "; the strategy is not a weighted sum, so each update, which carries only "
                "z/sqrt(m) of the noise, is charged on its own"
            )
        worst = self._worst_client()
        return {
            "mode": s.mode,
            "trust_model": self.mechanism.trust_model,
            "clipping": s.clipping,
            "clip": self._clip,
            "initial_clip": s.clip,
            "noise_multiplier": s.noise,
            "update_noise_multiplier": self.update_noise_multiplier,
            "adaptive_clipping": s.adaptive,
            "quantile": s.quantile,
            "clip_lr": s.clip_lr if s.adaptive else None,
            "count_noise": s.count_noise,
            "sampling": self.sampling,
            "sampling_description": SAMPLING_DESCRIPTIONS[self.sampling],
            "sampling_rate": self.clients_per_round / self.num_clients,
            "num_clients": self.num_clients,
            "clients_per_round": self.clients_per_round,
            "min_replies": self.min_replies,
            "weighted_sum": self.weighted_sum,
            "delta": self.delta,
            "epsilon": self.epsilon_json,
            "epsilon_reason": self.epsilon_reason,
            "nominal_epsilon": self._nominal,
            "epsilon_by_accountant": self.epsilons_by_accountant(),
            "max_epsilon": self.max_epsilon,
            "budget_exceeded": self._exceeded,
            "neighboring_relation": _RELATION_TEXT[self.relation],
            "relation": self.relation,
            "honest_fraction": s.honest,
            "trust": (
                "every client's own dp_mod clips and noises its update (its guarantee "
                "needs nothing else); "
                + ("each update carries the full noise, so no other device is trusted"
                   if self.mechanism.per_update else
                   f"the noise is sized so that ceil({s.honest:g} x cohort) devices carry "
                   "it all, and the accountant counts only that many noise shares in every "
                   "sum: any other devices may send no noise")
            ),
            "server_update_bound": (
                f"every accepted update is clipped to C + sigma (sqrt(d) + {DP_NOISE_TAIL:g}) "
                "(C the clip, sigma one device's noise std, d the model size); it binds on "
                f"an honest update with probability <= exp(-{DP_NOISE_TAIL**2 / 2:g})"
            ),
            "accountant": f"{self.accountant_name}: {self._aggregate.describe()}",
            "accounting_unit": unit,
            "rounds_accounted": self._rounds,
            "worst_client_releases": sum(worst.values()),
            "rng": s.rng,
        }

    def state_dict(self) -> dict[str, Any]:
        """The whole ledger as JSON; :meth:`load_state_dict` restores it exactly.

        Client ids keep their type (int or str): they are stored as ``[id, ...]`` pairs.
        """
        return {
            "version": _STATE_VERSION,
            "spec": self.settings.to_spec(),
            "num_clients": self.num_clients,
            "clients_per_round": self.clients_per_round,
            "delta": self.delta,
            "sampling": self.sampling,
            "weighted_sum": self.weighted_sum,
            "accountant": self.accountant_name,
            "clip": self._clip,
            "rounds": self._rounds,
            "history": [r.to_json() for r in self._history],
            "clients": [
                [client, [[m, n] for m, n in sorted(releases.items())]]
                for client, releases in self._clients.items()
            ],
            "participation": [[client, n] for client, n in self._participation.items()],
            "budget_exceeded": self._exceeded,
            "epsilon": self._nominal,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict`; refuses state of a different configuration.

        ``max_epsilon`` and ``min_replies`` may differ (a resumed run may get a new
        budget); the epsilon spent before the restart counts against it.
        """
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"privacy state: version must be {_STATE_VERSION}")
        saved = parse_dp(str(state.get("spec")))
        if saved != self.settings:
            raise ValueError(
                f"privacy state: dp spec {state.get('spec')!r} differs from this run's "
                f"{self.settings.to_spec()!r}"
            )
        for key in ("num_clients", "clients_per_round", "delta", "sampling", "weighted_sum"):
            if state.get(key) != getattr(self, key):
                raise ValueError(
                    f"privacy state: {key} {state.get(key)!r} differs from this run's "
                    f"{getattr(self, key)!r}"
                )
        if state.get("accountant") != self.accountant_name:
            raise ValueError(
                f"privacy state: accountant {state.get('accountant')!r} differs from this "
                f"run's {self.accountant_name!r}"
            )
        clip = float(state["clip"])
        if not (math.isfinite(clip) and clip > 0):
            raise ValueError(f"privacy state: clip must be > 0, got {clip!r}")
        history = [GaussianRelease.from_json(r) for r in state["history"]]
        aggregate = make_accountant(self.accountant_name)
        for release in history:  # same order as the live run: identical result
            aggregate.compose(release)
        clients: dict[ClientId, Counter[float]] = {}
        for client, releases in state["clients"]:
            clients[_check_client_id(client)] = Counter(
                {float(m): _check_int("privacy state count", n, 1) for m, n in releases}
            )
        participation: Counter[ClientId] = Counter(
            {_check_client_id(c): _check_int("privacy state count", n, 0)
             for c, n in state["participation"]}
        )
        self._history = history
        self._aggregate = aggregate
        self._clients = clients
        self._participation = participation
        self._clip = clip
        self._by_accountant = None
        self._rounds = _check_int("privacy state rounds", state["rounds"], 0)
        self._exceeded = bool(state.get("budget_exceeded", False))
        if self.per_client:
            self._nominal = self._client_epsilon(self._worst_client()) if clients else 0.0
        else:
            self._nominal = aggregate.get_epsilon(self.delta)

    def participation(self) -> dict[ClientId, int]:
        """Rounds each client was sent a train message in, by stable id."""
        return dict(self._participation)
