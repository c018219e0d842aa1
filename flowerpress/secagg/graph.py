"""SecAgg+'s communication graph: who shares keys and masks with whom.

Bell et al. (CCS 2020) replace SecAgg's complete graph by a random k-regular
graph with ``k = O(log n)``, so each device does O(log n) key agreements and
shares instead of O(n). Here the graph is a Harary (circulant) graph on a
permutation of the cohort drawn from the round's public seed: node ``i`` of
the permutation is joined to the ``k/2`` nodes on each side. It is k-regular
and connected; the random permutation keeps the server from choosing the
neighbourhoods (it is derived from the seed every device sees).

``degree=0`` (the default) picks the complete graph for cohorts up to
:data:`COMPLETE_UP_TO` devices, the original SecAgg (Bonawitz et al. CCS 2017),
where one device's neighbourhood is the whole cohort; larger cohorts get
``k = 2 * ceil(3 * log2 n)`` neighbours (40 for 100 devices), capped at
``n - 1``. With a majority of each neighbourhood as the share threshold, a
cohort of 100 losing 30 % of its devices leaves a given neighbourhood of 41
without a majority with probability about 1e-4 (hypergeometric tail); losing
20 % it cannot. Bell et al.'s Table 2 gives the ``k`` their security statement needs
for a given corruption and dropout rate; set ``degree`` to it when that
statement matters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

COMPLETE_UP_TO = 30


def default_degree(n: int) -> int:
    """The neighbourhood size used when ``degree=0``: complete up to 30 devices."""
    if n <= COMPLETE_UP_TO:
        return n - 1
    return min(2 * math.ceil(3 * math.log2(n)), n - 1)


def communication_graph(nodes: Sequence[int], *, degree: int, seed: int
                        ) -> dict[int, tuple[int, ...]]:
    """Each node's neighbours (sorted, itself excluded) in a k-regular graph.

    ``degree`` is rounded up to an even number (a circulant graph on an odd
    count is k-regular for even k); ``degree >= n - 1`` gives the complete graph.

    Raises
    ------
    ValueError
        Repeated node ids or ``degree < 1`` with more than one node.
    """
    if len(set(nodes)) != len(nodes):
        raise ValueError("node ids repeat")
    n = len(nodes)
    if n == 0:
        return {}
    if degree < 1 and n > 1:
        raise ValueError(f"degree={degree} must be >= 1")
    if degree >= n - 1:
        return {v: tuple(sorted(u for u in nodes if u != v)) for v in nodes}
    half = (degree + 1) // 2
    order = [sorted(nodes)[i] for i in np.random.default_rng([seed, 7]).permutation(n)]
    out: dict[int, set[int]] = {v: set() for v in nodes}
    for i, v in enumerate(order):
        for step in range(1, half + 1):
            u = order[(i + step) % n]
            out[v].add(u)
            out[u].add(v)
    return {v: tuple(sorted(out[v])) for v in nodes}
