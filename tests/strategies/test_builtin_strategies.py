"""Each built-in rule against a direct numpy formula on small cases."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowerpress.strategies import (
    ClientUpdate,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    FedYogi,
    Krum,
    Median,
    MultiKrum,
    NDArray,
    Strategy,
    TrimmedMean,
    build_strategy,
)

SHAPES = [(2, 3), (4,)]


def _round(
    strategy: Strategy,
    server_round: int,
    global_weights: list[NDArray],
    deltas: list[list[NDArray]],
    weights: list[float],
) -> list[NDArray]:
    strategy.begin_round(server_round, global_weights)
    for i, (d, w) in enumerate(zip(deltas, weights, strict=True)):
        strategy.add(ClientUpdate(d, w, 100 + i))
    return strategy.result()


def _updates(seed: int, n: int) -> tuple[list[NDArray], list[list[NDArray]], list[float]]:
    rng = np.random.default_rng(seed)
    model = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
    deltas = [[rng.normal(size=s).astype(np.float32) for s in SHAPES] for _ in range(n)]
    weights = [float(w) for w in rng.integers(1, 50, size=n)]
    return model, deltas, weights


def _flat(ws: list[NDArray]) -> NDArray:
    return np.concatenate([np.ravel(w) for w in ws]).astype(np.float64)


def _unflat(v: NDArray) -> list[NDArray]:
    out, start = [], 0
    for s in SHAPES:
        size = int(np.prod(s))
        out.append(v[start : start + size].reshape(s))
        start += size
    return out


def _assert_close(actual: list[NDArray], expected_flat: NDArray) -> None:
    for a, e in zip(actual, _unflat(expected_flat), strict=True):
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)


# --- FedAvg family -----------------------------------------------------------------


def test_fedavg_is_the_example_weighted_mean() -> None:
    # Prepare
    model, deltas, weights = _updates(0, 5)
    local = np.stack([_flat(model) + _flat(d) for d in deltas])
    expected = np.average(local, axis=0, weights=weights)
    # Execute
    out = _round(FedAvg(), 1, model, deltas, weights)
    # Assert
    _assert_close(out, expected)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_fedavg_matches_numpy_average_property(n: int, seed: int) -> None:
    # Prepare
    model, deltas, weights = _updates(seed, n)
    # Execute
    out = _round(FedAvg(), 1, model, deltas, weights)
    # Assert
    expected = _flat(model) + np.average(np.stack([_flat(d) for d in deltas]), 0, weights)
    _assert_close(out, expected)


def test_fedprox_aggregates_like_fedavg_and_sends_mu() -> None:
    # Prepare
    model, deltas, weights = _updates(1, 4)
    # Execute
    prox = _round(FedProx(mu=0.25), 1, model, deltas, weights)
    avg = _round(FedAvg(), 1, model, deltas, weights)
    # Assert
    for p, a in zip(prox, avg, strict=True):
        np.testing.assert_array_equal(p, a)
    assert FedProx(mu=0.25).client_config(3) == {"proximal-mu": 0.25}


def test_fedavgm_two_rounds_match_momentum_formula() -> None:
    # Prepare
    lr, beta = 0.7, 0.9
    w0, deltas1, weights1 = _updates(2, 3)
    _, deltas2, weights2 = _updates(3, 3)
    strategy = FedAvgM(lr=lr, momentum=beta)
    d1 = np.average(np.stack([_flat(d) for d in deltas1]), 0, weights1)
    d2 = np.average(np.stack([_flat(d) for d in deltas2]), 0, weights2)
    v1 = d1
    w1 = _flat(w0) + lr * v1
    v2 = beta * v1 + d2
    w2 = w1 + lr * v2
    # Execute
    out1 = _round(strategy, 1, w0, deltas1, weights1)
    out2 = _round(strategy, 2, out1, deltas2, weights2)
    # Assert
    _assert_close(out1, w1)
    _assert_close(out2, w2)


def _fedopt_reference(
    kind: str,
    w: NDArray,
    mean_deltas: list[NDArray],
    lr: float,
    b1: float,
    b2: float,
    tau: float,
) -> list[NDArray]:
    m = np.zeros_like(w)
    v = np.full_like(w, tau**2)
    out = []
    for d in mean_deltas:
        m = b1 * m + (1 - b1) * d
        if kind == "adagrad":
            v = v + d**2
        elif kind == "yogi":
            v = v - (1 - b2) * d**2 * np.sign(v - d**2)
        else:
            v = b2 * v + (1 - b2) * d**2
        w = w + lr * m / (np.sqrt(v) + tau)
        out.append(w)
    return out


@pytest.mark.parametrize("kind", ["adagrad", "adam", "yogi"])
def test_fedopt_three_rounds_match_reddi_algorithm_2(kind: str) -> None:
    # Prepare
    lr, b1, b2, tau = 0.05, 0.8, 0.95, 1e-2
    strategy: Strategy
    if kind == "adagrad":
        strategy = FedAdagrad(lr=lr, beta1=b1, tau=tau)
    elif kind == "adam":
        strategy = FedAdam(lr=lr, beta1=b1, beta2=b2, tau=tau)
    else:
        strategy = FedYogi(lr=lr, beta1=b1, beta2=b2, tau=tau)
    w, _, _ = _updates(4, 1)
    rounds = [_updates(10 + r, 4) for r in range(3)]
    means = [np.average(np.stack([_flat(d) for d in ds]), 0, ws) for _, ds, ws in rounds]
    expected = _fedopt_reference(kind, _flat(w), means, lr, b1, b2, tau)
    # Execute
    current = w
    for r, (_, ds, ws) in enumerate(rounds):
        current = _round(strategy, r + 1, current, ds, ws)
        # Assert (every round)
        np.testing.assert_allclose(_flat(current), expected[r], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "make",
    [lambda: FedAvgM(lr=0.5, momentum=0.9), lambda: FedAdam(), lambda: FedYogi(), FedAdagrad],
    ids=["fedavgm", "fedadam", "fedyogi", "fedadagrad"],
)
def test_state_dict_resume_equals_uninterrupted_run(make: Callable[[], Strategy]) -> None:
    # Prepare
    w, _, _ = _updates(5, 1)
    rounds = [_updates(20 + r, 3) for r in range(3)]
    straight = make()
    cur = w
    for r, (_, ds, ws) in enumerate(rounds):
        cur = _round(straight, r + 1, cur, ds, ws)
    # Execute: two rounds, save, load into a fresh strategy, third round
    first = make()
    mid = w
    for r, (_, ds, ws) in enumerate(rounds[:2]):
        mid = _round(first, r + 1, mid, ds, ws)
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    _, ds, ws = rounds[2]
    out = _round(resumed, 3, mid, ds, ws)
    # Assert
    for a, b in zip(out, cur, strict=True):
        np.testing.assert_array_equal(a, b)


def test_fedopt_state_dict_rejects_foreign_state() -> None:
    with pytest.raises(ValueError, match="'m', 'v'"):
        FedAdam().load_state_dict({"velocity": None})
    with pytest.raises(ValueError, match="velocity"):
        FedAvgM().load_state_dict({"m": None, "v": None})


@pytest.mark.parametrize(
    ("make", "param"),
    [
        (lambda: FedProx(mu=-0.1), "mu"),
        (lambda: FedAvgM(lr=0.0), "lr"),
        (lambda: FedAvgM(momentum=1.0), "momentum"),
        (lambda: FedAdam(lr=-1.0), "lr"),
        (lambda: FedAdam(beta1=1.0), "beta1"),
        (lambda: FedYogi(beta2=-0.1), "beta2"),
        (lambda: FedAdagrad(tau=0.0), "tau"),
        (lambda: TrimmedMean(beta=0.5), "beta"),
        (lambda: Krum(f=-1), "f"),
        (lambda: MultiKrum(f=1, m=0), "m"),
    ],
)
def test_bad_arguments_name_the_parameter(make: Callable[[], Strategy], param: str) -> None:
    with pytest.raises(ValueError, match=rf"^{param} must"):
        make()


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("fedavg", True),
        ("fedprox", True),
        ("fedavgm", True),
        ("fedadagrad", True),
        ("fedadam", True),
        ("fedyogi", True),
        ("median", False),
        ("trimmed-mean", False),
        ("krum", False),
        ("multikrum", False),
    ],
)
def test_weighted_sum_flag_of_each_builtin(name: str, expected: bool) -> None:
    # The privacy accounting trusts this bit: only the mean family may claim it.
    assert build_strategy(name).weighted_sum is expected


def test_mean_family_ignores_metrics() -> None:
    # Prepare
    model, deltas, weights = _updates(14, 3)
    plain = FedAvg()
    with_metrics = FedAvg()
    # Execute
    a = _round(plain, 1, model, deltas, weights)
    with_metrics.begin_round(1, model)
    for i, (d, w) in enumerate(zip(deltas, weights, strict=True)):
        with_metrics.add(ClientUpdate(d, w, i, {"local-steps": 10.0 * (i + 1), "train-loss": 1.0}))
    b = with_metrics.result()
    # Assert
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


# --- Robust rules --------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 5, 6])
def test_median_is_coordinatewise_median(n: int) -> None:
    # Prepare
    model, deltas, weights = _updates(6, n)
    local = np.stack([_flat(model) + _flat(d) for d in deltas])
    # Execute
    out = _round(Median(), 1, model, deltas, weights)
    # Assert
    _assert_close(out, np.median(local, axis=0))


def test_median_ignores_weights_and_outliers() -> None:
    # Prepare: two of five updates are huge and heavily weighted
    model = [np.zeros(s, np.float32) for s in SHAPES]
    honest = [[np.full(s, v, np.float32) for s in SHAPES] for v in (1.0, 2.0, 3.0)]
    evil = [[np.full(s, 1e6, np.float32) for s in SHAPES] for _ in range(2)]
    # Execute
    out = _round(Median(), 1, model, honest + evil, [1, 1, 1, 1000, 1000])
    # Assert
    np.testing.assert_array_equal(out[0], np.full(SHAPES[0], 3.0))


@pytest.mark.parametrize(("n", "beta"), [(1, 0.2), (4, 0.2), (5, 0.2), (10, 0.25), (7, 0.0)])
def test_trimmed_mean_matches_sorted_slice_mean(n: int, beta: float) -> None:
    # Prepare
    model, deltas, weights = _updates(7, n)
    local = np.sort(np.stack([_flat(model) + _flat(d) for d in deltas]), axis=0)
    k = int(np.floor(beta * n))
    expected = local[k : n - k].mean(axis=0)
    # Execute
    out = _round(TrimmedMean(beta=beta), 1, model, deltas, weights)
    # Assert
    _assert_close(out, expected)


def _krum_reference(points: NDArray, f: int) -> NDArray:
    n = len(points)
    k = n - f - 2
    scores = []
    for i in range(n):
        d = sorted(float(np.sum((points[i] - points[j]) ** 2)) for j in range(n) if j != i)
        scores.append(sum(d[:k]))
    return np.array(scores)


def test_krum_selects_the_update_with_the_lowest_score() -> None:
    # Prepare: n = 7 >= 2f + 3 for f = 2
    model, deltas, weights = _updates(8, 7)
    flat = np.stack([_flat(d) for d in deltas])
    scores = _krum_reference(flat, f=2)
    best = int(np.argmin(scores))
    strategy = Krum(f=2)
    # Execute
    out = _round(strategy, 1, model, deltas, weights)
    # Assert
    _assert_close(out, _flat(model) + flat[best])
    assert strategy.last_selected == [100 + best]


def test_multikrum_averages_the_m_best_scored_updates() -> None:
    # Prepare
    model, deltas, weights = _updates(9, 8)
    flat = np.stack([_flat(d) for d in deltas])
    chosen = np.argsort(_krum_reference(flat, f=1))[:3]
    # Execute
    out = _round(MultiKrum(f=1, m=3), 1, model, deltas, weights)
    # Assert: unweighted mean of the selection (Blanchard et al.)
    _assert_close(out, _flat(model) + flat[chosen].mean(axis=0))


def test_multikrum_default_m_is_n_minus_f() -> None:
    # Prepare
    model, deltas, weights = _updates(10, 6)
    strategy = MultiKrum(f=2)
    # Execute
    _round(strategy, 1, model, deltas, weights)
    # Assert
    assert len(strategy.last_selected) == 4


def test_krum_rejects_a_far_outlier() -> None:
    # Prepare: 5 honest updates near 1.0, 2 attackers far away
    rng = np.random.default_rng(11)
    model = [np.zeros(s, np.float32) for s in SHAPES]
    honest = [
        [(1.0 + 0.01 * rng.normal(size=s)).astype(np.float32) for s in SHAPES] for _ in range(5)
    ]
    evil = [[np.full(s, -50.0, np.float32) for s in SHAPES] for _ in range(2)]
    strategy = MultiKrum(f=2)
    # Execute
    out = _round(strategy, 1, model, evil + honest, [1.0] * 7)
    # Assert
    assert not {100, 101} & set(strategy.last_selected)
    np.testing.assert_allclose(out[0], 1.0, atol=0.05)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_krum_with_too_few_updates_still_returns_a_selection(
    n: int, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: f = 2 needs 7 updates for the guarantee
    model, deltas, weights = _updates(12, n)
    strategy = Krum(f=2)
    # Execute
    with caplog.at_level(logging.WARNING):
        out = _round(strategy, 1, model, deltas, weights)
    # Assert: the output is one of the inputs, and the user was told
    flat = np.stack([_flat(d) for d in deltas])
    assert len(strategy.last_selected) == 1
    chosen = strategy.last_selected[0] - 100
    _assert_close(out, _flat(model) + flat[chosen])
    assert "guarantee does not hold" in caplog.text


def test_multikrum_m_larger_than_n_averages_everything() -> None:
    # Prepare
    model, deltas, weights = _updates(13, 3)
    # Execute
    out = _round(MultiKrum(f=0, m=10), 1, model, deltas, weights)
    # Assert
    _assert_close(out, _flat(model) + np.stack([_flat(d) for d in deltas]).mean(axis=0))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 7), seed=st.integers(0, 2**16), data=st.data())
def test_robust_rules_do_not_depend_on_arrival_order(
    n: int, seed: int, data: st.DataObject
) -> None:
    # Prepare
    model, deltas, weights = _updates(seed, n)
    order = data.draw(st.permutations(range(n)))
    shuffled = [deltas[i] for i in order]
    # Execute / Assert
    for make in (Median, lambda: TrimmedMean(beta=0.25), lambda: MultiKrum(f=1, m=2)):
        a = _round(make(), 1, model, deltas, weights)
        b = _round(make(), 1, model, shuffled, [weights[i] for i in order])
        for x, y in zip(a, b, strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)
