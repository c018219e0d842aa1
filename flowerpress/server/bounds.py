"""Server-side bounds on validated updates, applied before any strategy sees them.

:func:`bound_update_norm` is the optional per-update L2 norm bound of the run
config's ``max-update-norm`` (0 = off). Sun et al., "Can You Really Backdoor
Federated Learning?", 2019, https://arxiv.org/abs/1911.07963, show that
norm bounding limits what a few attacking devices can do to the model at
little cost in accuracy; we clip (as they do: ``delta / max(1, ||delta|| / M)``)
rather than reject, so an honest device whose early update is large still
counts, with its direction kept. Clipping an update that was already
privatized is post-processing and keeps its differential privacy.

It complements, and does not replace, robust strategies: a clipped update is
still a device's choice of direction, weighted by the ``num-examples`` it
reports (capped by ``max-client-weight``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

Weights = list[NDArray[np.float32]]

#: Elements handled at a time (bounds the temporary memory).
_CHUNK = 1 << 14


def l2_norm(update: Sequence[NDArray[np.float32]]) -> float:
    """The L2 norm of all tensors together; finite for any finite float32 input.

    Squares of float32 values up to 3.4e38 overflow float32, so each chunk is
    scaled by its largest magnitude first (``||x|| = m ||x / m||``) and the
    scaled squares summed into a float64 total. One reused float32 buffer of
    ``_CHUNK`` elements is the only temporary memory.
    """
    total = 0.0
    size = max((int(np.size(t)) for t in update), default=0)
    buffer = np.empty(min(_CHUNK, size), np.float32)
    for tensor in update:
        flat = np.asarray(tensor, dtype=np.float32).reshape(-1)
        for lo in range(0, flat.size, _CHUNK):
            chunk = buffer[:min(_CHUNK, flat.size - lo)]
            np.abs(flat[lo:lo + _CHUNK], out=chunk)
            peak = float(chunk.max())
            if peak == 0.0:
                continue
            np.multiply(chunk, np.float32(1.0 / peak), out=chunk)
            total += peak * peak * float(np.dot(chunk, chunk))
    return math.sqrt(total)


def bound_update_norm(delta: Sequence[NDArray[np.float32]], max_norm: float
                      ) -> tuple[Weights, float, bool]:
    """Clip ``delta`` to L2 norm ``max_norm`` (Sun et al. 2019); ``max_norm <= 0`` is off.

    Parameters
    ----------
    delta
        A validated update (finite float32 tensors).
    max_norm
        The bound ``M``; ``0`` (or less) returns ``delta`` unchanged.

    Returns
    -------
    tuple
        ``(delta', norm, clipped)``: the update scaled by ``min(1, M / ||delta||)``
        as new float32 arrays when clipped (the input is never modified), its
        norm before clipping (``nan`` when the bound is off and the norm was not
        computed), and whether it was scaled.

    Raises
    ------
    ValueError
        ``max_norm`` is not finite.
    """
    if not math.isfinite(max_norm):
        raise ValueError(f"max_norm must be finite, got {max_norm!r}")
    if max_norm <= 0.0:
        return list(delta), math.nan, False
    norm = l2_norm(delta)
    if norm <= max_norm:
        return list(delta), norm, False
    scale = max_norm / norm
    return [np.multiply(d, scale, dtype=np.float32) for d in delta], norm, True
