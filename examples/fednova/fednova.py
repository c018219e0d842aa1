"""FedNova for plain local SGD: a strategy that uses the clients' reply metrics.

Wang et al., "Tackling the Objective Inconsistency Problem in Heterogeneous
Federated Optimization", NeurIPS 2020, https://arxiv.org/abs/2007.07481.
Clients that take more local steps move further; FedAvg then drifts toward
their objectives. FedNova divides each client's change by its number of
local steps ``tau_i`` (read from the reply metric ``"local-steps"``),
averages these normalized updates with weights ``p_i`` and rescales by the
effective number of steps ``tau_eff = sum_i p_i tau_i``::

    w_{t+1} = w_t + tau_eff * sum_i p_i * delta_i / tau_i,   p_i = n_i / sum_k n_k

Run it with::

    flowerpress simulate --out runs/fednova --set strategy=examples.fednova.fednova:FedNova
"""

from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from flowerpress.strategies import ClientUpdate, NDArray, Strategy

LOCAL_STEPS = "local-steps"
"""The reply metric holding the number of local SGD steps a client took this round."""


class FedNova(Strategy):
    """FedNova with plain local SGD (Wang et al., NeurIPS 2020).

    Wang et al., "Tackling the Objective Inconsistency Problem in
    Heterogeneous Federated Optimization", NeurIPS 2020,
    https://arxiv.org/abs/2007.07481, Section 4. With plain local SGD a
    client's update after ``tau_i`` steps is ``delta_i = -lr * G_i a_i`` with
    ``a_i = [1, ..., 1]``, so the normalized gradient ``d_i = G_i a_i / ||a_i||_1``
    is ``-delta_i / (lr * tau_i)`` and the paper's server update
    ``w - tau_eff * lr * sum_i p_i d_i`` is::

        w_{t+1} = w_t + tau_eff * sum_i p_i * delta_i / tau_i
        p_i     = n_i / sum_k n_k            (the server's weight of each update)
        tau_eff = sum_i p_i * tau_i          (the paper's choice of tau_eff)

    When every client takes the same number of steps this is FedAvg.
    Memory is O(model): three running sums, folded in as updates arrive.

    Local momentum or a proximal term (FedProx) change ``a_i`` and hence
    ``||a_i||_1``; this class covers plain local SGD only.

    :attr:`weighted_sum` is ``False``: the coefficients ``p_i tau_eff / tau_i``
    come from what clients report, so the privacy accounting's weighted-mean
    assumption does not hold. Under differential privacy the replies carry no
    metrics, and :meth:`add` raises a ``ValueError`` naming ``"local-steps"``.
    """

    weighted_sum: ClassVar[bool] = False

    def begin_round(self, server_round: int, global_weights: Sequence[NDArray]) -> None:
        """Start a round: reset the running sums."""
        self.global_weights = [np.asarray(g, dtype=np.float32) for g in global_weights]
        # sum_i n_i delta_i / tau_i (float64), sum_i n_i, sum_i n_i tau_i
        self.normalized = [np.zeros(g.shape) for g in self.global_weights]
        self.weight = 0.0
        self.weighted_steps = 0.0

    def add(self, update: ClientUpdate) -> None:
        """Fold ``n_i * delta_i / tau_i`` into the running sums.

        Raises
        ------
        ValueError
            If the reply has no ``"local-steps"`` metric (always under
            differential privacy), or reports ``tau_i <= 0`` for an update of
            positive weight.
        """
        try:
            steps = update.require_metric(LOCAL_STEPS)
        except ValueError as exc:
            raise ValueError(f"FedNova needs the reply metric {LOCAL_STEPS!r}: {exc}") from None
        if update.weight == 0.0:
            return  # p_i = 0: no contribution, and tau_i may be 0 too
        if not steps > 0.0:
            raise ValueError(
                f"FedNova: node {update.node_id} reported {LOCAL_STEPS}={steps!r}, "
                f"expected > 0 for an update of weight {update.weight!r}"
            )
        for acc, d in zip(self.normalized, update.delta, strict=True):
            acc += (update.weight / steps) * np.asarray(d, dtype=np.float64)
        self.weight += update.weight
        self.weighted_steps += update.weight * steps

    def result(self) -> list[NDArray]:
        """Return ``w + tau_eff * sum_i p_i delta_i / tau_i`` (the global if nothing was added)."""
        if self.weight == 0.0:
            return [g.copy() for g in self.global_weights]
        tau_eff = self.weighted_steps / self.weight
        return [
            (g + tau_eff * acc / self.weight).astype(np.float32)
            for g, acc in zip(self.global_weights, self.normalized, strict=True)
        ]
