"""The streaming and batch bases: round bookkeeping the server relies on."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from flowerpress.strategies import BatchStrategy, ClientUpdate, FedAvg, NDArray, Strategy


def _model() -> list[NDArray]:
    return [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(4, dtype=np.float32)]


class _FirstUpdate(BatchStrategy):
    """Keeps the first update only; records what aggregate() was given."""

    def aggregate(
        self, global_weights: list[NDArray], updates: list[ClientUpdate]
    ) -> list[NDArray]:
        self.seen = list(updates)
        return [g + d for g, d in zip(global_weights, updates[0].delta, strict=True)]


@pytest.mark.parametrize("strategy", [FedAvg(), _FirstUpdate()], ids=["streaming", "batch"])
def test_no_updates_returns_global_unchanged(strategy: Strategy) -> None:
    # Prepare
    model = _model()
    strategy.begin_round(1, model)
    # Execute
    out = strategy.result()
    # Assert
    for o, g in zip(out, model, strict=True):
        np.testing.assert_array_equal(o, g)
        assert o.dtype == np.float32
        assert o is not g


@pytest.mark.parametrize("strategy", [FedAvg(), _FirstUpdate()], ids=["streaming", "batch"])
def test_add_before_begin_round_raises(strategy: Strategy) -> None:
    with pytest.raises(RuntimeError, match="begin_round"):
        strategy.add(ClientUpdate(_model(), 1.0, 1))


@pytest.mark.parametrize("strategy", [FedAvg(), _FirstUpdate()], ids=["streaming", "batch"])
def test_add_rejects_mismatched_layout_and_bad_weight(strategy: Strategy) -> None:
    # Prepare
    model = _model()
    strategy.begin_round(1, model)
    # Execute / Assert
    with pytest.raises(ValueError, match="expected 2"):
        strategy.add(ClientUpdate(model[:1], 1.0, 1))
    with pytest.raises(ValueError, match=r"delta\[1\] has shape"):
        strategy.add(ClientUpdate([model[0], np.ones(5, np.float32)], 1.0, 1))
    with pytest.raises(ValueError, match="weight"):
        strategy.add(ClientUpdate(model, -1.0, 1))
    with pytest.raises(ValueError, match="weight"):
        strategy.add(ClientUpdate(model, float("nan"), 1))


@pytest.mark.parametrize("strategy", [FedAvg(), _FirstUpdate()], ids=["streaming", "batch"])
def test_result_is_computed_once_per_round(strategy: Strategy) -> None:
    # Prepare
    model = _model()
    strategy.begin_round(1, model)
    strategy.add(ClientUpdate([np.ones_like(g) for g in model], 2.0, 7))
    # Execute
    first = strategy.result()
    second = strategy.result()
    # Assert: same weights, and no further add in a finished round
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(RuntimeError, match="after result"):
        strategy.add(ClientUpdate(model, 1.0, 8))


def test_batch_strategy_passes_all_updates_in_arrival_order() -> None:
    # Prepare: float64 deltas, one update without metrics
    strategy = _FirstUpdate()
    model = _model()
    strategy.begin_round(3, model)
    for cid, w in ((5, 1.0), (9, 3.0), (2, 0.5)):
        metrics = {} if cid == 9 else {"local-steps": float(cid), "train-loss": 0.5}
        delta = [np.full(g.shape, cid, dtype=np.float64) for g in model]
        strategy.add(ClientUpdate(delta, w, cid, metrics))
    # Execute
    out = strategy.result()
    # Assert: whole updates, in order, deltas as float32
    assert [u.node_id for u in strategy.seen] == [5, 9, 2]
    assert [u.weight for u in strategy.seen] == [1.0, 3.0, 0.5]
    assert [dict(u.metrics) for u in strategy.seen] == [
        {"local-steps": 5.0, "train-loss": 0.5},
        {},
        {"local-steps": 2.0, "train-loss": 0.5},
    ]
    assert all(d.dtype == np.float32 for u in strategy.seen for d in u.delta)
    assert strategy.server_round == 3
    np.testing.assert_array_equal(out[1], model[1] + 5)


def test_new_round_forgets_previous_updates() -> None:
    # Prepare
    strategy = FedAvg()
    model = _model()
    strategy.begin_round(1, model)
    strategy.add(ClientUpdate([np.full_like(g, 10.0) for g in model], 1.0, 1))
    strategy.result()
    # Execute
    strategy.begin_round(2, model)
    strategy.add(ClientUpdate([np.full_like(g, 1.0) for g in model], 1.0, 2))
    out = strategy.result()
    # Assert
    np.testing.assert_allclose(out[0], model[0] + 1.0)


def test_zero_total_weight_leaves_global_unchanged() -> None:
    # Prepare
    strategy = FedAvg()
    model = _model()
    strategy.begin_round(1, model)
    strategy.add(ClientUpdate([np.ones_like(g) for g in model], 0.0, 1))
    # Execute
    out = strategy.result()
    # Assert
    np.testing.assert_array_equal(out[0], model[0])


def test_default_config_and_state() -> None:
    # Prepare
    strategy = FedAvg()
    # Execute / Assert
    assert strategy.client_config(1) == {}
    assert strategy.state_dict() == {}
    strategy.load_state_dict({})
    with pytest.raises(ValueError, match="keeps no state"):
        strategy.load_state_dict({"m": [np.zeros(2)]})


class _DropsALayer(BatchStrategy):
    def aggregate(
        self, global_weights: list[NDArray], updates: list[ClientUpdate]
    ) -> list[NDArray]:
        return global_weights[:1]


def test_batch_result_rejects_aggregate_output_with_wrong_layout() -> None:
    # Prepare
    strategy = _DropsALayer()
    model = _model()
    strategy.begin_round(1, model)
    strategy.add(ClientUpdate(model, 1.0, 1))
    # Execute / Assert
    with pytest.raises(ValueError, match=r"_DropsALayer.aggregate\(\) returned bad weights"):
        strategy.result()


def test_client_update_defaults_to_no_metrics_and_is_frozen() -> None:
    # Prepare
    update = ClientUpdate(delta=_model(), weight=2.0, node_id=4)
    # Execute / Assert
    assert dict(update.metrics) == {}
    with pytest.raises(dataclasses.FrozenInstanceError):
        update.weight = 3.0  # type: ignore[misc]


def test_require_metric_returns_the_value_or_names_the_missing_key() -> None:
    # Prepare
    update = ClientUpdate(_model(), 1.0, 12, {"local-steps": 40, "train-loss": 0.3})
    withheld = ClientUpdate(_model(), 1.0, 13)  # as under DP: no metrics
    # Execute / Assert
    assert update.require_metric("local-steps") == 40.0
    assert isinstance(update.require_metric("local-steps"), float)
    with pytest.raises(ValueError, match=r"node 12 sent no metric 'lr' \(its metrics: local-steps"):
        update.require_metric("lr")
    with pytest.raises(ValueError, match=r"node 13 sent no metric 'local-steps' \(its metrics: no"):
        withheld.require_metric("local-steps")


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        (FedAvg(), True),
        (_FirstUpdate(), False),
    ],
    ids=["mean", "batch"],
)
def test_weighted_sum_defaults(strategy: Strategy, expected: bool) -> None:
    assert strategy.weighted_sum is expected
    assert type(strategy).weighted_sum is expected
    assert Strategy.weighted_sum is False
