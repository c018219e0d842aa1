"""Byzantine-robust batch rules: coordinate-wise median and trimmed mean, Krum, Multi-Krum.

All four ignore the clients' example weights (as in the papers: a weight is
something a Byzantine client could inflate) and are translation-equivariant,
so aggregating deltas and adding the global equals aggregating client models.
None is a weighted sum of the updates (``weighted_sum`` is ``False``), so the
server's privacy accounting does not cover them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from flowerpress.strategies.base import BatchStrategy, ClientUpdate, NDArray

logger = logging.getLogger(__name__)


def _stack(deltas: Sequence[Sequence[NDArray]], layer: int) -> NDArray:
    return np.stack([d[layer] for d in deltas]).astype(np.float64)


class Median(BatchStrategy):
    """Coordinate-wise median of the client updates.

    Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal
    Statistical Rates", ICML 2018, https://arxiv.org/abs/1803.01498.
    With an even number of updates the median is the mean of the two middle
    values (numpy's convention). One update is returned as is.
    """

    weighted_sum: ClassVar[bool] = False

    def aggregate(
        self, global_weights: list[NDArray], updates: list[ClientUpdate]
    ) -> list[NDArray]:
        """Return ``global + median_k delta_k`` coordinate by coordinate."""
        deltas = [u.delta for u in updates]
        return [g + np.median(_stack(deltas, i), axis=0) for i, g in enumerate(global_weights)]


class TrimmedMean(BatchStrategy):
    """Coordinate-wise trimmed mean of the client updates.

    Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal
    Statistical Rates", ICML 2018, https://arxiv.org/abs/1803.01498.
    For each coordinate, drop the ``floor(beta * n)`` largest and the
    ``floor(beta * n)`` smallest of the ``n`` values and average the rest.
    Because ``beta < 0.5`` at least one value always remains; with few
    updates (``beta * n < 1``) nothing is trimmed and the rule is the plain
    (unweighted) mean.

    Parameters
    ----------
    beta : float
        Fraction trimmed from each end, in ``[0, 0.5)``.
    """

    weighted_sum: ClassVar[bool] = False

    def __init__(self, *, beta: float = 0.1) -> None:
        if not 0.0 <= beta < 0.5:
            raise ValueError(f"beta must be in [0, 0.5), got {beta!r}")
        self.beta = float(beta)

    def aggregate(
        self, global_weights: list[NDArray], updates: list[ClientUpdate]
    ) -> list[NDArray]:
        """Return ``global + trimmed_mean_k delta_k`` coordinate by coordinate."""
        deltas = [u.delta for u in updates]
        n = len(deltas)
        k = math.floor(self.beta * n)
        out = []
        for i, g in enumerate(global_weights):
            values = np.sort(_stack(deltas, i), axis=0)
            out.append(g + values[k : n - k].mean(axis=0))
        return out


def krum_scores(deltas: Sequence[Sequence[NDArray]], f: int) -> NDArray:
    """Return each update's Krum score.

    The score of update ``i`` is the sum of squared L2 distances to its
    ``n - f - 2`` nearest other updates, clamped to ``[1, n - 1]`` neighbours
    when there are too few updates for the rule's guarantee (``n < 2f + 3``).

    Parameters
    ----------
    deltas : Sequence[Sequence[NDArray]]
        The round's deltas.
    f : int
        The assumed number of Byzantine clients.
    """
    n = len(deltas)
    flat = np.stack([np.concatenate([np.ravel(a) for a in d]) for d in deltas]).astype(np.float64)
    sq = np.sum(flat * flat, axis=1)
    dist = np.maximum(sq[:, None] + sq[None, :] - 2.0 * flat @ flat.T, 0.0)
    neighbours = min(max(n - f - 2, 1), n - 1)
    scores = np.zeros(n)
    for i in range(n):
        others = np.delete(dist[i], i)
        scores[i] = np.sort(others)[:neighbours].sum()
    return scores


class MultiKrum(BatchStrategy):
    """Multi-Krum: average the ``m`` updates with the lowest Krum scores.

    Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant
    Gradient Descent", NeurIPS 2017, https://papers.nips.cc/paper/6617.
    Krum's guarantee needs ``n >= 2f + 3`` updates; with fewer, the number
    of neighbours in the score is clamped to ``[1, n - 1]``, a warning is
    logged, and the rule still returns a selection (one update is returned
    as is). ``m`` is clamped to ``n``.

    Parameters
    ----------
    f : int
        Assumed number of Byzantine clients per round, ``>= 0``.
    m : int | None
        Number of updates averaged, ``>= 1``; ``None`` means ``n - f`` (the
        paper's choice), at least 1.
    """

    weighted_sum: ClassVar[bool] = False

    def __init__(self, *, f: int = 1, m: int | None = None) -> None:
        if isinstance(f, bool) or not isinstance(f, int) or f < 0:
            raise ValueError(f"f must be an int >= 0, got {f!r}")
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(f"m must be an int >= 1 or None, got {m!r}")
        self.f = f
        self.m = m
        self.last_selected: list[int] = []
        """Node ids chosen in the last aggregated round (for reports and tests)."""

    def _num_selected(self, n: int) -> int:
        m = n - self.f if self.m is None else self.m
        return min(max(m, 1), n)

    def aggregate(
        self, global_weights: list[NDArray], updates: list[ClientUpdate]
    ) -> list[NDArray]:
        """Return ``global +`` the mean of the ``m`` best-scored deltas."""
        deltas = [u.delta for u in updates]
        n = len(deltas)
        if n < 2 * self.f + 3:
            logger.warning(
                "%s: %s updates < 2f+3 = %s; Krum's robustness guarantee does not hold",
                type(self).__name__,
                n,
                2 * self.f + 3,
            )
        scores = krum_scores(deltas, self.f)
        chosen = np.argsort(scores, kind="stable")[: self._num_selected(n)]
        self.last_selected = [updates[int(i)].node_id for i in chosen]
        return [
            g + np.mean(_stack([deltas[int(j)] for j in chosen], i), axis=0)
            for i, g in enumerate(global_weights)
        ]


class Krum(MultiKrum):
    """Krum: keep the single update with the lowest Krum score.

    Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant
    Gradient Descent", NeurIPS 2017, https://papers.nips.cc/paper/6617.
    Few updates are handled as in :class:`MultiKrum`.

    Parameters
    ----------
    f : int
        Assumed number of Byzantine clients per round, ``>= 0``.
    """

    def __init__(self, *, f: int = 1) -> None:
        super().__init__(f=f, m=1)
