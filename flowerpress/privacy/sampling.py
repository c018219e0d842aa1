"""Draw a round's cohort exactly as the accountant analyses it.

``ServerPrivacy(sampling=...)`` accounts one scheme; drawing the cohort with
:func:`sample_cohort` and the same scheme name keeps the two from drifting apart
(Lebeda et al. 2024, "Avoiding Pitfalls for Privacy Accounting of Subsampled Mechanisms
under Composition": accounting a scheme that did not run under-reports epsilon).

- ``fixed``: ``size`` of the ids uniformly without replacement, from the OS CSPRNG
  (``secrets.SystemRandom``) unless a source is injected.
- ``poisson``: each id independently with ``probability``, from the OS CSPRNG unless
  injected; the cohort size is random (possibly 0).
- ``predictable``: ``size`` ids from a seeded numpy generator (reproducible, so the
  accountant grants no amplification).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Protocol, TypeVar

import numpy as np

from flowerpress.privacy.keys import SAMPLING_SCHEMES

T = TypeVar("T")


class RandomSource(Protocol):
    """The two methods of :class:`random.Random` the samplers use."""

    def sample(self, population: Sequence[T], k: int) -> list[T]: ...
    def random(self) -> float: ...


def sample_cohort(
    ids: Sequence[T],
    *,
    sampling: str,
    size: int | None = None,
    probability: float | None = None,
    source: RandomSource | None = None,
    rng: np.random.Generator | None = None,
) -> list[T]:
    """Return the cohort of one round, in the order of ``ids``.

    Parameters
    ----------
    ids : sequence
        Ids of the nodes available this round (the ``population`` of
        ``ServerPrivacy.end_round``).
    sampling : {"fixed", "poisson", "predictable"}
        The scheme the ledger was built with.
    size : int
        ``fixed``/``predictable``: cohort size, at most ``len(ids)``.
    probability : float
        ``poisson``: inclusion probability q in (0, 1], i.e. ``clients_per_round / num_clients``.
    source : random.Random-like or None
        ``fixed``/``poisson``: default ``secrets.SystemRandom()`` (the OS CSPRNG). Inject
        a seeded one only in tests: the accounting assumes the draw is secret.
    rng : numpy.random.Generator
        ``predictable``: the seeded generator whose draws are published.
    """
    if sampling not in SAMPLING_SCHEMES:
        raise ValueError(
            f"sampling must be one of {', '.join(SAMPLING_SCHEMES)}, got {sampling!r}"
        )
    if sampling == "poisson":
        if probability is None or not (0.0 < probability <= 1.0):
            raise ValueError(f"probability must be in (0, 1] for poisson, got {probability!r}")
        draw = source if source is not None else secrets.SystemRandom()
        return [i for i in ids if draw.random() < probability]
    if isinstance(size, bool) or not isinstance(size, int) or not (1 <= size <= len(ids)):
        raise ValueError(f"size must be an int in [1, len(ids)={len(ids)}], got {size!r}")
    if sampling == "fixed":
        draw = source if source is not None else secrets.SystemRandom()
        picked = set(draw.sample(range(len(ids)), size))
    else:
        if rng is None:
            raise ValueError("predictable sampling needs rng (the seeded generator)")
        picked = {int(i) for i in rng.choice(len(ids), size=size, replace=False)}
    return [ids[i] for i in sorted(picked)]
