"""Simulated Byzantine clients: spec parsing, the malicious set, the poisoned deltas."""

from __future__ import annotations

import numpy as np
import pytest

from flowerpress.simulations.attacks import GaussianNoise, SignFlip, parse_attack


def _delta() -> list[np.ndarray]:
    return [np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5, np.ones(4, dtype=np.float32)]


@pytest.mark.parametrize("spec", ["none", "", " None "])
def test_none_means_no_attack(spec: str) -> None:
    assert parse_attack(spec) is None


def test_specs_parse_to_attacks_with_arguments() -> None:
    # Execute
    flip = parse_attack("signflip:fraction=0.3,scale=4")
    noise = parse_attack("noise:fraction=0.1,std=2.5")
    default = parse_attack("signflip")
    # Assert
    assert flip == SignFlip(fraction=0.3, scale=4.0)
    assert noise == GaussianNoise(fraction=0.1, std=2.5)
    assert default == SignFlip(fraction=0.2, scale=10.0)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("flood:fraction=0.1", r"^unknown attack 'flood'; available: none, noise, signflip$"),
        ("signflip:std=1", r"bad argument 'std=1'; allowed: fraction, scale$"),
        ("noise:fraction", r"bad argument 'fraction'; allowed: fraction, std$"),
        ("noise:std=abc", r"std='abc' is not a number$"),
        ("signflip:fraction=1.5", r"fraction must be in \[0, 1\], got 1.5$"),
        ("signflip:scale=0", r"scale must be finite and > 0"),
        ("noise:std=-1", r"std must be finite and > 0"),
        ("none:fraction=0.2", "takes no arguments"),
    ],
)
def test_bad_specs_raise_one_line_value_error(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        parse_attack(spec)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("fraction", "n", "expected"),
    [(0.2, 10, 2), (0.2, 50, 10), (0.15, 10, 2), (0.25, 2, 1), (0.0, 10, 0), (1.0, 3, 3)],
)
def test_the_first_rounded_fraction_of_partitions_is_malicious(
    fraction: float, n: int, expected: int
) -> None:
    # Prepare
    attack = SignFlip(fraction=fraction)
    # Execute
    flags = [attack.is_malicious(pid, n) for pid in range(n)]
    # Assert
    assert flags == [True] * expected + [False] * (n - expected)
    assert attack.num_malicious(n) == expected


def test_is_malicious_rejects_out_of_range_partitions() -> None:
    with pytest.raises(ValueError, match="partition_id"):
        SignFlip().is_malicious(10, 10)
    with pytest.raises(ValueError, match="num_partitions"):
        SignFlip().num_malicious(0)


def test_signflip_returns_minus_scale_times_delta() -> None:
    # Prepare
    delta = _delta()
    # Execute
    out = SignFlip(scale=3.0).apply(delta, rng=np.random.default_rng(0))
    # Assert
    for o, d in zip(out, delta, strict=True):
        assert o.dtype == np.float32
        np.testing.assert_array_equal(o, -3.0 * d)


def test_noise_replaces_delta_with_seeded_gaussian() -> None:
    # Prepare
    delta = _delta()
    attack = GaussianNoise(std=2.0)
    # Execute
    a = attack.apply(delta, rng=np.random.default_rng(5))
    b = attack.apply(delta, rng=np.random.default_rng(5))
    c = attack.apply(delta, rng=np.random.default_rng(6))
    # Assert: shapes kept, reproducible from the injected generator, independent of delta
    for x, y, z, d in zip(a, b, c, delta, strict=True):
        assert x.shape == d.shape and x.dtype == np.float32
        np.testing.assert_array_equal(x, y)
        assert not np.array_equal(x, z)


def test_noise_has_the_requested_standard_deviation() -> None:
    # Prepare
    big = [np.zeros(20_000, np.float32)]
    # Execute
    out = GaussianNoise(std=3.0).apply(big, rng=np.random.default_rng(1))[0]
    # Assert: the std of 20k draws has standard error 3 / sqrt(40k) = 0.015
    assert abs(float(out.mean())) < 0.1
    assert abs(float(out.std()) - 3.0) < 0.05
