"""Per-round upload codec: density warm-up for top-k (Lin et al., "Deep Gradient
Compression", ICLR 2018).

DGC starts sparsification dense and tightens it exponentially over the first
epochs, so that error feedback does not start from a residual built on a
random model. Here the server rewrites the ``topk:F`` stage of the upload spec
it sends in each round's TrainInstruction: round ``r <= K`` uses density
``F ** (r / (K + 1))`` (from close to 1 down to ``F``), round ``K + 1`` on uses
``F``. The rest of the spec is sent as written; the codec stages themselves
are untouched (they live in ``flowerpress.compression``).
"""

from __future__ import annotations

import re

_TOPK = re.compile(r"(^|\+)\s*topk\s*:\s*([0-9.eE+-]+?)\s*(?=\+|$)")


def warmup_spec(spec: str, server_round: int, warmup_rounds: int) -> str:
    """The upload spec for ``server_round`` under a ``warmup_rounds`` density warm-up.

    Specs without a ``topk`` stage, and every round after the warm-up, are
    returned unchanged.
    """
    if warmup_rounds <= 0 or server_round > warmup_rounds:
        return spec
    match = _TOPK.search(spec)
    if match is None:
        return spec
    final = float(match.group(2))
    density = min(1.0, final ** (server_round / (warmup_rounds + 1)))
    return f"{spec[:match.start(2)]}{density:.6g}{spec[match.end(2):]}"
