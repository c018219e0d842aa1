"""``flwr:NAME``: Flower's own strategies on decoded updates, against the built-ins."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from flwr.serverapp.strategy import Krum as FlowerKrum
from flwr.supercore.task_identity import TaskIdentity

from flowerpress.strategies import ClientUpdate, FlwrStrategy, NDArray, Strategy, build_strategy
from flowerpress.strategies.flwr_adapter import FlwrWeightedMean

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


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("flwr:FedAvg", True),
        ("flwr:FedProx:proximal_mu=0.1", True),
        ("flwr:FedAvgM", True),
        ("flwr:FedAdagrad", True),
        ("flwr:FedAdam", True),
        ("flwr:FedYogi", True),
        ("flwr:FedAvg:weighted_by_key=local-steps", False),
        ("flwr:FedMedian", False),
        ("flwr:FedTrimmedAvg", False),
        ("flwr:Krum", False),
        ("flwr:MultiKrum", False),
        ("flwr:Bulyan", False),
        ("flwr:QFedAvg:client_learning_rate=0.1", False),
    ],
)
def test_weighted_sum_only_for_flowers_fedavg_family(spec: str, expected: bool) -> None:
    # The privacy accounting trusts this bit: only Flower's own FedAvg-family
    # classes, weighted by the server's weight, may claim it.
    strategy = build_strategy(spec)
    assert strategy.weighted_sum is expected
    assert isinstance(strategy, FlwrStrategy)
    assert isinstance(strategy, FlwrWeightedMean) is expected


def test_direct_adapter_is_conservative_and_weighted_mean_checks_its_input() -> None:
    class MyFedAvg(FlowerFedAvg):
        pass

    assert FlwrStrategy(FlowerFedAvg()).weighted_sum is False
    assert FlwrStrategy.wrap(MyFedAvg()).weighted_sum is False  # a subclass may override
    with pytest.raises(TypeError, match="not one of Flower's"):
        FlwrWeightedMean(FlowerKrum())


def _update(delta: list[NDArray], weight: float, node: int, **metrics: float) -> ClientUpdate:
    return ClientUpdate(delta, weight, node, {k.replace("_", "-"): v for k, v in metrics.items()})


def test_adapter_forwards_metrics_to_flower() -> None:
    # Prepare: Flower's FedAvg weighted by a client-reported metric
    g = [np.zeros(s, np.float32) for s in SHAPES]
    deltas = [[np.full(s, v, np.float32) for s in SHAPES] for v in (1.0, 4.0)]
    strategy = build_strategy("flwr:FedAvg:weighted_by_key=local-steps")
    # Execute
    strategy.begin_round(1, g)
    strategy.add(_update(deltas[0], 100.0, 1, local_steps=3.0, train_loss=0.5))
    strategy.add(_update(deltas[1], 1.0, 2, local_steps=1.0))  # no train-loss: not forwarded
    out = strategy.result()
    # Assert: (3 * 1 + 1 * 4) / 4, the server's weight ignored
    np.testing.assert_allclose(out[0], 7.0 / 4.0, rtol=1e-6)


def test_adapter_names_a_metric_the_flower_strategy_needs() -> None:
    # Prepare: under DP the replies carry no metrics
    g = [np.zeros(s, np.float32) for s in SHAPES]
    strategy = build_strategy("flwr:QFedAvg:client_learning_rate=0.1,train_loss_key=train-loss")
    strategy.begin_round(1, g)
    strategy.add(_update([np.ones(s, np.float32) for s in SHAPES], 1.0, 7, train_loss=0.2))
    strategy.add(_update([np.ones(s, np.float32) for s in SHAPES], 1.0, 8))
    # Execute / Assert
    with pytest.raises(
        ValueError, match=r"QFedAvg \(train_loss_key='train-loss'\).*node 8.*'train-loss'"
    ):
        strategy.result()


def test_adapter_runs_qfedavg_on_reported_losses() -> None:
    # Prepare: q-FedAvg (Li et al., ICLR 2020), as Flower writes it, L = 1 / lr
    q, lr = 0.5, 0.1
    g = [np.linspace(-1, 1, int(np.prod(s)), dtype=np.float32).reshape(s) for s in SHAPES]
    rng = np.random.default_rng(3)
    deltas = [[rng.normal(size=s).astype(np.float32) for s in SHAPES] for _ in range(3)]
    losses = [0.5, 1.0, 2.0]
    flat = [np.concatenate([a.ravel() for a in d]).astype(np.float64) for d in deltas]
    big_l = 1.0 / lr
    sum_delta = sum(f_**q * big_l * -x for f_, x in zip(losses, flat, strict=True))
    sum_h = sum(
        q * f_ ** (q - 1) * np.sum((big_l * -x) ** 2) + big_l * f_**q
        for f_, x in zip(losses, flat, strict=True)
    )
    expected = np.concatenate([a.ravel() for a in g]) - sum_delta / sum_h
    strategy = build_strategy(
        f"flwr:QFedAvg:client_learning_rate={lr},q={q},train_loss_key=train-loss"
    )
    # Execute
    strategy.begin_round(1, g)
    for i, (d, loss) in enumerate(zip(deltas, losses, strict=True)):
        strategy.add(_update(d, 10.0, i + 1, train_loss=loss))
    out = strategy.result()
    # Assert
    np.testing.assert_allclose(
        np.concatenate([o.ravel() for o in out]), expected, rtol=1e-4, atol=1e-5
    )
