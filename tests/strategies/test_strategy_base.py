"""The streaming and batch bases: round bookkeeping the server relies on."""

from __future__ import annotations

import numpy as np
import pytest

from flowerpress.strategies import BatchStrategy, FedAvg, NDArray, Strategy


def _model() -> list[NDArray]:
    return [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(4, dtype=np.float32)]


class _FirstUpdate(BatchStrategy):
    """Keeps the first update only; records what aggregate() was given."""

    def aggregate(
        self,
        global_weights: list[NDArray],
        deltas: list[list[NDArray]],
        weights: list[float],
        client_ids: list[int],
    ) -> list[NDArray]:
        self.seen = (len(deltas), list(weights), list(client_ids))
        return [g + d for g, d in zip(global_weights, deltas[0], strict=True)]


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
        strategy.add(_model(), 1.0, 1)


@pytest.mark.parametrize("strategy", [FedAvg(), _FirstUpdate()], ids=["streaming", "batch"])
def test_add_rejects_mismatched_layout_and_bad_weight(strategy: Strategy) -> None:
    # Prepare
    model = _model()
    strategy.begin_round(1, model)
    # Execute / Assert
    with pytest.raises(ValueError, match="expected 2"):
        strategy.add(model[:1], 1.0, 1)
    with pytest.raises(ValueError, match=r"delta\[1\] has shape"):
        strategy.add([model[0], np.ones(5, np.float32)], 1.0, 1)
    with pytest.raises(ValueError, match="weight"):
        strategy.add(model, -1.0, 1)
    with pytest.raises(ValueError, match="weight"):
        strategy.add(model, float("nan"), 1)


@pytest.mark.parametrize("strategy", [FedAvg(), _FirstUpdate()], ids=["streaming", "batch"])
def test_result_is_computed_once_per_round(strategy: Strategy) -> None:
    # Prepare
    model = _model()
    strategy.begin_round(1, model)
    strategy.add([np.ones_like(g) for g in model], 2.0, 7)
    # Execute
    first = strategy.result()
    second = strategy.result()
    # Assert: same weights, and no further add in a finished round
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(RuntimeError, match="after result"):
        strategy.add(model, 1.0, 8)


def test_batch_strategy_passes_all_updates_in_arrival_order() -> None:
    # Prepare
    strategy = _FirstUpdate()
    model = _model()
    strategy.begin_round(3, model)
    for cid, w in ((5, 1.0), (9, 3.0), (2, 0.5)):
        strategy.add([np.full_like(g, cid) for g in model], w, cid)
    # Execute
    out = strategy.result()
    # Assert
    assert strategy.seen == (3, [1.0, 3.0, 0.5], [5, 9, 2])
    assert strategy.server_round == 3
    np.testing.assert_array_equal(out[1], model[1] + 5)


def test_new_round_forgets_previous_updates() -> None:
    # Prepare
    strategy = FedAvg()
    model = _model()
    strategy.begin_round(1, model)
    strategy.add([np.full_like(g, 10.0) for g in model], 1.0, 1)
    strategy.result()
    # Execute
    strategy.begin_round(2, model)
    strategy.add([np.full_like(g, 1.0) for g in model], 1.0, 2)
    out = strategy.result()
    # Assert
    np.testing.assert_allclose(out[0], model[0] + 1.0)


def test_zero_total_weight_leaves_global_unchanged() -> None:
    # Prepare
    strategy = FedAvg()
    model = _model()
    strategy.begin_round(1, model)
    strategy.add([np.ones_like(g) for g in model], 0.0, 1)
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
        self,
        global_weights: list[NDArray],
        deltas: list[list[NDArray]],
        weights: list[float],
        client_ids: list[int],
    ) -> list[NDArray]:
        return global_weights[:1]


def test_batch_result_rejects_aggregate_output_with_wrong_layout() -> None:
    # Prepare
    strategy = _DropsALayer()
    model = _model()
    strategy.begin_round(1, model)
    strategy.add(model, 1.0, 1)
    # Execute / Assert
    with pytest.raises(ValueError, match=r"_DropsALayer.aggregate\(\) returned bad weights"):
        strategy.result()
