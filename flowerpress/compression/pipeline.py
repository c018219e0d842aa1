"""Spec parsing, the :class:`Pipeline` encoder, and the untrusted-payload decoder.

Payload layout (version 1, little-endian)::

    magic "FPC" | version:u8 | flags:u8 | [body_len:u64 zstd_frame] or body
    body := ntensors:u32 tensor*          (tensor: see flowerpress.compression.stages)

``flags`` bit 0 means the body is one zstd frame of exactly ``body_len``
decompressed bytes; every other bit must be zero.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import zstandard

from flowerpress.compression import stages as st
from flowerpress.compression.bitpack import (
    packed_nbytes,
    rice_decode,
    rice_encode,
    rice_max_unary_nbytes,
    seeded_indices,
)
from flowerpress.compression.state import CodecState
from flowerpress.compression.wire import PayloadError, Reader, Writer

__all__ = [
    "MAGIC",
    "VERSION",
    "Pipeline",
    "decode",
    "fp32_nbytes",
    "parse",
]

F32 = npt.NDArray[np.float32]

MAGIC = b"FPC"
VERSION = 1
_FLAG_ZSTD = 1
_MAX_NDIM = 32
_MAX_DIM = 0xFFFFFFFF
#: Default cap on the number of tensors a payload may declare.
DEFAULT_MAX_TENSORS = 1 << 16
#: Header slack allowed on top of the element budget when bounding a body.
_BODY_SLACK = 1 << 20

VALID_NAMES = ("ef", "fp16", "lowrank", "none", "q", "randk", "sign", "topk", "zstd")


# --------------------------------------------------------------------------- spec parsing
def _bad(stage: str, spec: str, why: str) -> ValueError:
    return ValueError(
        f"invalid compression stage {stage!r} in spec {spec!r}: {why}; "
        f"valid names: {', '.join(VALID_NAMES)}"
    )


def parse(spec: str) -> Pipeline:
    """Parse a compression spec into a :class:`Pipeline`.

    Grammar: ``spec := stage ("+" stage)*``, ``stage := NAME [":" ARG ("," ARG)*]``.
    Examples: ``q:8``, ``topk:0.01+q:8+ef+zstd``, ``lowrank:4+q:8+ef``, ``sign+ef``.

    Raises
    ------
    ValueError
        Naming the bad stage and listing the valid stage names.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise _bad(str(spec), str(spec), "empty spec")
    structure: st.StructureStage | None = None
    value: st.ValueStage | None = None
    ef = False
    zstd_level: int | None = None
    for raw in spec.split("+"):
        stage = raw.strip()
        name, _, argstr = stage.partition(":")
        name = name.strip().lower()
        args = [a.strip() for a in argstr.split(",")] if argstr else []
        if name not in VALID_NAMES:
            raise _bad(stage, spec, f"unknown name {name!r}")
        if zstd_level is not None:
            raise _bad(stage, spec, "zstd must be the last stage")
        try:
            if name in ("topk", "randk", "lowrank"):
                if structure is not None:
                    raise _bad(stage, spec, "only one of topk, randk, lowrank per pipeline")
                if name == "topk":
                    _nargs(args, 1, 1)
                    structure = st.TopKStage(fraction=float(args[0]))
                elif name == "randk":
                    _nargs(args, 1, 2)
                    if len(args) == 2 and args[1] not in ("unbiased", "biased"):
                        raise ValueError(f"second argument must be 'unbiased', got {args[1]!r}")
                    structure = st.RandKStage(
                        fraction=float(args[0]), unbiased=args[1:] == ["unbiased"]
                    )
                else:
                    _nargs(args, 1, 1)
                    structure = st.LowRankStage(rank=int(args[0]))
            elif name in ("none", "fp16", "q", "sign"):
                if value is not None:
                    raise _bad(stage, spec, "only one of none, fp16, q, sign per pipeline")
                if name == "q":
                    _nargs(args, 1, 1)
                    value = st.QuantStage(bits=int(args[0]))
                else:
                    _nargs(args, 0, 0)
                    value = {"none": st.NoneStage, "fp16": st.Fp16Stage, "sign": st.SignStage}[
                        name
                    ]()
            elif name == "ef":
                _nargs(args, 0, 0)
                if ef:
                    raise _bad(stage, spec, "ef given twice")
                ef = True
            else:  # zstd
                _nargs(args, 0, 1)
                zstd_level = int(args[0]) if args else 3
                if not 1 <= zstd_level <= 22:
                    raise ValueError(f"LEVEL must be in [1, 22], got {zstd_level}")
        except ValueError as exc:
            if str(exc).startswith("invalid compression stage"):
                raise
            raise _bad(stage, spec, str(exc)) from None
    return Pipeline(
        structure=structure,
        value=value if value is not None else st.NoneStage(),
        error_feedback=ef,
        zstd_level=zstd_level,
    )


def _nargs(args: list[str], lo: int, hi: int) -> None:
    if not lo <= len(args) <= hi:
        want = str(lo) if lo == hi else f"{lo} to {hi}"
        raise ValueError(f"takes {want} argument(s), got {len(args)}")


# --------------------------------------------------------------------------- helpers
def fp32_nbytes(update: Sequence[npt.ArrayLike]) -> int:
    """Bytes the same update costs as plain float32 (``sum(size) * 4``)."""
    return sum(int(np.size(a)) * 4 for a in update)


def _as_f32(update: Sequence[npt.ArrayLike]) -> list[F32]:
    arrays: list[F32] = []
    for i, a in enumerate(update):
        arr = np.asarray(a, dtype=np.float32, order="C")
        if arr.ndim > _MAX_NDIM or any(d > _MAX_DIM for d in arr.shape):
            raise ValueError(f"update tensor {i}: shape {arr.shape} not encodable")
        arrays.append(arr)
    return arrays


# --------------------------------------------------------------------------- pipeline
@dataclass(frozen=True)
class Pipeline:
    """A parsed compression pipeline (build it with :func:`parse`).

    Stages compose by wrapping: the structure stage (``topk`` / ``randk`` /
    ``lowrank``, see :mod:`flowerpress.compression.stages`) chooses the
    numbers, the value stage (``none`` / ``fp16`` / ``q`` / ``sign``) writes
    them, ``ef`` wraps both, and ``zstd`` compresses the result.  Every stage
    is post-processing of its input, so running the pipeline after DP noise
    keeps the DP guarantee.

    ``ef`` -- error feedback around the whole pipeline (Seide et al., 1-bit
    SGD, Interspeech 2014; Stich et al., "Sparsified SGD with Memory",
    NeurIPS 2018; Karimireddy et al., "Error Feedback Fixes SignSGD and other
    Gradient Compression Schemes", ICML 2019).  It encodes ``x = update +
    residual`` and keeps ``residual' = x - decoded`` in the returned
    :class:`CodecState`, so ``update + residual == decoded + residual'`` and
    nothing is lost, only delayed.  Each upload is biased on its own, but the
    running sum of uploads tracks the running sum of updates.  Safe after DP
    noise: the residual is a function of privatized updates only (the
    residual itself never leaves the client).

    ``zstd[:LEVEL]`` -- Zstandard (Collet & Kucherawy, RFC 8878) over the
    encoded body, level 1-22 (default 3).  Lossless, hence unbiased and
    trivially post-processing.  The decoder bounds the decompressed size by
    ``5 * max_elements + 1 MiB`` and checks it against the frame before
    decompressing, so a tiny payload cannot expand into gigabytes.

    Attributes
    ----------
    structure
        ``None`` for dense tensors, else the sparsifying or low-rank stage.
    value
        How each transmitted number is written.
    error_feedback
        Whether ``ef`` is on.
    zstd_level
        ``None`` without ``zstd``, else its level.
    """

    structure: st.StructureStage | None = None
    value: st.ValueStage = field(default_factory=st.NoneStage)
    error_feedback: bool = False
    zstd_level: int | None = None

    @property
    def spec(self) -> str:
        """Canonical spec string; ``parse(p.spec) == p``."""
        parts: list[str] = []
        if self.structure is not None:
            parts.append(self.structure.spec())
        if not isinstance(self.value, st.NoneStage):
            parts.append(self.value.spec())
        if self.error_feedback:
            parts.append("ef")
        if self.zstd_level is not None:
            parts.append(f"zstd:{self.zstd_level}")
        return "+".join(parts) if parts else "none"

    @property
    def has_error_feedback(self) -> bool:
        """Whether :meth:`encode` keeps residuals in the returned state."""
        return self.error_feedback

    def encode(
        self,
        update: Sequence[npt.ArrayLike],
        state: CodecState | None = None,
        *,
        rng: np.random.Generator | None = None,
    ) -> tuple[bytes, CodecState]:
        """Compress an update into a self-describing payload.

        Parameters
        ----------
        update
            Float arrays in model ``state_dict`` order (any shapes, including
            0-d and empty); converted to float32.  Must be finite.
        state
            The state returned by the previous call for this client, or
            ``None`` / :meth:`CodecState.empty` in the first round.
        rng
            Source of every random draw (stochastic rounding, random-k seeds,
            PowerSGD initialization).  If ``None``, a fresh
            ``np.random.default_rng()`` seeded from OS entropy is created for
            this call; pass one for reproducible runs.

        Returns
        -------
        tuple
            ``(payload, new_state)``; decode the payload with :func:`decode`.

        Raises
        ------
        ValueError
            On non-finite values, or a state whose residual shapes do not match.
        """
        if rng is None:
            rng = np.random.default_rng()
        state = state if state is not None else CodecState.empty()
        arrays = _as_f32(update)
        if self.error_feedback and state.residuals:
            if len(state.residuals) != len(arrays) or any(
                r.shape != a.shape for r, a in zip(state.residuals, arrays, strict=True)
            ):
                raise ValueError(
                    "state: error-feedback residual shapes "
                    f"{[r.shape for r in state.residuals]} do not match the update "
                    f"{[a.shape for a in arrays]}"
                )
            with np.errstate(over="ignore"):
                # np.asarray: adding 0-d arrays yields numpy scalars.
                arrays = [np.asarray(a + r) for a, r in zip(arrays, state.residuals, strict=True)]
            owned = True  # fresh arrays: the new residual may overwrite them
        else:
            owned = False
        # The float32 passthrough writes tensors into the payload zero-copy, so
        # only other value stages may reuse ``x`` for the residual.
        reuse = owned and not isinstance(self.value, st.NoneStage)
        w = Writer()
        if self.zstd_level is None:
            w.raw(MAGIC + struct.pack("<BB", VERSION, 0))
        w.u32(len(arrays))
        residuals: list[F32] = []
        warm: dict[int, F32] = {}
        for i, x in enumerate(arrays):
            recon = self._encode_tensor(i, x, w, rng, state, warm)
            if self.error_feedback:
                assert recon is not None
                if isinstance(recon, tuple):
                    # Sparse: the residual is x with the sent values subtracted at
                    # their positions (x itself never enters the payload).
                    idx, vrec = recon
                    res = x if owned else x.copy()
                    res.reshape(-1)[idx] -= vrec
                    residuals.append(res)
                elif reuse:
                    residuals.append(np.subtract(x, recon.reshape(x.shape), out=x))
                else:
                    residuals.append(
                        np.asarray(np.subtract(x, recon.reshape(x.shape), dtype=np.float32))
                    )
        body = w.getvalue()
        if self.zstd_level is not None:
            frame = zstandard.ZstdCompressor(
                level=self.zstd_level, write_content_size=True
            ).compress(body)
            header = MAGIC + struct.pack("<BBQ", VERSION, _FLAG_ZSTD, len(body))
            payload = header + frame
        else:
            payload = body  # already starts with the header
        return payload, CodecState.from_arrays(residuals, warm)

    def _encode_tensor(
        self,
        index: int,
        x: F32,
        w: Writer,
        rng: np.random.Generator,
        state: CodecState,
        warm: dict[int, F32],
    ) -> F32 | tuple[npt.NDArray[np.int64], F32] | None:
        """Write one tensor; with ``ef`` return its reconstruction.

        The reconstruction is dense, or ``(indices, values)`` for sparse stages.
        """
        need = self.error_feedback
        w.u8(x.ndim)
        for d in x.shape:
            w.u32(d)
        flat = x.ravel()
        n = flat.size
        s = self.structure
        # Dense quantization detects NaN/Inf from its block minima and maxima for free.
        if not (s is None and isinstance(self.value, st.QuantStage)) and not bool(
            np.isfinite(flat).all()
        ):
            raise ValueError(
                f"update tensor {index}: contains NaN or Inf; expected finite values"
                + (" (after adding the error-feedback residual)" if self.error_feedback else "")
            )
        if isinstance(s, st.LowRankStage):
            mshape = s.matrix_shape(x.shape)
            if mshape is not None:
                return self._encode_lowrank(index, x.reshape(mshape), w, rng, state, warm)
        elif isinstance(s, st.TopKStage | st.RandKStage) and n > 0:
            k = st.kept_count(s.fraction, n)
            if k < n:
                if isinstance(s, st.TopKStage):
                    idx = st.topk_indices(flat, k)
                    b, unary, rem = rice_encode(idx, n)
                    w.u8(st.STRUCT_TOPK)
                    w.u32(k)
                    w.u8(b)
                    w.u32(len(unary))
                    w.raw(unary)
                    w.raw(rem)
                    vals = flat[idx]
                else:
                    seed = int(rng.integers(0, 1 << 63))
                    idx = seeded_indices(seed, n, k)
                    w.u8(st.STRUCT_RANDK)
                    w.u32(k)
                    w.u64(seed)
                    vals = flat[idx]
                    if s.unbiased:
                        with np.errstate(over="ignore"):
                            vals = (vals * np.float32(n / k)).astype(np.float32)
                        if not np.isfinite(vals).all():
                            raise ValueError(
                                f"randk unbiased: tensor {index} overflows float32 after "
                                f"scaling by n/k = {n / k:g}"
                            )
                vrec = st.encode_values(self.value, vals, w, rng, need)
                if not need:
                    return None
                assert vrec is not None
                return idx, vrec
        w.u8(st.STRUCT_DENSE)
        try:
            return st.encode_values(self.value, flat, w, rng, need)
        except ValueError as exc:
            raise ValueError(f"update tensor {index}: {exc}") from None

    def _encode_lowrank(
        self,
        index: int,
        m: F32,
        w: Writer,
        rng: np.random.Generator,
        state: CodecState,
        warm: dict[int, F32],
    ) -> F32 | None:
        assert isinstance(self.structure, st.LowRankStage)
        cols = m.shape[1]
        rank = self.structure.rank
        q = state.lowrank_q.get(index)
        if q is None or q.shape != (cols, rank):
            q = rng.standard_normal((cols, rank), dtype=np.float32)
        sub = Writer()
        factors = _powersgd_step(m, q, rank, self.value, sub, rng)
        if factors is None:
            # Only reachable near the float32 overflow limit: send the tensor dense.
            w.u8(st.STRUCT_DENSE)
            return st.encode_values(self.value, m.ravel(), w, rng, self.error_feedback)
        q_new, recon = factors
        w.raw(sub.getvalue())
        warm[index] = q_new
        return recon


def _powersgd_step(
    m: F32,
    q: F32,
    rank: int,
    value: st.ValueStage,
    w: Writer,
    rng: np.random.Generator,
) -> tuple[F32, F32] | None:
    """One warm-started PowerSGD iteration written to ``w``: ``(Q, P_hat Q_hat^T)``.

    ``P = orth(M Q)`` goes through the value stage first and ``Q = M^T P_hat``
    is computed from the *transmitted* ``P_hat``, so the second factor absorbs
    the quantization error of the first (Vogels et al. 2019, Algorithm 1, with
    one worker).  Returns ``None`` if anything overflows float32.
    """
    rows, cols = m.shape
    with np.errstate(all="ignore"):
        p = m @ q
        if not np.isfinite(p).all():
            return None
        p = np.ascontiguousarray(np.linalg.qr(p)[0], dtype=np.float32)
        w.u8(st.STRUCT_LOWRANK)
        w.u32(rows)
        w.u32(cols)
        w.u16(rank)
        p_hat = st.encode_values(value, p.ravel(), w, rng, True)
        assert p_hat is not None
        p_hat2 = p_hat.reshape(rows, rank)
        q_new = np.ascontiguousarray(m.T @ p_hat2, dtype=np.float32)
        if not np.isfinite(q_new).all():
            return None
        q_hat = st.encode_values(value, q_new.ravel(), w, rng, True)
        assert q_hat is not None
        recon = np.asarray(p_hat2 @ q_hat.reshape(cols, rank).T, dtype=np.float32)
        if not np.isfinite(recon).all():
            return None
    return q_new, recon


# --------------------------------------------------------------------------- decoding
def decode(
    payload: bytes | bytearray | memoryview | npt.NDArray[np.uint8],
    *,
    max_elements: int,
    max_tensors: int = DEFAULT_MAX_TENSORS,
) -> list[F32]:
    """Decode an untrusted payload into float32 arrays with their original shapes.

    Parameters
    ----------
    payload
        Bytes produced by :meth:`Pipeline.encode` (or by an attacker), as
        ``bytes``, ``bytearray``, ``memoryview`` or a 1-D ``uint8`` array (the
        form a payload takes inside a Flower ``ArrayRecord``:
        ``np.frombuffer(payload, np.uint8)`` on the way in,
        ``record["payload"].numpy()`` on the way out).
    max_elements
        Upper bound on the total number of elements of all tensors (use the
        model's parameter count).  Also bounds the decompressed body of a
        ``zstd`` payload to ``5 * max_elements + 1 MiB``.
    max_tensors
        Upper bound on the number of tensors.

    Raises
    ------
    PayloadError
        If anything is malformed: bad magic, unknown version, flag or kind,
        truncation, trailing bytes, sizes beyond the bounds, inconsistent
        shapes or indices, non-finite values.  Never any other exception for
        bad bytes.
    ValueError
        If ``max_elements`` or ``max_tensors`` is not a non-negative integer.
    """
    if not isinstance(max_elements, int) or max_elements < 0:
        raise ValueError(f"max_elements must be a non-negative int, got {max_elements!r}")
    if not isinstance(max_tensors, int) or max_tensors < 0:
        raise ValueError(f"max_tensors must be a non-negative int, got {max_tensors!r}")
    buffer: bytes | bytearray | memoryview
    if isinstance(payload, np.ndarray):
        if payload.dtype != np.uint8 or payload.ndim != 1:
            raise PayloadError(
                f"payload array must be 1-D uint8, got {payload.ndim}-D {payload.dtype}"
            )
        buffer = np.ascontiguousarray(payload).data
    elif isinstance(payload, bytes | bytearray | memoryview):
        buffer = payload
    else:
        raise PayloadError(f"payload must be bytes, got {type(payload).__name__}")
    body_limit = 5 * max_elements + _BODY_SLACK
    try:
        with np.errstate(all="ignore"):
            view = memoryview(buffer)
            if view.format != "B" or view.ndim != 1:
                view = view.cast("B")  # byte view of any C-contiguous buffer
            return _decode(view, max_elements, max_tensors, body_limit)
    except PayloadError:
        raise
    except (
        ValueError,
        TypeError,
        IndexError,
        ArithmeticError,
        struct.error,
        zstandard.ZstdError,
        np.linalg.LinAlgError,
    ) as exc:
        raise PayloadError(f"malformed payload ({type(exc).__name__}: {exc})") from None


def _decode(payload: memoryview, max_elements: int, max_tensors: int, body_limit: int) -> list[F32]:
    if len(payload) > body_limit + 64:
        raise PayloadError(f"payload of {len(payload)} bytes exceeds the bound {body_limit}")
    r = Reader(payload)
    if bytes(r.raw(3, "magic")) != MAGIC:
        raise PayloadError("bad magic: not a flowerpress payload")
    version = r.u8("version")
    if version != VERSION:
        raise PayloadError(f"unsupported payload version {version} (this decoder reads {VERSION})")
    flags = r.u8("flags")
    if flags & ~_FLAG_ZSTD:
        raise PayloadError(f"unknown flags {flags:#04x}")
    if flags & _FLAG_ZSTD:
        body_len = r.u64("body length")
        if body_len > body_limit:
            raise PayloadError(f"declared body of {body_len} bytes exceeds the bound {body_limit}")
        frame = bytes(r.raw(r.remaining, "zstd frame"))
        body: bytes | memoryview = _unzstd(frame, body_len)
    else:
        body = r.raw(r.remaining, "body")
    return _decode_body(Reader(body), max_elements, max_tensors)


def _unzstd(frame: bytes, body_len: int) -> bytes:
    try:
        params = zstandard.get_frame_parameters(frame)
    except zstandard.ZstdError as exc:
        raise PayloadError(f"bad zstd frame header ({exc})") from None
    if params.content_size != body_len:
        raise PayloadError(
            f"zstd frame declares {params.content_size} bytes, header says {body_len}"
        )
    if params.dict_id != 0:
        raise PayloadError("zstd frame requires a dictionary")
    dctx = zstandard.ZstdDecompressor(max_window_size=1 << 27)
    try:
        out = dctx.decompress(
            frame, max_output_size=body_len, read_across_frames=False, allow_extra_data=False
        )
    except zstandard.ZstdError as exc:
        raise PayloadError(f"corrupt zstd frame ({exc})") from None
    if len(out) != body_len:
        raise PayloadError(f"zstd frame produced {len(out)} bytes, expected {body_len}")
    return out


def _decode_body(r: Reader, max_elements: int, max_tensors: int) -> list[F32]:
    ntensors = r.u32("tensor count")
    if ntensors > max_tensors:
        raise PayloadError(f"{ntensors} tensors exceed the bound {max_tensors}")
    budget = max_elements
    out: list[F32] = []
    for i in range(ntensors):
        ndim = r.u8("ndim")
        if ndim > _MAX_NDIM:
            raise PayloadError(f"tensor {i}: ndim {ndim} exceeds {_MAX_NDIM}")
        shape = tuple(int(d) for d in r.array(np.uint32, ndim, "shape"))
        numel = math.prod(shape)
        if numel > budget:
            raise PayloadError(
                f"tensor {i}: shape {shape} exceeds the element bound {max_elements}"
            )
        budget -= numel
        try:
            out.append(_decode_tensor(r, shape, numel))
        except PayloadError as exc:
            raise PayloadError(f"tensor {i}: {exc}") from None
    r.expect_end()
    return out


def _decode_tensor(r: Reader, shape: tuple[int, ...], numel: int) -> F32:
    structure = r.u8("structure id")
    if structure == st.STRUCT_DENSE:
        return st.decode_values(r, numel).reshape(shape)
    if structure in (st.STRUCT_TOPK, st.STRUCT_RANDK):
        k = r.u32("kept count")
        if k > numel:
            raise PayloadError(f"keeps {k} of {numel} elements")
        if structure == st.STRUCT_TOPK:
            b = r.u8("rice parameter")
            if b > 31:
                raise PayloadError(f"rice parameter {b} outside [0, 31]")
            unary_len = r.u32("index section length")
            if unary_len > rice_max_unary_nbytes(numel, k, b):
                raise PayloadError("index section longer than any valid encoding")
            unary = r.raw(unary_len, "index section")
            rem = r.raw(packed_nbytes(k, b), "index remainders")
            idx = rice_decode(unary, rem, k, b, numel)
        else:
            seed = r.u64("random-k seed")
            idx = seeded_indices(seed, numel, k)
        vals = st.decode_values(r, k)
        dense = np.zeros(numel, dtype=np.float32)
        dense[idx] = vals
        return dense.reshape(shape)
    if structure == st.STRUCT_LOWRANK:
        rows = r.u32("rows")
        cols = r.u32("cols")
        rank = r.u16("rank")
        if len(shape) < 2 or rows != shape[0] or rows * cols != numel:
            raise PayloadError(f"low-rank factors {rows}x{cols} do not match shape {shape}")
        if not 1 <= rank <= st.MAX_LOWRANK_RANK or (rows + cols) * rank >= numel:
            raise PayloadError(f"low-rank rank {rank} invalid for a {rows}x{cols} matrix")
        p = st.decode_values(r, rows * rank).reshape(rows, rank)
        q = st.decode_values(r, cols * rank).reshape(cols, rank)
        prod = np.ascontiguousarray(p @ q.T, dtype=np.float32)
        if not np.isfinite(prod).all():  # finite factors can still overflow
            raise PayloadError("non-finite value in the low-rank product")
        return prod.reshape(shape)
    raise PayloadError(f"unknown structure id {structure}")
