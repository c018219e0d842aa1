"""Bytes on the wire: the ratios of issue 4 on a ~1M-parameter update (sizes are deterministic)."""

from __future__ import annotations

import numpy as np
import pytest

from flowerpress.compression import decode, fp32_nbytes, parse

# Mixed conv / linear / bias shapes in state_dict order, ~1.06M parameters.
MIXED_SHAPES: list[tuple[int, ...]] = [
    (32, 3, 3, 3),
    (32,),
    (64, 32, 3, 3),
    (64,),
    (128, 64, 3, 3),
    (128,),
    (128, 128, 3, 3),
    (128,),
    (256, 3200),
    (256,),
    (10, 256),
    (10,),
]
SMALL_SHAPES: list[tuple[int, ...]] = [(4, 1, 3, 3), (4,), (10, 16), (10,), (3, 7), ()]


def _gaussian_update(shapes: list[tuple[int, ...]], seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(0.01 * rng.standard_normal(s)).astype(np.float32) for s in shapes]


@pytest.fixture(scope="module")
def mixed_update() -> list[np.ndarray]:
    return _gaussian_update(MIXED_SHAPES, seed=0)


def test_mixed_update_is_about_one_million_parameters(mixed_update: list[np.ndarray]) -> None:
    assert 1_000_000 <= sum(a.size for a in mixed_update) <= 1_100_000


@pytest.mark.parametrize(
    ("spec", "min_ratio"),
    [
        ("fp16", 1.99),
        ("q:8", 3.9),
        ("q:4", 7.5),
        ("q:2", 14.0),
        ("sign", 28.0),
        ("sign+ef", 28.0),
        ("topk:0.01+q:8+zstd", 150.0),
        ("topk:0.01+q:4+ef+zstd", 150.0),
        ("lowrank:4+q:8+ef", 100.0),
        ("randk:0.01+q:8", 300.0),
    ],
)
def test_payload_is_smaller_than_float32_by_the_target_ratio(
    mixed_update: list[np.ndarray], spec: str, min_ratio: float
) -> None:
    # Execute
    payload, _ = parse(spec).encode(mixed_update, rng=np.random.default_rng(0))

    # Assert: against raw float32 bytes (stricter than .npy, which adds headers)
    ratio = fp32_nbytes(mixed_update) / len(payload)
    assert ratio >= min_ratio, f"{spec}: {len(payload)} bytes, ratio {ratio:.2f}"
    decoded = decode(payload, max_elements=sum(a.size for a in mixed_update))
    assert [d.shape for d in decoded] == [a.shape for a in mixed_update]


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8, 11, 16])
def test_quantized_codes_are_really_packed(mixed_update: list[np.ndarray], bits: int) -> None:
    # Execute
    payload, _ = parse(f"q:{bits}").encode(mixed_update, rng=np.random.default_rng(0))

    # Assert: BITS per value + one lo/hi float32 pair per 2048 values + <= 64 bytes per tensor
    n = sum(a.size for a in mixed_update)
    nblocks = sum(-(-a.size // 2048) for a in mixed_update)
    packed = sum((a.size * bits + 7) // 8 for a in mixed_update)
    overhead = len(payload) - packed - 8 * nblocks
    assert 0 <= overhead <= 64 * len(mixed_update)
    assert len(payload) <= n * (bits + 64 / 2048) / 8 + 64 * len(mixed_update) + 8


def test_topk_indices_cost_far_less_than_int32(mixed_update: list[np.ndarray]) -> None:
    # Prepare
    n = sum(a.size for a in mixed_update)

    # Execute
    payload, _ = parse("topk:0.01+q:8").encode(mixed_update, rng=np.random.default_rng(0))

    # Assert: ~1% kept at 8 bits each; int32 indices alone would be 4 bytes per kept value
    kept = sum(max(1, -(-a.size // 100)) for a in mixed_update)
    per_kept = len(payload) / kept
    assert kept <= 0.0101 * n + len(mixed_update)
    assert per_kept < 2.2, f"{per_kept:.2f} bytes per kept value"


@pytest.mark.parametrize(
    "spec",
    [
        "none",
        "fp16",
        "q:8",
        "q:16",
        "sign",
        "topk:0.5",
        "topk:0.01+q:8+zstd",
        "randk:0.3",
        "lowrank:1",
        "lowrank:4+q:8+ef",
        "zstd",
        "sign+ef+zstd:19",
    ],
)
def test_small_update_grows_by_at_most_its_header(spec: str) -> None:
    # Prepare: a few hundred parameters
    update = _gaussian_update(SMALL_SHAPES, seed=1)
    n = sum(a.size for a in update)
    assert 200 <= n <= 400

    # Execute
    payload, _ = parse(spec).encode(update, rng=np.random.default_rng(0))

    # Assert: 5-byte frame + 4-byte count (+8 with zstd) and <= 64 bytes per tensor
    assert len(payload) <= 4 * n + 17 + 64 * len(update)
