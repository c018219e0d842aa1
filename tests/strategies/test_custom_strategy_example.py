"""The researcher example ``examples/custom_strategy/norm_bounded_mean.py``, via the interface."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from flowerpress.strategies import ClientUpdate, Strategy, build_strategy, register_strategy
from flowerpress.strategies import registry as registry_module

REPO = Path(__file__).resolve().parents[2]
SPEC = "examples.custom_strategy.norm_bounded_mean:NormBoundedMean"


@pytest.fixture
def example_spec(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.chdir(REPO)  # the example is imported relative to the project
    return SPEC


@pytest.fixture
def restore_registry() -> Iterator[None]:
    saved = dict(registry_module._REGISTRY)
    try:
        yield
    finally:
        registry_module._REGISTRY.clear()
        registry_module._REGISTRY.update(saved)


def _norm_bounded_mean(
    g: np.ndarray, deltas: list[np.ndarray], weights: list[float], c: float
) -> np.ndarray:
    clipped = [d * min(1.0, c / np.linalg.norm(d)) for d in deltas]
    return g + np.average(np.stack(clipped), axis=0, weights=weights)


def test_example_matches_direct_formula(example_spec: str) -> None:
    # Prepare: one short update, one long one (clipped), one zero update
    strategy = build_strategy(f"{example_spec}:max_norm=5")
    g = [np.zeros((2, 2), np.float32), np.ones(3, np.float32)]
    rng = np.random.default_rng(0)
    deltas = [[rng.normal(size=a.shape).astype(np.float32) * s for a in g] for s in (0.1, 50.0)]
    deltas.append([np.zeros_like(a) for a in g])
    weights = [3.0, 1.0, 2.0]
    flat = [np.concatenate([x.ravel() for x in d]).astype(np.float64) for d in deltas]
    clipped = [  # a zero update has no direction: kept as is
        f * (min(1.0, 5.0 / np.linalg.norm(f)) if np.linalg.norm(f) > 0 else 1.0) for f in flat
    ]
    expected = np.concatenate([a.ravel() for a in g]) + np.average(
        np.stack(clipped), axis=0, weights=weights
    )
    # Execute
    strategy.begin_round(1, g)
    for i, (d, w) in enumerate(zip(deltas, weights, strict=True)):
        strategy.add(ClientUpdate(d, w, i))
    out = strategy.result()
    # Assert
    assert all(o.dtype == np.float32 for o in out)
    np.testing.assert_allclose(np.concatenate([o.ravel() for o in out]), expected, rtol=1e-5)


def test_example_bounds_a_single_attacker(example_spec: str) -> None:
    # Prepare: 4 honest updates of norm 1, one attacker of norm 1e4
    strategy = build_strategy(f"{example_spec}:max_norm=1")
    g = [np.zeros(4, np.float32)]
    honest = [np.array([0.5, 0.5, 0.5, 0.5], np.float32)] * 4
    evil = np.full(4, -5000.0, np.float32)
    # Execute
    strategy.begin_round(1, g)
    for i, d in enumerate([*honest, evil]):
        strategy.add(ClientUpdate([d], 1.0, i))
    out = strategy.result()[0]
    # Assert: the attacker moves the mean by at most max_norm / n
    expected = _norm_bounded_mean(g[0], [*honest, evil], [1.0] * 5, 1.0)
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    assert np.linalg.norm(out - honest[0] * 4 / 5) <= 1.0 / 5 + 1e-6


def test_example_can_be_registered_by_name(example_spec: str, restore_registry: None) -> None:
    # Prepare
    strategy = build_strategy(example_spec)
    # Execute
    register_strategy("norm-bounded-mean", type(strategy))
    built = build_strategy("norm-bounded-mean:max_norm=2.5")
    # Assert
    assert isinstance(built, Strategy) and type(built).__name__ == "NormBoundedMean"
    assert built.max_norm == 2.5  # type: ignore[attr-defined]


def test_example_is_not_a_weighted_sum(example_spec: str) -> None:
    # Clipping each update on the server is not sum_k w_k delta_k / sum_k w_k.
    assert build_strategy(example_spec).weighted_sum is False


def test_example_validates_its_argument(example_spec: str) -> None:
    with pytest.raises(ValueError, match="max_norm must be > 0"):
        build_strategy(f"{example_spec}:max_norm=0")


def test_example_without_updates_returns_global(example_spec: str) -> None:
    # Prepare
    strategy = build_strategy(example_spec)
    g = [np.arange(3, dtype=np.float32)]
    # Execute
    strategy.begin_round(1, g)
    out = strategy.result()
    # Assert
    np.testing.assert_array_equal(out[0], g[0])
