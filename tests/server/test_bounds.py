"""The server's bound on accepted updates (issue 20, item 3): never off, and no single
update can freeze or poison any strategy, built-in or ``flwr:``.

The strategy-level runs below drive each strategy as the round loop does
(``begin_round``, one ``add`` per accepted update through the bound, ``result``)
on a quadratic problem: each honest device moves 30% of the way to a target, one
device sends float32-max in round 1.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from flowerpress.server.bounds import (
    AUTO_FACTOR,
    UpdateNormBound,
    bound_update_norm,
    dp_update_bound,
    l2_norm,
)
from flowerpress.strategies import build_strategy
from flowerpress.strategies.base import ClientUpdate, NDArray
from flowerpress.testing import server_identity

F32_MAX = float(np.finfo(np.float32).max)


def _updates(norms: list[float], d: int = 8) -> list[list[NDArray]]:
    unit = np.ones(d, np.float32) / math.sqrt(d)
    return [[(unit * n).astype(np.float32)] for n in norms]


# --- the derived bound ---------------------------------------------------------------------

def test_the_first_round_bound_is_the_initial_models_norm() -> None:
    # Prepare
    initial = [np.full((10, 10), 0.5, np.float32)]
    # Execute
    bound = UpdateNormBound(initial)
    # Assert: ||w_0|| = 5
    assert bound.mode == "derived"
    assert bound.current() == pytest.approx(5.0)


def test_a_model_initialised_at_zero_gets_the_rms_floor() -> None:
    bound = UpdateNormBound([np.zeros(400, np.float32)])
    assert bound.current() == pytest.approx(0.01 * 20.0)


def test_the_next_bound_is_a_few_times_the_last_rounds_median_norm() -> None:
    # Prepare
    bound = UpdateNormBound([np.full(100, 1.0, np.float32)])  # M_1 = 10
    # Execute: round 1 accepts 1, 2, 3 and one float32-max update
    for update in [*_updates([1.0, 2.0, 3.0]), [np.full(8, F32_MAX, np.float32)]]:
        bound.apply(update, server_round=1)
    before = bound.current()
    _, norm, clipped = bound.apply(_updates([1.0])[0], server_round=2)
    # Assert: the hostile norm counts as M_1 = 10, so the median is (2 + 3) / 2
    assert before == pytest.approx(10.0) and not clipped and norm == pytest.approx(1.0)
    assert bound.current() == pytest.approx(AUTO_FACTOR * 2.5)


def test_one_hostile_update_in_ten_does_not_move_the_bound() -> None:
    # Prepare
    honest = [0.9, 1.0, 1.1, 1.0, 0.95, 1.05, 1.0, 0.98, 1.02]
    clean, attacked = (UpdateNormBound([np.ones(100, np.float32)]) for _ in range(2))
    # Execute
    for update in _updates([*honest, 1.0]):
        clean.apply(update, server_round=1)
    for update in [*_updates(honest), [np.full(8, F32_MAX, np.float32)]]:
        attacked.apply(update, server_round=1)
    clean.apply(_updates([1.0])[0], server_round=2)
    attacked.apply(_updates([1.0])[0], server_round=2)
    # Assert
    assert attacked.current() == pytest.approx(clean.current())


def test_a_hostile_majority_grows_the_bound_by_at_most_the_factor_per_round() -> None:
    bound = UpdateNormBound([np.ones(100, np.float32)])
    previous = bound.current()
    for server_round in range(1, 6):
        for _ in range(3):
            bound.apply([np.full(8, F32_MAX, np.float32)], server_round=server_round)
        bound.apply(_updates([0.1])[0], server_round=server_round + 1)
        assert bound.current() <= AUTO_FACTOR * previous * (1 + 1e-12)
        previous = bound.current()


def test_a_fixed_bound_and_a_dp_bound_override_the_derived_one() -> None:
    initial = [np.ones(16, np.float32)]
    fixed = UpdateNormBound(initial, max_norm=0.5)
    dp = UpdateNormBound(initial, max_norm=0.5, dp_bound=lambda d: 1.0 + 0.1 * d)
    assert (fixed.mode, fixed.current()) == ("fixed", 0.5)
    assert dp.mode == "dp" and dp.current() == pytest.approx(2.6)
    clipped, norm, was = dp.apply(_updates([10.0])[0], server_round=1)
    assert was and norm == pytest.approx(10.0) and l2_norm(clipped) <= 2.6


def test_the_bounded_update_never_exceeds_the_bound_after_float32_rounding() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        delta = [rng.normal(0, 10, 37).astype(np.float32)]
        bound = float(rng.uniform(1e-3, 5.0))
        out, _, _ = bound_update_norm(delta, bound)
        assert l2_norm(out) <= bound


def test_the_state_round_trips_mid_round() -> None:
    # Prepare
    initial = [np.ones(100, np.float32)]
    live, restored = UpdateNormBound(initial), UpdateNormBound(initial)
    for update in _updates([1.0, 2.0]):
        live.apply(update, server_round=1)
    # Execute
    restored.load_state_dict(live.state_dict())
    for bound in (live, restored):
        bound.apply(_updates([4.0])[0], server_round=1)
        bound.apply(_updates([1.0])[0], server_round=2)
    # Assert
    assert restored.current() == live.current() == pytest.approx(AUTO_FACTOR * 2.0)


@pytest.mark.parametrize("state", [{"version": 0}, {"version": 1, "derived": -1.0, "round": 1,
                                                       "norms": []},
                                   {"version": 1, "derived": 1.0, "round": 1,
                                    "norms": [float("nan")]}])
def test_a_bad_state_is_refused(state: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="update bound state"):
        UpdateNormBound([np.ones(4, np.float32)]).load_state_dict(state)


def test_the_dp_bound_is_the_clip_plus_the_noise_tail() -> None:
    assert dp_update_bound(clip=1.0, noise_std=0.5, elements=400) == pytest.approx(
        1.0 + 0.5 * (20.0 + 20.0))
    with pytest.raises(ValueError, match="clip"):
        dp_update_bound(clip=0.0, noise_std=0.5, elements=4)


# --- no single update freezes or poisons a strategy --------------------------------------

STRATEGIES = ["fedavg", "fedprox:mu=0.1", "fedavgm", "fedadam", "fedyogi", "fedadagrad",
              "median", "trimmed-mean:beta=0.2", "krum:f=1", "flwr:FedAvg", "flwr:FedAvgM",
              "flwr:FedAdam", "flwr:FedAdagrad", "flwr:FedYogi", "flwr:FedMedian",
              "flwr:FedTrimmedAvg"]


def _distance_after(spec: str, *, hostile: bool, bounded: bool, rounds: int = 20,
                    cohort: int = 10, d: int = 200) -> float:
    """Distance to the target after ``rounds``; one float32-max update in round 1."""
    rng = np.random.default_rng(0)
    weights: list[NDArray] = [rng.normal(0, 0.35, d).astype(np.float32)]
    target = weights[0] + rng.normal(0, 3 / math.sqrt(d), d).astype(np.float32)
    strategy = build_strategy(spec)
    bound = UpdateNormBound(weights)
    for server_round in range(1, rounds + 1):
        strategy.begin_round(server_round, weights)
        for node in range(1, cohort + 1):
            if hostile and server_round == 1 and node == 1:
                delta = [np.full(d, F32_MAX, np.float32)]
            else:
                step = 0.3 * (target - weights[0]) + rng.normal(0, 0.01, d)
                delta = [step.astype(np.float32)]
            if bounded:
                delta = bound.apply(delta, server_round=server_round)[0]
            strategy.add(ClientUpdate(delta=delta, weight=1.0, node_id=node))
        weights = strategy.result()
    return l2_norm([weights[0] - target])


@pytest.mark.parametrize("spec", STRATEGIES)
def test_one_float32_max_update_neither_freezes_nor_poisons_any_strategy(spec: str) -> None:
    # Execute
    with server_identity():
        clean = _distance_after(spec, hostile=False, bounded=True)
        attacked = _distance_after(spec, hostile=True, bounded=True)
    # Assert: the attacked run gets as close to the target as the clean one
    assert attacked <= 1.1 * clean + 0.02, (spec, clean, attacked)


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")
@pytest.mark.parametrize("spec", ["flwr:FedAdam", "flwr:FedAdagrad", "flwr:FedYogi"])
def test_without_a_bound_one_update_freezes_flowers_adaptive_optimizers(spec: str) -> None:
    # The defect the default bound closes (issue 20): the model never moves again.
    with server_identity():
        start = _distance_after(spec, hostile=False, bounded=False, rounds=0)
        frozen = _distance_after(spec, hostile=True, bounded=False)
    assert frozen == pytest.approx(start, rel=1e-3)
