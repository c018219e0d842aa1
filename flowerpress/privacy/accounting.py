"""Server-side privacy accounting with Google's ``dp_accounting`` (RDP).

Neighbouring federations differ in the data of one client (client-level DP) and the
server samples exactly ``clients_per_round`` of ``num_clients`` clients uniformly
without replacement each round. The matching analysis is the sampled-without-replacement
Gaussian of Wang, Balle & Kasiviswanathan 2019 (``SampledWithoutReplacementDpEvent``),
which ``dp_accounting`` only supports under the *replace-one* relation. Replacing one
client's update inside the C-ball moves the sum by up to 2C, so a noise std of ``z*C``
is a Gaussian event with multiplier ``z/2`` relative to that sensitivity.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import replace
from importlib.metadata import version
from typing import Any

import dp_accounting
import numpy as np
from dp_accounting.rdp import RdpAccountant
from dp_accounting.rdp.rdp_privacy_accountant import DEFAULT_RDP_ORDERS, compute_epsilon
from numpy.typing import NDArray

from flowerpress.privacy.mechanisms import adaptive_update_noise
from flowerpress.privacy.settings import DpSettings, parse_dp

METRIC_CLIP_INDICATOR = "dp-clip-indicator"
CONFIG_DP = "dp"
CONFIG_CLIP = "dp-clip"

SAMPLING = "fixed-size uniform without replacement"
NEIGHBORING = "replace-one client (sensitivity 2C)"
_STATE_VERSION = 1

# A subset of the accountant's orders for calibration: epsilon is a minimum over orders,
# so a subset can only over-estimate it and calibrated noise never overshoots the target.
CALIBRATION_ORDERS: tuple[float, ...] = tuple(
    float(o)
    for o in DEFAULT_RDP_ORDERS
    if o < 3.0
    or (o <= 11 and float(2 * o).is_integer())
    or o in (12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 63)
)


def _accountant(orders: Sequence[float] | None = None) -> RdpAccountant:
    return RdpAccountant(
        orders=None if orders is None else list(orders),
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE,
    )


def distributed_round_event(
    *, noise_multiplier: float, num_clients: int, clients_per_round: int
) -> dp_accounting.DpEvent:
    """DpEvent of one distributed-DP round (z relative to the clip C)."""
    return dp_accounting.SampledWithoutReplacementDpEvent(
        source_dataset_size=num_clients,
        sample_size=clients_per_round,
        event=dp_accounting.GaussianDpEvent(noise_multiplier / 2.0),
    )


def local_round_event(*, noise_multiplier: float) -> dp_accounting.DpEvent:
    """DpEvent of one local-DP release by one client: no sampling amplification."""
    return dp_accounting.GaussianDpEvent(noise_multiplier / 2.0)


@functools.lru_cache(maxsize=512)
def _event_rdp(
    mode: str, noise_multiplier: float, num_clients: int, clients_per_round: int
) -> tuple[float, ...]:
    """RDP vector (at DEFAULT_RDP_ORDERS) of one round, from dp_accounting; memoized.

    The sampled-without-replacement RDP costs ~0.3 s per evaluation and a run repeats
    the same event every round, so the server adds cached vectors exactly as
    ``RdpAccountant.compose`` does internally (``self._rdp += ...``).
    """
    if mode == "distributed":
        event = distributed_round_event(
            noise_multiplier=noise_multiplier,
            num_clients=num_clients,
            clients_per_round=clients_per_round,
        )
    else:
        event = local_round_event(noise_multiplier=noise_multiplier)
    accountant = _accountant()
    accountant.compose(event)
    return tuple(float(v) for v in accountant.rdp)


def _epsilon(rdp: NDArray[np.float64], delta: float) -> float:
    if not np.any(rdp):
        return 0.0
    return float(compute_epsilon(np.asarray(DEFAULT_RDP_ORDERS), rdp, delta)[0])


def _check_common(
    *, delta: float, num_clients: int, clients_per_round: int, rounds: int | None = None
) -> None:
    if not (0.0 < delta < 1.0):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
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
    if rounds is not None and (
        isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1
    ):
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")


def epsilon_after(
    *,
    noise_multiplier: float,
    rounds: int,
    delta: float,
    num_clients: int,
    clients_per_round: int,
    mode: str = "distributed",
    orders: Sequence[float] | None = None,
) -> float:
    """Epsilon at ``delta`` after ``rounds`` rounds with full participation.

    ``mode="local"`` gives the worst-case client that took part in every round.
    """
    _check_common(
        delta=delta, num_clients=num_clients, clients_per_round=clients_per_round, rounds=rounds
    )
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0.0):
        raise ValueError(f"noise_multiplier must be a finite number > 0, got {noise_multiplier!r}")
    if mode == "distributed":
        event = distributed_round_event(
            noise_multiplier=noise_multiplier,
            num_clients=num_clients,
            clients_per_round=clients_per_round,
        )
    elif mode == "local":
        event = local_round_event(noise_multiplier=noise_multiplier)
    else:
        raise ValueError(f"mode must be distributed or local, got {mode!r}")
    accountant = _accountant(orders)
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    return float(accountant.get_epsilon(delta))


def noise_multiplier_for(
    target_epsilon: float,
    *,
    delta: float,
    rounds: int,
    num_clients: int,
    clients_per_round: int,
    mode: str = "distributed",
    rtol: float = 1e-3,
) -> float:
    """Smallest noise multiplier (to ``rtol``) whose epsilon after ``rounds`` <= target.

    Binary search over the RDP accountant on a subset of its orders
    (:data:`CALIBRATION_ORDERS`), which over-estimates epsilon, and always returns the
    upper end of the bracket: the result never overshoots ``target_epsilon`` under the
    accountant :class:`ServerPrivacy` uses.

    Parameters
    ----------
    target_epsilon : float
        Budget at ``delta`` after ``rounds`` rounds (> 0).
    delta, rounds, num_clients, clients_per_round
        As in :class:`ServerPrivacy`; ``rounds`` >= 1.
    mode : {"distributed", "local"}
        ``local`` calibrates for a client taking part in every round.
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


class ServerPrivacy:
    """Privacy bookkeeping of a DP-FedAvg run: clip schedule and epsilon spent.

    Implements the accounting of McMahan et al. 2018 ("Learning Differentially Private
    Recurrent Language Models") for fixed-size sampling without replacement (Wang, Balle
    & Kasiviswanathan 2019), and the adaptive clip of Andrew et al. 2021 ("Differentially
    Private Learning with Adaptive Clipping") whose clip-count release is charged through
    the effective multiplier ``z`` (the update itself carries
    ``z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)``).

    Parameters
    ----------
    settings : DpSettings
        Parsed ``dp`` spec.
    num_clients : int
        Population size n the server samples from.
    clients_per_round : int
        Exact number m of clients sampled per round (uniform, without replacement).
    delta : float
        Target delta in (0, 1), e.g. 1e-5 (should be well below 1/n).
    max_epsilon : float or None
        Budget; :meth:`can_run_round` says False before a round would exceed it.
        ``None`` = no budget (run config ``max-epsilon = 0`` means None).
    """

    def __init__(
        self,
        settings: DpSettings,
        *,
        num_clients: int,
        clients_per_round: int,
        delta: float,
        max_epsilon: float | None,
    ) -> None:
        if not isinstance(settings, DpSettings):
            raise ValueError(f"settings must be DpSettings, got {type(settings).__name__}")
        _check_common(delta=delta, num_clients=num_clients, clients_per_round=clients_per_round)
        if max_epsilon is not None and not (math.isfinite(max_epsilon) and max_epsilon > 0):
            raise ValueError(
                f"max_epsilon must be None (no budget) or a finite number > 0, got {max_epsilon!r}"
            )
        if settings.adaptive and settings.count_noise is None:
            settings = replace(settings, count_noise=max(clients_per_round / 20.0, settings.noise))
        self.settings = settings
        self.num_clients = num_clients
        self.clients_per_round = clients_per_round
        self.delta = delta
        self.max_epsilon = max_epsilon
        self.update_noise_multiplier = (
            adaptive_update_noise(settings.noise, settings.count_noise)
            if settings.adaptive and settings.count_noise is not None
            else settings.noise
        )
        self._clip = settings.clip
        self._history: list[float] = []  # distributed: multiplier accounted per round
        self._participation: Counter[int] = Counter()  # local: releases per client
        self._rdp = np.zeros(len(DEFAULT_RDP_ORDERS), dtype=np.float64)  # distributed
        self._epsilon = 0.0

    # -- per round ---------------------------------------------------------------------

    @property
    def clip(self) -> float:
        """Clip norm the next round uses."""
        return self._clip

    @property
    def epsilon(self) -> float:
        """Epsilon at ``delta`` spent so far."""
        return self._epsilon

    def train_config(self, server_round: int) -> dict[str, int | float | str | bool]:
        """Keys to add to the train ConfigRecord of ``server_round``.

        ``"dp"``: canonical spec (count-noise resolved), ``"dp-clip"``: current clip.
        The message must also carry ``"server-round"``, ``"seed"`` and
        ``"clients-per-round"``.
        """
        if isinstance(server_round, bool) or not isinstance(server_round, int):
            raise ValueError(f"server_round must be an int, got {server_round!r}")
        return {CONFIG_DP: self.settings.to_spec(), CONFIG_CLIP: float(self._clip)}

    def _round_rdp(self, noise_multiplier: float) -> NDArray[np.float64]:
        return np.asarray(
            _event_rdp("distributed", noise_multiplier, self.num_clients, self.clients_per_round)
        )

    def _local_epsilon(self, releases: int) -> float:
        rdp = np.asarray(_event_rdp("local", self.settings.noise, 1, 1)) * releases
        return _epsilon(rdp, self.delta)

    def peek_epsilon(self) -> float:
        """Epsilon after one more round with all ``clients_per_round`` replies."""
        if self.settings.mode == "local":
            return self._local_epsilon(max(self._participation.values(), default=0) + 1)
        return _epsilon(self._rdp + self._round_rdp(self.settings.noise), self.delta)

    def can_run_round(self) -> tuple[bool, str]:
        """Whether the next round stays within ``max_epsilon``, and why not."""
        if self.max_epsilon is None:
            return True, ""
        nxt = self.peek_epsilon()
        if nxt > self.max_epsilon:
            return False, (
                f"privacy budget: the next round would bring epsilon to {nxt:.4g} "
                f"> max-epsilon {self.max_epsilon:g} at delta {self.delta:g} "
                f"(spent so far {self._epsilon:.4g})"
            )
        return True, ""

    def topup_std(self, aggregated: int) -> float:
        """Std the server may add to the *sum* of updates when replies are missing.

        Distributed mode: m clients each add ``z*C/sqrt(m)``; with only ``aggregated`` of
        them summed the aggregate lacks ``z*C*sqrt((m-k)/m)``. Adding it on the server
        (trusted for the aggregate view) and passing ``topped_up=True`` to
        :meth:`end_round` keeps the accounted multiplier at z.
        """
        if not (0 <= aggregated <= self.clients_per_round):
            raise ValueError(
                f"aggregated must be in [0, clients_per_round={self.clients_per_round}], "
                f"got {aggregated!r}"
            )
        if self.settings.mode == "local":
            return 0.0
        missing = (self.clients_per_round - aggregated) / self.clients_per_round
        return self.update_noise_multiplier * self._clip * math.sqrt(missing)

    def end_round(
        self,
        participants: Sequence[int],
        reply_metrics: Sequence[Mapping[str, float | int]],
        *,
        aggregated: int | None = None,
        topped_up: bool = False,
    ) -> float:
        """Account one finished round and update the adaptive clip.

        Parameters
        ----------
        participants : sequence of int
            Node ids whose privatized replies arrived this round (local mode charges each
            of them one release, including replies later rejected).
        reply_metrics : sequence of mappings
            The replies' MetricRecords; ``"dp-clip-indicator"`` (noised on the client)
            drives the adaptive clip.
        aggregated : int or None
            Replies summed into the model (distributed mode); default ``len(participants)``.
            Fewer than ``clients_per_round`` means less aggregate noise, accounted as
            ``z*sqrt(k/m)`` unless ``topped_up``.
        topped_up : bool
            The server added :meth:`topup_std` noise to the sum.

        Returns
        -------
        float
            Epsilon at ``delta`` spent so far.
        """
        k = len(participants) if aggregated is None else aggregated
        if isinstance(k, bool) or not isinstance(k, int) or not (0 <= k <= self.clients_per_round):
            raise ValueError(
                f"aggregated must be an int in [0, clients_per_round={self.clients_per_round}],"
                f" got {k!r}"
            )
        clip_used = self._clip
        if self.settings.mode == "distributed":
            if k > 0:
                z = self.settings.noise
                if not topped_up:
                    z *= math.sqrt(k / self.clients_per_round)
                self._rdp = self._rdp + self._round_rdp(z)
                self._history.append(z)
                self._epsilon = _epsilon(self._rdp, self.delta)
        else:
            self._participation.update(int(p) for p in participants)
            self._epsilon = self._local_epsilon(max(self._participation.values(), default=0))
        if self.settings.adaptive and self.settings.quantile is not None:
            indicators = [
                float(m[METRIC_CLIP_INDICATOR]) for m in reply_metrics if METRIC_CLIP_INDICATOR in m
            ]
            if indicators:
                # Andrew et al. 2021, Alg. 1: geometric update towards the target quantile.
                fraction = sum(indicators) / len(indicators)
                self._clip = clip_used * math.exp(
                    -self.settings.clip_lr * (fraction - self.settings.quantile)
                )
        return self._epsilon

    # -- reporting and persistence -----------------------------------------------------

    def privacy_block(self) -> dict[str, Any]:
        """The ``privacy`` block of results.json."""
        s = self.settings
        if s.mode == "local":
            accountant = (
                f"dp_accounting {version('dp-accounting')} RdpAccountant: GaussianDpEvent"
                "(z/2) per release, worst-case client, no amplification by sampling"
            )
        else:
            accountant = (
                f"dp_accounting {version('dp-accounting')} RdpAccountant(REPLACE_ONE): "
                "SampledWithoutReplacementDpEvent(n, m, GaussianDpEvent(z/2)) per round"
            )
        return {
            "mode": s.mode,
            "clip": self._clip,
            "initial_clip": s.clip,
            "noise_multiplier": s.noise,
            "update_noise_multiplier": self.update_noise_multiplier,
            "adaptive_clipping": s.adaptive,
            "quantile": s.quantile,
            "clip_lr": s.clip_lr if s.adaptive else None,
            "count_noise": s.count_noise,
            "sampling": SAMPLING,
            "sampling_rate": self.clients_per_round / self.num_clients,
            "num_clients": self.num_clients,
            "clients_per_round": self.clients_per_round,
            "delta": self.delta,
            "epsilon": self._epsilon,
            "max_epsilon": self.max_epsilon,
            "neighboring_relation": NEIGHBORING,
            "accountant": accountant,
            "rounds_accounted": (
                len(self._history)
                if s.mode == "distributed"
                else max(self._participation.values(), default=0)
            ),
            "rng": s.rng,
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable state; :meth:`load_state_dict` restores it exactly."""
        return {
            "version": _STATE_VERSION,
            "spec": self.settings.to_spec(),
            "num_clients": self.num_clients,
            "clients_per_round": self.clients_per_round,
            "delta": self.delta,
            "clip": self._clip,
            "history": list(self._history),
            "participation": {str(k): v for k, v in sorted(self._participation.items())},
            "epsilon": self._epsilon,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict`; refuses state of a different configuration."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"privacy state: version must be {_STATE_VERSION}")
        saved = parse_dp(str(state.get("spec")))
        if saved != self.settings:
            raise ValueError(
                f"privacy state: dp spec {state.get('spec')!r} differs from this run's "
                f"{self.settings.to_spec()!r}"
            )
        for key in ("num_clients", "clients_per_round", "delta"):
            if state.get(key) != getattr(self, key):
                raise ValueError(
                    f"privacy state: {key} {state.get(key)!r} differs from this run's "
                    f"{getattr(self, key)!r}"
                )
        clip = float(state["clip"])
        if not (math.isfinite(clip) and clip > 0):
            raise ValueError(f"privacy state: clip must be > 0, got {clip!r}")
        history = [float(z) for z in state["history"]]
        participation = Counter({int(k): int(v) for k, v in state["participation"].items()})
        rdp = np.zeros(len(DEFAULT_RDP_ORDERS), dtype=np.float64)
        for z in history:  # same order of additions as the live run: bit-identical
            rdp = rdp + self._round_rdp(z)
        self._rdp = rdp
        self._history = history
        self._participation = participation
        self._clip = clip
        if self.settings.mode == "distributed":
            self._epsilon = _epsilon(rdp, self.delta)
        else:
            self._epsilon = self._local_epsilon(max(participation.values(), default=0))
