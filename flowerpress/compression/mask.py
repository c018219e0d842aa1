"""Federated pruning's shared parts: the schedule, the global magnitude mask, its wire form.

The server owns the mask (``flowerpress.server.prune``); it travels with every
train message as a compact blob (:func:`pack_mask`: the tensors' shapes, then one
bit per weight with :func:`numpy.packbits`, zstd where that is smaller), devices
train the masked model and upload only the unmasked coordinates gathered into
one dense vector (:func:`gather`) that the run's codec spec then encodes like
any update; the server scatters the decoded vector back (:func:`scatter`).

References
----------
Zhu and Gupta, "To prune, or not to prune: exploring the efficacy of pruning
for model compression", ICLR workshop 2018 (arXiv:1710.01878): the cubic
sparsity schedule and global magnitude pruning during training.
Jiang et al., "Model Pruning Enables Efficient Federated Learning on Edge
Devices" (PruneFL), IEEE TNNLS 2022, and Bibikar et al., "Federated Dynamic
Sparse Training" (FedDST), AAAI 2022: the server prunes the global model and
sends the mask with the model; devices train the masked model.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import zstandard
from numpy.typing import NDArray

__all__ = ["Mask", "PruneSettings", "gather", "magnitude_mask", "mask_sparsity", "pack_mask",
           "parse_prune", "prunable", "scatter", "unpack_mask"]

#: One boolean array per tensor of the model: True keeps the weight, False prunes it.
Mask = list[NDArray[np.bool_]]

_MAGIC = b"FPM1"
_RAW, _ZSTD = 0, 1
_HEAD = struct.Struct(">4sBI")  # magic, codec, tensor count
_MAX_NDIM = 8
_ARG_RE = re.compile(r"^(sparsity|start|end)=(.+)$")


@dataclass(frozen=True)
class PruneSettings:
    """The run-config key ``prune``: ``magnitude:sparsity=S,start=A,end=B``.

    The target sparsity of round ``r`` follows the cubic schedule of Zhu and
    Gupta (2018): 0 before round ``start``, then
    ``S * (1 - (1 - (r - start) / (end - start)) ** 3)`` up to ``S`` at round
    ``end`` and after. Fast pruning early, while the model has redundancy to
    spare, slow pruning near the end.
    """

    sparsity: float  # the final fraction of the prunable weights set to zero, in (0, 1)
    start: int = 1  # the first round that prunes (its target is 0: the mask starts then)
    end: int = 1  # the round the final sparsity is reached

    def target(self, server_round: int) -> float:
        """The fraction of prunable weights pruned in ``server_round``."""
        if server_round < self.start:
            return 0.0
        if server_round >= self.end:
            return self.sparsity
        progress = (server_round - self.start) / (self.end - self.start)
        return float(self.sparsity * (1.0 - (1.0 - progress) ** 3))


def parse_prune(text: str) -> PruneSettings | None:
    """``none`` (None) or ``magnitude:sparsity=S[,start=A][,end=B]`` as PruneSettings.

    Raises
    ------
    ValueError
        One line naming the part that is wrong and what it accepts.
    """
    value = text.strip()
    if value.lower() in ("", "none", "off"):
        return None
    name, _, args = value.partition(":")
    if name != "magnitude":
        raise ValueError(f"pruning method {name!r} is unknown; expected none or "
                         "magnitude:sparsity=S,start=A,end=B")
    parts: dict[str, str] = {}
    for raw in (a.strip() for a in args.split(",") if a.strip()):
        match = _ARG_RE.match(raw)
        if match is None:
            raise ValueError(f"prune argument {raw!r}: expected sparsity=S, start=A or end=B")
        if match.group(1) in parts:
            raise ValueError(f"prune argument {match.group(1)!r} given twice")
        parts[match.group(1)] = match.group(2)
    if "sparsity" not in parts:
        raise ValueError("magnitude pruning needs sparsity=S (0 < S < 1)")
    try:
        sparsity = float(parts["sparsity"])
        start = int(parts.get("start", "1"), 10)
        end = int(parts.get("end", str(start)), 10)
    except ValueError:
        raise ValueError("prune sparsity must be a number, start and end integers") from None
    if not 0.0 < sparsity < 1.0:
        raise ValueError(f"prune sparsity={sparsity:g} must be in (0, 1)")
    if start < 1:
        raise ValueError(f"prune start={start} must be >= 1 (a round)")
    if end < start:
        raise ValueError(f"prune end={end} must be >= start={start}")
    return PruneSettings(sparsity=sparsity, start=start, end=end)


def prunable(weights: Sequence[NDArray[np.float32]]) -> list[bool]:
    """Which tensors are pruned: weight matrices and kernels (2 or more dimensions).

    Biases and normalization parameters stay dense, as in Zhu and Gupta (2018):
    they are few and pruning them costs accuracy for nothing.
    """
    return [w.ndim >= 2 for w in weights]


def magnitude_mask(weights: Sequence[NDArray[np.float32]], sparsity: float,
                   previous: Mask | None = None) -> Mask:
    """The global magnitude mask that prunes ``sparsity`` of the prunable weights.

    One threshold over all prunable tensors (global, not per layer): the
    weights of smallest ``|w|`` go first. Pruned weights stay pruned
    (``previous`` is kept; the schedule only grows), as in Zhu and Gupta (2018).
    Ties break by position, so the mask is deterministic.
    """
    which = prunable(weights)
    total = sum(int(w.size) for w, p in zip(weights, which, strict=True) if p)
    mask: Mask = [np.ones(w.shape, dtype=np.bool_) for w in weights]
    if total == 0:
        return mask
    scores = np.concatenate([np.abs(w).reshape(-1).astype(np.float64)
                             for w, p in zip(weights, which, strict=True) if p])
    if previous is not None:
        kept_before = np.concatenate([m.reshape(-1) for m, p in
                                      zip(previous, which, strict=True) if p])
        scores[~kept_before] = -1.0  # already pruned: first to go again
    pruned = min(total, round(sparsity * total))
    flat = np.ones(total, dtype=np.bool_)
    if pruned > 0:
        order = np.argsort(scores, kind="stable")
        flat[order[:pruned]] = False
    if previous is not None:
        flat &= kept_before
    offset = 0
    for i, (w, p) in enumerate(zip(weights, which, strict=True)):
        if p:
            mask[i] = flat[offset:offset + w.size].reshape(w.shape)
            offset += w.size
    return mask


def mask_sparsity(mask: Sequence[NDArray[np.bool_]]) -> float:
    """The fraction of all the model's weights the mask prunes."""
    total = sum(int(m.size) for m in mask)
    kept = sum(int(np.count_nonzero(m)) for m in mask)
    return 0.0 if total == 0 else (total - kept) / total


def gather(arrays: Sequence[NDArray[np.float32]], mask: Sequence[NDArray[np.bool_]]
           ) -> NDArray[np.float32]:
    """The unmasked coordinates of ``arrays``, in model order, as one float32 vector."""
    if len(arrays) != len(mask):
        raise ValueError(f"{len(arrays)} tensors, but the mask has {len(mask)}")
    parts = []
    for i, (a, m) in enumerate(zip(arrays, mask, strict=True)):
        if np.shape(a) != m.shape:
            raise ValueError(f"tensor {i} has shape {np.shape(a)}, the mask {m.shape}")
        parts.append(np.asarray(a, dtype=np.float32)[m])
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def scatter(vector: NDArray[np.float32], mask: Sequence[NDArray[np.bool_]]
            ) -> list[NDArray[np.float32]]:
    """Inverse of :func:`gather`: tensors of the mask's shapes, zero where pruned."""
    kept = sum(int(np.count_nonzero(m)) for m in mask)
    if vector.ndim != 1 or vector.size != kept:
        raise ValueError(f"vector of shape {vector.shape}, the mask keeps {kept} weights")
    out: list[NDArray[np.float32]] = []
    offset = 0
    for m in mask:
        t = np.zeros(m.shape, dtype=np.float32)
        n = int(np.count_nonzero(m))
        t[m] = vector[offset:offset + n]
        offset += n
        out.append(t)
    return out


def apply_mask_inplace(arrays: Sequence[NDArray[np.float32]],
                       mask: Sequence[NDArray[np.bool_]]) -> None:
    """Zero the pruned coordinates of ``arrays`` (writable float arrays)."""
    for a, m in zip(arrays, mask, strict=True):
        a[~m] = 0.0


def pack_mask(mask: Sequence[NDArray[np.bool_]]) -> bytes:
    """The mask's wire form: header, shapes, one bit per weight, zstd where smaller."""
    shapes = b"".join(struct.pack(f">B{m.ndim}I", m.ndim, *m.shape) for m in mask)
    bits = np.packbits(np.concatenate([m.reshape(-1) for m in mask]) if mask
                       else np.zeros(0, np.bool_)).tobytes()
    squeezed = zstandard.ZstdCompressor(level=10).compress(bits)
    codec, body = (_ZSTD, squeezed) if len(squeezed) < len(bits) else (_RAW, bits)
    return _HEAD.pack(_MAGIC, codec, len(mask)) + shapes + body


def unpack_mask(data: bytes, *, max_elements: int, max_tensors: int = 4096) -> Mask:
    """Inverse of :func:`pack_mask`; sizes bounded by ``max_elements`` and ``max_tensors``.

    Raises
    ------
    ValueError
        The bytes are not a mask within the bounds (one line naming why).
    """
    if not isinstance(data, bytes) or len(data) < _HEAD.size:
        raise ValueError("prune mask is not a byte string with a header")
    magic, codec, count = _HEAD.unpack_from(data)
    if magic != _MAGIC or codec not in (_RAW, _ZSTD):
        raise ValueError("prune mask has an unknown header")
    if count > max_tensors:
        raise ValueError(f"prune mask names {count} tensors, at most {max_tensors} allowed")
    offset, shapes, total = _HEAD.size, [], 0
    for _ in range(count):
        if offset >= len(data) or data[offset] > _MAX_NDIM:
            raise ValueError("prune mask has a truncated or malformed shape")
        ndim = data[offset]
        if offset + 1 + 4 * ndim > len(data):
            raise ValueError("prune mask has a truncated shape")
        shape = struct.unpack_from(f">{ndim}I", data, offset + 1)
        offset += 1 + 4 * ndim
        total += int(np.prod(shape, dtype=np.int64)) if ndim else 1
        if total > max_elements:
            raise ValueError(f"prune mask covers more than {max_elements} weights")
        shapes.append(tuple(int(d) for d in shape))
    need = (total + 7) // 8
    body = data[offset:]
    if codec == _ZSTD:
        try:
            body = zstandard.ZstdDecompressor().decompress(body, max_output_size=need)
        except zstandard.ZstdError as exc:
            raise ValueError(f"prune mask does not decompress: {exc}") from None
    if len(body) != need:
        raise ValueError(f"prune mask holds {len(body)} bytes of bits, expected {need}")
    flat = np.unpackbits(np.frombuffer(body, dtype=np.uint8), count=total).astype(np.bool_)
    out: Mask = []
    start = 0
    for shape in shapes:
        n = int(np.prod(shape, dtype=np.int64)) if shape else 1
        out.append(flat[start:start + n].reshape(shape))
        start += n
    return out
