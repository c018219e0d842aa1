"""Clipping and noise: the clip bound for any input, noise statistics, RNG streams."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from flowerpress.privacy import (
    adaptive_update_noise,
    add_gaussian_noise,
    clip_inplace,
    clip_update,
    l2_norm,
    secure_generator,
    seeded_generator,
)

_arrays = st.lists(
    hnp.arrays(
        dtype=st.sampled_from([np.float32, np.float64]),
        shape=hnp.array_shapes(min_dims=1, max_dims=2, max_side=6),
        elements=st.floats(allow_nan=True, allow_infinity=True, width=32),
    ),
    min_size=1,
    max_size=4,
)


@settings(max_examples=120, deadline=None, derandomize=True)
@given(update=_arrays, clip=st.floats(min_value=1e-30, max_value=1e30))
def test_clip_bound_holds_for_any_input(update: list[np.ndarray], clip: float) -> None:
    # Prepare
    dtypes = [a.dtype for a in update]

    # Execute
    copied, _ = clip_update(update, clip=clip)
    clip_inplace(update, clip=clip)

    # Assert: both the float64 copy and the in-place (possibly float32) result obey C
    assert l2_norm(copied) <= clip
    assert l2_norm(update) <= clip
    assert [a.dtype for a in update] == dtypes


def test_clip_is_identity_inside_the_ball() -> None:
    update = [np.array([0.5, -0.25], dtype=np.float32), np.array([[0.125]], dtype=np.float32)]
    before = [a.copy() for a in update]

    norm = clip_inplace(update, clip=1.0)

    assert norm == pytest.approx(math.sqrt(0.25 + 0.0625 + 0.015625))
    for a, b in zip(update, before, strict=True):
        np.testing.assert_array_equal(a, b)


def test_clip_scales_to_the_bound_direction_kept() -> None:
    update = [np.array([3.0, 4.0])]

    clipped, norm = clip_update(update, clip=1.0)

    assert norm == 5.0
    np.testing.assert_allclose(clipped[0], [0.6, 0.8], rtol=1e-12)


def test_huge_finite_update_is_clipped_not_zeroed() -> None:
    update = [np.array([1e300, -1e300])]

    clipped, norm = clip_update(update, clip=2.0)

    assert norm == pytest.approx(math.sqrt(2) * 1e300)
    np.testing.assert_allclose(clipped[0], [math.sqrt(2), -math.sqrt(2)], rtol=1e-12)


def test_non_finite_update_becomes_zero() -> None:
    update = [np.array([1.0, np.nan], dtype=np.float32), np.array([np.inf], dtype=np.float32)]

    clip_inplace(update, clip=2.0)

    assert all(not np.any(a) for a in update)


@pytest.mark.parametrize("clip", [0.0, -1.0, math.inf, math.nan])
def test_clip_rejects_bad_clip(clip: float) -> None:
    with pytest.raises(ValueError, match="clip"):
        clip_update([np.ones(2)], clip=clip)


def test_noise_std_statistically() -> None:
    # Prepare: 200k draws; the sample std of a Gaussian has relative sd ~ 1/sqrt(2n).
    rng = np.random.default_rng(0)
    update = [np.zeros(100_000), np.full((100, 1000), 3.0)]
    std = 0.7

    # Execute
    noised = add_gaussian_noise(update, std=std, rng=rng)

    # Assert: mean and std within 5 standard errors; input untouched.
    noise = np.concatenate([noised[0].ravel(), (noised[1] - 3.0).ravel()])
    n = noise.size
    assert abs(noise.mean()) < 5 * std / math.sqrt(n)
    assert abs(noise.std() / std - 1.0) < 5 / math.sqrt(2 * n)
    assert not np.any(update[0])
    # Gaussian tails, not e.g. uniform: 4-sigma exceedances ~ 6.3e-5 * n.
    assert 0 < np.sum(np.abs(noise) > 4 * std) < 40


def test_seeded_streams_reproducible_and_distinct() -> None:
    def draw(stream: int, client: int = 3) -> np.ndarray:
        rng = seeded_generator(seed=7, client_id=client, server_round=2, stream=stream)
        return rng.standard_normal(4)

    np.testing.assert_array_equal(draw(0), draw(0))
    assert not np.allclose(draw(0), draw(1))
    assert not np.allclose(draw(0), draw(0, client=4))


def test_seeded_generator_rejects_negative() -> None:
    with pytest.raises(ValueError, match="seed"):
        seeded_generator(seed=-1, client_id=0, server_round=1, stream=0)


def test_secure_generators_differ() -> None:
    a = secure_generator().standard_normal(8)
    b = secure_generator().standard_normal(8)
    assert not np.allclose(a, b)


def test_adaptive_update_noise_matches_andrew_et_al() -> None:
    # z_delta^-2 + (2 sigma_b)^-2 == z^-2
    z, sigma_b = 1.0, 5.0

    z_delta = adaptive_update_noise(z, sigma_b)

    assert z_delta ** -2 + (2 * sigma_b) ** -2 == pytest.approx(z ** -2)
    assert z_delta > z
    with pytest.raises(ValueError, match="count-noise"):
        adaptive_update_noise(2.0, 1.0)


def test_hostile_clip_indicators_move_the_adaptive_clip_by_a_bounded_factor() -> None:
    # Prepare: indicators far outside [0, 1] (in the contract's range) from one device
    from flowerpress.privacy.mechanisms import AdaptiveClip
    from flowerpress.privacy.settings import parse_dp

    settings = parse_dp("distributed:clip=1.0,noise=1.0,quantile=0.5,clip-lr=1.0,count-noise=1")
    assert settings is not None
    rule = AdaptiveClip()
    # Execute
    up = rule.next_clip(1.0, [-1000.0, 0.5, 0.5], settings)
    down = rule.next_clip(1.0, [1000.0, 0.5, 0.5], settings)
    # Assert: at most exp(clip_lr * 0.5) either way, finite and positive
    assert 1.0 < up <= math.exp(0.5) + 1e-12
    assert math.exp(-0.5) - 1e-12 <= down < 1.0
