"""Privacy accounting of the distributed discrete Gaussian under secure aggregation.

Server-side only (it imports ``dp_accounting``); a device never loads it.

Per round, the server releases the sum of ``n`` survivors' vectors, each
carrying independent discrete Gaussian noise N_Z(0, sigma**2) (integer units,
after rotation and scaling). Kairouz, Liu and Steinke (ICML 2021, Theorem 1)
show that the sum of ``n`` such noises, on an input of L2 sensitivity
``Delta_2`` in ``d`` dimensions, is ``eps**2 / 2``-concentrated DP with::

    tau = 10 * sum_{k=1}^{n-1} exp(-2 pi**2 sigma**2 k / (k + 1))
    eps = min( sqrt(Delta_2**2 / (n sigma**2) + tau d / 2),
               Delta_2 / sqrt(n sigma**2) + tau sqrt(d) )

``tau`` is the slack between a sum of discrete Gaussians and one discrete
Gaussian of variance ``n sigma**2``. ``Delta_2`` is the bound that conditional
randomized rounding enforces on one device's rounded vector
(:func:`flowerpress.secagg.encoding.rounded_norm_bound`), so discretization is
accounted; modular wrap-around is post-processing of the released sum (it
costs utility, bounded by ``BETA_MOD`` per round, not privacy).

Rounds compose as zCDP (``rho`` adds up); ``dp_accounting``'s RDP accountant
turns the total ``ZCDpEvent(rho)`` into ``(epsilon, delta)``. No amplification
by sampling is claimed: the cohort is sampled by the server, which is the
adversary this mode protects against.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import dp_accounting
from dp_accounting.rdp import RdpAccountant

from flowerpress.secagg.encoding import make_plan
from flowerpress.secagg.settings import SecAggSettings


def ddg_epsilon(*, l2: float, variance: float, summands: int, dim: int) -> float:
    """The concentrated-DP ``eps`` of one release (Kairouz et al. 2021, Theorem 1).

    Raises
    ------
    ValueError
        ``variance < 1/4`` (the theorem needs sigma >= 1/2) or no summands.
    """
    if variance < 0.25 or summands < 1:
        raise ValueError(f"the theorem needs sigma >= 1/2 and n >= 1 (variance={variance}, "
                         f"n={summands})")
    tau = 10 * sum(math.exp(-2 * math.pi ** 2 * variance * k / (k + 1))
                   for k in range(1, summands))
    total = summands * variance
    return min(math.sqrt(l2 * l2 / total + tau * dim / 2),
               l2 / math.sqrt(total) + tau * math.sqrt(dim))


class SecAggLedger:
    """The privacy ledger of a secure-aggregation run with distributed discrete Gaussian noise.

    Implements what the round loop asks of a ledger
    (``flowerpress.server.loop.PrivacyLedger``).
    """

    def __init__(self, settings: SecAggSettings, *, dim: int, randk: float | None,
                 delta: float, max_epsilon: float | None = None) -> None:
        if settings.noise <= 0:
            raise ValueError("SecAggLedger needs secagg noise > 0")
        if not 0 < delta < 1:
            raise ValueError(f"delta={delta} must be in (0, 1)")
        self.settings, self.dim, self.randk = settings, dim, randk
        self.delta, self.max_epsilon = delta, max_epsilon
        self.rhos: list[float] = []
        self._last_cohort: int | None = None

    def round_rho(self, cohort: int, summands: int) -> float:
        """``rho`` of one round of ``cohort`` devices whose sum holds ``summands`` of them."""
        s = self.settings
        plan = make_plan(dim=self.dim, bits=s.bits, clip=s.clip, noise=s.noise, cohort=cohort,
                         min_summands=s.min_summands(cohort), seed=0, randk=self.randk)
        eps = ddg_epsilon(l2=plan.norm_bound, variance=float(plan.local_variance),
                          summands=summands, dim=plan.padded)
        return eps * eps / 2

    def _epsilon(self, rho: float) -> float:
        if rho <= 0:
            return 0.0
        accountant = RdpAccountant()
        accountant.compose(dp_accounting.ZCDpEvent(rho))
        return float(accountant.get_epsilon(self.delta))

    #: The cohort is drawn from the run's seeded generator: no amplification is claimed.
    sampling = "predictable"
    #: The noise is secret (the devices' OS CSPRNG).
    private = True

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far."""
        return self._epsilon(sum(self.rhos))

    @property
    def epsilon_json(self) -> float | None:
        """:attr:`epsilon` for results.json."""
        return self.epsilon

    @property
    def nominal_epsilon(self) -> float:
        """The same as :attr:`epsilon` (the noise is never seeded)."""
        return self.epsilon

    def train_config(self, server_round: int, *,
                     cohort_size: int | None = None) -> dict[str, int | float | str | bool]:
        """Nothing to add: the noise settings travel in the secagg spec."""
        del server_round, cohort_size
        return {}

    def can_run_round(self, *, cohort_size: int | None = None,
                      population: int | None = None) -> tuple[bool, str]:
        """False once one more round (with the fewest survivors) would pass max-epsilon."""
        del population
        cohort = cohort_size if cohort_size is not None else self._last_cohort
        if self.max_epsilon is None or cohort is None:
            return True, ""
        worst = self.round_rho(cohort, self.settings.min_summands(cohort))
        after = self._epsilon(sum(self.rhos) + worst)
        if after > self.max_epsilon:
            return False, (f"another round would spend epsilon {after:.3g} > max-epsilon="
                           f"{self.max_epsilon:g}")
        return True, ""

    def end_round(self, participants: Sequence[int | str],
                  reply_metrics: Sequence[Mapping[str, float | int]], *,
                  aggregated: int | None = None, cohort_size: int | None = None,
                  population: int | None = None) -> float:
        """Charge the round's release (nothing if the round was skipped); epsilon so far."""
        del reply_metrics, cohort_size, population
        cohort = len(participants)
        self._last_cohort = cohort
        if aggregated:
            self.rhos.append(self.round_rho(cohort, aggregated))
        return self.epsilon

    def privacy_block(self) -> dict[str, Any]:
        """The privacy section of results.json."""
        s = self.settings
        return {
            "mechanism": "distributed discrete Gaussian under secure aggregation (SecAgg+)",
            "noise_multiplier": s.noise, "clip": s.clip, "bits": s.bits,
            "threshold": s.threshold, "accountant": "zCDP (Kairouz, Liu, Steinke 2021, Thm 1)"
            " composed, converted with dp_accounting RDP", "sampling": "no amplification "
            "claimed", "delta": self.delta, "rho": sum(self.rhos), "epsilon": self.epsilon,
            "trust_model": "honest-but-curious server sees only the sum of the survivors; "
            "noise shares of colluding devices do not count",
            # Theorem 1 is applied with Delta_2 = the norm bound of ONE device's rounded
            # vector: the sums compared differ by that vector being there or not.
            "relation": "zero-out",
            "neighboring_relation": "zero-out client: its vector replaced by zero, i.e. "
            "added to or removed from the sum (sensitivity Delta_2, one device's rounded "
            "norm bound); under replace-one the sensitivity would be 2 Delta_2",
        }

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs."""
        return {"rhos": list(self.rhos), "last_cohort": self._last_cohort}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`state_dict`."""
        self.rhos = [float(r) for r in state.get("rhos", [])]
        last = state.get("last_cohort")
        self._last_cohort = None if last is None else int(last)
