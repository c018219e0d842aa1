"""flowerpress.compression: update codecs that shrink the bytes actually uploaded.

Public API::

    pipe = parse("topk:0.01+q:8+ef+zstd")                   # ValueError on a bad spec
    payload, state = pipe.encode(update, state, rng=rng)     # bytes, CodecState
    arrays = decode(payload, max_elements=model_size)        # list of float32 arrays
    fp32_nbytes(update)                                      # the same update as float32

``decode`` needs no spec (the payload is self-describing and versioned),
accepts ``bytes`` or a 1-D ``uint8`` array, and raises :class:`PayloadError`
(a ``ValueError``) on anything malformed.  :class:`CodecState` holds the
error-feedback residuals and PowerSGD warm starts between rounds and round
trips through a Flower ``ArrayRecord`` (``to_record`` / ``from_record``), e.g.
``context.state["flowerpress.codec"]``.

Stages (see :mod:`flowerpress.compression.stages`): ``none``, ``fp16``,
``q:BITS``, ``sign``, ``topk:FRACTION``, ``randk:FRACTION[,unbiased]``,
``lowrank:RANK``, ``ef``, ``zstd[:LEVEL]``.
"""

from flowerpress.compression.pipeline import (
    VALID_NAMES,
    Pipeline,
    decode,
    fp32_nbytes,
    parse,
)
from flowerpress.compression.state import CodecState
from flowerpress.compression.wire import PayloadError

__all__ = [
    "VALID_NAMES",
    "CodecState",
    "PayloadError",
    "Pipeline",
    "decode",
    "fp32_nbytes",
    "parse",
]
