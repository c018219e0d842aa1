"""Compression stages: the public stage interfaces, the built-in stages, their wire encodings.

A pipeline has at most one *structure* stage (built-ins ``topk``, ``randk``,
``lowrank``) choosing which numbers are sent, at most one *value* stage
(built-ins ``none``, ``fp16``, ``q``, ``sign``) choosing how each number is
written, an optional ``ef`` (error feedback around the whole pipeline) and an
optional final ``zstd``.  Each is a class registered by name (and, for value
and structure stages, by wire id) in :mod:`flowerpress.compression.registry`;
a user's stage subclasses :class:`ValueStage` or :class:`StructureStage` and
registers the same way the built-ins do.

All built-in stages are deterministic functions of the (already privatized)
update and of randomness drawn from an injected generator, i.e.
post-processing in the sense of differential privacy: applied after the DP
noise they never weaken the guarantee.  None of them *adds* privacy.

The framework owns every bound when decoding: a stage's decoder is told how
many values it must produce (never more than the tensor's validated element
count), reads through the bounds-checked :class:`~flowerpress.compression.wire.Reader`,
and its result is checked (length, dtype, finiteness) before anyone sees it.

Wire encodings (little-endian) of the built-in stages::

    tensor  := ndim:u8 dims:u32*ndim struct:u8 ...
    struct 0 (dense)   := values(numel)
    struct 1 (topk)    := k:u32 b:u8 unary_len:u32 unary remainder values(k)
    struct 2 (randk)   := k:u32 seed:u64 values(k)
    struct 3 (lowrank) := rows:u32 cols:u32 rank:u16 values(rows*rank) values(cols*rank)
    values  := kind:u8 ...
    kind 0 (float32)   := f32*count
    kind 1 (float16)   := f16*count
    kind 2 (quant)     := bits:u8 block:u32 lo:f32*nblocks hi:f32*nblocks packed_codes
    kind 3 (sign)      := scale:f32 packed_sign_bits

A user stage's ``struct`` / ``kind`` byte is its registered wire id (64-255);
what follows is whatever its ``encode`` wrote.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, NamedTuple, Self

import numpy as np
import numpy.typing as npt

from flowerpress.compression.bitpack import (
    pack_uint,
    packed_nbytes,
    rice_decode_into,
    rice_encode,
    rice_max_parameter,
    seeded_indices,
    seeded_mask,
    unpack_uint,
)
from flowerpress.compression.wire import PayloadError, Reader, Writer

__all__ = [
    "EF21Stage",
    "ErrorFeedbackStage",
    "FlatStage",
    "Fp16Stage",
    "LowRankStage",
    "NoneStage",
    "QuantStage",
    "RandKStage",
    "SignStage",
    "SparseRecon",
    "Stage",
    "StructureEncoding",
    "StructureStage",
    "TopKStage",
    "ValueDecoder",
    "ValueEncoder",
    "ValueStage",
    "ZstdStage",
]

F32 = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]

#: ``put_values(x, need_recon)``: the framework's value writer handed to a
#: structure stage's ``encode``; writes the pipeline's value stage (with its
#: wire id) and returns the reconstruction when ``need_recon``.
ValueEncoder = Callable[[F32, bool], "F32 | None"]
#: ``values(count)``: the framework's bounded value reader handed to a
#: structure stage's ``decode``; returns exactly ``count`` finite float32 values
#: and raises :class:`PayloadError` if ``count`` exceeds what the tensor allows.
ValueDecoder = Callable[[int], F32]

# Value kinds and structure ids on the wire. Never renumber: decoders of older
# payloads depend on them. Ids below FIRST_USER_WIRE_ID belong to flowerpress.
KIND_F32 = 0
KIND_F16 = 1
KIND_QUANT = 2
KIND_SIGN = 3
STRUCT_DENSE = 0
STRUCT_TOPK = 1
STRUCT_RANDK = 2
STRUCT_LOWRANK = 3
#: Wire ids from here to 255 are for user stages; lower ids are reserved.
FIRST_USER_WIRE_ID = 64

#: Largest accepted low-rank rank.  Bounds the decoder's matmul to
#: ``MAX_LOWRANK_RANK * max_elements`` multiply-adds (PowerSGD uses ranks 1-32).
MAX_LOWRANK_RANK = 256
#: Elements per quantization block (one float32 ``lo``/``hi`` pair per block).
QUANT_BLOCK = 2048
# The decoder accepts blocks in [_MIN_QUANT_BLOCK, _MAX_QUANT_BLOCK]: the
# encoder always writes QUANT_BLOCK, and a floor keeps the per-block ranges of
# a hostile payload at most 1/8 of the values' size.
_MIN_QUANT_BLOCK = 64
_MAX_QUANT_BLOCK = 1 << 24
_F16_MAX = float(np.finfo(np.float16).max)
# Ranges/bounds beyond this (or scales beyond _F32_SAFE_SCALE) take the float64
# path, so nothing overflows float32 (max 3.4e38) on either side of the wire.
_F32_SAFE_RANGE = 1e38
_F32_SAFE_SCALE = 1e36
# Elements per working chunk: ~256 KiB of float32, comfortably inside L2.
_CHUNK = 1 << 16
# Largest chunk of the float64 dequantization path (only near the float32
# limits): four 64 KiB buffers, so a hostile payload taking this path costs no
# more memory than an honest one.
_F64_CHUNK = 1 << 13


# --------------------------------------------------------------------------- interfaces
@dataclass(frozen=True)
class Stage:
    """Base of every pipeline stage: a spec name, spec arguments, a canonical spec.

    Subclasses are frozen dataclasses whose fields are the spec arguments, and
    set the class attributes below.  Register a subclass with
    :func:`flowerpress.compression.register_stage` to make it usable in specs.

    Attributes
    ----------
    name
        Spec name: lower-case letters, digits, ``-`` and ``_`` (at most 32).
    wire_id
        For value and structure stages, the byte identifying the stage in a
        payload (user stages: 64-255; unique per role); ``None`` for ``ef``
        and ``zstd``, which have no per-tensor encoding.
    """

    name: ClassVar[str] = ""
    wire_id: ClassVar[int | None] = None

    @classmethod
    def from_args(cls, args: Sequence[str]) -> Self:
        """Build the stage from the spec arguments after ``NAME:`` (already stripped).

        The default accepts no arguments.  Raise ``ValueError`` naming the
        argument and its bound on bad input; the spec parser adds the stage.
        """
        if args:
            raise ValueError(f"takes no arguments, got {len(args)}")
        return cls()

    def spec(self) -> str:
        """Canonical spec fragment: ``parse`` of it builds an equal stage."""
        return self.name


@dataclass(frozen=True)
class ValueStage(Stage, ABC):
    """A stage that writes each transmitted number (public interface).

    Implement :meth:`encode` and :meth:`decode`.  The framework writes the
    stage's wire id before :meth:`encode` and reads it before :meth:`decode`;
    it passes :meth:`decode` the exact number of values to produce (already
    validated against the model), and rejects the payload unless the result
    is a finite float32 vector of that length.  Anything :meth:`decode` raises
    on bad bytes becomes a :class:`PayloadError`.

    Keep the encoding at most 4 bytes per value plus a small header: a
    ``zstd`` body is bounded by ``5 * max_elements + 64 KiB + 256 * max_tensors`` bytes.
    """

    @abstractmethod
    def encode(
        self, x: F32, w: Writer, *, rng: np.random.Generator, need_recon: bool
    ) -> F32 | None:
        """Write the flat, finite float32 vector ``x`` to ``w``.

        Draw every random number from ``rng``.  Do not modify ``x``.  If
        ``need_recon`` (error feedback is on), return what :meth:`decode` will
        produce for these bytes, as float32 of ``x.size``; otherwise ``None``.
        """

    @classmethod
    @abstractmethod
    def decode(cls, r: Reader, count: int) -> F32:
        """Read the bytes :meth:`encode` wrote for ``count`` values and return them.

        ``r`` is bounded: reading past the payload raises :class:`PayloadError`.
        Allocate nothing larger than ``count`` values (or the bytes you read);
        the framework already bounded ``count``.  Read-only views into the
        payload are fine.
        """


class SparseRecon(NamedTuple):
    """Reconstruction of a sparse tensor: flat ``indices`` and their decoded ``values``."""

    indices: IntArray
    values: F32


class StructureEncoding(NamedTuple):
    """What a structure stage's ``encode`` returns.

    Attributes
    ----------
    recon
        With error feedback: the decoded tensor, dense (float32, any shape of
        ``x.size`` elements) or as :class:`SparseRecon`; otherwise ``None``.
    warm
        State to hand back to this tensor's next ``encode`` (e.g. PowerSGD's
        ``Q``), kept in :class:`~flowerpress.compression.CodecState`; or ``None``.
    """

    recon: F32 | SparseRecon | None
    warm: F32 | None = None


@dataclass(frozen=True)
class StructureStage(Stage, ABC):
    """A stage that chooses which numbers are transmitted (public interface).

    :meth:`encode` writes its own header and sends numbers through the
    framework's ``put_values`` (the pipeline's value stage); :meth:`decode`
    reads them back through the framework's bounded ``values``.  The framework
    writes and reads the wire id, and rejects the payload unless the decoded
    tensor is finite float32 with the declared number of elements.
    """

    @abstractmethod
    def encode(
        self,
        x: F32,
        w: Writer,
        *,
        put_values: ValueEncoder,
        rng: np.random.Generator,
        need_recon: bool,
        warm: F32 | None,
    ) -> StructureEncoding | None:
        """Write the finite float32 tensor ``x`` (original shape) to ``w``.

        Return ``None`` to send this tensor dense instead (what was written to
        ``w`` is then discarded).  ``warm`` is what the previous round's call
        returned for this tensor, or ``None``.
        """

    @classmethod
    @abstractmethod
    def decode(cls, r: Reader, shape: tuple[int, ...], *, values: ValueDecoder) -> F32:
        """Read one tensor of ``shape`` and return its ``prod(shape)`` float32 values.

        ``values(count)`` reads a value section; the counts of all calls for one
        tensor may not exceed its element count.
        """


@dataclass(frozen=True)
class ErrorFeedbackStage(Stage):
    """``ef``: error feedback around the whole pipeline.

    Seide et al., 1-bit SGD, Interspeech 2014; Stich et al., "Sparsified SGD
    with Memory", NeurIPS 2018; Karimireddy et al., "Error Feedback Fixes
    SignSGD and other Gradient Compression Schemes", ICML 2019.  Encodes
    ``update + residual`` and keeps what was not transmitted as the next
    residual.  Safe after DP noise (the residual never leaves the device).
    """

    name: ClassVar[str] = "ef"


@dataclass(frozen=True)
class EF21Stage(Stage):
    """``ef21``: send the compressed change of a per-device estimate (EF21).

    Richtarik, Sokolov and Fatkhullin, "EF21: A New, Simpler, Theoretically
    Better, and Practically Faster Error Feedback", NeurIPS 2021; for partial
    participation Fatkhullin et al., "EF21 with Bells & Whistles", 2021, and
    Li and Li, "Analysis of Error Feedback in Federated Non-Convex
    Optimization with Biased Compression", ICML 2023.  The device keeps an
    estimate ``g`` of its update (in :class:`~flowerpress.compression.CodecState`),
    encodes ``c = C(update - g)`` and sets ``g += decoded(c)``; the server
    keeps the same ``g`` per device and aggregates ``g``, not ``c``
    (``flowerpress.server.estimates``).  Both sides must agree on ``g``: the
    server names the round of the estimate it holds and the device starts from
    zero when it does not hold that one.  Exclusive with ``ef``.  The
    estimate is a function of privatized updates only: safe after DP noise.
    """

    name: ClassVar[str] = "ef21"


@dataclass(frozen=True)
class FlatStage(Stage):
    """``flat``: encode the update as one vector, so the structure stage sees all of it.

    The pipeline concatenates the update's tensors (model order, C order) into
    one 1-D tensor before error feedback and the structure stage, so
    ``topk:F`` keeps the ``ceil(F * n)`` largest magnitudes of the whole
    update (global top-k, as in Shi et al., "A Distributed Synchronous SGD
    Algorithm with Global Top-k Sparsification", ICDCS 2019) instead of
    ``F`` of every tensor, and the payload carries one tensor header instead
    of one per tensor (about 250 bytes less on an 8-tensor CNN).  The decoder
    returns the one vector; the receiver, which knows the model's shapes,
    splits it (:func:`flowerpress.protocol.decode_weights`).  No wire id: a flat
    payload is an ordinary one-tensor payload.  Deterministic reshaping:
    post-processing, so safe after DP noise.
    """

    name: ClassVar[str] = "flat"


@dataclass(frozen=True)
class ZstdStage(Stage):
    """``zstd[:LEVEL]``: Zstandard (Collet & Kucherawy, RFC 8878) over the encoded body.

    Lossless, hence unbiased and trivially post-processing.  Level 1-22
    (default 3).  Marked by a flag bit in the payload header, not a wire id.
    """

    name: ClassVar[str] = "zstd"
    level: int = 3

    def __post_init__(self) -> None:
        if not isinstance(self.level, int) or not 1 <= self.level <= 22:
            raise ValueError(f"LEVEL must be in [1, 22], got {self.level!r}")

    @classmethod
    def from_args(cls, args: Sequence[str]) -> Self:
        """``zstd`` or ``zstd:LEVEL``."""
        _nargs(args, 0, 1)
        return cls(level=int(args[0])) if args else cls()

    def spec(self) -> str:
        """Canonical spec fragment."""
        return f"zstd:{self.level}"


def _nargs(args: Sequence[str], lo: int, hi: int) -> None:
    if not lo <= len(args) <= hi:
        want = str(lo) if lo == hi else f"{lo} to {hi}"
        raise ValueError(f"takes {want} argument(s), got {len(args)}")


# --------------------------------------------------------------------------- value stages
@dataclass(frozen=True)
class NoneStage(ValueStage):
    """``none``: float32 passthrough (32 bits per value).

    Unbiased and exact.  Safe after DP noise (identity is post-processing).
    """

    name: ClassVar[str] = "none"
    wire_id: ClassVar[int | None] = KIND_F32

    def encode(
        self, x: F32, w: Writer, *, rng: np.random.Generator, need_recon: bool
    ) -> F32 | None:
        """Write ``x`` as little-endian float32 (zero-copy)."""
        w.array(x.astype("<f4", copy=False))
        return x if need_recon else None

    @classmethod
    def decode(cls, r: Reader, count: int) -> F32:
        """A read-only float32 view of the payload."""
        return r.array(np.float32, count, "float values")  # type: ignore[return-value]


@dataclass(frozen=True)
class Fp16Stage(ValueStage):
    """``fp16``: round to IEEE half precision (16 bits per value).

    Round-to-nearest (Micikevicius et al., "Mixed Precision Training", ICLR
    2018): deterministic and slightly biased; values beyond +-65504 saturate
    instead of becoming infinite (error feedback recovers the excess).  Safe
    after DP noise (post-processing).
    """

    name: ClassVar[str] = "fp16"
    wire_id: ClassVar[int | None] = KIND_F16

    def encode(
        self, x: F32, w: Writer, *, rng: np.random.Generator, need_recon: bool
    ) -> F32 | None:
        """Write ``x`` as saturated little-endian float16."""
        half = np.clip(x, -_F16_MAX, _F16_MAX).astype("<f2")
        w.array(half)
        return half.astype(np.float32) if need_recon else None

    @classmethod
    def decode(cls, r: Reader, count: int) -> F32:
        """Widen the float16 values to float32."""
        return r.array(np.float16, count, "float values").astype(np.float32)


@dataclass(frozen=True)
class QuantStage(ValueStage):
    """``q:BITS``: stochastic, unbiased uniform quantization with packed codes.

    Each block of :data:`QUANT_BLOCK` values is mapped onto ``2**BITS`` evenly
    spaced levels between the block's minimum and maximum, rounding up with
    probability equal to the fractional position (QSGD, Alistarh et al.,
    NeurIPS 2017; TernGrad, Wen et al., 2017), so ``E[decode] = input``. Codes
    are bit-packed: ``BITS`` bits per value plus 64 bits per block.

    The scale is *per block*, not per tensor: a single outlier then widens the
    step of 2048 values instead of the whole tensor (less variance on heavy
    tailed updates), and the cost stays at ``64 / 2048 = 0.03`` bits per value,
    which keeps ``q:2`` above 15x.  Dither resolution is ``2**-16`` of a step
    for ``BITS <= 8`` and ``2**-24`` above, so the bias is below that.

    Unbiased; stochastic (draws from the injected generator).  Safe after DP
    noise: the quantization randomness is independent of the data, so it is
    post-processing.
    """

    name: ClassVar[str] = "q"
    wire_id: ClassVar[int | None] = KIND_QUANT
    bits: int = 8

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 16:
            raise ValueError(f"q: BITS must be an integer in [1, 16], got {self.bits!r}")

    @classmethod
    def from_args(cls, args: Sequence[str]) -> Self:
        """``q:BITS``."""
        _nargs(args, 1, 1)
        return cls(bits=int(args[0]))

    def spec(self) -> str:
        """Canonical spec fragment."""
        return f"q:{self.bits}"

    def encode(
        self, x: F32, w: Writer, *, rng: np.random.Generator, need_recon: bool
    ) -> F32 | None:
        """Quantize blockwise and write the ranges and the packed codes."""
        w.u8(self.bits)
        w.u32(QUANT_BLOCK)
        lo, hi, codes = quantize(x, self.bits, rng)
        w.array(lo.astype("<f4"))
        w.array(hi.astype("<f4"))
        if self.bits in (8, 16):
            w.array(codes.astype("<u1" if self.bits == 8 else "<u2", copy=False))
        else:
            w.raw(pack_uint(codes, self.bits))
        return dequantize(lo, hi, codes, self.bits, QUANT_BLOCK) if need_recon else None

    @classmethod
    def decode(cls, r: Reader, count: int) -> F32:
        """Validate the header and ranges, then dequantize (finite by construction)."""
        bits = r.u8("quantization bits")
        if not 1 <= bits <= 16:
            raise PayloadError(f"quantization bits {bits} outside [1, 16]")
        block = r.u32("quantization block")
        if not _MIN_QUANT_BLOCK <= block <= _MAX_QUANT_BLOCK:
            raise PayloadError(
                f"quantization block {block} outside [{_MIN_QUANT_BLOCK}, {_MAX_QUANT_BLOCK}]"
            )
        nblocks = -(-count // block)
        lo: F32 = r.array(np.float32, nblocks, "block minima")  # type: ignore[assignment]
        hi: F32 = r.array(np.float32, nblocks, "block maxima")  # type: ignore[assignment]
        if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
            raise PayloadError("non-finite quantization range")
        if np.any(lo > hi):
            raise PayloadError("quantization block with minimum above maximum")
        codes = unpack_uint(r.raw(packed_nbytes(count, bits), "quantized codes"), count, bits)
        return dequantize(lo, hi, codes, bits, block)


@dataclass(frozen=True)
class SignStage(ValueStage):
    """``sign``: scaled sign, 1 bit per value plus one float32 scale per tensor.

    Sends ``sign(x) * ||x||_1 / d`` as in EF-signSGD (Karimireddy et al.,
    "Error Feedback Fixes SignSGD and other Gradient Compression Schemes",
    ICML 2019; signSGD: Bernstein et al., ICML 2018).  Deterministic and
    *biased*: use it with ``ef``.  Safe after DP noise (post-processing).
    """

    name: ClassVar[str] = "sign"
    wire_id: ClassVar[int | None] = KIND_SIGN

    def encode(
        self, x: F32, w: Writer, *, rng: np.random.Generator, need_recon: bool
    ) -> F32 | None:
        """Write the mean magnitude and the packed sign bits."""
        scale = np.float32(np.abs(x).mean(dtype=np.float64)) if x.size else np.float32(0.0)
        packed = np.packbits(x < 0, bitorder="little")
        w.f32(float(scale))
        w.array(packed)
        # The decoder's own table expansion: bit-identical and much faster than np.where.
        return _sign_decode(packed, x.size, scale) if need_recon else None

    @classmethod
    def decode(cls, r: Reader, count: int) -> F32:
        """Expand the sign bits times the (validated) scale."""
        scale = r.f32("sign scale")
        if not (math.isfinite(scale) and scale >= 0.0):
            raise PayloadError(f"sign scale {scale} is not a finite non-negative number")
        packed = np.frombuffer(r.raw((count + 7) // 8, "sign bits"), dtype=np.uint8)
        return _sign_decode(packed, count, np.float32(scale))


# --------------------------------------------------------------------------- structure stages
def _check_fraction(stage: str, fraction: float) -> None:
    if not isinstance(fraction, float) or not (0.0 < fraction <= 1.0):
        raise ValueError(f"{stage}: FRACTION must be a float in (0, 1], got {fraction!r}")


def kept_count(fraction: float, n: int) -> int:
    """Values ``topk`` / ``randk`` keep of ``n``: ``ceil(fraction * n)`` clipped to [1, n]."""
    return min(n, max(1, math.ceil(fraction * n)))


def _sparse_result(
    idx: IntArray, vals: F32, put_values: ValueEncoder, need_recon: bool
) -> StructureEncoding:
    vrec = put_values(vals, need_recon)
    if not need_recon:
        return StructureEncoding(None)
    assert vrec is not None
    return StructureEncoding(SparseRecon(idx, vrec))


@dataclass(frozen=True)
class TopKStage(StructureStage):
    """``topk:FRACTION``: keep the ``ceil(FRACTION * n)`` largest magnitudes per tensor.

    Top-k sparsification (Aji & Heafield, EMNLP 2017; Lin et al., "Deep
    Gradient Compression", ICLR 2018; with memory: Stich et al., NeurIPS 2018).
    Selection never sorts the tensor (:func:`topk_indices`: sampled threshold,
    one comparison pass, ``argpartition`` among candidates).  Kept indices are
    gap-coded with an adaptive Rice code (about ``log2(e / FRACTION)`` bits per
    index, ~8 bits at 1%); kept values go through the value stage.

    Deterministic and *biased* (small entries are dropped): use it with ``ef``.
    Safe after DP noise: the selection looks only at the privatized values.
    """

    name: ClassVar[str] = "topk"
    wire_id: ClassVar[int | None] = STRUCT_TOPK
    fraction: float = 0.01

    def __post_init__(self) -> None:
        _check_fraction("topk", self.fraction)

    @classmethod
    def from_args(cls, args: Sequence[str]) -> Self:
        """``topk:FRACTION``."""
        _nargs(args, 1, 1)
        return cls(fraction=float(args[0]))

    def spec(self) -> str:
        """Canonical spec fragment."""
        return f"topk:{self.fraction!r}"

    def encode(
        self,
        x: F32,
        w: Writer,
        *,
        put_values: ValueEncoder,
        rng: np.random.Generator,
        need_recon: bool,
        warm: F32 | None,
    ) -> StructureEncoding | None:
        """Rice-code the top-k positions, then send their values."""
        flat = x.reshape(-1)
        n = flat.size
        k = kept_count(self.fraction, n) if n else 0
        if k >= n:
            return None
        idx = topk_indices(flat, k)
        b, unary, rem = rice_encode(idx, n)
        w.u32(k)
        w.u8(b)
        w.u32(len(unary))
        w.raw(unary)
        w.raw(rem)
        return _sparse_result(idx, flat[idx], put_values, need_recon)

    @classmethod
    def decode(cls, r: Reader, shape: tuple[int, ...], *, values: ValueDecoder) -> F32:
        """Scatter the values at the Rice-decoded positions, chunk by chunk."""
        numel = math.prod(shape)
        k = r.u32("kept count")
        if k > numel:
            raise PayloadError(f"keeps {k} of {numel} elements")
        b = r.u8("rice parameter")
        if b > rice_max_parameter(numel, k):
            raise PayloadError(
                f"rice parameter {b} outside [0, {rice_max_parameter(numel, k)}] "
                f"for {k} of {numel} indices"
            )
        unary_len = r.u32("index section length")
        unary = r.raw(unary_len, "index section")
        rem = r.raw(packed_nbytes(k, b), "index remainders")
        vals = values(k)
        dense = np.zeros(numel, dtype=np.float32)
        rice_decode_into(unary, rem, k, b, numel, dense, vals)
        return dense


@dataclass(frozen=True)
class RandKStage(StructureStage):
    """``randk:FRACTION[,unbiased]``: keep a uniform random ``ceil(FRACTION * n)`` subset.

    Random-k sparsification (Stich et al., "Sparsified SGD with Memory",
    NeurIPS 2018; Wangni et al., NeurIPS 2018).  The subset is derived from a
    64-bit seed drawn from the injected generator, so only the seed travels
    (no index bytes).  Without ``unbiased`` it is biased (scaled by ``k/n`` in
    expectation) and meant for ``ef``; with ``unbiased`` kept values are
    multiplied by ``n / k`` so ``E[decode] = input`` (higher variance; avoid
    combining that with ``ef``).  Safe after DP noise: the subset is independent
    of the data.
    """

    name: ClassVar[str] = "randk"
    wire_id: ClassVar[int | None] = STRUCT_RANDK
    fraction: float = 0.01
    unbiased: bool = False

    def __post_init__(self) -> None:
        _check_fraction("randk", self.fraction)

    @classmethod
    def from_args(cls, args: Sequence[str]) -> Self:
        """``randk:FRACTION`` or ``randk:FRACTION,unbiased``."""
        _nargs(args, 1, 2)
        if len(args) == 2 and args[1] not in ("unbiased", "biased"):
            raise ValueError(f"second argument must be 'unbiased', got {args[1]!r}")
        return cls(fraction=float(args[0]), unbiased=list(args[1:]) == ["unbiased"])

    def spec(self) -> str:
        """Canonical spec fragment."""
        return f"randk:{self.fraction!r}" + (",unbiased" if self.unbiased else "")

    def encode(
        self,
        x: F32,
        w: Writer,
        *,
        put_values: ValueEncoder,
        rng: np.random.Generator,
        need_recon: bool,
        warm: F32 | None,
    ) -> StructureEncoding | None:
        """Send a seed and the values at the positions it derives."""
        flat = x.reshape(-1)
        n = flat.size
        k = kept_count(self.fraction, n) if n else 0
        if k >= n:
            return None
        seed = int(rng.integers(0, 1 << 63))
        idx = seeded_indices(seed, n, k)
        w.u32(k)
        w.u64(seed)
        vals = flat[idx]
        if self.unbiased:
            with np.errstate(over="ignore"):
                vals = (vals * np.float32(n / k)).astype(np.float32)
            if not np.isfinite(vals).all():
                raise ValueError(
                    f"randk unbiased: overflows float32 after scaling by n/k = {n / k:g}"
                )
        return _sparse_result(idx, vals, put_values, need_recon)

    @classmethod
    def decode(cls, r: Reader, shape: tuple[int, ...], *, values: ValueDecoder) -> F32:
        """Re-derive the support from the seed (as a mask) and scatter the values."""
        numel = math.prod(shape)
        k = r.u32("kept count")
        if k > numel:
            raise PayloadError(f"keeps {k} of {numel} elements")
        seed = r.u64("random-k seed")
        mask = seeded_mask(seed, numel, k)
        vals = values(k)
        dense = np.zeros(numel, dtype=np.float32)
        dense[mask] = vals
        return dense


@dataclass(frozen=True)
class LowRankStage(StructureStage):
    """``lowrank:RANK``: PowerSGD rank-``RANK`` approximation of each tensor.

    One warm-started power iteration per round (Vogels et al., "PowerSGD:
    Practical Low-Rank Gradient Compression for Distributed Optimization",
    NeurIPS 2019): a tensor is viewed as ``(shape[0], numel / shape[0])``,
    ``P = orth(M Q)``, ``Q = M^T P``, and ``P``, ``Q`` are sent through the
    value stage; ``Q`` is kept in :class:`CodecState` as the next warm start.
    Tensors with fewer than 2 dims, or where ``(rows + cols) * RANK >= rows *
    cols``, pass through dense.  Exact on matrices of rank ``<= RANK``.

    The first round's ``Q`` is standard normal from the injected generator;
    later rounds are deterministic given the warm start.  *Biased*: use it
    with ``ef``.  Safe after DP noise (post-processing of the privatized
    update).
    """

    name: ClassVar[str] = "lowrank"
    wire_id: ClassVar[int | None] = STRUCT_LOWRANK
    rank: int = 4

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or not 1 <= self.rank <= MAX_LOWRANK_RANK:
            raise ValueError(
                f"lowrank: RANK must be an integer in [1, {MAX_LOWRANK_RANK}], got {self.rank!r}"
            )

    @classmethod
    def from_args(cls, args: Sequence[str]) -> Self:
        """``lowrank:RANK``."""
        _nargs(args, 1, 1)
        return cls(rank=int(args[0]))

    def spec(self) -> str:
        """Canonical spec fragment."""
        return f"lowrank:{self.rank}"

    def matrix_shape(self, shape: tuple[int, ...]) -> tuple[int, int] | None:
        """``(rows, cols)`` if this tensor is compressed, ``None`` if it passes through."""
        if len(shape) < 2:
            return None
        rows = shape[0]
        numel = math.prod(shape)
        if rows == 0:
            return None
        cols = numel // rows
        if (rows + cols) * self.rank >= rows * cols:
            return None
        return rows, cols

    def encode(
        self,
        x: F32,
        w: Writer,
        *,
        put_values: ValueEncoder,
        rng: np.random.Generator,
        need_recon: bool,
        warm: F32 | None,
    ) -> StructureEncoding | None:
        """One warm-started PowerSGD iteration (``None``: dense, e.g. on overflow).

        ``P = orth(M Q)`` goes through the value stage first and ``Q = M^T
        P_hat`` is computed from the *transmitted* ``P_hat``, so the second
        factor absorbs the quantization error of the first (Vogels et al.
        2019, Algorithm 1, with one worker).
        """
        mshape = self.matrix_shape(x.shape)
        if mshape is None:
            return None
        rows, cols = mshape
        m = x.reshape(mshape)
        rank = self.rank
        q = warm
        if q is None or q.shape != (cols, rank):
            q = rng.standard_normal((cols, rank), dtype=np.float32)
        with np.errstate(all="ignore"):
            p = m @ q
            if not np.isfinite(p).all():
                return None  # only near the float32 overflow limit
            p = np.ascontiguousarray(np.linalg.qr(p)[0], dtype=np.float32)
            w.u32(rows)
            w.u32(cols)
            w.u16(rank)
            p_hat = put_values(p.ravel(), True)
            assert p_hat is not None
            p_hat2 = p_hat.reshape(rows, rank)
            q_new = np.ascontiguousarray(m.T @ p_hat2, dtype=np.float32)
            if not np.isfinite(q_new).all():
                return None
            q_hat = put_values(q_new.ravel(), True)
            assert q_hat is not None
            recon = np.asarray(p_hat2 @ q_hat.reshape(cols, rank).T, dtype=np.float32)
            if not np.isfinite(recon).all():
                return None
        return StructureEncoding(recon if need_recon else None, q_new)

    @classmethod
    def decode(cls, r: Reader, shape: tuple[int, ...], *, values: ValueDecoder) -> F32:
        """Multiply the two factors (at most ``MAX_LOWRANK_RANK`` multiply-adds per element)."""
        numel = math.prod(shape)
        rows = r.u32("rows")
        cols = r.u32("cols")
        rank = r.u16("rank")
        if len(shape) < 2 or rows != shape[0] or rows * cols != numel:
            raise PayloadError(f"low-rank factors {rows}x{cols} do not match shape {shape}")
        if not 1 <= rank <= MAX_LOWRANK_RANK or (rows + cols) * rank >= numel:
            raise PayloadError(f"low-rank rank {rank} invalid for a {rows}x{cols} matrix")
        p = values(rows * rank).reshape(rows, rank)
        q = values(cols * rank).reshape(cols, rank)
        with np.errstate(all="ignore"):
            prod = np.ascontiguousarray(p @ q.T, dtype=np.float32)
        if not np.isfinite(prod).all():  # finite factors can still overflow
            raise PayloadError("non-finite value in the low-rank product")
        return prod.reshape(-1)


# --------------------------------------------------------------------------- helpers
def topk_indices(flat: F32, k: int) -> npt.NDArray[np.int64]:
    """Sorted positions of the ``k`` largest magnitudes (ties broken arbitrarily).

    No full sort: a threshold is estimated from a strided sample (as in Deep
    Gradient Compression, Lin et al. 2018), candidates at or above it are
    gathered with one comparison pass, and ``argpartition`` (introselect, O(n))
    picks exactly ``k`` among them.  If the estimate leaves fewer than ``k``
    candidates it falls back to ``argpartition`` over the whole tensor, so the
    result is always the exact top-k.
    """
    n = flat.size
    if n >= 1 << 16 and 8 * k < n:
        stride = max(1, n // (1 << 15))
        sample = np.abs(flat[::stride])
        m = sample.size
        # Aim for ~1.5x k candidates (plus slack for small k) to survive sampling noise.
        keep = min(m, math.ceil(1.5 * k * m / n) + 16)
        thr = np.partition(sample, m - keep)[m - keep]
        # Two comparisons instead of |x| >= thr: no full-size float temporary.
        cand = np.flatnonzero((flat >= thr) | (flat <= -thr))
        if k <= cand.size <= 8 * k:
            mag = np.abs(flat[cand])
            sel = cand[np.argpartition(mag, cand.size - k)[cand.size - k :]]
            return np.sort(sel).astype(np.int64)
    return np.sort(np.argpartition(np.abs(flat), n - k)[n - k :]).astype(np.int64)


# --------------------------------------------------------------------------- value codecs
def _f32_safe(lo: F32, hi: F32) -> bool:
    """Whether ``lo + code * step`` can be evaluated in float32 without overflow."""
    if lo.size == 0:
        return True
    span = float((hi.astype(np.float64) - lo.astype(np.float64)).max())
    bound = max(float(np.abs(lo).max()), float(np.abs(hi).max()))
    return span <= _F32_SAFE_RANGE and bound <= _F32_SAFE_RANGE


def _quant_chunk_into(
    seg: F32,
    levels: int,
    rng: np.random.Generator,
    lo: F32,
    hi: F32,
    codes: npt.NDArray[np.unsignedinteger],
    scratch: F32,
) -> None:
    """Quantize a ``(blocks, block_len)`` chunk, writing ``lo``, ``hi`` and ``codes`` in place."""
    np.min(seg, axis=1, out=lo)
    np.max(seg, axis=1, out=hi)
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        raise ValueError("contains NaN or Inf; expected finite values")
    span = hi.astype(np.float64) - lo.astype(np.float64)
    scale64 = np.divide(levels, span, out=np.zeros_like(span), where=span > 0)
    safe = _f32_safe(lo, hi)
    if levels <= 255 and safe and float(scale64.max()) * 65536.0 <= _F32_SAFE_SCALE:
        # Fast path, 6 passes: work in units of 2**-16 of a step and add a
        # 16-bit dither drawn from the generator's raw words (4 per word).
        # floor(t + u) with u uniform on {0, 1/65536, ...} rounds up with
        # probability frac(t) to within 2**-16; grid points (integer t) stay
        # exact because j * 65536 + 65535 < 2**24 is exact in float32.
        t32 = scratch[: seg.size].reshape(seg.shape)
        np.subtract(seg, lo[:, None], out=t32)
        t32 *= (scale64 * 65536.0).astype(np.float32)[:, None]
        raw = np.asarray(rng.bit_generator.random_raw((t32.size + 3) // 4), dtype=np.uint64)
        np.add(t32, raw.view(np.uint16)[: t32.size].reshape(t32.shape), out=t32)
        t32 *= np.float32(2.0**-16)
        np.minimum(t32, levels, out=t32)
        np.copyto(codes, t32, casting="unsafe")  # truncation == floor, since t >= 0
        return
    t: npt.NDArray[np.floating]
    if safe and float(scale64.max()) <= _F32_SAFE_SCALE:
        t = scratch[: seg.size].reshape(seg.shape)
        np.subtract(seg, lo[:, None], out=t)
        t *= scale64.astype(np.float32)[:, None]
    else:
        t = (seg.astype(np.float64) - lo.astype(np.float64)[:, None]) * scale64[:, None]
    np.minimum(t, levels, out=t)
    np.copyto(codes, t, casting="unsafe")  # truncation == floor, since t >= 0
    t -= codes  # fractional part in [0, 1)
    if levels <= 255:
        raw = np.asarray(rng.bit_generator.random_raw((t.size + 3) // 4), dtype=np.uint64)
        dither = raw.view(np.uint16)[: t.size].reshape(t.shape)
        t *= 65536.0
        codes += dither < t
    else:
        codes += rng.random(t.shape, dtype=np.float32) < t


def quantize(
    x: F32, bits: int, rng: np.random.Generator, block: int = QUANT_BLOCK
) -> tuple[F32, F32, npt.NDArray[np.unsignedinteger]]:
    """Stochastically quantize a flat float32 vector blockwise (see :class:`QuantStage`).

    Works through the vector in cache-sized chunks of whole blocks so the
    dozen elementwise passes stay in L2 instead of streaming from memory.

    Raises
    ------
    ValueError
        If ``x`` contains NaN or Inf.
    """
    n = x.size
    levels = (1 << bits) - 1
    code_dtype: type[np.unsignedinteger] = np.uint8 if bits <= 8 else np.uint16
    nblocks = -(-n // block)
    lo = np.empty(nblocks, dtype=np.float32)
    hi = np.empty(nblocks, dtype=np.float32)
    codes = np.empty(n, dtype=code_dtype)
    step = max(1, _CHUNK // block)
    scratch = np.empty(min(n, step * block), dtype=np.float32)
    for b0 in range(0, nblocks, step):
        b1 = min(nblocks, b0 + step)
        e0, e1 = b0 * block, min(n, b1 * block)
        if e1 - e0 == (b1 - b0) * block:
            shape = (b1 - b0, block)
            _quant_chunk_into(
                x[e0:e1].reshape(shape), levels, rng, lo[b0:b1], hi[b0:b1],
                codes[e0:e1].reshape(shape), scratch,
            )
        else:  # full blocks of this chunk, then the short tail block
            full = b1 - 1
            if full > b0:
                shape = (full - b0, block)
                f1 = full * block
                _quant_chunk_into(
                    x[e0:f1].reshape(shape), levels, rng, lo[b0:full], hi[b0:full],
                    codes[e0:f1].reshape(shape), scratch,
                )
            tail = (1, e1 - full * block)
            _quant_chunk_into(
                x[full * block : e1].reshape(tail), levels, rng, lo[full:b1], hi[full:b1],
                codes[full * block : e1].reshape(tail), scratch,
            )
    return lo, hi, codes


def dequantize(
    lo: F32, hi: F32, codes: npt.NDArray[np.unsignedinteger], bits: int, block: int
) -> F32:
    """Map codes back to values: ``lo + code * (hi - lo) / (2**bits - 1)`` per block.

    Shared by the encoder (for the error-feedback reconstruction) and the
    decoder, so both produce bit-identical values.
    """
    n = codes.size
    levels = (1 << bits) - 1
    out = np.empty(n, dtype=np.float32)
    if n == 0:
        return out
    step64 = (hi.astype(np.float64) - lo.astype(np.float64)) / levels
    if not _f32_safe(lo, hi):
        # Near the float32 limits: evaluate in float64 (stays within [lo, hi]),
        # a chunk at a time in four reused buffers.  A payload picks this path
        # with a single huge block minimum; fresh float64 temporaries of _CHUNK
        # elements per chunk (about 2 MB) made such a reply peak at 3x a
        # 200k-parameter model (issue 12).  Now only ``out`` and the per-block
        # arrays (at most 1/64 of the elements) scale with the tensor.
        lo64 = lo.astype(np.float64)
        # Chunks of at most _F64_CHUNK and at most 1/8 of the tensor (32 buffer
        # bytes per element of a chunk), so the buffers stay below ``out``.
        m = min(n, _F64_CHUNK, max(256, n // 8))
        ramp = np.arange(m, dtype=np.int64)
        bidx = np.empty(m, dtype=np.int64)
        acc = np.empty(m, dtype=np.float64)
        base = np.empty(m, dtype=np.float64)
        for e0 in range(0, n, m):
            e1 = min(n, e0 + m)
            c = e1 - e0
            bi, a, b = bidx[:c], acc[:c], base[:c]
            np.add(ramp[:c], e0, out=bi)
            bi //= block
            np.take(step64, bi, out=a)
            np.multiply(codes[e0:e1], a, out=a)
            np.take(lo64, bi, out=b)
            np.add(b, a, out=a)  # lo + code * step, the same float64 operations as before
            np.copyto(out[e0:e1], a, casting="same_kind")
        return out
    step32 = step64.astype(np.float32)
    nblocks = lo.size
    chunk = max(1, _CHUNK // block)
    for b0 in range(0, nblocks, chunk):
        b1 = min(nblocks, b0 + chunk)
        e0, e1 = b0 * block, min(n, b1 * block)
        nfull = (e1 - e0) // block
        if nfull:
            f1 = e0 + nfull * block
            o2 = out[e0:f1].reshape(nfull, block)
            np.multiply(
                codes[e0:f1].reshape(nfull, block),
                step32[b0 : b0 + nfull, None],
                out=o2,
                dtype=np.float32,
            )
            o2 += lo[b0 : b0 + nfull, None]
        if e0 + nfull * block < e1:
            t0, bt = e0 + nfull * block, b0 + nfull
            o1 = out[t0:e1]
            np.multiply(codes[t0:e1], step32[bt], out=o1, dtype=np.float32)
            o1 += lo[bt]
    return out


_BYTE_BITS = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little")
_BYTE_BITS.setflags(write=False)


def _sign_decode(packed: npt.NDArray[np.uint8], count: int, scale: np.float32) -> F32:
    """Expand packed sign bits with a 256-entry table (one gather per byte)."""
    table = np.where(_BYTE_BITS.astype(bool), -scale, scale).astype(np.float32)
    return np.take(table, packed, axis=0).reshape(-1)[:count]


