"""FedAvg and its streaming relatives: FedProx and FedAvgM."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from flowerpress.strategies.base import ConfigValue, MeanStrategy, NDArray, saturate


class FedAvg(MeanStrategy):
    """Federated Averaging: the new global is the example-weighted mean of client models.

    McMahan et al., "Communication-Efficient Learning of Deep Networks from
    Decentralized Data", AISTATS 2017, https://arxiv.org/abs/1602.05629.
    ``w_{t+1} = w_t + sum_k n_k delta_k / sum_k n_k``.
    """


class FedProx(FedAvg):
    """FedProx: FedAvg aggregation plus a proximal term in the clients' local objective.

    Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020,
    https://arxiv.org/abs/1812.06127. The server aggregates exactly like
    FedAvg; the strategy only sends ``"proximal-mu"`` to the clients, whose
    local training adds ``mu / 2 * ||w - w_global||^2`` when it is positive.

    Parameters
    ----------
    mu : float
        Proximal coefficient, ``>= 0`` (0 is FedAvg).
    """

    def __init__(self, *, mu: float = 0.01) -> None:
        if not math.isfinite(mu) or mu < 0.0:
            raise ValueError(f"mu must be finite and >= 0, got {mu!r}")
        self.mu = float(mu)

    def client_config(self, server_round: int) -> dict[str, ConfigValue]:
        """Send the proximal coefficient to the clients."""
        del server_round
        return {"proximal-mu": self.mu}


class FedAvgM(MeanStrategy):
    """FedAvg with server momentum.

    Hsu et al., "Measuring the Effects of Non-Identical Data Distribution for
    Federated Visual Classification", 2019, https://arxiv.org/abs/1909.06335.
    With the weighted mean delta ``d_t``::

        v_t     = momentum * v_{t-1} + d_t        (v_0 = d_1)
        w_{t+1} = w_t + lr * v_t

    Defaults are ``lr=1.0, momentum=0.9``, the momentum Hsu et al. use. On
    mnist with ``dirichlet:0.5`` (20 clients, 5 per round, 10 rounds) they
    reached 0.88 accuracy against FedAvg's 0.84; ``lr=0.1`` (an effective
    learning rate ``lr / (1 - momentum)`` of 1) reached only 0.66.

    Parameters
    ----------
    lr : float
        Server learning rate, ``> 0``.
    momentum : float
        Server momentum, in ``[0, 1)``.
    """

    def __init__(self, *, lr: float = 1.0, momentum: float = 0.9) -> None:
        if not math.isfinite(lr) or lr <= 0.0:
            raise ValueError(f"lr must be finite and > 0, got {lr!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        self.lr = float(lr)
        self.momentum = float(momentum)
        self._velocity: list[NDArray] | None = None

    def step(
        self, server_round: int, global_weights: list[NDArray], mean_delta: list[NDArray]
    ) -> list[NDArray]:
        """Apply one momentum step along the mean delta."""
        del server_round
        # The velocity stays within the float32 range (a huge update would
        # otherwise grow it by 1 / (1 - momentum) and overflow a checkpoint).
        if self._velocity is None:
            self._velocity = saturate(mean_delta)
        else:
            self._velocity = saturate(
                [self.momentum * v + d for v, d in zip(self._velocity, mean_delta, strict=True)]
            )
        return [g + self.lr * v for g, v in zip(global_weights, self._velocity, strict=True)]

    def state_dict(self) -> dict[str, Any]:
        """Return the momentum buffer (``None`` before the first step)."""
        velocity = None if self._velocity is None else [v.copy() for v in self._velocity]
        return {"velocity": velocity}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the momentum buffer."""
        if set(state) != {"velocity"}:
            raise ValueError(f"FedAvgM state needs key 'velocity', got {sorted(state)}")
        velocity = state["velocity"]
        self._velocity = (
            None if velocity is None else [np.array(v, dtype=np.float64) for v in velocity]
        )
