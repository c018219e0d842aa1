"""Compression for secure aggregation: modular quantization, rand-k, rotation, packing."""

from __future__ import annotations

import numpy as np
import pytest

from flowerpress.config import ConfigError, validate
from flowerpress.secagg import encoding
from flowerpress.secagg.settings import codec_of, min_cohort, parse_secagg, refusal


def test_pack_roundtrip_and_size() -> None:
    # Prepare
    words = np.random.default_rng(0).integers(0, 1 << 11, size=1001, dtype=np.uint64)
    # Execute
    packed = encoding.pack_words(words, 11)
    # Assert: b bits per coordinate, not 64
    assert len(packed) == (1001 * 11 + 7) // 8
    np.testing.assert_array_equal(encoding.unpack_words(packed, 11, 1001), words)
    with pytest.raises(ValueError, match="expected"):
        encoding.unpack_words(packed[:-1], 11, 1001)


def test_rotation_is_orthonormal_and_invertible() -> None:
    x = np.random.default_rng(1).normal(size=256)
    y = encoding.fwht(x)
    assert np.isclose(np.linalg.norm(y), np.linalg.norm(x))
    np.testing.assert_allclose(encoding.fwht(y), x, atol=1e-12)


def test_modular_representation_is_centred() -> None:
    ints = np.array([-128, -1, 0, 1, 127], dtype=np.int64)
    np.testing.assert_array_equal(encoding.from_modular(encoding.to_modular(ints, 8), 8), ints)


def test_encoding_is_unbiased_over_seeded_draws() -> None:
    # Prepare: one device, no noise, a vector inside the clip
    plan = encoding.make_plan(dim=50, bits=8, clip=1.0, noise=0.0, cohort=4, min_summands=3,
                              seed=5)
    x = np.random.default_rng(2).normal(size=50)
    x *= 0.8 / np.linalg.norm(x)
    # Execute: the mean of many decoded single-device encodings
    draws = [encoding.decode_sum(encoding.encode_update(x, plan, rng=np.random.default_rng(s))[0],
                                 plan, 1) for s in range(400)]
    # Assert: stochastic rounding is unbiased (error shrinks like 1/sqrt(draws))
    assert np.abs(np.mean(draws, axis=0) - x).max() < 0.25 * plan.gamma * 4


def test_sum_of_encodings_decodes_to_the_mean() -> None:
    plan = encoding.make_plan(dim=300, bits=16, clip=1.0, noise=0.0, cohort=10,
                              min_summands=7, seed=9)
    rng = np.random.default_rng(3)
    xs = [v / np.linalg.norm(v) * 0.9 for v in rng.normal(size=(10, 300))]
    total = np.zeros(plan.padded, dtype=np.uint64)
    for x in xs:
        total += encoding.encode_update(x, plan, rng=rng)[0]
    total &= np.uint64((1 << 16) - 1)
    np.testing.assert_allclose(encoding.decode_sum(total, plan, 10), np.mean(xs, axis=0),
                               atol=3 * plan.gamma)


def test_randk_support_is_shared_and_decoded_in_place() -> None:
    # Prepare: two devices and the server derive the support from the round seed
    a = encoding.make_plan(dim=1000, bits=16, clip=10.0, noise=0.0, cohort=2, min_summands=2,
                           seed=4, randk=0.1)
    b = encoding.make_plan(dim=1000, bits=16, clip=10.0, noise=0.0, cohort=2, min_summands=2,
                           seed=4, randk=0.1)
    assert a.support is not None and b.support is not None
    np.testing.assert_array_equal(a.support, b.support)
    assert a.padded == 128  # 100 kept coordinates, padded to a power of two
    x = np.zeros(1000)
    x[a.support] = 0.01
    # Execute
    words, _ = encoding.encode_update(x, a, rng=np.random.default_rng(0))
    out = encoding.decode_sum(words, a, 1)
    # Assert: the kept coordinates come back (scaled by d/k, unbiased), the rest are 0
    np.testing.assert_allclose(out[a.support], 0.1, atol=3 * a.gamma)
    assert np.count_nonzero(np.delete(out, a.support)) == 0


def test_too_few_bits_are_refused() -> None:
    with pytest.raises(ValueError, match="bits=4 is too few"):
        encoding.make_plan(dim=100, bits=4, clip=1.0, noise=0.0, cohort=100, min_summands=70,
                           seed=0)


def test_settings_and_refusals_are_one_line() -> None:
    s = parse_secagg("on:threshold=0.7,bits=12,noise=0.5")
    assert s is not None and s.bits == 12 and s.noise == 0.5
    assert parse_secagg("off") is None
    with pytest.raises(ValueError, match=r"\(0.5, 1\]"):
        parse_secagg("on:threshold=0.5")
    assert codec_of("randk:0.1+q:8") == (8, 0.1)
    assert refusal(s, compression="topk:0.1+q:8", dp="off", weighted_sum=True,
                   strategy="fedavg") is not None
    assert "weighted sum" in (refusal(s, compression="none", dp="off", weighted_sum=False,
                                      strategy="median") or "")
    assert "dp=off" in (refusal(s, compression="q:12", dp="distributed:clip=1,noise=1",
                                weighted_sum=True, strategy="fedavg") or "")
    assert "disagree" in (refusal(s, compression="q:8", dp="off", weighted_sum=True,
                                  strategy="fedavg") or "")


@pytest.mark.parametrize(("spec", "cohort", "refused"), [
    ("on", 1, True), ("on", 2, True), ("on", 3, False),
    ("on:threshold=0.6", 3, True), ("on:threshold=0.6", 4, False)])
def test_a_cohort_below_the_minimum_is_refused_in_one_line(spec: str, cohort: int,
                                                          refused: bool) -> None:
    # Prepare
    settings = parse_secagg(spec)
    assert settings is not None
    # Execute
    line = refusal(settings, compression="q:16", dp="off", weighted_sum=True,
                   strategy="fedavg", clients_per_round=cohort)
    # Assert: every decoded sum adds at least three devices
    assert (line is not None) == refused
    assert line is None or ("minimum cohort" in line and "\n" not in line)
    assert min_cohort(settings) == (3 if settings.threshold > 2 / 3 else 4)


def test_the_run_config_refuses_secure_aggregation_of_one_device() -> None:
    # Prepare / Execute / Assert: config validation calls the same refusal
    with pytest.raises(ConfigError, match="minimum cohort of 3"):
        validate({"secagg": "on", "clients-per-round": "1", "num-clients": "10",
                  "min-replies": "1", "compression": "q:16"})
