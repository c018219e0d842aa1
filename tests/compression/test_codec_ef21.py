"""The ``ef21`` stage: estimate bookkeeping, the EF21 invariant, state round trips, fuzz."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from flowerpress import protocol
from flowerpress.compression import CodecState, PayloadError, decode, parse
from flowerpress.compression.envelope import payload_record
from flowerpress.config import validate
from tests.compression.payload_mutations import mutated_payloads

SHAPES = [(6, 2, 3, 3), (6,), (24, 40), (5, 7)]
N = sum(int(np.prod(s)) for s in SHAPES)


def _update(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in SHAPES]


def test_ef21_spec_is_canonical_and_exclusive_with_ef() -> None:
    # Execute
    pipe = parse("topk:0.1+ef21+q:4+zstd")

    # Assert
    assert pipe.ef21 and not pipe.error_feedback and pipe.has_error_feedback
    assert pipe.spec == "topk:0.1+q:4+ef21+zstd:3"
    assert parse(pipe.spec) == pipe
    with pytest.raises(ValueError, match="ef and ef21"):
        parse("topk:0.1+ef+ef21")
    with pytest.raises(ValueError, match="ef21 given twice"):
        parse("topk:0.1+ef21+ef21")


@pytest.mark.parametrize("spec", ["topk:0.1+q:4+ef21", "flat+topk:0.05+q:2+ef21+zstd",
                                  "q:4+ef21", "ef21"])
def test_ef21_invariant_new_estimate_is_old_plus_decoded(spec: str) -> None:
    # Prepare
    pipe = parse(spec)
    rng = np.random.default_rng(0)
    state: CodecState | None = None
    old = [np.zeros(s, np.float32) for s in SHAPES]

    for seed in range(3):
        update = _update(seed)
        # Execute
        payload, state = pipe.encode(update, state, rng=rng)
        sent = protocol.decode_weights(payload_record(payload), update)
        new = protocol.unflatten(list(state.estimates), update)

        # Assert: g' = g + decoded(C(update - g)), on both sides of the wire
        for g_new, g_old, c in zip(new, old, sent, strict=True):
            np.testing.assert_allclose(g_new, g_old + c, rtol=0, atol=1e-5)
        old = [np.array(g) for g in new]
    assert not state.residuals


def test_ef21_sends_the_difference_from_the_estimate() -> None:
    # Prepare: an estimate equal to the update leaves nothing to send
    update = _update(1)
    pipe = parse("topk:0.1+ef21")
    state = CodecState.from_arrays(estimates=[u.copy() for u in update])

    # Execute
    payload, new_state = pipe.encode(update, state, rng=np.random.default_rng(0))
    sent = decode(payload, max_elements=N, max_tensors=len(SHAPES))

    # Assert
    assert all(not s.any() for s in sent)
    for g, u in zip(new_state.estimates, update, strict=True):
        np.testing.assert_array_equal(g, u)


def test_ef21_state_round_trips_through_a_record_and_checks_shapes() -> None:
    # Prepare
    _, state = parse("topk:0.1+q:4+ef21").encode(_update(0), rng=np.random.default_rng(0))

    # Execute
    back = CodecState.from_record(state.to_record())

    # Assert
    assert len(back.estimates) == len(SHAPES)
    for a, b in zip(back.estimates, state.estimates, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="ef21 estimate shapes"):
        parse("topk:0.1+ef21").encode([np.zeros(3, np.float32)], state)


def test_download_specs_refuse_ef21() -> None:
    with pytest.raises(ValueError, match="ef21 is an upload stage"):
        validate({"download-compression": "topk:0.05+q:4+ef21"})


def _valid_payloads() -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for spec in ("topk:0.1+q:4+ef21", "flat+topk:0.05+q:2+ef21+zstd", "flat+topk:0.1+q:4+ef",
                 "flat+q:3"):
        state = None
        for seed in range(2):
            payload, state = parse(spec).encode(_update(seed), state, rng=rng)
        out.append(payload)
    return out


VALID = _valid_payloads()
REFERENCE = [np.zeros(s, np.float32) for s in SHAPES]


def hostile() -> hs.SearchStrategy[bytes]:
    return mutated_payloads(VALID, kinds=("flip", "truncate", "insert", "huge", "byte"))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile())
def test_hostile_flat_and_ef21_payloads_stay_bounded(payload: bytes) -> None:
    # Execute: the decoder with the model's bounds, then the server's split
    try:
        out = decode(payload, max_elements=N, max_tensors=len(SHAPES))
    except PayloadError as exc:
        assert "\n" not in str(exc)
        return
    # Assert: within max_elements / max_tensors, finite float32
    assert len(out) <= len(SHAPES) and sum(a.size for a in out) <= N
    assert all(a.dtype == np.float32 and np.isfinite(a).all() for a in out)
    try:
        values = protocol.decode_weights(payload_record(payload), REFERENCE)
        protocol._check_shapes(values, REFERENCE, "update")
    except protocol.UpdateRejected:
        return
    assert [v.shape for v in values] == [r.shape for r in REFERENCE]
