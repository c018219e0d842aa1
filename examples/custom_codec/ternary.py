"""A custom codec stage in one file: TernGrad's ternary quantization.

Each value ``x_i`` of a tensor is sent as ``s * sign(x_i) * b_i`` with
``s = max_i |x_i|`` and ``b_i ~ Bernoulli(|x_i| / s)``: stochastic, unbiased
rounding to ``{-s, 0, +s}`` with 2 bits per value plus one float32 scale per
tensor (Wen et al., "TernGrad: Ternary Gradients to Reduce Communication in
Distributed Deep Learning", NeurIPS 2017, https://arxiv.org/abs/1705.07878).

It is written only against the public interface of
:mod:`flowerpress.compression`; register it and use it in any spec::

    from flowerpress.compression import parse, register_stage
    from examples.custom_codec.ternary import Ternary

    register_stage(Ternary)
    pipe = parse("topk:0.1+ternary+ef+zstd")

or name it by import path, which registers it too (run from the project root)::

    flowerpress simulate --out runs/tern \
        --set compression=examples.custom_codec.ternary:Ternary+zstd
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import numpy.typing as npt

from flowerpress.compression import PayloadError, Reader, ValueStage, Writer

F32 = npt.NDArray[np.float32]

# Byte b holds four 2-bit codes, value j in bits 2j..2j+1 (0: zero, 1: +s, 2: -s).
_SHIFTS = np.arange(0, 8, 2, dtype=np.uint8)
_CODES = (np.arange(256, dtype=np.uint8)[:, None] >> _SHIFTS) & np.uint8(3)  # (256, 4)
_SIGNS = np.array([0.0, 1.0, -1.0, np.nan], dtype=np.float32)[_CODES]  # code 3 is invalid


@dataclass(frozen=True)
class Ternary(ValueStage):
    """``ternary``: stochastic ternary quantization, ``{-s, 0, +s}`` per value (TernGrad).

    ``E[decode(encode(x))] = x``: each value becomes ``s * sign(x_i)`` with
    probability ``|x_i| / s`` and ``0`` otherwise (Wen et al. 2017, eq. 4),
    with ``s = max |x_i|`` per tensor (or per sparsified vector after ``topk``
    / ``randk``).  Unbiased but with variance up to ``s * |x_i|``, so it pairs
    well with ``ef`` or a sparsifier.  Stochastic: every draw comes from the
    injected generator.  Safe after DP noise (post-processing: the rounding
    randomness is independent of the data).

    Wire: ``scale:f32 codes`` with four 2-bit codes per byte, LSB first.
    """

    name: ClassVar[str] = "ternary"
    #: Any unused id in [64, 255]; 0x54 is "T".
    wire_id: ClassVar[int | None] = 0x54

    def encode(
        self, x: F32, w: Writer, *, rng: np.random.Generator, need_recon: bool
    ) -> F32 | None:
        """Write ``s`` and the packed codes; return the decoded values if asked."""
        mag = np.abs(x)
        scale = np.float32(mag.max()) if x.size else np.float32(0.0)
        # Keep with probability |x| / s: u * s < |x| for u uniform on [0, 1).
        keep = rng.random(x.size, dtype=np.float32) * scale < mag
        codes = keep.astype(np.uint8) << (x < 0).astype(np.uint8)  # 1: +s, 2: -s
        padded = np.zeros(-(-x.size // 4) * 4, dtype=np.uint8)
        padded[: x.size] = codes
        packed = (padded.reshape(-1, 4) << _SHIFTS).sum(axis=1, dtype=np.uint8)
        w.f32(float(scale))
        w.raw(packed.tobytes())
        return _expand(packed, x.size, scale) if need_recon else None

    @classmethod
    def decode(cls, r: Reader, count: int) -> F32:
        """Read ``s`` and ``count`` codes; reject a negative scale or the unused code 3."""
        scale = r.f32("ternary scale")
        if not scale >= 0.0:  # NaN fails this too; +inf is caught by the framework
            raise PayloadError(f"ternary scale {scale} is not a non-negative number")
        packed = np.frombuffer(r.raw(-(-count // 4), "ternary codes"), dtype=np.uint8)
        if np.any((packed & 0x55) & ((packed >> 1) & 0x55)):
            raise PayloadError("ternary code 3 is not a valid code")
        return _expand(packed, count, np.float32(scale))


def _expand(packed: npt.NDArray[np.uint8], count: int, scale: np.float32) -> F32:
    """Codes to values with one table gather per byte (``count`` float32 out)."""
    table = _SIGNS * scale
    out: F32 = np.take(table, packed, axis=0).reshape(-1)[:count]
    return out
