"""Spec parsing, the :class:`Pipeline` encoder, and the untrusted-payload decoder.

Payload layout (little-endian)::

    magic "FPC" | version:u8 | flags:u8 | [manifest] | [body_len:u64 zstd_frame] or body
    body     := ntensors:u32 tensor*    (tensor: see flowerpress.compression.stages)
    manifest := nstages:u8 (role:u8 wire_id:u8 name_len:u8 name)*       (version 2 only)

``flags`` bit 0 means the body is one zstd frame of exactly ``body_len``
decompressed bytes; every other bit must be zero.  Version 1 payloads use
only flowerpress's built-in stages (wire ids below 64) and are what the
encoder writes for them, byte for byte as before.  Version 2 adds the
manifest: every user stage the body uses (role 0 = value, 1 = structure),
with its name, so a decoder whose registry maps a wire id to a different
stage (or to none) rejects the payload naming the stage instead of
misreading it; a body may use no user wire id that its manifest omits.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import re
import struct
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import overload

import numpy as np
import numpy.typing as npt
import zstandard

from flowerpress.compression import registry
from flowerpress.compression import stages as st
from flowerpress.compression.state import CodecState
from flowerpress.compression.wire import PayloadError, Reader, Writer

__all__ = [
    "MAGIC",
    "VALID_NAMES",
    "VERSION",
    "Pipeline",
    "decode",
    "fp32_nbytes",
    "parse",
]

F32 = npt.NDArray[np.float32]
_HeaderFn = Callable[[int, int | None], bytes]

MAGIC = b"FPC"
#: Newest wire version this module writes and reads (it reads 1 and 2).
VERSION = 2
_V1 = 1
_FLAG_ZSTD = 1
_MAX_NDIM = 32
_MAX_DIM = 0xFFFFFFFF
#: Default cap on the number of tensors a payload may declare (pass the model's count).
DEFAULT_MAX_TENSORS = 1 << 16
#: Header slack allowed on top of the element budget when bounding a body: a
#: fixed part and a part per declared tensor (shape, stage ids, counts), so the
#: bound stays proportional to the model for small models too.
_BODY_SLACK = 1 << 16
_BODY_SLACK_PER_TENSOR = 256
_MANIFEST_NAME = re.compile(rb"^[a-z][a-z0-9_-]{0,31}$")
_ROLE_NAMES = {registry.ROLE_VALUE: "value", registry.ROLE_STRUCTURE: "structure"}


class _RegisteredNames(Sequence[str]):
    """Live, sorted view of the registered stage names (``VALID_NAMES``)."""

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[str]: ...
    def __getitem__(self, index: int | slice) -> str | Sequence[str]:
        return registry.available_stages()[index]

    def __len__(self) -> int:
        return len(registry.available_stages())

    def __repr__(self) -> str:
        return repr(tuple(registry.available_stages()))


#: The registered stage names, sorted (a live view of the registry).
VALID_NAMES: Sequence[str] = _RegisteredNames()


# --------------------------------------------------------------------------- spec parsing
def _bad(stage: str, spec: str, why: str) -> ValueError:
    why = " ".join(why.split())
    return ValueError(
        f"invalid compression stage {stage!r} in spec {spec!r}: {why}; "
        f"valid names: {', '.join(VALID_NAMES)}"
    )


def _names_of(base: type[st.Stage]) -> str:
    names = registry.available_stages()
    return ", ".join(n for n in names if issubclass(registry.stage_class(n) or object, base))


def parse(spec: str) -> Pipeline:
    """Parse a compression spec into a :class:`Pipeline`.

    Grammar: ``spec := stage ("+" stage)*``, ``stage := NAME [":" ARG ("," ARG)*]``.
    Examples: ``q:8``, ``topk:0.01+q:8+ef+zstd``, ``lowrank:4+q:8+ef``, ``sign+ef``.
    ``NAME`` is any registered stage (:func:`~flowerpress.compression.register_stage`),
    or ``package.module:Class`` (a dotted module path, imported with the working
    directory on ``sys.path``), which registers that stage class, e.g.
    ``examples.custom_codec.ternary:Ternary+zstd``.  A pipeline takes at most
    one structure stage, one value stage, ``ef`` once, and ``zstd`` last.

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
    ef21 = False
    flat = False
    zstd_level: int | None = None
    for raw in spec.split("+"):
        stage = raw.strip()
        name, _, argstr = stage.partition(":")
        name = name.strip()
        cls: type[st.Stage] | None
        if "." in name:  # package.module:Class[:ARG,...]: import and register it
            class_name, _, argstr = argstr.partition(":")
            cls = _import_stage(stage, spec, name, class_name.strip())
        else:
            name = name.lower()
            cls = registry.stage_class(name)
            if cls is None:
                raise _bad(stage, spec, f"unknown name {name!r}")
        args = [a.strip() for a in argstr.split(",")] if argstr else []
        if zstd_level is not None:
            raise _bad(stage, spec, "zstd must be the last stage")
        try:
            built = cls.from_args(args)
        except Exception as exc:  # a user's from_args: any failure is a bad spec
            raise _bad(stage, spec, str(exc) or type(exc).__name__) from None
        if isinstance(built, st.StructureStage):
            if structure is not None:
                raise _bad(
                    stage, spec, f"only one of {_names_of(st.StructureStage)} per pipeline"
                )
            structure = built
        elif isinstance(built, st.ValueStage):
            if value is not None:
                raise _bad(stage, spec, f"only one of {_names_of(st.ValueStage)} per pipeline")
            value = built
        elif isinstance(built, st.ErrorFeedbackStage):
            if ef:
                raise _bad(stage, spec, "ef given twice")
            ef = True
        elif isinstance(built, st.EF21Stage):
            if ef21:
                raise _bad(stage, spec, "ef21 given twice")
            ef21 = True
        elif isinstance(built, st.FlatStage):
            if flat:
                raise _bad(stage, spec, "flat given twice")
            flat = True
        elif isinstance(built, st.ZstdStage):
            zstd_level = built.level
        else:  # pragma: no cover - the registry only holds these six kinds
            raise _bad(stage, spec, f"{type(built).__name__} is not a stage")
    if ef and ef21:
        raise _bad("ef21", spec, "ef and ef21 are two kinds of error feedback; use one")
    return Pipeline(
        structure=structure,
        value=value if value is not None else st.NoneStage(),
        error_feedback=ef,
        zstd_level=zstd_level,
        flat=flat,
        ef21=ef21,
    )


def _import_stage(stage: str, spec: str, module_name: str, class_name: str) -> type[st.Stage]:
    """Import ``module_name:class_name`` (the working directory on the path) and register it.

    Registering the class already registered under its name is a no-op, so
    the same spec can be parsed any number of times; another class under that
    name is refused, as :func:`~flowerpress.compression.register_stage` does.
    """
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise _bad(stage, spec, f"cannot import {module_name!r}: {exc}") from None
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(cwd)
    cls = getattr(module, class_name, None) if class_name else None
    if not (isinstance(cls, type) and issubclass(cls, st.Stage)):
        raise _bad(stage, spec, f"{module_name} has no stage class {class_name!r}")
    if registry.stage_class(cls.name) is not cls:
        try:
            registry.register_stage(cls)
        except (TypeError, ValueError) as exc:
            raise _bad(stage, spec, str(exc)) from None
    return cls


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


def _put_values(
    stage: st.ValueStage, x: F32, w: Writer, rng: np.random.Generator, need_recon: bool
) -> F32 | None:
    """Write a value section (wire id, then the stage's bytes); check its reconstruction."""
    assert stage.wire_id is not None
    w.u8(stage.wire_id)
    recon = stage.encode(x, w, rng=rng, need_recon=need_recon)
    if need_recon and not (
        isinstance(recon, np.ndarray) and recon.dtype == np.float32 and recon.size == x.size
    ):
        raise TypeError(
            f"value stage {stage.name!r}: encode must return float32 of {x.size} values "
            f"when need_recon, got {type(recon).__name__}"
        )
    return recon


# Value stages whose reconstruction never aliases the input or the payload, so
# error feedback may overwrite the input with the residual.
_COPYING_VALUE_STAGES: tuple[type[st.ValueStage], ...] = (
    st.QuantStage,
    st.SignStage,
    st.Fp16Stage,
)


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

    ``flat`` -- the update is concatenated into one vector first (model
    order), so the structure stage acts on the whole update (``topk``: a
    global top-k, :class:`~flowerpress.compression.stages.FlatStage`) and the
    payload has one tensor header; :func:`decode` returns that one vector.

    ``ef21`` -- EF21 (Richtarik et al., NeurIPS 2021): encodes ``update -
    estimate`` and returns ``estimate + decoded`` as the new estimate in the
    state (:class:`~flowerpress.compression.stages.EF21Stage`); the receiver
    adds its copy of the estimate.  Exclusive with ``ef``.

    ``zstd[:LEVEL]`` -- Zstandard (Collet & Kucherawy, RFC 8878) over the
    encoded body, level 1-22 (default 3).  Lossless, hence unbiased and
    trivially post-processing.  The decoder bounds the decompressed size by
    ``5 * max_elements + 64 KiB + 256 * max_tensors`` and checks it against the frame before
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
    flat
        Whether ``flat`` is on (the update is encoded as one vector).
    ef21
        Whether ``ef21`` is on.
    """

    structure: st.StructureStage | None = None
    value: st.ValueStage = field(default_factory=st.NoneStage)
    error_feedback: bool = False
    zstd_level: int | None = None
    flat: bool = False
    ef21: bool = False

    @property
    def spec(self) -> str:
        """Canonical spec string; ``parse(p.spec) == p``."""
        parts: list[str] = ["flat"] if self.flat else []
        if self.structure is not None:
            parts.append(self.structure.spec())
        if not isinstance(self.value, st.NoneStage):
            parts.append(self.value.spec())
        if self.error_feedback:
            parts.append("ef")
        if self.ef21:
            parts.append("ef21")
        if self.zstd_level is not None:
            parts.append(f"zstd:{self.zstd_level}")
        return "+".join(parts) if parts else "none"

    @property
    def has_error_feedback(self) -> bool:
        """Whether :meth:`encode` keeps residuals or ef21 estimates in the returned state."""
        return self.error_feedback or self.ef21

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
        if self.flat and arrays:
            arrays = [np.concatenate([a.reshape(-1) for a in arrays])]
        estimates: list[F32] = []
        if self.ef21:
            if state.estimates and (len(state.estimates) != len(arrays) or any(
                g.shape != a.shape for g, a in zip(state.estimates, arrays, strict=True)
            )):
                raise ValueError(
                    "state: ef21 estimate shapes "
                    f"{[g.shape for g in state.estimates]} do not match the update "
                    f"{[a.shape for a in arrays]}"
                )
            estimates = [np.array(g, dtype=np.float32) for g in state.estimates] or [
                np.zeros(a.shape, dtype=np.float32) for a in arrays]
            with np.errstate(over="ignore"):
                arrays = [np.asarray(a - g) for a, g in zip(arrays, estimates, strict=True)]
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
        # Only value stages known to copy may have ``x`` reused for the residual
        # (the float32 passthrough, or a user stage, may write ``x`` zero-copy).
        reuse = owned and type(self.value) in _COPYING_VALUE_STAGES
        header = self._header()
        w = Writer()
        if self.zstd_level is None:
            w.raw(header(0, None))
        w.u32(len(arrays))
        residuals: list[F32] = []
        warm: dict[int, F32] = {}
        for i, x in enumerate(arrays):
            try:
                recon = self._encode_tensor(x, w, rng, state.lowrank_q.get(i), warm, i)
            except ValueError as exc:
                raise ValueError(f"update tensor {i}: {exc}") from None
            if self.ef21:
                assert recon is not None
                g = estimates[i].reshape(-1)
                if isinstance(recon, st.SparseRecon):
                    g[recon.indices] += recon.values
                else:
                    g += recon.reshape(-1)
                if not bool(np.isfinite(g).all()):
                    raise ValueError(f"update tensor {i}: ef21 estimate is not finite")
            if self.error_feedback:
                assert recon is not None
                if isinstance(recon, st.SparseRecon):
                    # Sparse: the residual is x with the sent values subtracted at
                    # their positions (x itself never enters the payload).
                    res = x if owned else x.copy()
                    res.reshape(-1)[recon.indices] -= recon.values
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
            payload = header(_FLAG_ZSTD, len(body)) + frame
        else:
            payload = body  # already starts with the header
        return payload, CodecState.from_arrays(residuals, warm, estimates)

    def _header(self) -> _HeaderFn:
        """The payload header writer: version 1 unless a user stage needs the manifest."""
        entries: list[tuple[int, st.Stage]] = []
        if self.structure is not None:
            entries.append((registry.ROLE_STRUCTURE, self.structure))
        entries.append((registry.ROLE_VALUE, self.value))
        manifest = b""
        user = [(role, s) for role, s in entries if (s.wire_id or 0) >= st.FIRST_USER_WIRE_ID]
        if user:
            manifest = struct.pack("<B", len(user)) + b"".join(
                struct.pack("<BBB", role, s.wire_id or 0, len(s.name)) + s.name.encode("ascii")
                for role, s in user
            )
        version = VERSION if user else _V1

        def header(flags: int, body_len: int | None) -> bytes:
            out = MAGIC + struct.pack("<BB", version, flags) + manifest
            return out if body_len is None else out + struct.pack("<Q", body_len)

        return header

    def _encode_tensor(
        self,
        x: F32,
        w: Writer,
        rng: np.random.Generator,
        warm_in: F32 | None,
        warm: dict[int, F32],
        index: int,
    ) -> F32 | st.SparseRecon | None:
        """Write one tensor; with ``ef`` return its reconstruction (dense or sparse)."""
        need = self.error_feedback or self.ef21
        w.u8(x.ndim)
        for d in x.shape:
            w.u32(d)
        flat = x.reshape(-1)
        s = self.structure
        # Dense quantization detects NaN/Inf from its block minima and maxima for free.
        if not (s is None and isinstance(self.value, st.QuantStage)) and not bool(
            np.isfinite(flat).all()
        ):
            raise ValueError(
                "contains NaN or Inf; expected finite values"
                + (" (after adding the error-feedback residual)" if self.error_feedback else "")
            )
        if s is not None:
            sub = Writer()

            def put_values(v: F32, need_recon: bool) -> F32 | None:
                return _put_values(self.value, v, sub, rng, need_recon)

            result = s.encode(x, sub, put_values=put_values, rng=rng, need_recon=need, warm=warm_in)
            if result is not None:
                assert s.wire_id is not None
                w.u8(s.wire_id)
                w.extend(sub)
                if result.warm is not None:
                    warm[index] = result.warm
                if need and result.recon is None:
                    raise TypeError(
                        f"structure stage {s.name!r}: encode must return a reconstruction "
                        "when need_recon"
                    )
                return result.recon
        w.u8(st.STRUCT_DENSE)
        return _put_values(self.value, flat, w, rng, need)


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
        ``record[envelope.PAYLOAD_KEY].numpy()`` on the way out).
    max_elements
        Upper bound on the total number of elements of all tensors (use the
        model's parameter count).  Also bounds the decompressed body of a
        ``zstd`` payload to ``5 * max_elements + 64 KiB + 256 * max_tensors``.
    max_tensors
        Upper bound on the number of tensors: pass the model's tensor count
        (``len(model)``), so a payload declaring many tiny tensors is
        rejected before any per-tensor work.  The default, 65,536, exists for
        compatibility only.

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
    body_limit = 5 * max_elements + _BODY_SLACK + _BODY_SLACK_PER_TENSOR * min(
        max_tensors, DEFAULT_MAX_TENSORS)
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


@dataclass(frozen=True)
class _Allowed:
    """Wire ids a payload may use: the built-ins, plus its manifest's user stages."""

    values: frozenset[int] = frozenset()
    structures: frozenset[int] = frozenset()


def _decode(payload: memoryview, max_elements: int, max_tensors: int, body_limit: int) -> list[F32]:
    if len(payload) > body_limit + 64 + _MAX_MANIFEST:
        raise PayloadError(f"payload of {len(payload)} bytes exceeds the bound {body_limit}")
    r = Reader(payload)
    if bytes(r.raw(3, "magic")) != MAGIC:
        raise PayloadError("bad magic: not a flowerpress payload")
    version = r.u8("version")
    if version not in (_V1, VERSION):
        raise PayloadError(
            f"unsupported payload version {version} (this decoder reads {_V1} and {VERSION})"
        )
    flags = r.u8("flags")
    if flags & ~_FLAG_ZSTD:
        raise PayloadError(f"unknown flags {flags:#04x}")
    allowed = _read_manifest(r) if version == VERSION else _Allowed()
    if flags & _FLAG_ZSTD:
        body_len = r.u64("body length")
        if body_len > body_limit:
            raise PayloadError(f"declared body of {body_len} bytes exceeds the bound {body_limit}")
        body: bytes | memoryview = _unzstd(r.raw(r.remaining, "zstd frame"), body_len)
    else:
        body = r.raw(r.remaining, "body")
    if len(body) > body_limit:
        raise PayloadError(f"body of {len(body)} bytes exceeds the bound {body_limit}")
    return _decode_body(Reader(body), max_elements, max_tensors, allowed)


_MAX_MANIFEST = 1 + 255 * 35


def _read_manifest(r: Reader) -> _Allowed:
    count = r.u8("manifest length")
    if count == 0:
        raise PayloadError("version 2 payload lists no extension stage (use version 1)")
    values: set[int] = set()
    structures: set[int] = set()
    for _ in range(count):
        role = r.u8("manifest role")
        wire_id = r.u8("manifest wire id")
        name_b = bytes(r.raw(r.u8("manifest name length"), "manifest name"))
        if role not in _ROLE_NAMES:
            raise PayloadError(f"manifest role {role} is neither 0 (value) nor 1 (structure)")
        if wire_id < st.FIRST_USER_WIRE_ID or not _MANIFEST_NAME.match(name_b):
            raise PayloadError(f"manifest entry {name_b[:32]!r} (wire id {wire_id}) is invalid")
        name = name_b.decode("ascii")
        seen = values if role == registry.ROLE_VALUE else structures
        if wire_id in seen:
            raise PayloadError(f"manifest lists {_ROLE_NAMES[role]} wire id {wire_id} twice")
        cls: type[st.Stage] | None = (
            registry.value_stage_class(wire_id)
            if role == registry.ROLE_VALUE
            else registry.structure_stage_class(wire_id)
        )
        if cls is None:
            raise PayloadError(
                f"payload uses {_ROLE_NAMES[role]} stage {name!r} (wire id {wire_id}), "
                "which is not registered here"
            )
        if cls.name != name:
            raise PayloadError(
                f"payload's {_ROLE_NAMES[role]} wire id {wire_id} is stage {name!r}, "
                f"registered here as {cls.name!r}"
            )
        seen.add(wire_id)
    return _Allowed(frozenset(values), frozenset(structures))


def _unzstd(frame: memoryview, body_len: int) -> bytes:
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


def _decode_body(r: Reader, max_elements: int, max_tensors: int, allowed: _Allowed) -> list[F32]:
    ntensors = r.u32("tensor count")
    if ntensors > max_tensors:
        raise PayloadError(f"{ntensors} tensors exceed the bound {max_tensors}")
    # Every tensor takes at least one byte (in fact 3: ndim, structure id, value
    # kind), so a count the body cannot hold is rejected before the loop.
    if ntensors > r.remaining:
        raise PayloadError(f"{ntensors} tensors cannot fit in {r.remaining} bytes")
    budget = max_elements
    out: list[F32] = []
    for i in range(ntensors):
        ndim = r.u8("ndim")
        if ndim > _MAX_NDIM:
            raise PayloadError(f"tensor {i}: ndim {ndim} exceeds {_MAX_NDIM}")
        shape = r.u32s(ndim, "shape")
        numel = math.prod(shape)
        if numel > budget:
            raise PayloadError(
                f"tensor {i}: shape {shape} exceeds the element bound {max_elements}"
            )
        budget -= numel
        try:
            out.append(_decode_tensor(r, shape, numel, allowed))
        except PayloadError as exc:
            raise PayloadError(f"tensor {i}: {exc}") from None
    r.expect_end()
    return out


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def _all_finite(a: F32) -> bool:
    """Whether a float32 array is all finite, in one reduction and no temporaries.

    A float64 sum of float32 values cannot overflow (``3.4e38 * 2**32 <<
    1.8e308``), so it is finite exactly when every element is: any NaN or
    infinity propagates (``inf - inf`` is NaN).
    """
    if a.size <= 16:  # cheaper than a ufunc call for the tiny tensors (biases, scalars)
        return all(map(math.isfinite, a.ravel().tolist()))
    return math.isfinite(float(np.add.reduce(a, axis=None, dtype=np.float64)))


# Built-in decoders whose results are finite by construction (validated ranges and
# scales, scatters of checked values, a checked product): the framework skips
# only their finiteness pass.  Matched by identity, so a subclass is checked.
_FINITE_BY_CONSTRUCTION: frozenset[type[st.Stage]] = frozenset(
    {st.QuantStage, st.SignStage, st.TopKStage, st.RandKStage, st.LowRankStage}
)


def _checked(out: object, count: int, what: str, *, finite: bool = False) -> F32:
    """The framework's check of a stage decoder's result: float32, ``count`` values, finite.

    ``finite`` says the decoder already guarantees finiteness (built-ins only).
    """
    if not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.size != count:
        got = type(out).__name__
        if isinstance(out, np.ndarray):
            got = f"{out.dtype} array of {out.size}"
        raise PayloadError(f"{what} decoded {got}, expected {count} float32 values")
    if not finite and not _all_finite(out):
        raise PayloadError(f"non-finite value from the {what}")
    return out if out.ndim == 1 else out.reshape(-1)


def _decode_values(r: Reader, count: int, allowed: _Allowed) -> F32:
    kind = r.u8("value kind")
    cls = registry.value_stage_class(kind)
    if cls is None or (kind >= st.FIRST_USER_WIRE_ID and kind not in allowed.values):
        raise PayloadError(f"unknown value kind {kind}")
    try:
        out = cls.decode(r, count)
    except PayloadError:
        raise
    except Exception as exc:  # whatever a stage's decoder raises on bad bytes
        raise PayloadError(f"value stage {cls.name!r}: {_one_line(exc)}") from None
    return _checked(out, count, f"value stage {cls.name!r}", finite=cls in _FINITE_BY_CONSTRUCTION)


def _decode_tensor(r: Reader, shape: tuple[int, ...], numel: int, allowed: _Allowed) -> F32:
    sid = r.u8("structure id")
    if sid == st.STRUCT_DENSE:
        vals = _decode_values(r, numel, allowed)
        if not vals.flags.writeable:  # a view into the payload: the caller gets its own array
            vals = vals.copy()
        return vals if len(shape) == 1 else vals.reshape(shape)
    cls = registry.structure_stage_class(sid)
    if cls is None or (sid >= st.FIRST_USER_WIRE_ID and sid not in allowed.structures):
        raise PayloadError(f"unknown structure id {sid}")
    left = numel

    def values(count: int) -> F32:
        # The framework's bound: all value sections of a tensor hold <= numel values.
        nonlocal left
        if not isinstance(count, int) or not 0 <= count <= left:
            raise PayloadError(
                f"structure stage {cls.name!r} asked for {count!r} values, "
                f"at most {left} left for a tensor of {numel}"
            )
        left -= count
        return _decode_values(r, count, allowed)

    try:
        out = cls.decode(r, shape, values=values)
    except PayloadError:
        raise
    except Exception as exc:  # whatever a stage's decoder raises on bad bytes
        raise PayloadError(f"structure stage {cls.name!r}: {_one_line(exc)}") from None
    out = _checked(
        out, numel, f"structure stage {cls.name!r}", finite=cls in _FINITE_BY_CONSTRUCTION
    )
    return (out if out.flags.writeable else out.copy()).reshape(shape)
