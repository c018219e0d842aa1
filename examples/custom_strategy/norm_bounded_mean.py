"""A custom aggregation rule in one file: the norm-bounded mean.

Each update is scaled down to L2 norm ``max_norm`` if it is longer, then the
updates are averaged by weight (Sun et al., "Can You Really Backdoor Federated
Learning?", 2019, https://arxiv.org/abs/1911.07963). Run it with::

    flowerpress simulate --out runs/nbm \
        --set strategy=examples.custom_strategy.norm_bounded_mean:NormBoundedMean:max_norm=5
"""

from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from flowerpress.strategies import ClientUpdate, NDArray, Strategy


class NormBoundedMean(Strategy):
    """Weighted mean of client updates clipped to L2 norm ``max_norm`` (Sun et al. 2019)."""

    # Not sum_k w_k delta_k / sum_k w_k: the server rescales each delta first,
    # so the privacy accounting's weighted-sum assumption does not hold.
    weighted_sum: ClassVar[bool] = False

    def __init__(self, *, max_norm: float = 5.0) -> None:
        if not max_norm > 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm!r}")
        self.max_norm = max_norm

    def begin_round(self, server_round: int, global_weights: Sequence[NDArray]) -> None:
        self.global_weights = [np.asarray(g, dtype=np.float32) for g in global_weights]
        self.total = [np.zeros(g.shape) for g in self.global_weights]  # float64 running sum
        self.weight = 0.0

    def add(self, update: ClientUpdate) -> None:
        norm = np.sqrt(sum(np.sum(np.square(d, dtype=np.float64)) for d in update.delta))
        scale = min(1.0, self.max_norm / norm) if norm > 0 else 1.0
        for acc, d in zip(self.total, update.delta, strict=True):
            acc += update.weight * scale * d
        self.weight += update.weight

    def result(self) -> list[NDArray]:
        if self.weight == 0:
            return [g.copy() for g in self.global_weights]
        return [
            (g + acc / self.weight).astype(np.float32)
            for g, acc in zip(self.global_weights, self.total, strict=True)
        ]
