"""Bit packing, Rice-coded index gaps and seeded index sampling."""

from __future__ import annotations

import numpy as np
import pytest

from flowerpress.compression import PayloadError
from flowerpress.compression.bitpack import (
    pack_uint,
    packed_nbytes,
    rice_decode,
    rice_encode,
    seeded_indices,
    unpack_uint,
)


@pytest.mark.parametrize("bits", [*range(1, 17), 24, 32])
@pytest.mark.parametrize("count", [0, 1, 7, 8, 9, 1001])
def test_pack_uint_round_trips_and_uses_exactly_count_times_bits(bits: int, count: int) -> None:
    # Prepare
    rng = np.random.default_rng(bits * 1000 + count)
    values = rng.integers(0, 1 << bits, size=count, dtype=np.uint64)

    # Execute
    packed = pack_uint(values, bits)
    back = unpack_uint(packed, count, bits)

    # Assert
    assert len(packed) == packed_nbytes(count, bits) == (count * bits + 7) // 8
    np.testing.assert_array_equal(back.astype(np.uint64), values)


@pytest.mark.parametrize("bits", [1, 3, 4, 12])
def test_pack_uint_round_trips_across_internal_chunks(bits: int) -> None:
    # Prepare: more values than one 32768-value chunk, not a multiple of 8
    values = np.random.default_rng(bits).integers(0, 1 << bits, size=100_003, dtype=np.uint64)

    # Execute
    back = unpack_uint(pack_uint(values, bits), values.size, bits)

    # Assert
    np.testing.assert_array_equal(back.astype(np.uint64), values)


def test_unpack_uint_rejects_wrong_section_length() -> None:
    with pytest.raises(PayloadError, match="packed section"):
        unpack_uint(b"\x00\x00", 5, 4)


@pytest.mark.parametrize(("n", "k"), [(1, 1), (10, 3), (1000, 10), (100_000, 1000), (50, 49)])
def test_rice_round_trips_sorted_indices(n: int, k: int) -> None:
    # Prepare
    rng = np.random.default_rng(n + k)
    idx = np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)

    # Execute
    b, unary, rem = rice_encode(idx, n)
    back = rice_decode(unary, rem, k, b, n)

    # Assert
    np.testing.assert_array_equal(back, idx)


def test_rice_codes_random_support_near_entropy_not_as_int32() -> None:
    # Prepare: 1% of 1M positions, the topk:0.01 regime
    rng = np.random.default_rng(0)
    n, k = 1_000_000, 10_000
    idx = np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)

    # Execute
    _, unary, rem = rice_encode(idx, n)

    # Assert: about log2(e / 0.01) = 8.1 bits per index, versus 32 for int32
    bits_per_index = 8 * (len(unary) + len(rem)) / k
    assert bits_per_index < 8.6


def test_rice_decode_rejects_index_past_the_end() -> None:
    # Prepare: valid for n=100, replayed against n=50
    idx = np.array([3, 40, 90], dtype=np.int64)
    b, unary, rem = rice_encode(idx, 100)

    # Execute / Assert
    with pytest.raises(PayloadError):
        rice_decode(unary, rem, 3, b, 50)


@pytest.mark.parametrize(("n", "k"), [(10, 0), (10, 1), (10, 5), (10, 9), (10, 10), (5000, 50)])
def test_seeded_indices_are_deterministic_sorted_and_distinct(n: int, k: int) -> None:
    # Execute
    a = seeded_indices(1234, n, k)
    b = seeded_indices(1234, n, k)

    # Assert
    np.testing.assert_array_equal(a, b)
    assert a.size == k
    assert np.all(np.diff(a) > 0)
    assert (a.size == 0) or (a[0] >= 0 and a[-1] < n)


def test_seeded_indices_cover_positions_uniformly() -> None:
    # Prepare
    n, k, draws = 20, 5, 4000

    # Execute
    counts = np.zeros(n)
    for seed in range(draws):
        counts[seeded_indices(seed, n, k)] += 1

    # Assert: each position kept with probability k/n = 0.25 (binomial sd ~ 27)
    np.testing.assert_allclose(counts / draws, k / n, atol=0.035)
