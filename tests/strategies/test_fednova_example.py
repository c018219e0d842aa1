"""The example ``examples/fednova/fednova.py``: FedNova against its formula, via the interface."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flowerpress.strategies import ClientUpdate, NDArray, Strategy, build_strategy

REPO = Path(__file__).resolve().parents[2]
SPEC = "examples.fednova.fednova:FedNova"
SHAPES = [(2, 3), (4,)]


@pytest.fixture
def fednova(monkeypatch: pytest.MonkeyPatch) -> Strategy:
    monkeypatch.chdir(REPO)  # the example is imported relative to the project
    return build_strategy(SPEC)


def _flat(ws: list[NDArray]) -> NDArray:
    return np.concatenate([np.ravel(w) for w in ws]).astype(np.float64)


def _updates(seed: int, n: int) -> tuple[list[NDArray], list[list[NDArray]], list[float]]:
    rng = np.random.default_rng(seed)
    model = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
    deltas = [[rng.normal(size=s).astype(np.float32) for s in SHAPES] for _ in range(n)]
    weights = [float(w) for w in rng.integers(1, 50, size=n)]
    return model, deltas, weights


def _round(
    strategy: Strategy,
    model: list[NDArray],
    deltas: list[list[NDArray]],
    weights: list[float],
    steps: list[float],
) -> list[NDArray]:
    strategy.begin_round(1, model)
    for i, (d, w, tau) in enumerate(zip(deltas, weights, steps, strict=True)):
        strategy.add(ClientUpdate(d, w, 10 + i, {"local-steps": tau, "train-loss": 0.7}))
    return strategy.result()


def test_fednova_matches_the_paper_formula(fednova: Strategy) -> None:
    # Prepare: heterogeneous local work (Wang et al. 2020, Section 4, plain SGD)
    model, deltas, weights = _updates(0, 4)
    steps = [1.0, 5.0, 20.0, 80.0]
    p = np.array(weights) / sum(weights)
    tau = np.array(steps)
    tau_eff = float(np.sum(p * tau))
    normalized = np.stack([_flat(d) / t for d, t in zip(deltas, steps, strict=True)])
    expected = _flat(model) + tau_eff * (p @ normalized)
    # Execute
    out = _round(fednova, model, deltas, weights, steps)
    # Assert
    assert all(o.dtype == np.float32 for o in out)
    assert [o.shape for o in out] == SHAPES
    np.testing.assert_allclose(_flat(out), expected, rtol=1e-5, atol=1e-6)


def test_fednova_with_equal_steps_is_fedavg(fednova: Strategy) -> None:
    # Prepare
    model, deltas, weights = _updates(1, 5)
    expected = _flat(model) + np.average(np.stack([_flat(d) for d in deltas]), 0, weights)
    # Execute
    out = _round(fednova, model, deltas, weights, [12.0] * 5)
    # Assert
    np.testing.assert_allclose(_flat(out), expected, rtol=1e-5, atol=1e-6)


def test_fednova_is_not_a_weighted_sum(fednova: Strategy) -> None:
    # Its coefficients come from client-reported step counts.
    assert fednova.weighted_sum is False


def test_fednova_names_the_missing_metric(fednova: Strategy) -> None:
    # Prepare: under DP the replies carry no metrics
    model, deltas, _ = _updates(2, 2)
    fednova.begin_round(1, model)
    fednova.add(ClientUpdate(deltas[0], 3.0, 1, {"local-steps": 4.0}))
    # Execute / Assert
    with pytest.raises(ValueError, match=r"FedNova needs the reply metric 'local-steps'.*node 2"):
        fednova.add(ClientUpdate(deltas[1], 1.0, 2))
    with pytest.raises(ValueError, match="'local-steps'"):
        fednova.add(ClientUpdate(deltas[1], 1.0, 3, {"train-loss": 0.1}))


def test_fednova_rejects_non_positive_steps_but_skips_zero_weight(fednova: Strategy) -> None:
    # Prepare
    model, deltas, _ = _updates(3, 2)
    fednova.begin_round(1, model)
    # Execute / Assert: zero weight contributes nothing, even with 0 steps
    fednova.add(ClientUpdate(deltas[0], 0.0, 1, {"local-steps": 0.0}))
    with pytest.raises(ValueError, match=r"node 2 reported local-steps=0.0, expected > 0"):
        fednova.add(ClientUpdate(deltas[1], 2.0, 2, {"local-steps": 0.0}))
    for o, g in zip(fednova.result(), model, strict=True):
        np.testing.assert_array_equal(o, g)


def test_fednova_without_updates_returns_global(fednova: Strategy) -> None:
    # Prepare
    model, _, _ = _updates(4, 0)
    # Execute
    fednova.begin_round(1, model)
    out = fednova.result()
    # Assert
    for o, g in zip(out, model, strict=True):
        np.testing.assert_array_equal(o, g)
        assert o is not g
