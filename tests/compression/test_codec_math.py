"""The math each stage promises: identity, unbiasedness, error feedback, low-rank exactness."""

from __future__ import annotations

import numpy as np
import pytest

from flowerpress.compression import CodecState, decode, parse
from flowerpress.compression import stages as st

MAX = 1_000_000


def _roundtrip(spec: str, update: list[np.ndarray], seed: int = 0) -> list[np.ndarray]:
    payload, _ = parse(spec).encode(update, rng=np.random.default_rng(seed))
    return decode(payload, max_elements=MAX)


# --------------------------------------------------------------------------- identity
def test_none_and_zstd_are_bit_exact_on_any_finite_float32() -> None:
    # Prepare: huge, tiny, subnormal, signed zero, odd shapes, 0-d and empty
    rng = np.random.default_rng(0)
    update = [
        (rng.standard_normal((3, 5, 7)) * 1e38).astype(np.float32),
        np.array([1e-45, -1e-45, 0.0, -0.0, 3.4e38, -3.4e38], dtype=np.float32),
        np.float32(-2.5),
        np.zeros((0, 4), dtype=np.float32),
    ]
    for spec in ("none", "zstd", "zstd:19"):
        # Execute
        out = _roundtrip(spec, update)

        # Assert
        for a, b in zip(update, out, strict=True):
            assert b.dtype == np.float32 and b.shape == np.shape(a)
            np.testing.assert_array_equal(b.view(np.uint32), np.asarray(a).view(np.uint32))


def test_fp16_is_exact_on_half_precision_values() -> None:
    # Prepare
    rng = np.random.default_rng(1)
    update = [rng.standard_normal((17, 9)).astype(np.float16).astype(np.float32)]

    # Execute / Assert
    np.testing.assert_array_equal(_roundtrip("fp16", update)[0], update[0])


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8, 12, 16])
def test_quantization_is_exact_on_grid_values(bits: int) -> None:
    # Prepare: every value on lo + j * step with step a power of two, min and max present
    rng = np.random.default_rng(bits)
    levels = (1 << bits) - 1
    codes = rng.integers(0, levels + 1, size=(40, 50))
    codes.flat[0], codes.flat[1] = 0, levels
    x = (-3.0 + codes * 0.125).astype(np.float32)

    # Execute
    out = _roundtrip(f"q:{bits}", [x], seed=bits)[0]

    # Assert
    np.testing.assert_array_equal(out, x)


@pytest.mark.parametrize("bits", [1, 8, 16])
@pytest.mark.parametrize(
    "values",
    [
        [-3.4e38, 3.4e38, 0.0, 1e38, -1e-45],
        [3.0e38, 3.4e38, 3.2e38],
        [1e-45, 3e-45, 0.0, -1e-45],
        [1e37, -1e37, 5e36],
    ],
)
def test_quantization_stays_finite_and_within_a_step_at_float32_extremes(
    bits: int, values: list[float]
) -> None:
    # Prepare
    x = np.array(values, dtype=np.float32)
    step = (float(x.max()) - float(x.min())) / ((1 << bits) - 1)

    # Execute
    out = _roundtrip(f"q:{bits}", [x], seed=bits)[0]

    # Assert
    assert np.isfinite(out).all()
    assert out.min() >= x.min() and out.max() <= x.max()
    err = np.abs(out.astype(np.float64) - x.astype(np.float64))
    assert err.max() <= step * (1 + 1e-6) + 1e-44


def test_sign_is_exact_on_plus_minus_constant() -> None:
    # Prepare
    rng = np.random.default_rng(2)
    x = np.where(rng.random((10, 30)) < 0.5, -0.375, 0.375).astype(np.float32)

    # Execute / Assert
    np.testing.assert_array_equal(_roundtrip("sign", [x])[0], x)


@pytest.mark.parametrize("spec", ["topk:0.05", "topk:0.05+zstd"])
def test_topk_is_exact_on_sparse_input(spec: str) -> None:
    # Prepare: 20 nonzeros among 1000, k = 50
    rng = np.random.default_rng(3)
    x = np.zeros(1000, dtype=np.float32)
    x[rng.choice(1000, 20, replace=False)] = rng.standard_normal(20).astype(np.float32)

    # Execute / Assert
    np.testing.assert_array_equal(_roundtrip(spec, [x])[0], x)


def test_topk_keeps_the_largest_magnitudes() -> None:
    # Prepare
    x = np.arange(-50, 50, dtype=np.float32)

    # Execute
    out = _roundtrip("topk:0.1", [x])[0]

    # Assert: 10 kept, exactly, and none smaller than anything dropped (|45| ties either way)
    kept = np.flatnonzero(out)
    assert kept.size == 10
    np.testing.assert_array_equal(out[kept], x[kept])
    assert np.abs(x[kept]).min() >= np.abs(x[np.flatnonzero(out == 0)]).max()


def test_randk_full_fraction_is_identity() -> None:
    x = np.random.default_rng(4).standard_normal((7, 11)).astype(np.float32)
    np.testing.assert_array_equal(_roundtrip("randk:1.0", [x])[0], x)


# --------------------------------------------------------------------------- unbiasedness
def _mean_of_encodings(spec: str, x: np.ndarray, draws: int) -> np.ndarray:
    pipe = parse(spec)
    total = np.zeros(x.shape, dtype=np.float64)
    for seed in range(draws):
        payload, _ = pipe.encode([x], rng=np.random.default_rng(seed))
        total += decode(payload, max_elements=MAX)[0]
    return total / draws


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_stochastic_quantization_is_unbiased(bits: int) -> None:
    # Prepare: one full 2048-block plus a tail block
    x = np.random.default_rng(10).standard_normal(2048 + 61).astype(np.float32)
    draws = 600
    step = (x.max() - x.min()) / ((1 << bits) - 1)

    # Execute
    mean = _mean_of_encodings(f"q:{bits}", x, draws)

    # Assert: per element the sd of the mean is <= step / (2 sqrt(draws))
    sd = step / (2 * np.sqrt(draws))
    assert np.abs(mean - x).max() <= 6 * sd
    assert abs(float((mean - x).mean())) <= 6 * sd / np.sqrt(x.size)


def test_unbiased_randk_is_unbiased_and_plain_randk_shrinks_by_k_over_n() -> None:
    # Prepare
    x = np.random.default_rng(11).standard_normal(100).astype(np.float32)
    draws = 1200

    # Execute
    unbiased = _mean_of_encodings("randk:0.2,unbiased", x, draws)
    plain = _mean_of_encodings("randk:0.2", x, draws)

    # Assert: Var = x^2 (n/k - 1) = 4 x^2 per draw
    sd = 2 * np.abs(x) / np.sqrt(draws)
    assert np.all(np.abs(unbiased - x) <= 6 * sd + 1e-6)
    np.testing.assert_allclose(plain, 0.2 * x, atol=float(6 * sd.max() / 4))


def test_unbiased_randk_with_quantized_values_is_unbiased() -> None:
    # Prepare
    x = np.random.default_rng(12).standard_normal(64).astype(np.float32)
    draws = 1500

    # Execute
    mean = _mean_of_encodings("randk:0.25,unbiased+q:4", x, draws)

    # Assert
    assert np.abs(mean - x).max() < 0.35
    assert abs(float((mean - x).mean())) < 0.05


# --------------------------------------------------------------------------- error feedback
@pytest.mark.parametrize(
    "spec",
    [
        "sign+ef",
        "topk:0.05+ef",
        "topk:0.05+q:4+ef+zstd",
        "randk:0.1+q:2+ef",
        "q:2+ef",
        "lowrank:2+ef",
        "lowrank:2+q:8+ef",
        "fp16+ef",
        "ef",
    ],
)
def test_error_feedback_invariant_holds_over_rounds(spec: str) -> None:
    # Prepare
    rng = np.random.default_rng(20)
    shapes = [(8, 3, 3, 3), (8,), (30, 40), ()]
    pipe = parse(spec)
    state = CodecState.empty()
    sent = [np.zeros(s, dtype=np.float64) for s in shapes]
    given = [np.zeros(s, dtype=np.float64) for s in shapes]

    for _ in range(5):
        update = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        old = state.residuals or tuple(np.zeros(s, dtype=np.float32) for s in shapes)

        # Execute
        payload, state = pipe.encode(update, state, rng=rng)
        decoded = decode(payload, max_elements=MAX)

        # Assert: input + old_residual == decoded + new_residual
        for u, r0, d, r1 in zip(update, old, decoded, state.residuals, strict=True):
            np.testing.assert_allclose(u + r0, d + r1, rtol=1e-6, atol=1e-6)
        for i, (u, d) in enumerate(zip(update, decoded, strict=True)):
            sent[i] += d
            given[i] += u

    # Assert: nothing is lost, only delayed (telescoping sum)
    for g, s, r in zip(given, sent, state.residuals, strict=True):
        np.testing.assert_allclose(g, s + r, rtol=1e-5, atol=1e-4)


def test_error_feedback_drives_the_average_sign_error_down() -> None:
    # Prepare: a constant update; with ef the running mean of decoded -> update
    x = np.random.default_rng(21).standard_normal(500).astype(np.float32)
    pipe = parse("sign+ef")
    state = CodecState.empty()
    total = np.zeros_like(x, dtype=np.float64)

    # Execute
    rounds = 200
    for _ in range(rounds):
        payload, state = pipe.encode([x], state, rng=np.random.default_rng(0))
        total += decode(payload, max_elements=MAX)[0]

    # Assert
    without_ef = np.abs(_roundtrip("sign", [x])[0] - x).mean()
    with_ef = np.abs(total / rounds - x).mean()
    assert with_ef < 0.05 * without_ef


# --------------------------------------------------------------------------- low rank
@pytest.mark.parametrize(("rank", "true_rank"), [(1, 1), (4, 2), (4, 4), (8, 5)])
def test_lowrank_is_exact_on_matrices_of_rank_at_most_r(rank: int, true_rank: int) -> None:
    # Prepare
    rng = np.random.default_rng(rank * 10 + true_rank)
    m = (rng.standard_normal((60, true_rank)) @ rng.standard_normal((true_rank, 45))).astype(
        np.float32
    )
    conv = (
        rng.standard_normal((32, true_rank)) @ rng.standard_normal((true_rank, 16 * 3 * 3))
    ).astype(np.float32).reshape(32, 16, 3, 3)

    # Execute
    out = _roundtrip(f"lowrank:{rank}", [m, conv])

    # Assert
    np.testing.assert_allclose(out[0], m, rtol=1e-4, atol=1e-4 * float(np.abs(m).max()))
    np.testing.assert_allclose(out[1], conv, rtol=1e-4, atol=1e-4 * float(np.abs(conv).max()))


def test_lowrank_passes_small_tensors_through_and_keeps_warm_starts() -> None:
    # Prepare: bias (1-D), 4x4 matrix (no gain at rank 4), a large matrix
    rng = np.random.default_rng(30)
    update = [
        rng.standard_normal(16).astype(np.float32),
        rng.standard_normal((4, 4)).astype(np.float32),
        rng.standard_normal((50, 60)).astype(np.float32),
    ]

    # Execute
    payload, state = parse("lowrank:4").encode(update, rng=rng)
    out = decode(payload, max_elements=MAX)

    # Assert
    np.testing.assert_array_equal(out[0], update[0])
    np.testing.assert_array_equal(out[1], update[1])
    assert set(state.lowrank_q) == {2}
    assert state.lowrank_q[2].shape == (60, 4)


def test_lowrank_warm_start_improves_a_fixed_matrix_over_rounds() -> None:
    # Prepare: a full-rank matrix with a decaying spectrum (power iteration converges)
    rng = np.random.default_rng(31)
    u, _ = np.linalg.qr(rng.standard_normal((80, 80)))
    v, _ = np.linalg.qr(rng.standard_normal((70, 70)))
    spectrum = 0.5 ** np.arange(70)
    m = ((u[:, :70] * spectrum) @ v.T).astype(np.float32)
    pipe = parse("lowrank:2")
    state = CodecState.empty()

    # Execute
    errors = []
    for _ in range(4):
        payload, state = pipe.encode([m], state, rng=rng)
        errors.append(float(np.linalg.norm(decode(payload, max_elements=MAX)[0] - m)))

    # Assert: approaches the best rank-2 error ||sigma_3..|| ~ 0.2887
    best = float(np.linalg.norm(spectrum[2:]))
    assert errors[-1] <= errors[0]
    assert errors[-1] <= 1.01 * best


# --------------------------------------------------------------------------- input validation
def test_encode_rejects_non_finite_update_naming_the_tensor() -> None:
    update = [np.ones(3, dtype=np.float32), np.array([1.0, np.nan], dtype=np.float32)]
    with pytest.raises(ValueError, match="tensor 1"):
        parse("q:8").encode(update, rng=np.random.default_rng(0))


def test_encode_without_rng_creates_its_own_generator() -> None:
    payload, _ = parse("q:4").encode([np.arange(10, dtype=np.float32)])
    assert decode(payload, max_elements=10)[0].shape == (10,)


@pytest.mark.parametrize("n", [100, 70_000, 300_001])
@pytest.mark.parametrize("fraction", [0.001, 0.01, 0.1, 0.5])
def test_topk_indices_match_a_full_sort(n: int, fraction: float) -> None:
    # Prepare: heavy tails and a periodic structure that fools strided sampling
    rng = np.random.default_rng(n)
    x = rng.standard_t(2, n).astype(np.float32)
    x[::64] *= 50
    k = max(1, int(np.ceil(fraction * n)))

    # Execute
    idx = st.topk_indices(x, k)

    # Assert: same magnitudes as the k largest (ties may pick other positions)
    assert idx.size == k and np.all(np.diff(idx) > 0)
    expected = np.sort(np.abs(x))[n - k :]
    np.testing.assert_array_equal(np.sort(np.abs(x[idx])), expected)


@pytest.mark.parametrize("spec", ["q:8+ef", "sign+ef", "topk:0.5+ef"])
def test_encode_rejects_residual_overflow_instead_of_sending_inf(spec: str) -> None:
    # Prepare
    big = np.full(4, 3.0e38, dtype=np.float32)
    state = CodecState.from_arrays([big])

    # Execute / Assert
    with pytest.raises(ValueError, match="tensor 0"):
        parse(spec).encode([big], state, rng=np.random.default_rng(0))


@pytest.mark.parametrize(
    "spec", ["lowrank:2", "lowrank:2+q:8", "lowrank:2+q:8+ef", "lowrank:2+fp16"]
)
def test_lowrank_falls_back_to_dense_when_factors_would_overflow(spec: str) -> None:
    # Prepare: entries near the float32 limit make M @ Q overflow
    m = np.full((40, 50), 3.0e38, dtype=np.float32)
    m[::2] *= -1

    # Execute
    payload, _ = parse(spec).encode([m], rng=np.random.default_rng(0))
    out = decode(payload, max_elements=m.size)[0]

    # Assert: still a valid, finite payload of the right shape
    assert out.shape == m.shape
    assert np.isfinite(out).all()


@pytest.mark.parametrize(
    "spec", ["q:3", "q:12", "randk:0.2,unbiased+q:4", "lowrank:2+q:8+ef", "topk:0.1+q:2+zstd"]
)
def test_all_randomness_comes_from_the_injected_generator(spec: str) -> None:
    # Prepare
    rng = np.random.default_rng(40)
    update = [rng.standard_normal((30, 20)).astype(np.float32), np.float32(0.5)]

    # Execute
    first, _ = parse(spec).encode(update, rng=np.random.default_rng(7))
    second, _ = parse(spec).encode(update, rng=np.random.default_rng(7))
    other, _ = parse(spec).encode(update, rng=np.random.default_rng(8))

    # Assert: same seed, same bytes; another seed, other bytes
    assert first == second
    assert first != other
