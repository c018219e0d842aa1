"""Strategy state survives a checkpoint: a restored strategy takes the same next step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flowerpress.server.checkpoint import LoopState, load_checkpoint, save_checkpoint
from flowerpress.strategies import build_strategy
from flowerpress.strategies.base import ClientUpdate, NDArray, Strategy

SHAPES = [(3, 4), (4,)]


def _round(strategy: Strategy, server_round: int, weights: list[NDArray]) -> list[NDArray]:
    rng = np.random.default_rng(server_round)
    strategy.begin_round(server_round, weights)
    for node in range(3):
        delta = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
        strategy.add(ClientUpdate(delta=delta, weight=float(node + 1), node_id=node + 1))
    return [np.asarray(w, dtype=np.float32) for w in strategy.result()]


def _through_checkpoint(tmp_path: Path, state: dict[str, object]) -> dict[str, object]:
    save_checkpoint(tmp_path, LoopState(server_round=2, weights=[], rows=[], rng={},
                                        membership={}, strategy=state), {})
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None
    return loaded.state.strategy


@pytest.mark.parametrize("spec", [
    "fedavgm", "fedadam:lr=0.1", "fedyogi:lr=0.1", "fedadagrad:lr=0.1",
    "flwr:FedAvgM:server_momentum=0.9", "flwr:FedAdam:eta=0.1", "flwr:FedYogi:eta=0.1",
    "flwr:FedAdagrad:eta=0.1",
])
def test_restored_strategy_takes_the_same_step(tmp_path: Path, spec: str) -> None:
    # Prepare: two rounds, then the state goes through a checkpoint file
    weights = [np.zeros(s, dtype=np.float32) for s in SHAPES]
    original = build_strategy(spec)
    for server_round in (1, 2):
        weights = _round(original, server_round, weights)
    state = original.state_dict()
    assert state and any(v is not None for v in state.values())
    restored = build_strategy(spec)
    restored.load_state_dict(_through_checkpoint(tmp_path, state))
    # Execute
    expected = _round(original, 3, weights)
    got = _round(restored, 3, weights)
    # Assert: the momentum / moments carried over (a fresh strategy steps differently)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)
    fresh = _round(build_strategy(spec), 3, weights)
    assert any(not np.array_equal(a, b) for a, b in zip(fresh, expected, strict=True))


def test_flwr_state_of_another_strategy_is_refused() -> None:
    with pytest.raises(ValueError, match="no state attribute 'momentum_vector'"):
        build_strategy("flwr:FedAdam").load_state_dict({"momentum_vector": None})
