"""Adaptive server optimizers: FedAdagrad, FedAdam, FedYogi.

Reddi et al., "Adaptive Federated Optimization", ICLR 2021,
https://arxiv.org/abs/2003.00295, Algorithm 2. The server pseudo-gradient is
the example-weighted mean delta ``d_t``::

    m_t     = beta1 * m_{t-1} + (1 - beta1) * d_t
    v_t     = v_{t-1} + d_t^2                                     (FedAdagrad)
    v_t     = v_{t-1} - (1 - beta2) * d_t^2 * sign(v_{t-1} - d_t^2)   (FedYogi)
    v_t     = beta2 * v_{t-1} + (1 - beta2) * d_t^2              (FedAdam)
    w_{t+1} = w_t + lr * m_t / (sqrt(v_t) + tau)

with ``m_0 = 0`` and ``v_0 = tau^2`` as in the paper (no Adam bias
correction; Flower's FedAdam adds one, so the two differ in early rounds).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from flowerpress.strategies.base import FLOAT32_MAX, MeanStrategy, NDArray, saturate


def _check(lr: float, beta1: float, beta2: float | None, tau: float) -> None:
    if not math.isfinite(lr) or lr <= 0.0:
        raise ValueError(f"lr must be finite and > 0, got {lr!r}")
    if not 0.0 <= beta1 < 1.0:
        raise ValueError(f"beta1 must be in [0, 1), got {beta1!r}")
    if beta2 is not None and not 0.0 <= beta2 < 1.0:
        raise ValueError(f"beta2 must be in [0, 1), got {beta2!r}")
    if not math.isfinite(tau) or tau <= 0.0:
        raise ValueError(f"tau must be finite and > 0, got {tau!r}")


class _FedOpt(MeanStrategy):
    """Shared moment bookkeeping; subclasses define the second-moment update."""

    def __init__(self, *, lr: float, beta1: float, beta2: float, tau: float) -> None:
        self.lr = float(lr)
        self.beta1 = float(beta1)
        self.beta2 = float(beta2)
        self.tau = float(tau)
        self._m: list[NDArray] | None = None
        self._v: list[NDArray] | None = None

    def _second_moment(self, v: NDArray, d2: NDArray) -> NDArray:
        raise NotImplementedError

    def step(
        self, server_round: int, global_weights: list[NDArray], mean_delta: list[NDArray]
    ) -> list[NDArray]:
        """Apply one adaptive step along the mean delta."""
        del server_round
        if self._m is None or self._v is None:
            self._m = [np.zeros_like(d) for d in mean_delta]
            self._v = [np.full_like(d, self.tau**2) for d in mean_delta]
        # Moments stay within the float32 range: m is a convex combination of
        # deltas; v sums squares, which exceed it once |d| > 1.8e19 (never for
        # an honest update) and would overflow a float32 checkpoint.
        self._m = saturate([
            self.beta1 * m + (1.0 - self.beta1) * d
            for m, d in zip(self._m, mean_delta, strict=True)
        ])
        self._v = [
            np.minimum(self._second_moment(v, np.minimum(d * d, FLOAT32_MAX)), FLOAT32_MAX)
            for v, d in zip(self._v, mean_delta, strict=True)
        ]
        return [
            g + self.lr * m / (np.sqrt(v) + self.tau)
            for g, m, v in zip(global_weights, self._m, self._v, strict=True)
        ]

    def state_dict(self) -> dict[str, Any]:
        """Return the first and second moments (``None`` before the first step)."""

        def copy(xs: list[NDArray] | None) -> list[NDArray] | None:
            return None if xs is None else [x.copy() for x in xs]

        return {"m": copy(self._m), "v": copy(self._v)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the moments."""
        if set(state) != {"m", "v"}:
            raise ValueError(
                f"{type(self).__name__} state needs keys ['m', 'v'], got {sorted(state)}"
            )
        if (state["m"] is None) != (state["v"] is None):
            raise ValueError(f"{type(self).__name__} state: 'm' and 'v' must both be set")

        def load(xs: Any) -> list[NDArray] | None:
            return None if xs is None else [np.array(x, dtype=np.float64) for x in xs]

        self._m, self._v = load(state["m"]), load(state["v"])


class FedAdagrad(_FedOpt):
    """Adagrad on the server (Reddi et al. 2021, Algorithm 2, FedAdagrad).

    Adagrad sums squared pseudo-gradients without decay, so there is no
    ``beta2``.

    Parameters
    ----------
    lr : float
        Server learning rate ``eta``, ``> 0``.
    beta1 : float
        First-moment decay, in ``[0, 1)``.
    tau : float
        Degree of adaptivity ``tau``, ``> 0``.
    """

    def __init__(self, *, lr: float = 0.01, beta1: float = 0.0, tau: float = 1e-3) -> None:
        _check(lr, beta1, None, tau)
        super().__init__(lr=lr, beta1=beta1, beta2=0.0, tau=tau)

    def _second_moment(self, v: NDArray, d2: NDArray) -> NDArray:
        return v + d2


class _DecayingFedOpt(_FedOpt):
    """FedAdam and FedYogi: a decaying second moment, hence a ``beta2``.

    Parameters
    ----------
    lr : float
        Server learning rate ``eta``, ``> 0``.
    beta1 : float
        First-moment decay, in ``[0, 1)``.
    beta2 : float
        Second-moment decay, in ``[0, 1)``.
    tau : float
        Degree of adaptivity ``tau``, ``> 0``.
    """

    def __init__(
        self, *, lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
    ) -> None:
        _check(lr, beta1, beta2, tau)
        super().__init__(lr=lr, beta1=beta1, beta2=beta2, tau=tau)


class FedAdam(_DecayingFedOpt):
    """Adam on the server (Reddi et al. 2021, Algorithm 2, FedAdam).

    Arguments as :class:`_DecayingFedOpt`: ``lr``, ``beta1``, ``beta2``, ``tau``.
    """

    def _second_moment(self, v: NDArray, d2: NDArray) -> NDArray:
        return self.beta2 * v + (1.0 - self.beta2) * d2


class FedYogi(_DecayingFedOpt):
    """Yogi on the server (Reddi et al. 2021, Algorithm 2, FedYogi).

    Arguments as :class:`_DecayingFedOpt`: ``lr``, ``beta1``, ``beta2``, ``tau``.
    """

    def _second_moment(self, v: NDArray, d2: NDArray) -> NDArray:
        result: NDArray = v - (1.0 - self.beta2) * d2 * np.sign(v - d2)
        return result
