"""Compression stages: value codecs, structure codecs, and their wire encodings.

A pipeline has at most one *structure* stage (``topk``, ``randk``, ``lowrank``)
choosing which numbers are sent, at most one *value* stage (``none``, ``fp16``,
``q``, ``sign``) choosing how each number is written, an optional ``ef`` flag
(error feedback around the whole pipeline) and an optional final ``zstd``.

All stages are deterministic functions of the (already privatized) update and
of randomness drawn from an injected generator, i.e. post-processing in the
sense of differential privacy: applied after the DP noise they never weaken
the guarantee.  None of them *adds* privacy.

Wire encodings (little-endian) written by this module::

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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import numpy.typing as npt

from flowerpress.compression.bitpack import (
    pack_uint,
    packed_nbytes,
    unpack_uint,
)
from flowerpress.compression.wire import PayloadError, Reader, Writer

F32 = npt.NDArray[np.float32]

# Value kinds and structure ids on the wire. Never renumber: decoders of older
# payloads depend on them. New kinds get new numbers and a version bump.
KIND_F32 = 0
KIND_F16 = 1
KIND_QUANT = 2
KIND_SIGN = 3
STRUCT_DENSE = 0
STRUCT_TOPK = 1
STRUCT_RANDK = 2
STRUCT_LOWRANK = 3

#: Largest accepted low-rank rank.  Bounds the decoder's matmul to
#: ``MAX_LOWRANK_RANK * max_elements`` multiply-adds (PowerSGD uses ranks 1-32).
MAX_LOWRANK_RANK = 256
#: Elements per quantization block (one float32 ``lo``/``hi`` pair per block).
QUANT_BLOCK = 2048
_MAX_QUANT_BLOCK = 1 << 24
_F16_MAX = float(np.finfo(np.float16).max)
# Ranges/bounds beyond this (or scales beyond _F32_SAFE_SCALE) take the float64
# path, so nothing overflows float32 (max 3.4e38) on either side of the wire.
_F32_SAFE_RANGE = 1e38
_F32_SAFE_SCALE = 1e36
# Elements per working chunk: ~256 KiB of float32, comfortably inside L2.
_CHUNK = 1 << 16


# --------------------------------------------------------------------------- value stages
@dataclass(frozen=True)
class ValueStage:
    """Base class of the stages that write each transmitted number."""

    name: ClassVar[str] = ""

    def spec(self) -> str:
        """Canonical spec fragment."""
        return self.name


@dataclass(frozen=True)
class NoneStage(ValueStage):
    """``none``: float32 passthrough (32 bits per value).

    Unbiased and exact.  Safe after DP noise (identity is post-processing).
    """

    name: ClassVar[str] = "none"


@dataclass(frozen=True)
class Fp16Stage(ValueStage):
    """``fp16``: round to IEEE half precision (16 bits per value).

    Round-to-nearest (Micikevicius et al., "Mixed Precision Training", ICLR
    2018): deterministic and slightly biased; values beyond +-65504 saturate
    instead of becoming infinite (error feedback recovers the excess).  Safe
    after DP noise (post-processing).
    """

    name: ClassVar[str] = "fp16"


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
    bits: int = 8

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 16:
            raise ValueError(f"q: BITS must be an integer in [1, 16], got {self.bits!r}")

    def spec(self) -> str:
        """Canonical spec fragment."""
        return f"q:{self.bits}"


@dataclass(frozen=True)
class SignStage(ValueStage):
    """``sign``: scaled sign, 1 bit per value plus one float32 scale per tensor.

    Sends ``sign(x) * ||x||_1 / d`` as in EF-signSGD (Karimireddy et al.,
    "Error Feedback Fixes SignSGD and other Gradient Compression Schemes",
    ICML 2019; signSGD: Bernstein et al., ICML 2018).  Deterministic and
    *biased*: use it with ``ef``.  Safe after DP noise (post-processing).
    """

    name: ClassVar[str] = "sign"


# --------------------------------------------------------------------------- structure stages
@dataclass(frozen=True)
class StructureStage:
    """Base class of the stages choosing which numbers are transmitted."""

    name: ClassVar[str] = ""

    def spec(self) -> str:
        """Canonical spec fragment."""
        raise NotImplementedError


def _check_fraction(stage: str, fraction: float) -> None:
    if not isinstance(fraction, float) or not (0.0 < fraction <= 1.0):
        raise ValueError(f"{stage}: FRACTION must be a float in (0, 1], got {fraction!r}")


def kept_count(fraction: float, n: int) -> int:
    """Values ``topk`` / ``randk`` keep of ``n``: ``ceil(fraction * n)`` clipped to [1, n]."""
    return min(n, max(1, math.ceil(fraction * n)))


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
    fraction: float = 0.01

    def __post_init__(self) -> None:
        _check_fraction("topk", self.fraction)

    def spec(self) -> str:
        """Canonical spec fragment."""
        return f"topk:{self.fraction!r}"


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
    fraction: float = 0.01
    unbiased: bool = False

    def __post_init__(self) -> None:
        _check_fraction("randk", self.fraction)

    def spec(self) -> str:
        """Canonical spec fragment."""
        return f"randk:{self.fraction!r}" + (",unbiased" if self.unbiased else "")


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
    rank: int = 4

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or not 1 <= self.rank <= MAX_LOWRANK_RANK:
            raise ValueError(
                f"lowrank: RANK must be an integer in [1, {MAX_LOWRANK_RANK}], got {self.rank!r}"
            )

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
        # Near the float32 limits: evaluate in float64 (stays within [lo, hi]).
        idx = np.arange(n) // block
        out[:] = lo.astype(np.float64)[idx] + codes * step64[idx]
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


def encode_values(
    stage: ValueStage, x: F32, w: Writer, rng: np.random.Generator, need_recon: bool
) -> F32 | None:
    """Write a flat float32 vector with ``stage``; return its reconstruction if asked."""
    if isinstance(stage, QuantStage):
        w.u8(KIND_QUANT)
        w.u8(stage.bits)
        w.u32(QUANT_BLOCK)
        lo, hi, codes = quantize(x, stage.bits, rng)
        w.array(lo.astype("<f4"))
        w.array(hi.astype("<f4"))
        if stage.bits in (8, 16):
            w.array(codes.astype("<u1" if stage.bits == 8 else "<u2", copy=False))
        else:
            w.raw(pack_uint(codes, stage.bits))
        return dequantize(lo, hi, codes, stage.bits, QUANT_BLOCK) if need_recon else None
    if isinstance(stage, SignStage):
        w.u8(KIND_SIGN)
        scale = np.float32(np.abs(x).mean(dtype=np.float64)) if x.size else np.float32(0.0)
        packed = np.packbits(x < 0, bitorder="little")
        w.f32(float(scale))
        w.array(packed)
        # The decoder's own table expansion: bit-identical and much faster than np.where.
        return _sign_decode(packed, x.size, scale) if need_recon else None
    if isinstance(stage, Fp16Stage):
        w.u8(KIND_F16)
        half = np.clip(x, -_F16_MAX, _F16_MAX).astype("<f2")
        w.array(half)
        return half.astype(np.float32) if need_recon else None
    if isinstance(stage, NoneStage):
        w.u8(KIND_F32)
        w.array(x.astype("<f4", copy=False))
        return x if need_recon else None
    raise TypeError(f"unknown value stage {stage!r}")  # pragma: no cover


_BYTE_BITS = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little")
_BYTE_BITS.setflags(write=False)


def _sign_decode(packed: npt.NDArray[np.uint8], count: int, scale: np.float32) -> F32:
    """Expand packed sign bits with a 256-entry table (one gather per byte)."""
    table = np.where(_BYTE_BITS.astype(bool), -scale, scale).astype(np.float32)
    return np.take(table, packed, axis=0).reshape(-1)[:count]


def decode_values(r: Reader, count: int) -> F32:
    """Read one ``values`` section of ``count`` elements (see module docstring).

    The result is always finite: float sections are checked, and quantized and
    sign sections are finite by construction once their scales are validated
    (quantized values stay within their block's finite ``[lo, hi]``).
    """
    kind = r.u8("value kind")
    if kind in (KIND_F32, KIND_F16):
        dtype = np.float32 if kind == KIND_F32 else np.float16
        raw = r.array(dtype, count, "float values")
        if not np.isfinite(raw).all():
            raise PayloadError("non-finite value")
        return raw.astype(np.float32)
    if kind == KIND_QUANT:
        bits = r.u8("quantization bits")
        if not 1 <= bits <= 16:
            raise PayloadError(f"quantization bits {bits} outside [1, 16]")
        block = r.u32("quantization block")
        if not 1 <= block <= _MAX_QUANT_BLOCK:
            raise PayloadError(f"quantization block {block} outside [1, {_MAX_QUANT_BLOCK}]")
        nblocks = -(-count // block)
        lo = r.array(np.float32, nblocks, "block minima").astype(np.float32)
        hi = r.array(np.float32, nblocks, "block maxima").astype(np.float32)
        if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
            raise PayloadError("non-finite quantization range")
        if np.any(lo > hi):
            raise PayloadError("quantization block with minimum above maximum")
        codes = unpack_uint(r.raw(packed_nbytes(count, bits), "quantized codes"), count, bits)
        return dequantize(lo, hi, codes, bits, block)
    if kind == KIND_SIGN:
        scale = r.f32("sign scale")
        if not (math.isfinite(scale) and scale >= 0.0):
            raise PayloadError(f"sign scale {scale} is not a finite non-negative number")
        packed = np.frombuffer(r.raw((count + 7) // 8, "sign bits"), dtype=np.uint8)
        return _sign_decode(packed, count, np.float32(scale))
    raise PayloadError(f"unknown value kind {kind}")
