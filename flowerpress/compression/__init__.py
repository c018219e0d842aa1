"""flowerpress.compression: update codecs that shrink the bytes actually uploaded.

Public API::

    pipe = parse("topk:0.01+q:8+ef+zstd")
    payload, state = pipe.encode(update, state, rng=rng)   # bytes, CodecState
    arrays = decode(payload, max_elements=model_size)       # list[np.ndarray] float32

``decode`` needs no spec (the payload is self-describing and versioned) and
raises :class:`PayloadError` on anything malformed.  :class:`CodecState` round
trips through a Flower ``ArrayRecord`` (``to_record`` / ``from_record``).
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
