"""The message contract refuses every hostile reply field with UpdateRejected (issue 12).

One reproducer per class of the issue: crashes from one small reply,
memory from a tiny reply, a model corrupted by a weight or by float32-max
values, trusted metrics, CPU from a tiny payload. Each builds the reply a
hostile device would send and asserts it is refused with a message naming
the field, and (where the issue measured memory) that refusing it allocates
next to nothing.
"""

from __future__ import annotations

import io
import struct
import tracemalloc
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from flowerpress import protocol
from flowerpress.compression import parse
from flowerpress.compression.envelope import payload_record
from flowerpress.protocol import UpdateRejected, validate_train_reply
from flowerpress.testing import server_identity

MODEL = [np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3), np.full(3, 0.5, np.float32)]
OK_METRICS: dict[str, Any] = {"num-examples": 10, "train-loss": 0.3}


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _reply(arrays: ArrayRecord, metrics: Mapping[str, Any] | None = None) -> Message:
    with server_identity():
        content = RecordDict({"arrays": arrays,
                              "metrics": MetricRecord(dict(OK_METRICS if metrics is None
                                                           else metrics))})
        return Message(content, dst_node_id=0, message_type="train")


def _plain(first: bytes, *, dtype: str = "float32", shape: tuple[int, ...] = (4, 3)) -> ArrayRecord:
    """A plain ArrayRecord whose first array's npy bytes are ``first`` (the second is honest)."""
    return ArrayRecord({"w": Array(dtype=dtype, shape=shape, stype="numpy.ndarray", data=first),
                        "b": Array(MODEL[1] + 0.1)})


def _rejects(reply: Message, *words: str) -> str:
    with server_identity(), pytest.raises(UpdateRejected) as info:
        validate_train_reply(reply, MODEL)
    text = str(info.value)
    assert "\n" not in text
    for word in words:
        assert word in text
    return text


def test_an_honest_plain_reply_gives_the_delta() -> None:
    # Execute
    with server_identity():
        checked = validate_train_reply(_reply(ArrayRecord([MODEL[0] + 1, MODEL[1] - 1])), MODEL)
    # Assert
    np.testing.assert_allclose(checked.delta[0], 1.0, rtol=1e-6)
    np.testing.assert_allclose(checked.delta[1], -1.0, rtol=1e-6)
    assert checked.weight == 10 and checked.metrics == {"train-loss": 0.3}


# --- class 1: crashes from one small reply (plain ArrayRecord, npy header) ---------------

_HONEST = _npy(MODEL[0])


@pytest.mark.parametrize(("data", "words"), [
    (b"", ("malformed npy header",)),
    (b"\x93NUMPY\x01\x00", ("malformed npy header",)),
    (b"\x93NUMPY\x09\x00" + _HONEST[8:], ("malformed npy header",)),
    (_HONEST.replace(b"'descr'", b"'dascr'"), ("malformed npy header",)),
    (_HONEST.replace(b"(4, 3)", b"(4, 3, (", 1), ("malformed npy header",)),
    (_HONEST[:10] + b"((((((((((((((((((((" * 20, ("malformed npy header",)),
    # a declared shape whose element product overflows int64
    (_HONEST.replace(b"(4, 3)", b"(4294967296, 4294967296)"), ("npy shape", "(4, 3)")),
    # a header claiming a huge array, with 48 bytes of data
    (_HONEST.replace(b"(4, 3)", b"(99999999999,)"), ("npy shape",)),
    (_HONEST.replace(b"(4, 3)", b"(-4, -3)"), ("npy shape (-4, -3)",)),
    (_HONEST[:-4], ("data bytes", "expected 48")),
    (_HONEST + b"\x00" * 4, ("data bytes", "expected 48")),
    (_npy(MODEL[0].astype(">f4")), ("dtype '>f4'",)),
    (_npy(MODEL[0].astype(np.int32)), ("dtype '<i4'",)),
    (_npy(np.zeros((4, 3), dtype=complex)), ("dtype '<c16'",)),
])
def test_malformed_npy_blobs_are_rejected_not_raised(data: bytes, words: tuple[str, ...]) -> None:
    _rejects(_reply(_plain(data)), "array 'w'", *words)


def test_an_object_dtype_header_is_rejected_without_unpickling() -> None:
    # Prepare: numpy refuses to save object arrays without pickle; craft the header
    header = _HONEST.replace(b"'<f4'", b"'|O' ")
    # Execute / Assert
    _rejects(_reply(_plain(header)), "dtype '|O'")


def test_the_declared_dtype_must_match_the_npy_header() -> None:
    _rejects(_reply(_plain(_HONEST, dtype="float64")), "declares dtype 'float64'",
             "float32")


@pytest.mark.parametrize("shape", [(4, 3, 1), (12,), (2**62, 2**62), (True, 3)])
def test_a_declared_shape_other_than_the_models_is_rejected(shape: tuple[int, ...]) -> None:
    _rejects(_reply(_plain(_HONEST, shape=shape)), "declares shape", "(4, 3)")


def test_array_fields_of_the_wrong_type_are_rejected() -> None:
    # Prepare: fields a Flower Array constructor refuses, set afterwards as a
    # hand-made message could carry them
    record = _plain(_HONEST)
    record["w"].__dict__["data"] = "not bytes"
    # Execute / Assert
    _rejects(_reply(record), "data is str")


# --- class 2: memory from a tiny reply --------------------------------------------------

@pytest.mark.parametrize("descr", [b"[('a', '|V0')]", b"[('a', '<f4', (0,))]",
                                   b"('<f4', (1000000, 1000000))"])
def test_zero_itemsize_and_subarray_dtypes_with_a_huge_shape_cost_nothing(descr: bytes) -> None:
    # Prepare: a 128-byte blob: zero-itemsize structured dtype, 10^12 elements
    header = (b"{'descr': " + descr + b", 'fortran_order': False, 'shape': (1000000, 1000000), }")
    header = header.ljust(118) + b"\n"
    blob = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header
    # Execute
    tracemalloc.start()
    try:
        text = _rejects(_reply(_plain(blob, shape=(4, 3))))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Assert: refused on its dtype or shape, with far less than a megabyte allocated
    assert "dtype" in text or "npy shape" in text
    assert peak < 1 << 20


def test_a_blob_larger_than_the_tensor_is_refused_before_it_is_parsed() -> None:
    # Prepare: an honest header followed by a megabyte of junk
    blob = _HONEST + b"\x00" * (1 << 20)
    # Execute / Assert
    _rejects(_reply(_plain(blob)), "bytes, more than the", "float64")


# --- class 3: a model corrupted by the weight or by float32-max values ------------------

@pytest.mark.parametrize(("num_examples", "words"), [
    (10**7, ("exceeds max-client-weight",)),
    (10**400, ("int beyond the float range",)),
    (float("inf"), ("not finite",)),
    (float("nan"), ("not finite",)),
    (0, ("not a positive integer",)),
    (-5, ("not a positive integer",)),
    (2.5, ("not a positive integer",)),
    (True, ("not a number",)),
])
def test_num_examples_is_a_positive_integer_under_the_cap(num_examples: Any,
                                                          words: tuple[str, ...]) -> None:
    # Prepare: MetricRecord refuses some of these values; set them as the wire could
    record = MetricRecord({"num-examples": 1})
    record.__dict__["_data"]["num-examples"] = num_examples
    with server_identity():
        reply = Message(RecordDict({"arrays": ArrayRecord(MODEL), "metrics": record}),
                        dst_node_id=0, message_type="train")
    # Execute / Assert
    _rejects(reply, *words)


def test_float32_max_weights_whose_delta_overflows_are_rejected() -> None:
    # Prepare: the global holds -1 where the reply holds float32-max
    received = [np.full((4, 3), -3e38, np.float32), MODEL[1]]
    local = [np.full((4, 3), np.finfo(np.float32).max, np.float32), MODEL[1]]
    # Execute / Assert: finite weights, infinite delta
    with server_identity(), pytest.raises(UpdateRejected, match="delta tensor 0"):
        validate_train_reply(_reply(ArrayRecord(local)), received)


def test_float64_weights_beyond_float32_are_rejected() -> None:
    local = [np.full((4, 3), 1e300), MODEL[1].astype(np.float64)]
    _rejects(_reply(ArrayRecord(local)), "NaN or Inf")


def test_a_compressed_delta_that_leaves_the_float32_range_is_rejected() -> None:
    # Prepare: a finite float32 delta, but global + delta overflows float32
    received = [np.full((4, 3), 3e38, np.float32), MODEL[1]]
    delta = [np.full((4, 3), 3e38, np.float32), np.zeros(3, np.float32)]
    blob, _ = parse("zstd").encode(delta, None)
    # Execute / Assert
    with server_identity(), pytest.raises(UpdateRejected, match="float32 range"):
        validate_train_reply(_reply(payload_record(blob)), received)


# --- class 4: metrics trusted ------------------------------------------------------------

@pytest.mark.parametrize(("metrics", "words"), [
    ({"dp-clip-indicator": float("nan")}, ("dp-clip-indicator", "not finite")),
    ({"dp-clip-indicator": -1e6}, ("dp-clip-indicator", "outside")),
    ({"dp-clip-indicator": 1e6}, ("dp-clip-indicator", "outside")),
    ({"train-loss": -1.0}, ("train-loss", "outside")),
    ({"train-loss": float("inf")}, ("train-loss", "not finite")),
    ({"local-steps": 1e15}, ("local-steps", "outside")),
    ({"custom": [1.0, 2.0]}, ("custom", "list")),
    ({"x" * 1000: 1.0}, ("metric name",)),
    ({f"m{i}": 1.0 for i in range(100)}, ("at most 64",)),
])
def test_metrics_are_finite_numbers_in_their_documented_range(metrics: dict[str, Any],
                                                              words: tuple[str, ...]) -> None:
    _rejects(_reply(ArrayRecord(MODEL), {"num-examples": 3, **metrics}), *words)


def test_eval_replies_are_checked_the_same_way() -> None:
    # Prepare
    with server_identity():
        reply = Message(RecordDict({"metrics": MetricRecord(
            {"num-examples": 5, "eval-loss": 0.1, "eval-acc": 1.5})}),
            dst_node_id=0, message_type="evaluate")
    # Execute / Assert
    with pytest.raises(UpdateRejected, match="eval-acc"):
        protocol.validate_eval_reply(reply)


# --- class 5: CPU from a tiny payload -----------------------------------------------------

def test_a_payload_with_more_tensors_than_the_model_is_rejected() -> None:
    # Prepare: an honest encoding of 4,096 one-element tensors for a 2-tensor model
    many = [np.zeros(1, np.float32) for _ in range(4096)]
    blob, _ = parse("q:8").encode(many, None, rng=np.random.default_rng(0))
    # Execute / Assert
    _rejects(_reply(payload_record(blob)), "payload could not be decoded")


@pytest.mark.parametrize("mutate", [
    lambda b: b[:-3],
    lambda b: b[:5],
    lambda b: b + b"\x00",
    lambda b: bytes([b[0] ^ 0xFF]) + b[1:],
])
def test_a_mutated_payload_is_rejected(mutate: Callable[[bytes], bytes]) -> None:
    # Prepare
    blob, _ = parse("topk:0.5+q:8+zstd").encode([MODEL[0] - MODEL[0] + 0.25, MODEL[1]], None,
                                                rng=np.random.default_rng(0))
    # Execute / Assert
    _rejects(_reply(payload_record(mutate(blob))), "payload")


@pytest.mark.parametrize("anchor", ["a" * 32, "A" * 32, "a" * 31, "a" * 33, 7, None, True,
                                    "g" * 32, "0" * 32 + "\n"])
def test_the_hello_replys_anchor_is_a_well_formed_digest_or_nothing(anchor: Any) -> None:
    # Prepare
    from flwr.app import ConfigRecord

    with server_identity():
        query = Message(RecordDict({"config": ConfigRecord({"hello": True})}), dst_node_id=1,
                        message_type="query")
        info: dict[str, Any] = {"partition-id": 0, "num-partitions": 1}
        if anchor is not None:
            info["download-anchor"] = anchor
        reply = Message(RecordDict({"info": ConfigRecord(info)}), reply_to=query)
    # Execute
    got = protocol.anchor_of_reply(reply)
    # Assert: only 32 lower-case hex characters count
    assert got == (anchor if anchor == "a" * 32 else None)


# --- the reply's download claim (issue 14: one packed bytes value) ------------------------


def _claim_reply(record: Mapping[str, Any] | None) -> Message:
    from flwr.app import ConfigRecord

    reply = _reply(payload_record(b""))
    if record is not None:
        reply.content[protocol.DOWNLOAD] = ConfigRecord(dict(record))
    return reply


_SPENT = protocol.DeviceCompute(1.5, 3.0, 2.5e9)


@pytest.mark.parametrize(("version", "compute"), [((0, 7), _SPENT), ((3, 9), None),
                                                  ((999_999_999, 999_999_999),
                                                   protocol.DeviceCompute(0.0, 0.0, None))])
def test_a_packed_claim_round_trips(version: tuple[int, int],
                                    compute: protocol.DeviceCompute | None) -> None:
    # Prepare
    digest = "0123456789abcdef" * 2
    packed = protocol.pack_claim(version, digest, compute)
    assert packed is not None and len(packed) == (24 if compute is None else 36)
    # Execute
    reply = _claim_reply({protocol.DOWNLOAD_CLAIM: packed})
    held = protocol.held_version_of_reply(reply)
    # Assert: the whole 16-byte digest, the version, the compute (float32)
    assert held == protocol.HeldVersion(*version, digest)
    assert protocol.compute_of_reply(reply, protocol.ComputeBounds()) == compute


def test_a_device_holding_nothing_sends_only_its_compute() -> None:
    # Prepare
    packed = protocol.pack_claim(None, None, protocol.DeviceCompute(2.25, 4.5, 1e6))
    # Execute
    reply = _claim_reply({protocol.DOWNLOAD_CLAIM: packed})
    # Assert
    assert packed is not None and len(packed) == 12
    assert protocol.held_version_of_reply(reply) is None
    assert protocol.compute_of_reply(reply, protocol.ComputeBounds()) == \
        protocol.DeviceCompute(2.25, 4.5, 1e6)
    assert protocol.pack_claim(None, None, None) is None
    assert protocol.pack_claim(None, None, protocol.DeviceCompute(float("nan"), 1.0)) is None


@pytest.mark.parametrize(("version", "digest"), [((2, 1), "a" * 32), ((0, 1), "a" * 31),
                                                 ((0, 1), None), (None, "a" * 32),
                                                 ((0, 10**9), "a" * 32), ((-1, 1), "a" * 32)])
def test_pack_claim_refuses_what_it_could_not_parse(version: tuple[int, int] | None,
                                                    digest: str | None) -> None:
    with pytest.raises(ValueError, match="not a claim"):
        protocol.pack_claim(version, digest, None)


@pytest.mark.parametrize("record", [
    None,
    {},
    {protocol.DOWNLOAD_CLAIM: b"\x00" * 23},
    {protocol.DOWNLOAD_CLAIM: b"\x00" * 29},
    {protocol.DOWNLOAD_CLAIM: b"\x00" * 10**5},
    {protocol.DOWNLOAD_CLAIM: "\x00" * 24},
    {protocol.DOWNLOAD_CLAIM: 7},
    {protocol.DOWNLOAD_CLAIM: struct.pack(">II16s", 5, 4, bytes(16))},
    {protocol.DOWNLOAD_CLAIM: struct.pack(">II16s", 0, 10**9, bytes(16))},
    {protocol.DOWNLOAD_CLAIM: struct.pack(">II16s", 0, 3, bytes(16)), "x": 1},
    {protocol.DOWNLOAD_HELD: "0.3", protocol.DOWNLOAD_DIGEST: "a" * 32},
])
def test_a_malformed_claim_is_no_claim(record: Mapping[str, Any] | None) -> None:
    # Execute / Assert: never raises, never a claim
    assert protocol.held_version_of_reply(_claim_reply(record)) is None


_BOUNDS = protocol.ComputeBounds(max_seconds=300.0, max_cpu_seconds=600.0, max_flops=1e12)


@pytest.mark.parametrize("compute", [(float("nan"), 1.0, 1.0), (1.0, float("inf"), 1.0),
                                     (-1.0, 1.0, 1.0), (301.0, 1.0, 1.0), (1.0, 601.0, 1.0),
                                     (1.0, 1.0, 2e12), (1.0, 1.0, -5.0),
                                     (1.0, 1.0, float("inf"))])
def test_a_compute_outside_its_bounds_rejects_the_reply(
        compute: tuple[float, float, float]) -> None:
    # Prepare: a true claim with a hostile compute
    packed = struct.pack(">II16sfff", 0, 3, bytes(16), *compute)
    reply = _claim_reply({protocol.DOWNLOAD_CLAIM: packed})
    # Execute / Assert: the claim stands, the compute is refused with one line
    assert protocol.held_version_of_reply(reply) is not None
    with pytest.raises(protocol.UpdateRejected, match="compute: "):
        protocol.compute_of_reply(reply, _BOUNDS)
    with pytest.raises(protocol.UpdateRejected, match="compute: "):
        protocol.compute_of_reply(
            _claim_reply({protocol.DOWNLOAD_CLAIM: struct.pack(">fff", *compute)}), _BOUNDS)


def test_flops_not_counted_travel_as_nan_and_read_as_none() -> None:
    # Prepare / Execute
    packed = protocol.pack_claim(None, None, protocol.DeviceCompute(1.0, 2.0, float("inf")))
    reply = _claim_reply({protocol.DOWNLOAD_CLAIM: packed})
    # Assert
    assert protocol.compute_of_reply(reply, _BOUNDS) == protocol.DeviceCompute(1.0, 2.0, None)


def _spent_reply(compute: protocol.DeviceCompute, metrics: Mapping[str, Any] | None = None
                 ) -> Message:
    from flwr.app import ConfigRecord

    reply = _reply(ArrayRecord([MODEL[0] + 1, MODEL[1] - 1]), metrics)
    reply.content[protocol.DOWNLOAD] = ConfigRecord(
        {protocol.DOWNLOAD_CLAIM: protocol.pack_claim(None, None, compute)})
    return reply


def test_the_validator_returns_the_bounded_compute_and_refuses_it_beyond() -> None:
    # Prepare
    honest = _spent_reply(protocol.DeviceCompute(2.0, 1.5, 4e9))
    greedy = _spent_reply(protocol.DeviceCompute(2.0, 1.5, 4e13))
    # Execute
    with server_identity():
        checked = validate_train_reply(honest, MODEL, compute=_BOUNDS)
    # Assert: reported as sent (float32); beyond the model's bound the reply is rejected
    assert checked.compute == protocol.DeviceCompute(2.0, 1.5, 4e9)
    with server_identity(), pytest.raises(UpdateRejected, match="compute: FLOPs"):
        validate_train_reply(greedy, MODEL, compute=_BOUNDS)


def test_a_dp_reply_that_reports_its_compute_is_rejected() -> None:
    # Prepare: dp_mod's metrics, plus a compute the device should not have sent
    reply = _spent_reply(protocol.DeviceCompute(2.0, 1.5, 4e9),
                         {"num-examples": 1, protocol.DP_NOISED: 1})
    # Execute / Assert
    with server_identity(), pytest.raises(UpdateRejected, match="under DP"):
        validate_train_reply(reply, MODEL, dp=True)


def test_compute_bounds_come_from_the_run_and_the_task() -> None:
    # Prepare
    model = [np.zeros((10, 10), np.float32)]
    # Execute
    counted = protocol.compute_bounds(model, round_timeout=100.0, max_examples=1000,
                                      train_flops=5e9)
    unknown = protocol.compute_bounds(model, round_timeout=100.0, max_examples=1000)
    # Assert: seconds from the timeout, FLOPs from the task's count, else the parameters
    assert counted.max_seconds == 2 * 100.0 + 60.0
    assert counted.max_cpu_seconds == counted.max_seconds * protocol.CPU_SECONDS_FACTOR
    assert counted.max_flops == protocol.FLOPS_FACTOR * 5e9
    assert unknown.max_flops == 6.0 * 2**20 * 100 * 1000 * 1000


def test_the_claim_and_compute_cost_about_59_bytes_of_message() -> None:
    # Prepare: the same reply without and with a claim and a time
    from flwr.app import ConfigRecord

    plain = _claim_reply(None)
    claimed = _claim_reply({protocol.DOWNLOAD_CLAIM: protocol.pack_claim(
        (0, 7), "a" * 32, protocol.DeviceCompute(1.5, 1.5, 1e9))})
    old = _claim_reply({"download-held": "0.7", "download-digest": "a" * 32,
                        "compute-seconds": 1.5})
    assert isinstance(old.content[protocol.DOWNLOAD], ConfigRecord)
    # Execute
    added = protocol.message_bytes(claimed) - protocol.message_bytes(plain)
    # Assert: about 59 bytes with the compute (protobuf length prefixes may add one),
    # against about 124 for the three named values it replaces without the compute
    assert added <= 60
    assert protocol.message_bytes(old) - protocol.message_bytes(claimed) >= 60


@settings(max_examples=300, deadline=None)
@given(raw=st.one_of(st.binary(max_size=40),
                     *(st.binary(min_size=n, max_size=n) for n in (12, 24, 36)),
                     st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
                               st.binary(min_size=16, max_size=20)).map(
                         lambda t: struct.pack(">II", t[0], t[1]) + t[2])),
       key=st.sampled_from([protocol.DOWNLOAD_CLAIM, "x"]))
def test_any_claim_bytes_give_a_bounded_claim_or_none(raw: bytes, key: str) -> None:
    # Execute: whatever bytes a device packs under the claim key (or another key)
    with server_identity():
        reply = _claim_reply({key: raw})
        held = protocol.held_version_of_reply(reply)
        try:
            spent = protocol.compute_of_reply(reply, _BOUNDS)
        except protocol.UpdateRejected:
            spent = None
    # Assert: never another exception; what is read is within the documented bounds
    if held is not None:
        assert 0 <= held.anchor <= held.server_round <= 999_999_999
        assert len(held.digest) == 32 and int(held.digest, 16) >= 0
    if spent is not None:
        assert 0.0 <= spent.seconds <= 300.0 and 0.0 <= spent.cpu_seconds <= 600.0
        assert spent.flops is None or 0.0 <= spent.flops <= 1e12


@pytest.mark.parametrize("text", [b"\xc0" * 64, b"{'descr': '<f4',\x00" + b" " * 40, b" {}"])
def test_an_npy_header_of_binary_text_is_rejected_before_numpy_parses_it(text: bytes) -> None:
    # Prepare: a header numpy would re-tokenize as Python 2 text (its slow path)
    data = b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + b"\x00" * 48
    # Execute / Assert
    _rejects(_reply(_plain(data)), "array 'w'", "malformed npy header", "printable-ASCII")


def test_npy_headers_numpy_writes_fit_the_header_bound() -> None:
    # Up to 64 dimensions, numpy's own headers stay under MAX_NPY_HEADER
    for ndim in (1, 4, 16, 64):
        blob = _npy(np.zeros((1,) * ndim, np.float32))
        assert int.from_bytes(blob[8:10], "little") <= protocol.MAX_NPY_HEADER


# --- bytes as Flower serializes them, without trusting the reply (issue 20) ------------

def _proto_size(msg: Message) -> int:
    """What ``message_bytes`` must equal: Flower's protobuf of the message, pushed id."""
    from flwr.common.serde import message_to_proto

    proto = message_to_proto(msg)
    if not proto.metadata.message_id:
        proto.metadata.message_id = "0" * protocol.MESSAGE_ID_CHARS
    return int(proto.ByteSize())


def _instruction(message_type: str = "train") -> Message:
    ins = Message(RecordDict({"config": protocol.TrainInstruction(3, 0).to_record()}),
                  dst_node_id=9, message_type=message_type)
    ins.metadata.__dict__["_message_id"] = "a" * protocol.MESSAGE_ID_CHARS
    return ins


def _real_messages() -> list[Message]:
    """Replies of every kind a run sees (and the server's own train message)."""
    from flwr.app import ConfigRecord, Error

    from flowerpress.secagg import messages as sm

    rng = np.random.default_rng(0)
    delta = [(rng.standard_normal(w.shape) * 0.01).astype(np.float32) for w in MODEL]
    out: list[Message] = []
    ins, ev, query = _instruction(), _instruction("evaluate"), _instruction("query")
    out.append(protocol.train_reply(ins, [w + d for w, d in zip(MODEL, delta, strict=True)],
                                    num_examples=32, metrics={"train-loss": 0.25,
                                                              "local-steps": 4.0}))
    for spec in ["none", "q:8", "topk:0.5+q:4+zstd", "sign+ef"]:
        blob, _ = parse(spec).encode(delta, None, rng=rng)
        reply = Message(RecordDict({"arrays": payload_record(blob),
                                    "metrics": MetricRecord({"num-examples": 1, "dp-noised": 1}),
                                    "download": ConfigRecord({"h": b"\x01" * 28}),
                                    "ef21": ConfigRecord({"ef21-base": 2})}), reply_to=ins)
        out.append(reply)
    out.append(protocol.eval_reply(ev, num_examples=50, loss=0.7, accuracy=0.81,
                                   metrics={"f1": 0.5}))
    out.append(protocol.query_reply(query, partition_id=3, num_partitions=10))
    out.append(Message(Error(code=3, reason="ClientApp raised: é"), reply_to=ins))
    out.append(Message(Error(code=0), reply_to=ins))
    for values in ({sm.C_PK: b"c" * 32, sm.S_PK: b"s" * 32, sm.B_COMMIT: b"b" * 32},
                   {sm.DST: sm.pack_ids([2**64 - 1, 5]), sm.CIPHERTEXTS: [b"x" * 90, b""]},
                   {sm.MASKED: b"\x00" * 1000, sm.COMPLAINTS: b""},
                   {sm.B_OWNERS: sm.pack_ids([1]), sm.B_SHARES: [b"y" * 40],
                    sm.SK_OWNERS: b"", sm.SK_SHARES: []}):
        out.append(Message(RecordDict({sm.RECORD: ConfigRecord(values)}), reply_to=ins))
    out.append(Message(RecordDict({"arrays": ArrayRecord(MODEL),
                                   "config": protocol.TrainInstruction(
                                       2, 7, "q:8", 10, {"dp-clip": 0.5, "x": [1.5, -0.0],
                                                         "i": [0, -3, 2**63 - 1],
                                                         "u": 2**64 - 1}).to_record()}),
                       dst_node_id=4, message_type="train"))
    out.append(Message(RecordDict(), reply_to=ins))
    return out


def test_message_bytes_is_flowers_serialized_size_for_every_kind_of_message() -> None:
    from flowerpress.testing import through_superlink

    with server_identity():
        messages = _real_messages()
        arrived = [through_superlink(m) for m in messages if m.metadata.reply_to_message_id]
    for msg in [*messages, *arrived]:
        assert protocol.message_bytes(msg) == _proto_size(msg)


_METRIC_VALUES = st.one_of(
    st.floats(allow_nan=True), st.integers(-(2**63), 2**64 - 1),
    st.lists(st.floats(allow_nan=True), max_size=5),
    st.lists(st.integers(-(2**63), 2**63 - 1), max_size=5),
    st.lists(st.integers(0, 2**64 - 1), max_size=5))
_CONFIG_VALUES = st.one_of(
    _METRIC_VALUES, st.booleans(), st.text(max_size=20), st.binary(max_size=40),
    st.lists(st.booleans(), max_size=5), st.lists(st.text(max_size=5), max_size=5),
    st.lists(st.binary(max_size=5), max_size=5))


@settings(max_examples=150, deadline=None)
@given(metrics=st.dictionaries(st.text(max_size=12), _METRIC_VALUES, max_size=6),
       config=st.dictionaries(st.text(max_size=12), _CONFIG_VALUES, max_size=6),
       shape=st.lists(st.integers(-(2**31), 2**31 - 1), max_size=5),
       data=st.binary(max_size=64), names=st.text(max_size=8))
def test_message_bytes_equals_the_protobuf_size_of_any_carried_record(
        metrics: dict[str, Any], config: dict[str, Any], shape: list[int], data: bytes,
        names: str) -> None:
    # Prepare: records Flower's wire types carry, and an Array whose fields JSON carried
    from flwr.app import ConfigRecord

    array = Array(dtype=names, shape=tuple(shape), stype=names, data=data)
    with server_identity():
        msg = Message(RecordDict({"m" + names: MetricRecord(metrics),
                                  "c": ConfigRecord(config),
                                  names: ArrayRecord({names: array})}), reply_to=_instruction())
    # Execute / Assert
    assert protocol.message_bytes(msg) == _proto_size(msg)


def _hostile_shape_reply(shape: tuple[Any, ...]) -> Message:
    """A plain train reply whose first Array declares ``shape``, as Flower 1.41 delivers it."""
    from flowerpress.testing import through_superlink

    record = ArrayRecord(MODEL)
    next(iter(record.values())).__dict__["shape"] = shape
    with server_identity():
        return through_superlink(Message(RecordDict({
            "arrays": record, "metrics": MetricRecord(dict(OK_METRICS))}),
            reply_to=_instruction()))


@pytest.mark.parametrize("shape", [(2**31, 3), (4, 2**40), (-(2**31) - 1,), (2**64,)])
def test_a_shape_dimension_outside_int32_is_an_update_rejected_not_a_value_error(
        shape: tuple[int, ...]) -> None:
    # Prepare: Flower's JSON metadata carries the dimension intact
    from flwr.common.serde import message_to_proto

    reply = _hostile_shape_reply(shape)
    assert next(iter(reply.content["arrays"].values())).shape == shape
    with pytest.raises(ValueError, match="out of range"):
        message_to_proto(reply)
    # Execute / Assert: one line each, from counting and from validation
    with pytest.raises(UpdateRejected, match="int32") as info:
        protocol.message_bytes(reply)
    assert "\n" not in str(info.value)
    _rejects(reply, "declares shape")


def test_counting_a_large_reply_copies_none_of_its_data() -> None:
    # Prepare: a 40 MB plain reply
    big = Array(dtype="float32", shape=(10_000_000,), stype="numpy.ndarray",
                data=b"\x00" * 40_000_000)
    with server_identity():
        reply = Message(RecordDict({"arrays": ArrayRecord({"w": big}),
                                    "metrics": MetricRecord({"num-examples": 1})}),
                        reply_to=_instruction())
    # Execute
    tracemalloc.start()
    size = protocol.message_bytes(reply)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # Assert
    assert size == _proto_size(reply)
    assert peak < 64 * 1024


@pytest.mark.parametrize("build", [
    lambda: {"metrics": MetricRecord({f"m{i}": 1.0 for i in range(5000)})},
    lambda: {"metrics": MetricRecord({"l": [1.0] * 5000})},
    lambda: {"arrays": ArrayRecord({f"a{i}": Array(np.zeros(1, np.float32))
                                    for i in range(5000)})},
    lambda: {f"r{i}": MetricRecord({"a": 1}) for i in range(100)},
])
def test_counting_refuses_more_than_its_limits_before_walking(
        build: Callable[[], dict[str, Any]]) -> None:
    with server_identity():
        reply = Message(RecordDict(build()), reply_to=_instruction())
    with pytest.raises(UpdateRejected, match=r"at most|more than") as info:
        protocol.message_bytes(reply)
    assert "\n" not in str(info.value)
    assert protocol.message_bytes(reply, limits=None) == _proto_size(reply)


@pytest.mark.parametrize(("field", "value"), [("dtype", "\ud800"), ("stype", "a\udfff")])
def test_text_flower_cannot_encode_is_an_update_rejected(field: str, value: str) -> None:
    from flowerpress.testing import through_superlink

    record = ArrayRecord(MODEL)
    next(iter(record.values())).__dict__[field] = value
    with server_identity():
        reply = through_superlink(Message(RecordDict({"arrays": record}),
                                          reply_to=_instruction()))
    with pytest.raises(UpdateRejected, match="UTF-8"):
        protocol.message_bytes(reply)


@pytest.mark.parametrize("content", [
    lambda: {f"r{i}": MetricRecord({"a": 1}) for i in range(17)},
    lambda: {"metrics": MetricRecord(dict(OK_METRICS)), "x": MetricRecord(
        {f"m{i}": 1.0 for i in range(65)})},
    lambda: {"metrics": MetricRecord(dict(OK_METRICS)), "x": MetricRecord({"l": [1.0] * 65})},
])
def test_validation_bounds_a_replys_structure_before_reading_it(
        content: Callable[[], dict[str, Any]]) -> None:
    with server_identity():
        reply = Message(RecordDict(content()), reply_to=_instruction())
    for validate in (lambda: validate_train_reply(reply, MODEL),
                     lambda: protocol.validate_eval_reply(reply)):
        with pytest.raises(UpdateRejected, match="at most"):
            validate()


@pytest.mark.parametrize("field", ["dtype", "stype", "shape"])
def test_array_fields_the_simulation_engine_carries_as_any_object_are_rejected(
        field: str) -> None:
    # Prepare: Ray pickles a reply, so an Array field can be any object (a numpy array,
    # whose == is elementwise and whose truth value raises)
    from flowerpress.testing import through_simulation

    record = ArrayRecord(MODEL)
    next(iter(record.values())).__dict__[field] = np.zeros(2)
    with server_identity():
        reply = through_simulation(Message(RecordDict({
            "arrays": record, "metrics": MetricRecord(dict(OK_METRICS))}),
            reply_to=_instruction()))
    # Execute / Assert
    _rejects(reply, field if field != "shape" else "declares shape")
    with pytest.raises(UpdateRejected, match=field):
        protocol.message_bytes(reply)


def test_a_secagg_share_list_of_another_type_is_a_violation() -> None:
    from flwr.app import ConfigRecord

    from flowerpress.secagg import messages as sm
    from flowerpress.secagg.core import SecAggViolation

    record = ConfigRecord({})
    record.__dict__["_data"][sm.B_SHARES] = np.float64(1.0)  # kept as is by pickling
    with server_identity():
        reply = Message(RecordDict({sm.RECORD: record}), reply_to=_instruction())
    with pytest.raises(SecAggViolation, match="b-shares"):
        sm.parse_unmask_reply(reply, 7)


def test_reply_limits_count_any_valid_reply_of_a_model_with_many_tensors() -> None:
    # Prepare: a model of 2,000 tensors, more than the default limits walk
    model = [np.zeros((2, 2), np.float32) for _ in range(2000)]
    with server_identity():
        reply = Message(RecordDict({"arrays": ArrayRecord(model),
                                    "metrics": MetricRecord({f"m{i}": 1.0 for i in range(63)}
                                                            | {"num-examples": 1})}),
                        reply_to=_instruction())
    validate_train_reply(reply, model)
    # Execute / Assert
    with pytest.raises(UpdateRejected):
        protocol.message_bytes(reply)
    assert protocol.message_bytes(reply, limits=protocol.reply_limits(model)) == \
        _proto_size(reply)


def test_a_reply_holds_at_most_max_reply_values_besides_its_arrays() -> None:
    from flwr.app import ConfigRecord

    records = {f"c{i}": ConfigRecord({"l": [1] * 64, "m": [1] * 64}) for i in range(15)}
    with server_identity():
        reply = Message(RecordDict({"metrics": MetricRecord(dict(OK_METRICS)), **records}),
                        reply_to=_instruction())
    with pytest.raises(UpdateRejected, match=f"more than {protocol.MAX_REPLY_VALUES} values"):
        validate_train_reply(reply, MODEL)


def test_secagg_id_lists_are_refused_beyond_the_cohort_before_they_are_unpacked() -> None:
    from flwr.app import ConfigRecord

    from flowerpress.secagg import messages as sm
    from flowerpress.secagg.core import SecAggViolation

    ids = sm.pack_ids(range(1, 12_501))  # 100 KB: 12,500 Python ints if unpacked
    with server_identity():
        mask = Message(RecordDict({sm.RECORD: ConfigRecord({sm.MASKED: b"\x00" * 8,
                                                            sm.COMPLAINTS: ids})}),
                       reply_to=_instruction())
        unmask = Message(RecordDict({sm.RECORD: ConfigRecord({sm.B_OWNERS: ids})}),
                         reply_to=_instruction())
    with pytest.raises(SecAggViolation, match="at most 10"):
        sm.parse_mask_reply(mask, 7, packed_bytes=8, max_peers=10)
    with pytest.raises(SecAggViolation, match="at most 10"):
        sm.parse_unmask_reply(unmask, 7, max_peers=10)


@pytest.mark.parametrize(("value", "parsed"), [
    ("0.2.0", "0.2.0"), ("1.0.0rc1+local.7", "1.0.0rc1+local.7"), ("9" * 40, "9" * 40),
    ("9" * 41, None), ("0.2.0\n", None), ("0.2.0 ", None), ("", None), (2, None),
    (b"0.2.0", None), (None, None),
])
def test_a_senders_version_string_is_kept_only_if_short_and_plain(value: object,
                                                                   parsed: str | None) -> None:
    assert protocol.parse_flowerpress_version(value) == parsed


def test_version_of_reply_reads_the_hello_answer_strictly() -> None:
    # Prepare
    from flwr.app import MessageType

    from flowerpress import __version__

    with server_identity():
        query = Message(protocol.hello_query(), dst_node_id=3,
                        message_type=MessageType.QUERY)
        honest = protocol.query_reply(query, partition_id=0, num_partitions=2)
        odd = protocol.query_reply(query, partition_id=0, num_partitions=2)
    info = odd.content.config_records[protocol.INFO]
    info[protocol.FORMAT_KEY] = True
    info[protocol.VERSION_KEY] = "x" * 500
    # Execute / Assert
    assert protocol.version_of_reply(honest) == (protocol.MESSAGE_FORMAT, __version__)
    assert protocol.version_of_reply(odd) == (None, None)
