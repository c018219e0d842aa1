"""Decoding cost is bounded by the model, honest or hostile payload alike.

Peak traced memory (``tracemalloc``, which sees numpy's buffers) of one
``decode`` stays within ``PEAK_BOUND`` times the model's float32 size, the
output included, for a ~1M-element model.  No timing is asserted here; the
numbers are in the benchmark notes.
"""

from __future__ import annotations

import contextlib
import struct
import tracemalloc
from collections.abc import Callable

import numpy as np
import pytest
import zstandard

from flowerpress.compression import PayloadError, decode, parse

SHAPES: list[tuple[int, ...]] = [
    (32, 3, 3, 3), (32,), (64, 32, 3, 3), (64,), (128, 64, 3, 3), (128,),
    (128, 128, 3, 3), (128,), (256, 3200), (256,), (10, 256), (10,),
]  # fmt: skip
N = sum(int(np.prod(s)) for s in SHAPES)
MODEL_BYTES = 4 * N
PEAK_BOUND = 3.0


def _peak(fn: Callable[[], object]) -> float:
    tracemalloc.start()
    try:
        fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak / MODEL_BYTES


def _frame(body: bytes, *, zstd: bool = False) -> bytes:
    if zstd:
        frame = zstandard.ZstdCompressor(level=3).compress(body)
        return b"FPC\x01\x01" + struct.pack("<Q", len(body)) + frame
    return b"FPC\x01\x00" + body


@pytest.fixture(scope="module")
def update() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal(s).astype(np.float32) for s in SHAPES]


@pytest.mark.parametrize(
    "spec",
    ["none", "none+zstd", "q:16", "fp16", "randk:0.5", "randk:0.5+zstd", "topk:0.99",
     "topk:0.99+zstd", "topk:0.5+fp16", "lowrank:4+q:8"],
)  # fmt: skip
def test_honest_decode_peak_is_bounded_by_the_model(update: list[np.ndarray], spec: str) -> None:
    # Prepare
    payload, _ = parse(spec).encode(update, rng=np.random.default_rng(1))

    # Execute
    peak = _peak(lambda: decode(payload, max_elements=N, max_tensors=len(SHAPES)))

    # Assert
    assert peak <= PEAK_BOUND, f"{spec}: decode peak {peak:.2f}x the model"


def _hostile_topk(value_section: bytes, b: int) -> bytes:
    # One tensor holding every element, all kept (the encoder would send it dense).
    unary = np.packbits(np.ones(N, np.uint8), bitorder="little").tobytes()
    rem = bytes((N * b + 7) // 8)
    head = struct.pack("<IBI", 1, 1, N) + struct.pack("<BIBI", 1, N, b, len(unary))
    return head + unary + rem + value_section


HOSTILE = {
    "topk k=n, float32": lambda: _frame(_hostile_topk(b"\x00" + bytes(4 * N), 0)),
    "topk k=n, sign, zstd": lambda: _frame(
        _hostile_topk(b"\x03" + struct.pack("<f", 1.0) + bytes((N + 7) // 8), 3), zstd=True
    ),
    "topk k=n, fp16, zstd": lambda: _frame(_hostile_topk(b"\x01" + bytes(2 * N), 0), zstd=True),
    "randk k=n/2, float32": lambda: _frame(
        struct.pack("<IBI", 1, 1, N) + struct.pack("<BIQ", 2, N // 2, 12345) + b"\x00"
        + bytes(4 * (N // 2))
    ),
    "q:16 near float32 max (float64 path)": lambda: _frame(
        struct.pack("<IBI", 1, 1, N) + struct.pack("<BBBI", 0, 2, 16, 1 << 24)
        + struct.pack("<ff", -3e38, 3e38) + bytes(2 * N)
    ),
    "dense zeros, max zstd body": lambda: _frame(
        struct.pack("<IBI", 1, 1, N) + b"\x00\x00" + bytes(4 * N), zstd=True
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_decode_peak_is_bounded_by_the_model(name: str) -> None:
    # Prepare
    payload = HOSTILE[name]()

    # Execute
    def run() -> None:
        with contextlib.suppress(PayloadError):
            decode(payload, max_elements=N, max_tensors=len(SHAPES))

    peak = _peak(run)

    # Assert
    assert peak <= PEAK_BOUND, f"{name}: decode peak {peak:.2f}x the model"


def test_hostile_rice_parameter_is_rejected() -> None:
    # Prepare: b = 31 would inflate the remainders to 31 bits per index
    payload = _frame(_hostile_topk(b"\x03" + struct.pack("<f", 1.0) + bytes((N + 7) // 8), 31))

    # Execute / Assert
    with pytest.raises(PayloadError, match="rice parameter 31 outside"):
        decode(payload, max_elements=N)


def test_many_tiny_tensors_are_rejected_by_the_model_tensor_count() -> None:
    # Prepare: 65,536 empty-shaped scalars in a few hundred bytes of zstd
    body = struct.pack("<I", 65536) + (b"\x00\x00\x00" + bytes(4)) * 65536
    payload = _frame(body, zstd=True)
    assert len(payload) < 1024

    # Execute
    def run() -> None:
        with pytest.raises(PayloadError, match="65536 tensors exceed the bound 12"):
            decode(payload, max_elements=N, max_tensors=len(SHAPES))

    peak = _peak(run)

    # Assert: rejected before any per-tensor work (the body is ~460 KB)
    assert peak * MODEL_BYTES < 1 << 20


def test_tensor_count_beyond_the_body_is_rejected_before_looping() -> None:
    payload = _frame(struct.pack("<I", 60000) + bytes(100))
    with pytest.raises(PayloadError, match="60000 tensors cannot fit in 100 bytes"):
        decode(payload, max_elements=N)


# The 784-256-10 MLP of benchmarks/hostile_replies.py --model large (203,530
# parameters): on a model this size the fixed-size float64 temporaries of the
# dequantizer's float64 path were no longer small against the model.
MLP_SHAPES: list[tuple[int, ...]] = [(256, 784), (256,), (10, 256), (10,)]
MLP_N = sum(int(np.prod(s)) for s in MLP_SHAPES)


def test_one_huge_block_minimum_decodes_within_the_bound_on_a_small_model() -> None:
    # Prepare: an honest q:8 payload with one edit, as the hostile-replies benchmark
    # made it (seed 5, payload class): the 4th block minimum of the first tensor
    # becomes -1.9e38, still finite and below its maximum, so the payload is valid
    # and decodes through the float64 path. That reply peaked at 3.01x the model.
    rng = np.random.default_rng(0)
    update = [(rng.standard_normal(s) * 0.01).astype(np.float32) for s in MLP_SHAPES]
    payload = bytearray(parse("q:8").encode(update, rng=rng)[0])
    # magic+version+flags 5, count 4, ndim 1, dims 8, struct 1, kind 1, bits 1, block 4
    lo_at = 25
    assert payload[lo_at - 6 : lo_at] == b"\x02\x08" + struct.pack("<I", 2048)
    payload[lo_at + 12 : lo_at + 16] = struct.pack("<f", -1.9e38)
    decode(bytes(payload), max_elements=MLP_N, max_tensors=4)  # warm: lazy imports

    # Execute
    tracemalloc.start()
    try:
        out = decode(bytes(payload), max_elements=MLP_N, max_tensors=4)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    # Assert: decoded (a valid, finite, huge update), within 3x the model
    assert [a.shape for a in out] == MLP_SHAPES
    assert np.isfinite(out[0]).all() and out[0].min() < -1e38
    assert peak <= PEAK_BOUND * 4 * MLP_N, f"decode peak {peak / (4 * MLP_N):.2f}x the model"


@pytest.mark.parametrize("spec", ["randk:0.5", "randk:0.5+q:8", "randk:0.9"])
def test_random_k_support_on_a_small_model_is_bounded_by_the_model(spec: str) -> None:
    # Prepare: the digits MLP (4,810 parameters), where fixed-size batches of
    # draws used to dominate (11x the model)
    shapes = [(64, 64), (64,), (64, 10), (10,)]
    n = sum(int(np.prod(s)) for s in shapes)
    rng = np.random.default_rng(0)
    update = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    payload, _ = parse(spec).encode(update, None, rng=np.random.default_rng(1))
    decode(payload, max_elements=n, max_tensors=len(shapes))  # warm numpy's caches
    # Execute
    tracemalloc.start()
    try:
        decode(payload, max_elements=n, max_tensors=len(shapes))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Assert
    assert peak / (4 * n) <= PEAK_BOUND
