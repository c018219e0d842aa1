"""CodecState round trips through Flower records and Context.state."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, Context, RecordDict

from flowerpress.compression import CodecState, decode, parse


def _update(rng: np.random.Generator) -> list[np.ndarray]:
    return [
        rng.standard_normal((16, 3, 3, 3)).astype(np.float32),
        rng.standard_normal(16).astype(np.float32),
        rng.standard_normal((40, 64)).astype(np.float32),
        np.float32(rng.standard_normal()),
    ]


def test_state_round_trips_through_array_record_in_context_state() -> None:
    # Prepare
    rng = np.random.default_rng(0)
    update = _update(rng)
    pipe = parse("lowrank:2+q:8+ef")
    _, state = pipe.encode(update, rng=rng)
    context = Context(
        run_id=1, node_id=2, node_config={}, state=RecordDict(), run_config={}
    )

    # Execute
    context.state["flowerpress.codec"] = state.to_record()
    record = context.state["flowerpress.codec"]
    assert isinstance(record, ArrayRecord)
    restored = CodecState.from_record(record)

    # Assert
    assert len(restored.residuals) == len(update)
    for a, b in zip(state.residuals, restored.residuals, strict=True):
        assert a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    assert set(restored.lowrank_q) == set(state.lowrank_q) == {0, 2}
    for i, q in state.lowrank_q.items():
        np.testing.assert_array_equal(restored.lowrank_q[i], q)


def test_restored_state_continues_error_feedback_identically() -> None:
    # Prepare
    rng = np.random.default_rng(1)
    update = _update(rng)
    pipe = parse("topk:0.1+q:4+ef")
    _, state = pipe.encode(update, rng=np.random.default_rng(2))
    restored = CodecState.from_record(state.to_record())

    # Execute
    p1, _ = pipe.encode(update, state, rng=np.random.default_rng(3))
    p2, _ = pipe.encode(update, restored, rng=np.random.default_rng(3))

    # Assert
    assert p1 == p2
    assert len(decode(p1, max_elements=10_000)) == len(update)


def test_empty_state_round_trips() -> None:
    restored = CodecState.from_record(CodecState.empty().to_record())
    assert restored.is_empty


def test_pipeline_without_memory_returns_empty_state() -> None:
    rng = np.random.default_rng(0)
    _, state = parse("q:8+zstd").encode(_update(rng), rng=rng)
    assert state.is_empty


def test_from_record_rejects_foreign_keys() -> None:
    record = ArrayRecord(numpy_ndarrays=[np.zeros(3, dtype=np.float32)])
    with pytest.raises(ValueError, match="unexpected key"):
        CodecState.from_record(record)


def test_encode_rejects_state_of_another_model() -> None:
    # Prepare
    rng = np.random.default_rng(0)
    pipe = parse("sign+ef")
    _, state = pipe.encode([np.ones(5, dtype=np.float32)], rng=rng)

    # Execute / Assert
    with pytest.raises(ValueError, match="residual shapes"):
        pipe.encode([np.ones(6, dtype=np.float32)], state, rng=rng)
