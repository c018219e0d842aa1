"""Vectorized bit packing, Rice coding of index gaps, and seeded index sampling.

Everything here works on whole arrays (no per-element Python loops).  Decoders
validate every count they are given against the bytes available and the
caller's bounds before allocating.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

from flowerpress.compression.wire import PayloadError

__all__ = [
    "pack_uint",
    "packed_nbytes",
    "rice_decode",
    "rice_decode_into",
    "rice_encode",
    "rice_max_parameter",
    "seeded_indices",
    "seeded_mask",
    "unpack_uint",
]

UIntArray = npt.NDArray[np.unsignedinteger]

# Values per chunk in the general-width bit packer (a multiple of 8).
_BIT_CHUNK = 1 << 15
# Unary-section bytes per Rice decoding run (<= 8x as many indices).
_RICE_CHUNK_BYTES = 1 << 11
IntArray = npt.NDArray[np.int64]


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes taken by ``count`` values of ``bits`` bits each, densely packed."""
    return (count * bits + 7) // 8


def pack_uint(values: npt.NDArray[np.integer], bits: int) -> bytes:
    """Pack unsigned integers below ``2**bits`` into a little-endian bit stream.

    Value ``i`` occupies bits ``[i*bits, (i+1)*bits)`` of the stream, least
    significant bit first.  ``bits`` must be in ``[0, 32]``.
    """
    if not 0 <= bits <= 32:
        raise ValueError(f"bits must be in [0, 32], got {bits}")
    flat = np.asarray(values).ravel()
    if bits == 0 or flat.size == 0:
        return b""
    if bits == 8:
        return flat.astype(np.uint8, copy=False).tobytes()
    if bits == 16:
        return flat.astype("<u2", copy=False).tobytes()
    if bits == 32:
        return flat.astype("<u4", copy=False).tobytes()
    if bits == 1:
        return np.packbits(flat.astype(np.uint8, copy=False), bitorder="little").tobytes()
    if bits == 4:
        # Pairs of code bytes as one little-endian uint16, folded with a shift:
        # contiguous passes instead of strided ones.
        v = flat.astype(np.uint8, copy=False)
        if v.size % 2:
            v = np.concatenate([v, np.zeros(1, dtype=np.uint8)])
        word = v.view("<u2")
        folded: npt.NDArray[np.uint16] = word | (word >> np.uint16(4))
        return folded.astype(np.uint8).tobytes()
    if bits == 2:
        v = flat.astype(np.uint8)
        pad = (-v.size) % 4
        if pad:
            v = np.concatenate([v, np.zeros(pad, dtype=np.uint8)])
        v4 = v.reshape(-1, 4)
        out = v4[:, 0].copy()
        for j in range(1, 4):  # 3 vectorized passes, not per element
            out |= v4[:, j] << np.uint8(2 * j)
        return out.tobytes()
    # General width: expand chunks to a bit matrix and let packbits do the work.
    # Chunks hold a multiple of 8 values so each one ends on a byte boundary,
    # and keep the bit-matrix temporaries small.
    shifts = np.arange(bits, dtype=np.uint32)
    parts = []
    for c0 in range(0, flat.size, _BIT_CHUNK):
        wide = flat[c0 : c0 + _BIT_CHUNK].astype(np.uint32)
        bitmat = ((wide[:, None] >> shifts) & np.uint32(1)).astype(np.uint8)
        parts.append(np.packbits(bitmat.ravel(), bitorder="little").tobytes())
    return b"".join(parts)


def unpack_uint(data: bytes | memoryview, count: int, bits: int) -> UIntArray:
    """Inverse of :func:`pack_uint`; ``data`` must be exactly the packed size.

    Returns ``uint8`` for ``bits <= 8``, ``uint16`` for ``bits <= 16`` and
    ``uint32`` otherwise.
    """
    if not 0 <= bits <= 32:
        raise PayloadError(f"bit width {bits} outside [0, 32]")
    if len(data) != packed_nbytes(count, bits):
        raise PayloadError(
            f"packed section has {len(data)} bytes, expected {packed_nbytes(count, bits)}"
        )
    out_dtype = np.uint8 if bits <= 8 else (np.uint16 if bits <= 16 else np.uint32)
    if bits == 0 or count == 0:
        return np.zeros(count, dtype=out_dtype)
    buf = np.frombuffer(data, dtype=np.uint8)
    if bits == 8:
        return buf  # read-only view of the payload; callers only read it
    if bits == 16:  # read-only views too: no copy of the payload
        out16: UIntArray = np.frombuffer(data, dtype="<u2")
        return out16
    if bits == 32:
        out32: UIntArray = np.frombuffer(data, dtype="<u4")
        return out32
    if bits in (1, 2, 4):
        # One gather per packed byte from a table of little-endian words whose
        # bytes are the unpacked values (far faster than fancy 2-D indexing).
        return np.take(_UNPACK_TABLES[bits], buf).view(np.uint8)[:count]
    weights = np.left_shift(np.uint32(1), np.arange(bits, dtype=np.uint32))
    out: UIntArray = np.empty(count, dtype=out_dtype)
    chunk_bytes = _BIT_CHUNK * bits // 8
    for c0 in range(0, count, _BIT_CHUNK):
        m = min(_BIT_CHUNK, count - c0)
        b0 = (c0 // _BIT_CHUNK) * chunk_bytes
        piece = buf[b0 : b0 + chunk_bytes]
        bitmat = np.unpackbits(piece, count=m * bits, bitorder="little").reshape(m, bits)
        out[c0 : c0 + m] = bitmat.astype(np.uint32) @ weights
    return out


def _unpack_table(bits: int) -> npt.NDArray[np.unsignedinteger]:
    """Entry ``b`` is a word whose bytes are the ``8 // bits`` values packed in byte ``b``."""
    per = 8 // bits
    shifts = (np.arange(per, dtype=np.uint8) * np.uint8(bits)).astype(np.uint8)
    table = (np.arange(256, dtype=np.uint8)[:, None] >> shifts) & np.uint8((1 << bits) - 1)
    word = {2: "<u2", 4: "<u4", 8: "<u8"}[per]
    out = np.ascontiguousarray(table, dtype=np.uint8).view(word).reshape(256)
    out.setflags(write=False)
    return out


_UNPACK_TABLES = {b: _unpack_table(b) for b in (1, 2, 4)}


def _rice_cost(gaps: IntArray, b: int) -> int:
    return int(np.sum(gaps >> b)) + gaps.size * (b + 1)


def rice_encode(indices: IntArray, n: int) -> tuple[int, bytes, bytes]:
    """Gap-code strictly increasing ``indices`` in ``[0, n)`` with a Rice code.

    Gaps ``g_i = idx_i - idx_{i-1} - 1`` (with ``idx_{-1} = -1``) are split into
    a unary quotient ``g >> b`` and a ``b``-bit remainder; ``b`` is chosen to
    minimize the exact size.  For the geometric gaps of a random support this is
    within a few percent of the entropy (about ``log2(e / fraction)`` bits per
    index), versus 32 bits for a plain int32 index.

    Returns
    -------
    tuple
        ``(b, unary_bytes, remainder_bytes)``.  Quotients are stored as
        ``q`` zero bits followed by a one bit, LSB-first.
    """
    k = int(indices.size)
    if k == 0:
        return 0, b"", b""
    gaps = np.diff(indices, prepend=np.int64(-1)) - 1
    centre = _rice_centre(n, k)
    candidates = range(max(0, centre - 2), rice_max_parameter(n, k) + 1)
    b = min(candidates, key=lambda c: _rice_cost(gaps, c))
    q = gaps >> b
    ends = np.cumsum(q + 1) - 1
    unary = np.zeros(int(ends[-1]) + 1, dtype=np.uint8)
    unary[ends] = 1
    rem = gaps & ((1 << b) - 1)
    return b, np.packbits(unary, bitorder="little").tobytes(), pack_uint(rem, b)


def rice_max_unary_nbytes(n: int, k: int, b: int) -> int:
    """Largest unary section a valid encoding of ``k`` of ``n`` indices can need."""
    return ((n >> b) + k + 7) // 8 + 1


def _unpack_range(buf: npt.NDArray[np.uint8], j0: int, m: int, b: int) -> IntArray:
    """Values ``j0 .. j0+m-1`` of a stream of ``b``-bit fields (``0 < b <= 32``).

    Gathers the (at most 5) bytes under each field into a 64-bit word and
    shifts: a few ``8 m``-byte temporaries, whatever ``b`` is.
    """
    off = np.arange(j0, j0 + m, dtype=np.int64) * b
    byte = off >> 3
    last = buf.size - 1
    word = np.zeros(m, dtype=np.uint64)
    for t in range((b + 14) // 8):
        # Bytes past the end only feed bits above the field, which the mask drops.
        word |= buf[np.minimum(byte + t, last)].astype(np.uint64) << np.uint64(8 * t)
    word >>= (off & 7).astype(np.uint64)
    word &= np.uint64((1 << b) - 1)
    return word.astype(np.int64)


def rice_max_parameter(n: int, k: int) -> int:
    """Largest Rice parameter :func:`rice_encode` may choose for ``k`` of ``n`` indices.

    The decoder rejects larger ones: a hostile ``b`` would only inflate the
    remainder section (up to 31 bits per index) without encoding anything new.
    """
    return min(31, _rice_centre(n, k) + 3)


def _rice_centre(n: int, k: int) -> int:
    if k <= 0:
        return 0
    mean_gap = max((n - k) / k, 1e-9)
    return max(0, int(math.log2(mean_gap * math.log(2) + 1e-12)) if mean_gap > 1 else 0)


def _rice_runs(
    unary: bytes | memoryview, remainder: bytes | memoryview, k: int, b: int, n: int
) -> Iterator[tuple[int, IntArray]]:
    """Decode Rice-coded indices in runs: yield ``(j0, idx[j0:j0+m])``, validating all.

    Works through the unary section :data:`_RICE_CHUNK_BYTES` at a time, so
    the temporaries are a few hundred KiB whatever ``k`` and ``n`` are.
    """
    if k == 0:
        if len(unary) or len(remainder):
            raise PayloadError("empty index set carries index bytes")
        return
    if not 0 <= b <= rice_max_parameter(n, k):
        raise PayloadError(
            f"rice parameter {b} outside [0, {rice_max_parameter(n, k)}] for {k} of {n} indices"
        )
    if len(unary) > rice_max_unary_nbytes(n, k, b):
        raise PayloadError("unary index section longer than any valid encoding")
    if len(remainder) != packed_nbytes(k, b):
        raise PayloadError(
            f"packed section has {len(remainder)} bytes, expected {packed_nbytes(k, b)}"
        )
    ubuf = np.frombuffer(unary, dtype=np.uint8)
    rbuf = np.frombuffer(remainder, dtype=np.uint8)
    qmax = n >> b
    j = 0
    last_end = -1  # bit position of the previous terminating one
    last_idx = -1
    for c0 in range(0, ubuf.size, _RICE_CHUNK_BYTES):
        ends = np.flatnonzero(
            np.unpackbits(ubuf[c0 : c0 + _RICE_CHUNK_BYTES], bitorder="little")
        )
        m = ends.size
        if m == 0:
            continue
        if j + m > k:
            raise PayloadError(f"index section holds more than the {k} indices in the header")
        ends += 8 * c0
        gaps = np.diff(ends, prepend=np.int64(last_end))
        gaps -= 1  # quotients
        last_end = int(ends[-1])
        if int(gaps.max()) > qmax:
            raise PayloadError("index gap exceeds the tensor size")
        if b:
            gaps <<= b
            gaps |= _unpack_range(rbuf, j, m, b)
        gaps += 1
        idx = np.cumsum(gaps, out=gaps)
        idx += last_idx
        last_idx = int(idx[-1])
        if last_idx >= n:
            raise PayloadError(f"index {last_idx} out of range for a tensor of {n} elements")
        yield j, idx
        j += m
    if j != k:
        raise PayloadError(f"index section holds {j} indices, header says {k}")


def rice_decode(
    unary: bytes | memoryview, remainder: bytes | memoryview, k: int, b: int, n: int
) -> IntArray:
    """Inverse of :func:`rice_encode`, validating every index against ``n``."""
    runs = [idx for _, idx in _rice_runs(unary, remainder, k, b, n)]
    if not runs:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate(runs) if len(runs) > 1 else runs[0]


def rice_decode_into(
    unary: bytes | memoryview,
    remainder: bytes | memoryview,
    k: int,
    b: int,
    n: int,
    out: npt.NDArray[np.float32],
    values: npt.NDArray[np.float32],
) -> None:
    """Scatter ``values[i]`` to ``out[idx_i]`` for the Rice-coded indices, run by run.

    Same validation as :func:`rice_decode`, but never holds all ``k`` indices.
    """
    if values.size != k or out.size != n:
        raise PayloadError(f"{values.size} values for {k} indices into {out.size} of {n}")
    for j0, idx in _rice_runs(unary, remainder, k, b, n):
        out[idx] = values[j0 : j0 + idx.size]


_TWO_POW_M53 = float(2.0**-53)
_MAX_SEEDED_N = 1 << 30
# Draws per batch when deriving a random-k support (bounded temporaries).
_SEED_BATCH = 1 << 13
_POS_BITS = 16  # bits of a draw's position inside a batch (<= _SEED_BATCH)


def _mark_first_distinct_inplace(seed: int, n: int, k: int, mask: npt.NDArray[np.bool_]) -> None:
    """Set ``mask`` at the first ``k`` distinct values of an i.i.d. uniform stream over ``[0, n)``.

    Uses only the raw output of ``PCG64(seed)`` (bit generators are stream-stable
    across numpy versions) and IEEE float64 arithmetic, so every platform
    derives the same set.  By symmetry the result is a uniform ``k``-subset.
    The stream is consumed in fixed batches with ``mask`` as the set of values
    seen so far, so memory is ``n`` bits plus one batch, and the result does
    not depend on the batch size.
    """
    bitgen = np.random.PCG64(seed)
    got = 0
    scale = _TWO_POW_M53 * n
    # About 60 bytes of temporaries a draw: a batch of at most n / 16 draws keeps
    # them under the tensor's own float32 size, so small models are bounded too.
    batch = min(_SEED_BATCH, max(64, n // 16))
    # k <= n / 2 here: ~n ln 2 draws on average; the cap only bounds the loop.
    # Batches shrink with what is still needed (the stream, hence the result,
    # is the same whatever the batch sizes).
    for _ in range(64 * (n // 64 + 1)):
        raw = np.asarray(bitgen.random_raw(min(batch, 2 * (k - got) + 64)), dtype=np.uint64)
        raw >>= np.uint64(11)
        vals = (raw.astype(np.float64) * scale).astype(np.int64)
        np.minimum(vals, n - 1, out=vals)
        # Fresh draws as sort keys (value, position in the batch); one plain sort
        # (no reliance on sort stability) puts each value's first draw first.
        fresh = ~mask[vals]
        keys = (vals << _POS_BITS) | np.arange(vals.size, dtype=np.int64)
        keys = keys[fresh]
        keys.sort()
        sv = keys >> _POS_BITS
        head = np.ones(sv.size, dtype=bool)
        np.not_equal(sv[1:], sv[:-1], out=head[1:])
        uniq = sv[head]
        need = k - got
        if uniq.size >= need:
            if uniq.size > need:
                first = keys[head] & ((1 << _POS_BITS) - 1)
                kth = np.partition(first, need - 1)[need - 1]
                uniq = uniq[first <= kth]
            mask[uniq] = True
            return
        mask[uniq] = True
        got += uniq.size
    raise PayloadError("seeded index sampling did not converge")  # pragma: no cover


def seeded_mask(seed: int, n: int, k: int) -> npt.NDArray[np.bool_]:
    """Boolean mask of the uniform random ``k``-subset of ``range(n)`` derived from ``seed``.

    The decoder's form of :func:`seeded_indices` (``n`` bytes instead of
    ``8 k``).  For ``k > n / 2`` the complement is sampled so the cost stays
    ``O(n)`` with at most ``n / 2`` distinct draws.
    """
    if not 0 <= k <= n:
        raise PayloadError(f"cannot choose {k} of {n} elements")
    if n > _MAX_SEEDED_N:
        raise ValueError(f"random-k supports tensors up to {_MAX_SEEDED_N} elements, got {n}")
    if k == n:
        return np.ones(n, dtype=bool)
    mask = np.zeros(n, dtype=bool)
    if k == 0:
        return mask
    if 2 * k > n:
        _mark_first_distinct_inplace(seed, n, n - k, mask)
        np.logical_not(mask, out=mask)
    else:
        _mark_first_distinct_inplace(seed, n, k, mask)
    return mask


def seeded_indices(seed: int, n: int, k: int) -> IntArray:
    """Sorted uniform random ``k``-subset of ``range(n)`` derived from ``seed``.

    Encoder and decoder derive the same subset from ``(seed, n, k)`` so random-k
    sparsification transmits 8 bytes of seed instead of ``k`` indices.
    """
    out: IntArray = np.flatnonzero(seeded_mask(seed, n, k)).astype(np.int64, copy=False)
    return out
