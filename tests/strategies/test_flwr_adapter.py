"""``flwr:NAME``: Flower's own strategies on decoded updates, against the built-ins."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from flwr.supercore.task_identity import TaskIdentity

from flowerpress.strategies import ClientUpdate, FlwrStrategy, NDArray, Strategy, build_strategy

SHAPES = [(3, 2), (5,)]


def _rounds(seed: int, num_rounds: int, n: int) -> list[tuple[list[list[NDArray]], list[float]]]:
    rng = np.random.default_rng(seed)
    return [
        (
            [[rng.normal(size=s).astype(np.float32) for s in SHAPES] for _ in range(n)],
            [float(w) for w in rng.integers(1, 20, size=n)],
        )
        for _ in range(num_rounds)
    ]


def _run(
    strategy: Strategy, rounds: list[tuple[list[list[NDArray]], list[float]]]
) -> list[NDArray]:
    weights = [np.linspace(-1, 1, int(np.prod(s)), dtype=np.float32).reshape(s) for s in SHAPES]
    for r, (deltas, ws) in enumerate(rounds, start=1):
        strategy.begin_round(r, weights)
        for i, (d, w) in enumerate(zip(deltas, ws, strict=True)):
            strategy.add(ClientUpdate(d, w, 10 + i))
        weights = strategy.result()
    return weights


@pytest.mark.parametrize(
    ("flower", "ours", "num_rounds", "weighted"),
    [
        ("flwr:FedAvg", "fedavg", 2, True),
        ("flwr:FedProx:proximal_mu=0.1", "fedprox:mu=0.1", 1, True),
        (
            "flwr:FedAvgM:server_learning_rate=0.5,server_momentum=0.9",
            "fedavgm:lr=0.5,momentum=0.9",
            3,
            True,
        ),
        ("flwr:FedMedian", "median", 2, True),
        ("flwr:FedTrimmedAvg:beta=0.2", "trimmed-mean:beta=0.2", 2, True),
        ("flwr:Krum:num_malicious_nodes=1", "krum:f=1", 2, True),
        (
            "flwr:MultiKrum:num_malicious_nodes=1,num_nodes_to_select=3",
            "multikrum:f=1,m=3",
            2,
            False,
        ),
    ],
)
def test_flower_strategy_matches_builtin(
    flower: str, ours: str, num_rounds: int, weighted: bool
) -> None:
    # Prepare: Flower's MultiKrum averages its selection by example count, Blanchard
    # et al. (and ours) unweighted, so that case uses equal weights.
    rounds = _rounds(0, num_rounds, 6)
    if not weighted:
        rounds = [(ds, [1.0] * len(ws)) for ds, ws in rounds]
    # Execute
    theirs = _run(build_strategy(flower), rounds)
    mine = _run(build_strategy(ours), rounds)
    # Assert
    for a, b in zip(theirs, mine, strict=True):
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_flower_fedadam_matches_its_bias_corrected_formula() -> None:
    # Prepare: Flower's FedAdam bias-corrects with round-dependent eta (see fedadam.py)
    eta, b1, b2, tau = 0.05, 0.9, 0.99, 1e-3
    rounds = _rounds(1, 2, 4)
    w = np.concatenate(
        [np.linspace(-1, 1, int(np.prod(s)), dtype=np.float32).ravel() for s in SHAPES]
    ).astype(np.float64)
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    for r, (ds, ws) in enumerate(rounds, start=1):
        d = np.average(np.stack([np.concatenate([x.ravel() for x in dd]) for dd in ds]), 0, ws)
        m = b1 * m + (1 - b1) * d
        v = b2 * v + (1 - b2) * d**2
        eta_norm = eta * np.sqrt(1 - b2 ** (r + 1.0)) / (1 - b1 ** (r + 1.0))
        w = w + eta_norm * m / (np.sqrt(v) + tau)
        w = w.astype(np.float32).astype(np.float64)
    # Execute
    out = _run(build_strategy(f"flwr:FedAdam:eta={eta},beta_1={b1},beta_2={b2},tau={tau}"), rounds)
    # Assert
    np.testing.assert_allclose(np.concatenate([o.ravel() for o in out]), w, rtol=1e-5, atol=1e-5)


def test_adapter_forwards_proximal_mu() -> None:
    assert build_strategy("flwr:FedProx:proximal_mu=0.2").client_config(1) == {"proximal-mu": 0.2}
    assert build_strategy("flwr:FedAvg").client_config(1) == {}


def test_adapter_leaves_global_state_alone() -> None:
    # Prepare
    random.seed(123)
    expected_next = random.random()
    random.seed(123)
    level = logging.getLogger("flwr").level
    # Execute
    _run(build_strategy("flwr:FedAvg:min_available_nodes=5"), _rounds(2, 1, 3))
    # Assert: Flower's node sampling did not consume the global `random` stream,
    # the placeholder task identity was removed again, Flower's log level restored
    assert random.random() == expected_next
    with pytest.raises(RuntimeError):
        _ = TaskIdentity.run_id
    assert logging.getLogger("flwr").level == level


def test_adapter_no_updates_and_zero_weight_return_global() -> None:
    # Prepare
    strategy = build_strategy("flwr:FedAvg")
    g = [np.ones(s, np.float32) for s in SHAPES]
    # Execute
    strategy.begin_round(1, g)
    empty = strategy.result()
    strategy.begin_round(2, g)
    strategy.add(ClientUpdate([np.ones(s, np.float32) for s in SHAPES], 0.0, 1))
    zero = strategy.result()
    # Assert
    for a, b, c in zip(empty, zero, g, strict=True):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, c)


def test_adapter_rejects_non_flower_objects() -> None:
    with pytest.raises(TypeError, match=r"flwr\.serverapp\.strategy\.Strategy"):
        FlwrStrategy(object())
    assert isinstance(FlwrStrategy(FlowerFedAvg()), FlwrStrategy)
