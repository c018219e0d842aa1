"""The ``flat`` stage: one vector per update (global top-k), split back by the receiver."""

from __future__ import annotations

import numpy as np
import pytest

from flowerpress import protocol
from flowerpress.compression import decode, parse
from flowerpress.compression.envelope import payload_record
from flowerpress.config import validate

SHAPES = [(16, 1, 5, 5), (16,), (32, 16, 5, 5), (32,), (64, 98), (64,), (10, 64), (10,)]


def _update(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in SHAPES]


def test_flat_spec_is_canonical_and_reparses() -> None:
    # Execute
    pipe = parse("topk:0.01+q:4+flat+ef+zstd")

    # Assert
    assert pipe.flat
    assert pipe.spec == "flat+topk:0.01+q:4+ef+zstd:3"
    assert parse(pipe.spec) == pipe
    assert not parse("topk:0.01+q:4").flat


def test_flat_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="flat given twice"):
        parse("flat+topk:0.1+flat")


def test_flat_identity_round_trip_splits_into_the_model_shapes() -> None:
    # Prepare
    update = _update()

    # Execute
    payload, _ = parse("flat").encode(update, rng=np.random.default_rng(1))
    decoded = decode(payload, max_elements=sum(int(np.prod(s)) for s in SHAPES),
                     max_tensors=len(SHAPES))
    split = protocol.decode_weights(payload_record(payload), update)

    # Assert
    assert len(decoded) == 1 and decoded[0].shape == (sum(int(np.prod(s)) for s in SHAPES),)
    assert [a.shape for a in split] == [u.shape for u in update]
    for got, want in zip(split, update, strict=True):
        np.testing.assert_array_equal(got, want)


def test_flat_topk_is_global_across_tensors() -> None:
    # Prepare: the largest magnitudes all sit in the last tensor
    update = [np.full(s, 0.01, dtype=np.float32) for s in SHAPES]
    update[-1][:] = np.arange(1, 11, dtype=np.float32)
    n = sum(int(np.prod(s)) for s in SHAPES)
    k = 10

    # Execute
    payload, _ = parse(f"flat+topk:{k / n!r}").encode(update, rng=np.random.default_rng(0))
    split = protocol.decode_weights(payload_record(payload), update)
    per_tensor, _ = parse(f"topk:{k / n!r}").encode(update, rng=np.random.default_rng(0))
    split_per_tensor = protocol.decode_weights(payload_record(per_tensor), update)

    # Assert: global top-k keeps exactly the last tensor; per-tensor keeps one of each
    np.testing.assert_array_equal(split[-1], update[-1])
    assert all(not a.any() for a in split[:-1])
    assert all(int(np.count_nonzero(a)) >= 1 for a in split_per_tensor)


def test_flat_error_feedback_invariant() -> None:
    # Prepare
    update = _update(2)
    pipe = parse("flat+topk:0.02+q:4+ef")
    rng = np.random.default_rng(3)

    # Execute: two rounds, the second with the first's residual
    _, state = pipe.encode(update, rng=rng)
    payload2, state2 = pipe.encode(update, state, rng=rng)
    sent = protocol.decode_weights(payload_record(payload2), update)

    # Assert: input + old residual == decoded + new residual (in the flat layout)
    flat_in = np.concatenate([u.ravel() for u in update]) + state.residuals[0]
    flat_out = np.concatenate([s.ravel() for s in sent]) + state2.residuals[0]
    np.testing.assert_allclose(flat_out, flat_in, rtol=0, atol=1e-5)
    assert [r.shape for r in state2.residuals] == [flat_in.shape]


def test_a_flat_vector_of_the_wrong_size_is_rejected_by_the_shape_check() -> None:
    # Prepare: a vector one element short of the model
    update = _update()
    n = sum(int(np.prod(s)) for s in SHAPES)
    payload, _ = parse("none").encode([np.zeros(n - 1, np.float32)])

    # Execute / Assert: not split, and the reply's shapes do not match the model
    values = protocol.decode_weights(payload_record(payload), update)
    assert len(values) == 1
    with pytest.raises(protocol.UpdateRejected):
        protocol._check_shapes(values, update, "update")


def test_download_specs_refuse_flat() -> None:
    with pytest.raises(ValueError, match="flat is an upload stage"):
        validate({"download-compression": "flat+topk:0.05+q:4"})
    assert validate({"compression": "flat+topk:0.01+q:4+ef"})["compression"]
