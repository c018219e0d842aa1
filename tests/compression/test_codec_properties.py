"""Hypothesis properties of encode/decode over random shapes, magnitudes and specs."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from flowerpress.compression import decode, fp32_nbytes, parse

SPECS_ANY_MAGNITUDE = [
    "none",
    "fp16",
    "q:1",
    "q:3",
    "q:8",
    "q:16",
    "sign",
    "topk:0.3",
    "topk:0.01+q:8+zstd",
    "randk:0.5+q:4",
    "randk:0.5,unbiased",
    "lowrank:1",
    "lowrank:2+q:8",
    "zstd:1",
]
# Error feedback adds the residual to the input, so keep clear of float32 overflow.
SPECS_MODERATE = ["sign+ef", "topk:0.2+q:2+ef+zstd", "lowrank:2+q:4+ef", "q:2+ef"]

shape_st = hs.lists(hs.integers(0, 6), min_size=0, max_size=4).map(tuple)


@hs.composite
def updates(draw: hs.DrawFn, max_exp: int) -> list[np.ndarray]:
    shapes = draw(hs.lists(shape_st, min_size=1, max_size=4))
    seed = draw(hs.integers(0, 2**32 - 1))
    exponent = draw(hs.integers(-44, max_exp))
    rng = np.random.default_rng(seed)
    out = []
    for s in shapes:
        x = rng.standard_normal(s) * (10.0**exponent)
        if draw(hs.booleans()):
            x = np.round(x)  # many ties and exact zeros
        out.append(np.clip(x, -3.0e38, 3.0e38).astype(np.float32))
    return out


def _check_roundtrip(spec: str, update: list[np.ndarray], seed: int) -> list[np.ndarray]:
    n = sum(a.size for a in update)
    payload, _ = parse(spec).encode(update, rng=np.random.default_rng(seed))
    out = decode(payload, max_elements=n)
    assert len(out) == len(update)
    for a, b in zip(update, out, strict=True):
        assert b.shape == a.shape
        assert b.dtype == np.float32
        assert np.isfinite(b).all()
    assert len(payload) <= fp32_nbytes(update) + 17 + 64 * len(update) or "randk" in spec
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    spec=hs.sampled_from(SPECS_ANY_MAGNITUDE), update=updates(max_exp=37), seed=hs.integers(0, 99)
)
def test_roundtrip_keeps_shapes_dtype_and_finiteness(
    spec: str, update: list[np.ndarray], seed: int
) -> None:
    out = _check_roundtrip(spec, update, seed)
    if spec in ("none", "zstd:1"):
        for a, b in zip(update, out, strict=True):
            np.testing.assert_array_equal(a, b)


@settings(max_examples=40, deadline=None)
@given(update=updates(max_exp=37), bits=hs.sampled_from([1, 2, 5, 8, 16]), seed=hs.integers(0, 99))
def test_quantization_error_is_below_one_step(
    update: list[np.ndarray], bits: int, seed: int
) -> None:
    out = _check_roundtrip(f"q:{bits}", update, seed)
    for a, b in zip(update, out, strict=True):
        if a.size == 0:
            continue
        a64 = a.astype(np.float64)
        step = (a64.max() - a64.min()) / ((1 << bits) - 1)
        err = np.abs(b.astype(np.float64) - a64)
        assert err.max() <= step * (1 + 1e-4) + 1e-37 + 1e-6 * np.abs(a64).max()


@settings(max_examples=40, deadline=None)
@given(update=updates(max_exp=37), fraction=hs.floats(0.01, 1.0), seed=hs.integers(0, 99))
def test_topk_sends_exact_values_or_zero(
    update: list[np.ndarray], fraction: float, seed: int
) -> None:
    out = _check_roundtrip(f"topk:{fraction!r}", update, seed)
    for a, b in zip(update, out, strict=True):
        kept = b != 0
        np.testing.assert_array_equal(b[kept], a[kept])
        if a.size:
            assert np.count_nonzero(kept) <= max(1, int(np.ceil(fraction * a.size)))


@settings(max_examples=30, deadline=None)
@given(spec=hs.sampled_from(SPECS_MODERATE), update=updates(max_exp=20), seed=hs.integers(0, 99))
def test_error_feedback_specs_roundtrip_and_keep_the_invariant(
    spec: str, update: list[np.ndarray], seed: int
) -> None:
    pipe = parse(spec)
    n = sum(a.size for a in update)
    payload, state = pipe.encode(update, rng=np.random.default_rng(seed))
    out = decode(payload, max_elements=n)
    for a, b, r in zip(update, out, state.residuals, strict=True):
        assert b.shape == a.shape and r.shape == a.shape
        scale = float(np.abs(a).max(initial=0.0))
        np.testing.assert_allclose(a, b + r, rtol=1e-5, atol=1e-6 * scale + 1e-44)
