"""compression_mod on flowerpress's ClientApp and on a plain user ClientApp."""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flowerpress.client.mods import STATE_KEY, compression_mod
from flowerpress.compression import decode, parse
from flowerpress.compression.envelope import PAYLOAD_KEY, is_payload, payload_record
from flowerpress.protocol import validate_train_reply
from flowerpress.testing import server_identity

SHAPES = [(20, 10), (10,)]


def _user_app(step: float) -> ClientApp:
    """A user's ClientApp that knows nothing of flowerpress: adds ``step`` to every weight."""
    app = ClientApp(mods=[compression_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        arrays = msg.content.array_records["arrays"].to_numpy_ndarrays()
        new = [a + np.float32(step) for a in arrays]
        return Message(RecordDict({"arrays": ArrayRecord(new),
                                   "metrics": MetricRecord({"num-examples": 5})}), reply_to=msg)

    return app


def _train_msg(arrays: ArrayRecord, spec: str, round_: int = 1) -> Message:
    config = ConfigRecord({"compression": spec, "seed": 0, "server-round": round_})
    msg = Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=1,
                  message_type="train")
    msg.metadata.__dict__["_message_id"] = f"m{round_}"
    return msg


def _context() -> Context:
    return Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 1},
                   state=RecordDict(), run_config={})


def test_user_app_reply_becomes_a_payload_of_the_delta() -> None:
    # Prepare
    weights = [np.zeros(s, dtype=np.float32) for s in SHAPES]
    app, ctx = _user_app(0.5), _context()
    with server_identity():
        msg = _train_msg(ArrayRecord(weights), "fp16")
        # Execute
        reply = app(msg, ctx)
    # Assert: a payload, decoding to the delta the app made
    record = reply.content.array_records["arrays"]
    assert is_payload(record)
    delta = decode(record[PAYLOAD_KEY].data, max_elements=1000)
    for d, s in zip(delta, SHAPES, strict=True):
        np.testing.assert_array_equal(d, np.full(s, 0.5, dtype=np.float32))
    assert reply.content.metric_records["metrics"]["num-examples"] == 5
    assert len(record[PAYLOAD_KEY].data) < sum(np.prod(s) for s in SHAPES) * 4


def test_compressed_broadcast_is_decoded_and_delta_taken_against_it() -> None:
    # Prepare: the server broadcasts q:8 (lossy) weights
    rng = np.random.default_rng(0)
    weights = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
    payload, _ = parse("q:8").encode(weights, None, rng=rng)
    received = decode(payload, max_elements=1000)
    app, ctx = _user_app(1.0), _context()
    with server_identity():
        msg = _train_msg(payload_record(payload), "none")
        # Execute
        reply = app(msg, ctx)
        delta = validate_train_reply(reply, received).delta
    # Assert: the delta is exactly what the app added to what it received
    for d in delta:
        np.testing.assert_allclose(d, 1.0, atol=1e-6)


def test_error_feedback_residual_persists_in_context_state() -> None:
    # Prepare
    weights = [np.zeros(s, dtype=np.float32) for s in SHAPES]
    app, ctx = _user_app(0.25), _context()
    with server_identity():
        # Execute
        app(_train_msg(ArrayRecord(weights), "topk:0.1+ef", 1), ctx)
        first = ctx.state.array_records[STATE_KEY].to_numpy_ndarrays()
        app(_train_msg(ArrayRecord(weights), "topk:0.1+ef", 2), ctx)
        second = ctx.state.array_records[STATE_KEY].to_numpy_ndarrays()
    # Assert: 90% of the first delta was held back, and it accumulates
    total_first = sum(float(np.abs(r).sum()) for r in first)
    total_second = sum(float(np.abs(r).sum()) for r in second)
    assert total_first > 0
    assert total_second > total_first


def test_train_metrics_false_keeps_only_num_examples() -> None:
    # Prepare: a ClientApp whose reply carries a training metric
    app = ClientApp(mods=[compression_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        arrays = msg.content.array_records["arrays"].to_numpy_ndarrays()
        return Message(RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord(
            {"num-examples": 5, "train-loss": 0.25})}), reply_to=msg)

    weights = [np.zeros(s, dtype=np.float32) for s in SHAPES]
    lean = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(),
                   run_config={"train-metrics": False})
    with server_identity():
        # Execute
        kept = app(_train_msg(ArrayRecord(weights), "q:8"), _context())
        dropped = app(_train_msg(ArrayRecord(weights), "q:8"), lean)
    # Assert
    assert dict(kept.content.metric_records["metrics"]) == {"num-examples": 5,
                                                            "train-loss": 0.25}
    assert dict(dropped.content.metric_records["metrics"]) == {"num-examples": 5}
    assert validate_train_reply(dropped, weights).weight == 5


def test_the_flops_note_travels_in_the_claim_with_the_seconds_and_never_under_dp() -> None:
    # Prepare: a ClientApp whose reply carries the FLOPs note (as client_app's does)
    from flowerpress import protocol

    app = ClientApp(mods=[compression_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        arrays = msg.content.array_records["arrays"].to_numpy_ndarrays()
        return protocol.train_reply(msg, arrays, num_examples=5, flops=3.0e9)

    weights = [np.zeros(s, dtype=np.float32) for s in SHAPES]
    with server_identity():
        # Execute
        plain = app(_train_msg(ArrayRecord(weights), "q:8"), _context())
        private = _train_msg(ArrayRecord(weights), "none")
        private.content["config"]["dp"] = "local:clip=1.0,noise=1.0"
        noised = app(private, _context())
        checked = validate_train_reply(plain, weights)
    # Assert: the note is gone; the claim holds the FLOPs and the measured seconds
    assert protocol.FLOPS_NOTE not in plain.content
    assert checked.compute is not None and checked.compute.flops == 3.0e9
    assert checked.compute.seconds >= 0 and checked.compute.cpu_seconds >= 0
    assert protocol.DOWNLOAD not in noised.content and protocol.FLOPS_NOTE not in noised.content
