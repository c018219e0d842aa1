"""flowerpress.compression: update codecs that shrink the bytes actually uploaded.

Public API::

    pipe = parse("topk:0.01+q:8+ef+zstd")                   # ValueError on a bad spec
    payload, state = pipe.encode(update, state, rng=rng)     # bytes, CodecState
    arrays = decode(payload, max_elements=model_size,        # list of float32 arrays
                    max_tensors=len(model))
    fp32_nbytes(update)                                      # the same update as float32

``decode`` needs no spec (the payload is self-describing and versioned),
accepts ``bytes`` or a 1-D ``uint8`` array, and raises :class:`PayloadError`
(a ``ValueError``) on anything malformed.  :class:`CodecState` holds the
error-feedback residuals and PowerSGD warm starts between rounds and round
trips through a Flower ``ArrayRecord`` (``to_record`` / ``from_record``), e.g.
``context.state["flowerpress.codec"]``.

Stages (see :mod:`flowerpress.compression.stages`): ``none``, ``fp16``,
``q:BITS``, ``sign``, ``topk:FRACTION``, ``randk:FRACTION[,unbiased]``,
``lowrank:RANK``, ``ef``, ``ef21`` (EF21: a per-device estimate the receiver
also keeps), ``flat`` (the update as one vector: global top-k; the receiver
splits it by the model's shapes), ``zstd[:LEVEL]``, and any stage registered with
:func:`register_stage`.  A user's stage subclasses :class:`ValueStage` (how
each number is written) or :class:`StructureStage` (which numbers are
sent), sets ``name`` and a ``wire_id`` in 64-255, and is registered the way
the built-ins are::

    @dataclass(frozen=True)
    class Ternary(ValueStage):
        name: ClassVar[str] = "ternary"
        wire_id: ClassVar[int | None] = 64
        def encode(self, x, w, *, rng, need_recon): ...
        @classmethod
        def decode(cls, r, count): ...

    register_stage(Ternary)
    parse("topk:0.1+ternary+ef")

The decoder keeps every bound for a user's stage: it tells the stage's
decoder how many values to produce, reads go through the bounded
:class:`Reader`, and the result's length, dtype and finiteness are checked.
"""

from flowerpress.compression.pipeline import (
    VALID_NAMES,
    Pipeline,
    decode,
    fp32_nbytes,
    parse,
)
from flowerpress.compression.registry import available_stages, register_stage
from flowerpress.compression.stages import (
    SparseRecon,
    Stage,
    StructureEncoding,
    StructureStage,
    ValueDecoder,
    ValueEncoder,
    ValueStage,
)
from flowerpress.compression.state import CodecState
from flowerpress.compression.wire import PayloadError, Reader, Writer

__all__ = [
    "VALID_NAMES",
    "CodecState",
    "PayloadError",
    "Pipeline",
    "Reader",
    "SparseRecon",
    "Stage",
    "StructureEncoding",
    "StructureStage",
    "ValueDecoder",
    "ValueEncoder",
    "ValueStage",
    "Writer",
    "available_stages",
    "decode",
    "fp32_nbytes",
    "parse",
    "register_stage",
]
