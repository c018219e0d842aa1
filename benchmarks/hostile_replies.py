"""Hostile replies through the server's real reply path: escapes, CPU and memory per reply.

Every reply goes where a device's train reply goes in
:func:`flowerpress.server.loop.run_round`: :func:`flowerpress.protocol.validate_train_reply`
(the one message contract), the ``max-update-norm`` bound
(:func:`flowerpress.server.bounds.bound_update_norm`), ``strategy.add`` and, once
per simulated round, ``strategy.result`` checked by
:func:`flowerpress.server.loop.check_strategy_result`. Replies are Flower
``Message`` objects built the way a device (or an attacker with a hand-made
Flower client) could build them:

* ``payload``   honest compressed payloads of several codecs, mutated (bit flips,
                truncation, splices, insertions, extreme integers)
* ``npy``       plain ArrayRecords whose npy blobs are mutated or crafted (header
                versions and lengths, dtypes incl. zero-itemsize structured and
                subarray dtypes, object, big-endian, shapes that overflow)
* ``fields``    Array fields of the wrong value or type (declared shape, dtype,
                stype, data, tensor count, the record's kind)
* ``weight``    ``num-examples`` that is huge, zero, negative, fractional, NaN, a bool
* ``metrics``   NaN, infinite, out-of-range, list-valued, too many, long names
* ``values``    well-formed arrays holding NaN, Inf, float32-max, float64 beyond
                float32, or finite-but-huge updates (accepted, then clipped)
* ``honest``    honest replies, plain and compressed (must be accepted)

An *escape* is any exception other than ``UpdateRejected`` out of the reply
path, any exception from the bound or the strategy, a strategy result the loop
refuses, or an honest reply rejected. CPU is ``time.process_time`` per reply,
peak memory is ``tracemalloc``'s peak per reply (Python and numpy allocations;
the zstd library's own buffers are not traced) as a multiple of the model's
float32 size. The five replies with the highest peak are printed with their
class, outcome, what was done to them (codec and edits for a mutated payload)
and, for payloads, the header and stages as far as they parse; ``--dump DIR``
writes those payloads to files, to replay them through ``decode``.

Run::

    python benchmarks/hostile_replies.py                    # 3,000 replies, ~1 minute
    python benchmarks/hostile_replies.py --replies 100000   # the issue's count
    python benchmarks/hostile_replies.py --model large --classes payload --dump /tmp/top
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import os
import struct
import sys
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zstandard
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from flowerpress import protocol
from flowerpress.compression import parse
from flowerpress.compression.envelope import (
    PAYLOAD_KEY,
    PAYLOAD_STYPE,
    is_payload,
    payload_bytes,
    payload_record,
)
from flowerpress.compression.wire import Reader
from flowerpress.secagg import encoding
from flowerpress.secagg import messages as sm
from flowerpress.secagg.core import SecAggViolation
from flowerpress.server.bounds import bound_update_norm
from flowerpress.server.loop import StrategyFailedError, check_strategy_result
from flowerpress.strategies import build_strategy
from flowerpress.strategies.base import ClientUpdate
from flowerpress.testing import NotCarried, server_identity, through_simulation, through_superlink

Weights = list[np.ndarray]
Maker = Callable[[np.random.Generator], Message]

#: The node id of the hostile device (the server's own node id is 0).
NODE = 7
#: Devices in a secure-aggregation cohort (share-keys replies name at most this many peers).
COHORT = 10
#: Bits per word of the secure-aggregation mask stage.
SECAGG_BITS = 16
CODECS = ["none", "fp16", "q:8", "q:2", "sign", "topk:0.1+q:8+zstd", "randk:0.5",
          "topk:1.0", "lowrank:4+q:8", "zstd", "sign+ef+zstd:1"]
DESCRS = ["'<f4'", "'<f8'", "'<f2'", "'>f4'", "'<i4'", "'|O'", "'<c8'", "'|V0'", "'|S0'",
          "'<U0'", "'<M8[s]'", "[('a', '|V0')]", "[('a', '<f4', (0,))]",
          "('<f4', (1000000, 1000000))", "[('a', '<f4'), ('b', '<f4')]", "'|b1'", "'<u8'",
          "'f4'", "'float32'", "[]", "'<f4' if True else 1", "{'a': 1}", "'\\x00'"]
SHAPES = ["(1000000, 1000000)", "(4294967296, 4294967296)", "(-1,)", "(0,)", "()",
          "(99999999999999999999,)", "(1.5,)", "('a',)", "(True,)", "((1,),)", "[64, 64]",
          "(2**62,)", "(64, 64, 1)", "(4096,)"]
NUM_EXAMPLES: list[Any] = [0, -1, 10**7, 10**13, 10**400, 2.5, float("nan"), float("inf"),
                           -float("inf"), True, "10", [10], 1e308, -0.0]


def _npy(arr: np.ndarray, version: tuple[int, int] | None = None) -> bytes:
    buf = io.BytesIO()
    if version is None:
        np.save(buf, arr, allow_pickle=False)
    else:
        from numpy.lib import format as npy

        npy.write_array(buf, arr, version=version, allow_pickle=False)
    return buf.getvalue()


def _header(descr: str, shape: str, fortran: str = "False", version: int = 1,
            pad: int = 0) -> bytes:
    text = f"{{'descr': {descr}, 'fortran_order': {fortran}, 'shape': {shape}, }}"
    body = (text + " " * pad).encode("latin1", "replace")
    body = body.ljust(((len(body) + 11) // 64 + 1) * 64 - 10) + b"\n"
    if version == 1:
        return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(body)) + body
    return b"\x93NUMPY\x02\x00" + struct.pack("<I", len(body)) + body


#: The instruction each kind of reply answers (a real reply carries its metadata).
_INSTRUCTIONS: dict[str, Message] = {}


def _instruction(message_type: str) -> Message:
    """The server's message a reply of ``message_type`` answers (built once, pushed id)."""
    if message_type not in _INSTRUCTIONS:
        ins = Message(RecordDict(), dst_node_id=NODE, message_type=message_type)
        ins.metadata.__dict__["_message_id"] = f"{len(_INSTRUCTIONS):064x}"
        _INSTRUCTIONS[message_type] = ins
    return _INSTRUCTIONS[message_type]


def _reply(content: RecordDict, message_type: str = "train") -> Message:
    """A device's reply carrying ``content`` (metadata as a SuperNode sets it)."""
    return Message(content, reply_to=_instruction(message_type))


def _raw_record(kind: type, values: dict[Any, Any]) -> Any:
    """A Metric/ConfigRecord holding ``values`` unchecked (any value a sender could set)."""
    record = kind({})
    record.__dict__["_data"].update(values)
    return record


def _message(arrays: Any, metrics: Any) -> Message:
    """A train reply as it reaches the server (record values set as the wire could)."""
    content = RecordDict()
    if arrays is not None:
        content["arrays"] = arrays
    if metrics is not None:
        if isinstance(metrics, dict):
            record = MetricRecord({"num-examples": 1})
            record.__dict__["_data"].clear()
            record.__dict__["_data"].update(metrics)  # no type checks: any value
            content["metrics"] = record
        else:
            content["metrics"] = metrics
    return _reply(content)


def _mutate(rng: np.random.Generator, blob: bytes, *, region: int | None = None,
            log: list[str] | None = None) -> bytes:
    """One to four random edits of ``blob`` (the first ``region`` bytes if given).

    Each edit is described in ``log`` if given (no extra random draws, so a run
    with and without the log sends the same replies).
    """
    data = bytearray(blob)
    note = log if log is not None else []
    for _ in range(int(rng.integers(1, 5))):
        span = min(len(data), region) if region else len(data)
        kind = rng.integers(0, 7)
        if not data or span == 0:
            data = bytearray(rng.bytes(int(rng.integers(0, 64))))
            note.append(f"replace all by {len(data)} random bytes")
        elif kind == 0:  # bit flip
            i = int(rng.integers(0, span))
            bit = int(rng.integers(0, 8))
            data[i] ^= 1 << bit
            note.append(f"flip bit {bit} of byte {i}")
        elif kind == 1:  # random byte
            i = int(rng.integers(0, span))
            data[i] = int(rng.integers(0, 256))
            note.append(f"byte {i} := {data[i]:#04x}")
        elif kind == 2:  # truncate
            data = data[:int(rng.integers(0, len(data)))]
            note.append(f"truncate to {len(data)}")
        elif kind == 3:  # insert
            i = int(rng.integers(0, span + 1))
            extra = rng.bytes(int(rng.integers(1, 16)))
            data[i:i] = extra
            note.append(f"insert {len(extra)} random bytes at {i}")
        elif kind == 4:  # extreme integer
            i = int(rng.integers(0, max(span - 4, 1)))
            word = [b"\xff\xff\xff\xff", b"\xff\xff\xff\x7f", b"\x00\x00\x00\x80",
                    b"\x00\x00\x00\x00", b"\x01\x00\x01\x00"][int(rng.integers(0, 5))]
            data[i:i + 4] = word
            note.append(f"bytes {i}..{i + 3} := {word.hex()}")
        elif kind == 5:  # splice a chunk from elsewhere
            i, j = sorted(int(x) for x in rng.integers(0, len(data), size=2))
            k = int(rng.integers(0, span))
            piece = data[i:j][:256]
            data[k:k] = piece
            note.append(f"splice {len(piece)} bytes from {i} at {k}")
        else:  # drop a chunk
            i = int(rng.integers(0, span))
            n = int(rng.integers(1, 32))
            del data[i:i + n]
            note.append(f"drop up to {n} bytes at {i}")
    return bytes(data)


@dataclass
class Workload:
    """The model, this round's global weights and the reply makers."""

    received: Weights
    max_weight: float = protocol.DEFAULT_MAX_WEIGHT
    payloads: list[bytes] = field(default_factory=list)
    #: What the last maker did (codec and edits), for the report of the costliest replies.
    note: str = ""
    #: Whether the last query/evaluate/secagg reply was left honest (it must be accepted).
    honest_reply: bool = False
    #: The secure-aggregation stage of the last secagg reply.
    stage: str = ""
    #: Bytes of a mask-stage reply's packed vector (the model's length at SECAGG_BITS).
    packed_bytes: int = 0

    def __post_init__(self) -> None:
        self.packed_bytes = (self.length * SECAGG_BITS + 7) // 8
        rng = np.random.default_rng(1)
        delta = self.honest_delta(rng)
        for spec in CODECS:
            blob, _ = parse(spec).encode(delta, None, rng=rng)
            self.payloads.append(blob)

    @property
    def limits(self) -> protocol.WireLimits:
        """How much of a train or evaluate reply the round counts (``reply_limits``)."""
        return protocol.reply_limits(self.received)

    @property
    def length(self) -> int:
        """Elements of the model (the secure-aggregation vector's length)."""
        return sum(int(g.size) for g in self.received)

    def honest_delta(self, rng: np.random.Generator) -> Weights:
        return [(rng.standard_normal(g.shape) * 0.01).astype(np.float32) for g in self.received]

    def honest_local(self, rng: np.random.Generator) -> Weights:
        return [g + d for g, d in zip(self.received, self.honest_delta(rng), strict=True)]

    def good_metrics(self, rng: np.random.Generator) -> dict[str, Any]:
        return {"num-examples": int(rng.integers(1, 500)), "train-loss": float(rng.random()),
                "local-steps": 10.0}

    # --- the classes ------------------------------------------------------------------

    def honest(self, rng: np.random.Generator) -> Message:
        if rng.random() < 0.5:
            return _message(ArrayRecord(self.honest_local(rng)), self.good_metrics(rng))
        spec = CODECS[int(rng.integers(0, len(CODECS)))]
        blob, _ = parse(spec).encode(self.honest_delta(rng), None, rng=rng)
        return _message(payload_record(blob), self.good_metrics(rng))

    def payload(self, rng: np.random.Generator) -> Message:
        which = int(rng.integers(0, len(self.payloads)))
        region = 64 if rng.random() < 0.5 else None  # headers are where sizes live
        log: list[str] = []
        blob = _mutate(rng, self.payloads[which], region=region, log=log)
        self.note = (f"{CODECS[which]} payload, edits "
                     f"{'in the first 64 bytes' if region else 'anywhere'}: {'; '.join(log)}")
        return _message(payload_record(blob), self.good_metrics(rng))

    def npy(self, rng: np.random.Generator) -> Message:
        local = self.honest_local(rng)
        blobs = [_npy(a) for a in local]
        i = int(rng.integers(0, len(blobs)))
        kind = rng.integers(0, 4)
        log: list[str] = []
        if kind == 0:  # mutate the header
            blobs[i] = _mutate(rng, blobs[i], region=128, log=log)
        elif kind == 1:  # mutate anywhere
            blobs[i] = _mutate(rng, blobs[i], log=log)
        elif kind == 2:  # a crafted header, with or without data after it
            descr = DESCRS[int(rng.integers(0, len(DESCRS)))]
            shape = (str(local[i].shape) if rng.random() < 0.3
                     else SHAPES[int(rng.integers(0, len(SHAPES)))])
            head = _header(descr, shape, fortran=["False", "True", "1", "None"][
                int(rng.integers(0, 4))], version=int(rng.integers(1, 3)),
                pad=int(rng.choice([0, 0, 0, 20_000])))
            tail = blobs[i][128:] if rng.random() < 0.5 else b""
            blobs[i] = head + tail
            log.append(f"header {head[10:].strip()[:120]!r}, {len(tail)} data bytes")
        else:  # other npy versions and orders of honest data
            arr = local[i]
            if rng.random() < 0.5:
                arr = np.asfortranarray(arr.astype([np.float16, np.float64, np.float32][
                    int(rng.integers(0, 3))]))
            blobs[i] = _npy(arr, version=[(1, 0), (2, 0), (3, 0)][int(rng.integers(0, 3))])
            log.append(f"honest data as {arr.dtype}, npy version {blobs[i][6]}")
        self.note = f"array {i}: {'; '.join(log)}"
        record = ArrayRecord(local)
        for (name, arr), blob in zip(list(record.items()), blobs, strict=True):
            arr.__dict__["data"] = blob
            if blob[:6] == b"\x93NUMPY" and b"'<f8'" in blob[:128]:
                arr.__dict__["dtype"] = "float64"
            elif blob[:6] == b"\x93NUMPY" and b"'<f2'" in blob[:128]:
                arr.__dict__["dtype"] = "float16"
            del name
        return _message(record, self.good_metrics(rng))

    def fields(self, rng: np.random.Generator) -> Message:
        local = self.honest_local(rng)
        record = ArrayRecord(local)
        arrays = list(record.values())
        arr = arrays[int(rng.integers(0, len(arrays)))]
        kind = int(rng.integers(0, 9))
        values: list[Any]
        if kind == 0:
            values = [None, (), (2**63, 2**63), (-1,), [1.5], ("a",), (10**30,), [[1]],
                      tuple(range(100)), (True, 64)]
            arr.__dict__["shape"] = values[int(rng.integers(0, len(values)))]
        elif kind == 1:
            values = ["float64", "int8", "", "object", None, 7, "bytes", "float16"]
            arr.__dict__["dtype"] = values[int(rng.integers(0, len(values)))]
        elif kind == 2:
            values = ["", "torch.Tensor", None, 3, PAYLOAD_STYPE, "numpy.ndarray "]
            arr.__dict__["stype"] = values[int(rng.integers(0, len(values)))]
        elif kind == 3:
            values = [None, "text", bytearray(8), memoryview(b"abc"), 12, [1, 2]]
            arr.__dict__["data"] = values[int(rng.integers(0, len(values)))]
        elif kind == 4:  # too many or too few tensors
            extra = [np.zeros(int(rng.integers(1, 10**5)), np.float32)
                     for _ in range(int(rng.integers(1, 4)))]
            record = ArrayRecord(local + extra if rng.random() < 0.5 else local[:-1])
        elif kind == 5:  # the envelope's stype on a plain array, or a payload among others
            arr.__dict__["stype"] = PAYLOAD_STYPE
            if rng.random() < 0.5:
                record = ArrayRecord({PAYLOAD_KEY: arr})
        elif kind == 6:  # no arrays, or another record kind under the key
            return _message(None if rng.random() < 0.5 else ConfigRecord({"a": 1}),
                            self.good_metrics(rng))
        elif kind == 7:  # no metrics, or another record kind under the key
            return _message(record, None if rng.random() < 0.5 else ConfigRecord({"a": 1}))
        else:  # the arrays in the wrong order
            record = ArrayRecord(local[::-1])
        return _message(record, self.good_metrics(rng))

    def weight(self, rng: np.random.Generator) -> Message:
        metrics = self.good_metrics(rng)
        if rng.random() < 0.9:
            metrics["num-examples"] = NUM_EXAMPLES[int(rng.integers(0, len(NUM_EXAMPLES)))]
        else:
            del metrics["num-examples"]
        return _message(ArrayRecord(self.honest_local(rng)), metrics)

    def metrics(self, rng: np.random.Generator) -> Message:
        metrics = self.good_metrics(rng)
        bad: list[Any] = [float("nan"), float("inf"), -float("inf"), -1e9, 1e9, 10**400,
                          [1.0, 2.0], "x", None, -1.0, 1e300]
        kind = int(rng.integers(0, 4))
        if kind == 0:
            key = ["train-loss", "local-steps", "dp-clip-indicator", "eval-acc", "custom"][
                int(rng.integers(0, 5))]
            metrics[key] = bad[int(rng.integers(0, len(bad)))]
        elif kind == 1:
            metrics.update({f"m{i}": 1.0 for i in range(int(rng.integers(65, 5000)))})
        elif kind == 2:
            metrics["x" * int(rng.integers(257, 10**5))] = 1.0
        else:
            metrics[7] = 1.0  # type: ignore[index]
        return _message(ArrayRecord(self.honest_local(rng)), metrics)

    def values(self, rng: np.random.Generator) -> Message:
        local = self.honest_local(rng)
        i = int(rng.integers(0, len(local)))
        f32max = np.finfo(np.float32).max
        kind = int(rng.integers(0, 6))
        if kind == 0:
            local[i].reshape(-1)[int(rng.integers(0, local[i].size))] = np.nan
        elif kind == 1:
            local[i].reshape(-1)[int(rng.integers(0, local[i].size))] = -np.inf
        elif kind == 2:  # float32-max weights: the delta overflows against a negative global
            local = [np.where(g < 0, f32max, -f32max).astype(np.float32) for g in local]
        elif kind == 3:  # float64 beyond float32
            local[i] = np.full(local[i].shape, 1e300)
        elif kind == 4:  # finite but huge: accepted, clipped by the norm bound
            local = [np.full_like(g, float(rng.choice([1e30, -1e30, 3e38]))) for g in local]
        else:  # a compressed delta that leaves the float32 range against the global
            blob, _ = parse("none").encode([np.full_like(g, f32max) for g in local], None)
            return _message(payload_record(blob), self.good_metrics(rng))
        return _message(ArrayRecord(local), self.good_metrics(rng))

    # --- structure and the other kinds of reply ------------------------------------------

    def wire(self, rng: np.random.Generator) -> Message:
        """A train reply whose structure is hostile: Array fields as any JSON value (the
        deployment path moves them as JSON), extra or foreign records, an error reply."""
        reply = self.honest(rng)
        content = reply.content
        kind = int(rng.integers(0, 4))
        if kind == 0:  # one Array field of a plain or payload record, as JSON carries it
            record = content["arrays"]
            arr = list(record.values())[int(rng.integers(0, len(record)))]
            name = ["shape", "shape", "shape", "dtype", "stype"][int(rng.integers(0, 5))]
            value = _pick(rng, JSON_SHAPES if name == "shape" else JSON_TEXT)
            arr.__dict__[name] = value
            self.note = f"array {name} := {_short_repr(value)}"
        elif kind == 1:  # extra records, or a hostile record added
            _structure_inplace(rng, content, self)
        elif kind == 2:  # an error reply, as a device may send one
            reason = "x" * int(rng.choice([0, 10, 10**4, 10**6]))
            self.note = f"error reply, reason of {len(reason)} characters"
            return Message(Error(code=int(rng.integers(-2**63, 2**63 - 1)), reason=reason),
                           reply_to=_instruction("train"))
        else:  # the train reply's own config records (download claim, EF21 base) fuzzed
            content["download"] = ConfigRecord({"h": b"\x00" * 28})
            content["ef21"] = ConfigRecord({"ef21-base": 1})
            _fuzz_values_inplace(rng, content[["download", "ef21"][int(rng.integers(0, 2))]],
                                 self)
        return reply

    def query(self, rng: np.random.Generator) -> Message:
        """The start-up hello reply: partition id, number of partitions, anchor digest."""
        info = ConfigRecord({protocol.PARTITION_ID: int(rng.integers(0, COHORT)),
                             protocol.NUM_PARTITIONS: COHORT,
                             protocol.DOWNLOAD_ANCHOR: rng.bytes(16).hex(),
                             protocol.FORMAT_KEY: protocol.MESSAGE_FORMAT,
                             protocol.VERSION_KEY: "0.2.0"})
        return self._fuzzed(rng, RecordDict({protocol.INFO: info}), "query")

    def evaluate(self, rng: np.random.Generator) -> Message:
        values = {protocol.NUM_EXAMPLES: int(rng.integers(1, 500)),
                  protocol.EVAL_LOSS: float(rng.random()), protocol.EVAL_ACC: float(rng.random())}
        return self._fuzzed(rng, RecordDict({protocol.METRICS: MetricRecord(values)}),
                            "evaluate")

    def secagg(self, rng: np.random.Generator) -> Message:
        """A reply to one of the four secure-aggregation stages (``secagg-stage`` in note)."""
        stage = sm.STAGES[int(rng.integers(0, len(sm.STAGES)))]
        self.stage = stage
        peers = sorted(int(p) for p in rng.choice(np.arange(1, 1000), size=COHORT - 1,
                                                  replace=False))
        values: dict[str, Any]
        if stage == sm.ADVERTISE:
            values = {sm.C_PK: rng.bytes(32), sm.S_PK: rng.bytes(32), sm.B_COMMIT: rng.bytes(32)}
        elif stage == sm.SHARE_KEYS:
            values = {sm.DST: sm.pack_ids(peers), sm.CIPHERTEXTS: [rng.bytes(120) for _ in peers]}
        elif stage == sm.MASK:
            values = {sm.MASKED: rng.bytes(self.packed_bytes), sm.COMPLAINTS: sm.pack_ids([])}
        else:
            half = len(peers) // 2
            values = {sm.B_OWNERS: sm.pack_ids(peers[:half]),
                      sm.B_SHARES: [rng.bytes(40) for _ in peers[:half]],
                      sm.SK_OWNERS: sm.pack_ids(peers[half:]),
                      sm.SK_SHARES: [rng.bytes(40) for _ in peers[half:]]}
        return self._fuzzed(rng, RecordDict({sm.RECORD: ConfigRecord(values)}), "train")

    def _fuzzed(self, rng: np.random.Generator, content: RecordDict,
                message_type: str) -> Message:
        """The honest reply (a fifth of the time) or one with one to three hostile edits."""
        self.honest_reply = rng.random() < 0.2
        if self.honest_reply:
            self.note = "honest"
            return _reply(content, message_type)
        notes: list[str] = []
        for _ in range(int(rng.integers(1, 4))):
            kind = int(rng.integers(0, 10))
            name = next(iter(content.keys()), None)
            if kind < 6 and name is not None:
                _fuzz_values_inplace(rng, content[name], self)
            elif kind < 8:
                _structure_inplace(rng, content, self)
            elif kind == 8 and name is not None:  # the record under another kind
                other = [MetricRecord, ConfigRecord][int(rng.integers(0, 2))]
                content[name] = other({"a": 1})
                self.note = f"{name} is a {other.__name__}"
            else:
                self.note = f"error reply, code {int(rng.integers(-5, 5))}"
                return Message(Error(code=int(rng.integers(-5, 5)),
                                     reason="é" * int(rng.integers(0, 300))),
                               reply_to=_instruction(message_type))
            notes.append(self.note)
        self.note = "; ".join(notes)
        return _reply(content, message_type)

    def makers(self) -> dict[str, Maker]:
        return {"payload": self.payload, "npy": self.npy, "fields": self.fields,
                "weight": self.weight, "metrics": self.metrics, "values": self.values,
                "honest": self.honest, "wire": self.wire, "query": self.query,
                "evaluate": self.evaluate, "secagg": self.secagg}


#: Shapes as JSON can carry them in an Array object (Flower 1.41 json.loads its metadata).
JSON_SHAPES: list[Any] = [(2**31,), (2**40, 3), (-2**31 - 1,), (2**63,), (2**64,), (10**30,),
                          (-1,), (True, 3), (1.5,), ("a",), [], [[1]], list(range(10**4)),
                          [0] * 70, "abc", {"a": 1}, None, 7, (2**31 - 1, 2**31 - 1)]
#: dtype/stype values (Flower's inflation refuses non-strings; pickle keeps them).
JSON_TEXT: list[Any] = ["", "float64", "fp", "numpy.ndarray", "\ud800", "é" * 10**5,
                        "x" * 10**6, 7, None, [1], {"a": 1}, True, np.zeros(2)]
#: Values a Metric/ConfigRecord entry may be set to (Flower's deflation refuses some).
HOSTILE_VALUES: list[Any] = [2**63 - 1, 2**63, 2**64 - 1, 2**64, -2**63, -2**63 - 1, 10**400, -1,
                             0, True, float("nan"), float("inf"), -0.0, 1e308, "", "\ud800",
                             "é" * 1000, b"", b"\x00" * 31, b"\x00" * 33, b"\xff" * 10**5,
                             [], [b"a"] * 9, [b"a"] * 5000, [1] * 5000, [2**64 - 1, -1],
                             [True, 2], [1.0, 2], [[1]], {"a": 1}, None, np.float64(1.0),
                             np.int64(3), np.zeros(2), np.bool_(True)]


def _pick(rng: np.random.Generator, values: Sequence[Any]) -> Any:
    return values[int(rng.integers(0, len(values)))]


def _short_repr(value: Any) -> str:
    text = repr(value)
    if len(text) <= 60:
        return text
    size = f" of {len(value)}" if hasattr(value, "__len__") else ""
    return f"{text[:40]}... ({type(value).__name__}{size})"


def _fuzz_values_inplace(rng: np.random.Generator, record: Any, work: Workload) -> None:
    """Set, drop or multiply the entries of a Metric/ConfigRecord (unchecked values)."""
    data = record.__dict__.get("_data")
    if data is None or isinstance(record, ArrayRecord):
        return
    kind = int(rng.integers(0, 4))
    keys = list(data)
    if kind < 2 and keys:  # one entry set to a hostile value
        key = _pick(rng, keys)
        data[key] = _pick(rng, HOSTILE_VALUES)
        work.note = f"{key} := {_short_repr(data[key])}"
    elif kind == 2 and keys:  # an entry dropped
        key = _pick(rng, keys)
        del data[key]
        work.note = f"{key} dropped"
    else:  # many entries, or a long or non-text name
        count = int(rng.choice([1, 65, 5000]))
        name = _pick(rng, ["k", "é", "x" * 300, "\ud800"])
        data.update({f"{name}{i}": 1.0 for i in range(count)})
        work.note = f"{count} entries named {name[:8]!r}..."


def _structure_inplace(rng: np.random.Generator, content: RecordDict, work: Workload) -> None:
    """Add records to a reply: many of them, or an ArrayRecord with a hostile Array."""
    kind = int(rng.integers(0, 3))
    if kind == 0:
        count = int(rng.choice([17, 100, 1000]))
        for i in range(count):
            content[f"r{i}"] = ConfigRecord({"a": i})
        work.note = f"{count} extra records"
    elif kind == 1:
        record = ArrayRecord({"p": Array(np.zeros(3, np.float32))})
        record["p"].__dict__["shape"] = _pick(rng, JSON_SHAPES)
        content[_pick(rng, ["arrays", "x", "p", "info"])] = record
        work.note = f"an ArrayRecord with shape {_short_repr(record['p'].shape)}"
    else:
        count = int(rng.choice([2, 100, 600]))
        content["many"] = ArrayRecord({f"a{i}": Array(np.zeros(1, np.float32))
                                       for i in range(count)})
        work.note = f"an ArrayRecord of {count} arrays"


_KINDS = {0: "f32", 1: "f16", 2: "q", 3: "sign"}
_STRUCTS = {0: "dense", 1: "topk", 2: "randk", 3: "lowrank"}


def _describe_values(r: Reader, count: int) -> str:
    kind = r.u8("value kind")
    name = _KINDS.get(kind, f"kind {kind}")
    if kind == 0:
        r.raw(4 * count, "f32")
    elif kind == 1:
        r.raw(2 * count, "f16")
    elif kind == 2:
        bits, block = r.u8("bits"), r.u32("block")
        nblocks = -(-count // block) if block else 0
        lo = np.frombuffer(r.raw(4 * nblocks, "lo"), "<f4")
        hi = np.frombuffer(r.raw(4 * nblocks, "hi"), "<f4")
        r.raw((count * bits + 7) // 8, "codes")
        with np.errstate(all="ignore"):
            span = float((hi.astype(np.float64) - lo.astype(np.float64)).max()) if lo.size else 0
            big = max(float(np.abs(lo).max()), float(np.abs(hi).max())) if lo.size else 0
        name = f"q bits {bits} block {block}, max |lo|,|hi| {big:.3g}, max span {span:.3g}"
    elif kind == 3:
        name = f"sign scale {r.f32('scale'):.3g}"
        r.raw((count + 7) // 8, "bits")
    else:
        raise ValueError("unknown kind")
    return f"{name} x{count}"


def describe_payload(blob: bytes, max_body: int) -> str:
    """The header, stages and sizes of a (possibly mutated) payload, as far as they parse."""
    parts = [f"{len(blob)} bytes"]
    try:
        r = Reader(blob)
        magic, version, flags = bytes(r.raw(3, "magic")), r.u8("version"), r.u8("flags")
        parts.append(f"magic {magic!r} version {version} flags {flags:#04x}")
        body: bytes | memoryview
        if flags & 1:
            body_len = r.u64("body length")
            frame = r.raw(r.remaining, "frame")
            content = zstandard.get_frame_parameters(frame).content_size
            parts.append(f"zstd body {body_len} (frame says {content}, frame {len(frame)} bytes)")
            body = zstandard.ZstdDecompressor().decompress(frame, max_output_size=max_body)
        else:
            body = r.raw(r.remaining, "body")
        r = Reader(body)
        ntensors = r.u32("tensors")
        parts.append(f"{ntensors} tensors")
        for _ in range(min(ntensors, 8)):
            shape = r.u32s(r.u8("ndim"), "shape")
            count = math.prod(shape)
            sid = r.u8("structure")
            dims = str(shape) if len(shape) <= 4 else f"({len(shape)} dims, {count} elements)"
            text = f"{dims} {_STRUCTS.get(sid, f'struct {sid}')}"
            if sid == 0:
                text += " " + _describe_values(r, count)
            elif sid == 1:
                k, b, unary = r.u32("k"), r.u8("b"), r.u32("unary")
                r.raw(unary, "unary")
                r.raw((k * b + 7) // 8, "rem")
                text += f" k {k} b {b}: " + _describe_values(r, k)
            elif sid == 2:
                k, seed = r.u32("k"), r.u64("seed")
                text += f" k {k} seed {seed}: " + _describe_values(r, k)
            elif sid == 3:
                rows, cols, rank = r.u32("rows"), r.u32("cols"), r.u16("rank")
                text += (f" {rows}x{cols} rank {rank}: " + _describe_values(r, rows * rank)
                         + ", " + _describe_values(r, cols * rank))
            parts.append(text)
        if r.remaining:
            parts.append(f"{r.remaining} trailing bytes")
    except Exception as exc:  # a mutated payload: describe what parsed, then why it stopped
        parts.append(f"stops: {type(exc).__name__}: {str(exc)[:80]}")
    return "; ".join(parts)


def digits_model() -> Weights:
    """The bundled digits MLP (4,810 parameters)."""
    from flowerpress.tasks import data
    from flowerpress.tasks.models import build_model, get_weights

    test = data.load_test("digits", 0, 4)
    return get_weights(build_model("digits", tuple(test.x.shape[1:]), 10, seed=0))


def large_model() -> Weights:
    """A 784-256-10 MLP (203,530 parameters), where fixed overheads no longer dominate."""
    rng = np.random.default_rng(0)
    shapes = [(256, 784), (256,), (10, 256), (10,)]
    return [(rng.standard_normal(s) * 0.05).astype(np.float32) for s in shapes]


@dataclass
class Tally:
    """What the run measured."""

    tried: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    accepted: Counter[str] = field(default_factory=Counter)
    clipped: int = 0
    escapes: list[str] = field(default_factory=list)
    max_cpu: float = 0.0
    max_cpu_class: str = ""
    max_peak: int = 0
    max_peak_class: str = ""
    honest_cpu: list[float] = field(default_factory=list)
    reasons: Counter[str] = field(default_factory=Counter)
    class_cpu: dict[str, float] = field(default_factory=dict)
    class_peak: dict[str, int] = field(default_factory=dict)
    #: Replies Flower itself refused to carry, by class and transport.
    not_carried: Counter[str] = field(default_factory=Counter)
    #: The highest peak of the server path by transport.
    transport_peak: dict[str, int] = field(default_factory=dict)
    #: The costliest replies by peak memory: (peak, reply number, class, outcome, note).
    top: list[tuple[int, int, str, str, str]] = field(default_factory=list)
    top_blobs: dict[int, bytes] = field(default_factory=dict)
    #: The slowest replies by CPU: (cpu, reply number, class, outcome, note, reply, stage).
    slow: list[tuple[float, int, str, str, str, Message, str]] = field(default_factory=list)

    def keep_slow(self, cpu: float, number: int, name: str, outcome: str, reply: Message,
                  work: Workload, count: int = 5, stage: str = "") -> None:
        """Remember the reply if it is among the ``count`` slowest so far (kept for replay)."""
        if len(self.slow) >= count and cpu <= self.slow[-1][0]:
            return
        self.slow.append((cpu, number, name, outcome, work.note, reply, stage))
        self.slow.sort(key=lambda t: -t[0])
        del self.slow[count:]

    def keep_top(self, peak: int, number: int, name: str, outcome: str, reply: Message,
                 work: Workload, count: int = 5) -> None:
        """Remember the reply if it is among the ``count`` costliest so far."""
        if len(self.top) >= count and peak <= self.top[-1][0]:
            return
        record = reply.content.get(protocol.ARRAYS) if reply.has_content() else None
        blob = None
        note = work.note
        if name in ("payload", "honest", "values") and isinstance(record, ArrayRecord) \
                and is_payload(record):
            blob = payload_bytes(record)
            max_body = 5 * sum(int(g.size) for g in work.received) + (1 << 20)
            note = f"{note} | {describe_payload(blob, max_body)}" if note else describe_payload(
                blob, max_body)
        self.top.append((peak, number, name, outcome, note))
        self.top.sort(key=lambda t: -t[0])
        for dropped in self.top[count:]:
            self.top_blobs.pop(dropped[1], None)
        del self.top[count:]
        if blob is not None:
            self.top_blobs[number] = blob


def _begin_round(strategy: Any, server_round: int, global_weights: Weights, work: Workload,
                 warm: np.random.Generator) -> None:
    """Start a round holding one honest update, added outside any measurement.

    The strategy's float64 sum is O(model) state of the round, not a cost of
    the replies that follow.
    """
    strategy.begin_round(server_round, global_weights)
    strategy.add(ClientUpdate(delta=work.honest_delta(warm), weight=1.0, node_id=0))


#: The ways a reply reaches the ServerApp in Flower 1.41 (flowerpress.testing).
#: Pickling comes first: deflation caches memoryview chunks in the message, which Ray's
#: pickling of a ClientApp's fresh reply never sees.
TRANSPORTS: dict[str, Callable[[Message], Message]] = {"simulation": through_simulation,
                                                       "superlink": through_superlink}
#: Classes whose replies answer a train message (the others say their kind in the name).
TRAIN_CLASSES = ("payload", "npy", "fields", "weight", "metrics", "values", "honest", "wire")
#: Share of each class in the mix (the train classes as before, then the other kinds).
MIX = {"payload": 0.17, "npy": 0.17, "fields": 0.1, "weight": 0.07, "metrics": 0.07,
       "values": 0.09, "honest": 0.08, "wire": 0.07, "query": 0.06, "evaluate": 0.06,
       "secagg": 0.06}


def run(replies: int, *, model: Weights, seed: int, strategy_spec: str, max_norm: float,
        round_size: int = 50, progress: bool = False,
        classes: Sequence[str] | None = None) -> Tally:
    """Send ``replies`` replies over both of Flower's paths and through the server's calls."""
    rng = np.random.default_rng(seed)
    work = Workload(received=model)
    makers = work.makers()
    names = list(makers)
    probs = np.array([MIX[n] for n in names])
    if classes:  # only these classes (another stream of replies than the full mix)
        probs = np.array([p if n in classes else 0.0 for n, p in zip(names, probs, strict=True)])
    probs /= probs.sum()
    strategy = build_strategy(strategy_spec)
    tally = Tally()
    global_weights = [w.copy() for w in model]
    warm = np.random.default_rng(seed + 1)
    server_round = 0
    sent = 0
    with server_identity():
        while sent < replies:
            server_round += 1
            _begin_round(strategy, server_round, global_weights, work, warm)
            for _ in range(min(round_size, replies - sent)):
                sent += 1
                name = names[int(rng.choice(len(names), p=probs))]
                work.note, work.stage, work.honest_reply = "", "", False
                reply = makers[name](rng)
                honest = name == "honest" or work.honest_reply
                tally.tried[name] += 1
                for transport, carry in TRANSPORTS.items():
                    try:
                        arrival = carry(reply)
                    except NotCarried as exc:
                        tally.not_carried[f"{name} ({transport})"] += 1
                        if honest:
                            tally.escapes.append(f"honest {name} reply not carried over "
                                                 f"{transport}: {exc}")
                        continue
                    _one(arrival, name, work, strategy, max_norm, tally, sent,
                         transport=transport, honest=honest, stage=work.stage)
            try:
                new = check_strategy_result(strategy.result(), global_weights, strategy_spec)
            except StrategyFailedError as exc:
                tally.escapes.append(f"round {server_round}: {exc}")
            else:
                global_weights = model  # keep the same global: replies are built against it
                del new
            if progress and server_round % 200 == 0:
                print(f"  {sent} replies, {len(tally.escapes)} escapes", file=sys.stderr,
                      flush=True)
    return tally


def _count_rejected(reply: Message, work: Workload) -> None:
    """A rejected reply's bytes are counted too (its ``UpdateRejected`` is the verdict)."""
    with contextlib.suppress(protocol.UpdateRejected):
        protocol.message_bytes(reply, limits=work.limits)


def _server_path(reply: Message, name: str, work: Workload, strategy: Any, max_norm: float,
                 tally: Tally, stage: str) -> None:
    """The calls a real run makes on one arriving reply (flowerpress.server.loop and
    secagg_round), in the order of the round's collect phase: validate (or parse), count
    its bytes (a rejected reply's too), then use it.

    Raises
    ------
    UpdateRejected, SecAggViolation
        The reply is rejected (what the round's guard turns into one log line).
    """
    if name in ("secagg", "query"):  # no validator of their own: counted first
        protocol.message_bytes(reply)
    if name == "secagg":
        if stage == sm.ADVERTISE:
            sm.parse_advertise_reply(reply, NODE)
        elif stage == sm.SHARE_KEYS:
            sm.parse_share_keys_reply(reply, NODE, max_peers=COHORT)
        elif stage == sm.MASK:
            packed, _ = sm.parse_mask_reply(reply, NODE, packed_bytes=work.packed_bytes,
                                            max_peers=COHORT)
            encoding.unpack_words(packed, SECAGG_BITS, work.length)
        else:
            sm.parse_unmask_reply(reply, NODE, max_peers=COHORT)
        return
    if reply.has_error():  # a device's error reply is dropped, counted as rejected
        _count_rejected(reply, work)
        raise protocol.UpdateRejected("error reply")
    if name == "query":
        if protocol.partition_of_reply(reply) is None:
            raise protocol.UpdateRejected("no partition id")
        protocol.anchor_of_reply(reply)
        return
    try:
        if name == "evaluate":
            protocol.validate_eval_reply(reply, max_weight=work.max_weight)
        else:
            checked = protocol.validate_train_reply(reply, work.received,
                                                    max_weight=work.max_weight)
    except protocol.UpdateRejected:
        _count_rejected(reply, work)
        raise
    protocol.message_bytes(reply, limits=work.limits)
    if name == "evaluate":
        return
    protocol.ef21_base_of_reply(reply)
    protocol.held_version_of_reply(reply)
    delta, _, was_clipped = bound_update_norm(checked.delta, max_norm)
    strategy.add(ClientUpdate(delta=delta, weight=checked.weight, node_id=1,
                              metrics=checked.metrics))
    tally.clipped += was_clipped


def _one(reply: Message, name: str, work: Workload, strategy: Any, max_norm: float,
         tally: Tally, number: int = 0, *, transport: str = "", honest: bool = False,
         stage: str = "") -> None:
    # Traced from here only: Flower's transport before it runs untraced (and fast).
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base, _ = tracemalloc.get_traced_memory()
    start = time.process_time()
    outcome, reason = "accepted", ""
    try:
        _server_path(reply, name, work, strategy, max_norm, tally, stage)
    except (protocol.UpdateRejected, SecAggViolation) as exc:
        outcome, reason = "rejected", str(exc)
        if "\n" in reason:
            tally.escapes.append(f"{name} ({transport}): a rejection of several lines")
        tally.reasons[f"{name}: {_reason(reason)}"] += 1
    except Exception as exc:  # an escape: the round's guard would have to catch it
        outcome = "escape"
        tally.escapes.append(f"{name} {stage} ({transport}): {type(exc).__name__}: "
                             f"{str(exc)[:200]} [{work.note[:200]}]")
    cpu = time.process_time() - start
    _, peak = tracemalloc.get_traced_memory()
    peak -= base
    if not tracing:
        tracemalloc.stop()
    label = f"{name}:{stage}" if stage else name
    if outcome == "accepted":
        tally.accepted[name] += 1
    elif outcome == "rejected":
        tally.rejected[name] += 1
        if honest:
            tally.escapes.append(f"honest {label} reply rejected ({transport}): {reason[:200]}")
    if honest:
        tally.honest_cpu.append(cpu)
    tally.class_cpu[label] = max(cpu, tally.class_cpu.get(label, 0.0))
    tally.class_peak[label] = max(peak, tally.class_peak.get(label, 0))
    tally.transport_peak[transport] = max(peak, tally.transport_peak.get(transport, 0))
    if cpu > tally.max_cpu:
        tally.max_cpu, tally.max_cpu_class = cpu, label
    if peak > tally.max_peak:
        tally.max_peak, tally.max_peak_class = peak, label
    tally.keep_top(peak, number, label, f"{outcome} ({transport})", reply, work)
    tally.keep_slow(cpu, number, name, f"{outcome} ({transport})", reply, work, stage=stage)


def replay_cpu(reply: Message, name: str, stage: str, model: Weights, strategy_spec: str,
               max_norm: float, repeats: int = 5) -> float:
    """The least CPU time of ``repeats`` replays of one arrived reply through the same path.

    One measurement of a reply can be inflated by what else ran at that moment
    (the garbage collector, another process on the core); the minimum over
    replays is the reply's own cost, under the same ``tracemalloc`` tracing.
    """
    work = Workload(received=model)
    warm = np.random.default_rng(1)
    best = float("inf")
    tracemalloc.start()
    try:
        with server_identity():
            for _ in range(repeats):
                strategy = build_strategy(strategy_spec)
                _begin_round(strategy, 1, [w.copy() for w in model], work, warm)
                tally = Tally()
                _one(reply, name, work, strategy, max_norm, tally, stage=stage)
                best = min(best, tally.max_cpu)
    finally:
        tracemalloc.stop()
    return best


def honest_peaks(model: Weights) -> dict[str, tuple[float, float]]:
    """Per upload codec, peak memory of one honest train reply as a multiple of the model:
    Flower's own deflation and inflation (``through_superlink``, the reply included) and
    the server path after it (bytes, validation, norm bound, strategy add)."""
    work = Workload(received=model)
    rng = np.random.default_rng(2)
    model_bytes = sum(int(w.size) for w in model) * 4
    out: dict[str, tuple[float, float]] = {}
    with server_identity():
        for spec in ["plain", *CODECS]:
            if spec == "plain":
                record = ArrayRecord(work.honest_local(rng))
            else:
                record = payload_record(parse(spec).encode(work.honest_delta(rng), None,
                                                           rng=rng)[0])
            reply = _message(record, work.good_metrics(rng))
            strategy = build_strategy("fedavg")
            _begin_round(strategy, 1, model, work, rng)
            _server_path(through_superlink(reply), "honest", work, strategy, 0.0, Tally(), "")
            tracemalloc.start()
            arrival = through_superlink(reply)
            _, wire = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            base, _ = tracemalloc.get_traced_memory()
            _server_path(arrival, "honest", work, strategy, 0.0, Tally(), "")
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            out[spec] = (wire / model_bytes, (peak - base) / model_bytes)
    return out


def _reason(text: str) -> str:
    """The kind of a rejection, without the numbers and names that vary."""
    words = [w for w in text.replace(":", " ").split() if not any(c.isdigit() for c in w)]
    return " ".join(words[:6])


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table; exit 1 if anything escaped."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replies", type=int, default=3000)
    parser.add_argument("--model", choices=["digits", "large"], default="digits")
    parser.add_argument("--strategy", default="fedavg")
    parser.add_argument("--max-update-norm", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--classes", default="",
                        help="comma-separated classes to send only (default: the full mix)")
    parser.add_argument("--dump", default="",
                        help="directory to write the payloads of the costliest replies to")
    args = parser.parse_args(argv)
    logging.getLogger("flwr").setLevel(logging.ERROR)  # "Key ... was overwritten" per reply
    model = digits_model() if args.model == "digits" else large_model()
    model_bytes = sum(int(w.size) for w in model) * 4
    started = time.monotonic()
    tally = run(args.replies, model=model, seed=args.seed, strategy_spec=args.strategy,
                max_norm=args.max_update_norm, progress=args.progress,
                classes=[c for c in args.classes.split(",") if c])
    seconds = time.monotonic() - started
    honest = float(np.median(tally.honest_cpu)) if tally.honest_cpu else float("nan")
    load = os.getloadavg()
    print(f"machine: nproc {os.cpu_count()}, load average {load[0]:.2f} {load[1]:.2f} "
          f"{load[2]:.2f}; python {sys.version.split()[0]}; numpy {np.__version__}")
    print(f"model: {args.model}, {model_bytes // 4} parameters ({model_bytes} bytes float32); "
          f"strategy {args.strategy}; max-update-norm {args.max_update_norm:g}; "
          f"seed {args.seed}; {seconds:.0f} s")
    print()
    print("| class | tried | not carried (superlink / simulation) | rejected | accepted | "
          "max CPU (ms) | max peak, server path (x model) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in sorted(tally.tried):
        labels = sorted(k for k in tally.class_cpu if k == name or k.startswith(name + ":"))
        cpu = max((tally.class_cpu[k] for k in labels), default=0.0)
        peak = max((tally.class_peak[k] for k in labels), default=0)
        print(f"| {name} | {tally.tried[name]} | {tally.not_carried[f'{name} (superlink)']} / "
              f"{tally.not_carried[f'{name} (simulation)']} | {tally.rejected[name]} | "
              f"{tally.accepted[name]} | {cpu * 1e3:.2f} | {peak / model_bytes:.2f} |")
    total = sum(tally.tried.values())
    arrived = sum(tally.rejected.values()) + sum(tally.accepted.values())
    print(f"| **all** | **{total}** | {sum(tally.not_carried.values())} | "
          f"**{sum(tally.rejected.values())}** | **{sum(tally.accepted.values())}** | "
          f"{tally.max_cpu * 1e3:.2f} | {tally.max_peak / model_bytes:.2f} |")
    print()
    stages = sorted(k for k in tally.class_cpu if k.startswith("secagg:"))
    print("secure-aggregation stages, max CPU (ms) / max peak (x model): " + ", ".join(
        f"{k[7:]} {tally.class_cpu[k] * 1e3:.2f} / {tally.class_peak[k] / model_bytes:.2f}"
        for k in stages))
    print("max peak of the server path by transport (x model): " + ", ".join(
        f"{k} {v / model_bytes:.2f}" for k, v in sorted(tally.transport_peak.items())))
    print("honest train replies by upload codec, peak (x model) of Flower's transport "
          "(deflate + inflate, reply included) / of the server path after it:")
    print(" ".join(f"{spec}={wire:.2f}/{path:.2f}"
                   for spec, (wire, path) in honest_peaks(model).items()))
    print()
    print(f"replies made:             {total} ({arrived} arrivals over the two transports)")
    print(f"escapes:                  {len(tally.escapes)}")
    print(f"rejected / accepted:      {sum(tally.rejected.values())} / "
          f"{sum(tally.accepted.values())} (clipped by max-update-norm: {tally.clipped})")
    slowest = max(tally.honest_cpu, default=float("nan"))
    print(f"max CPU per reply:        {tally.max_cpu * 1e3:.2f} ms ({tally.max_cpu_class}); "
          f"{tally.max_cpu / honest:.1f}x the median honest reply ({honest * 1e3:.3f} ms); "
          f"slowest honest {slowest * 1e3:.2f} ms")
    print(f"max peak memory per reply: {tally.max_peak} bytes ({tally.max_peak_class}); "
          f"{tally.max_peak / model_bytes:.2f}x the model's float32 size")
    print()
    print("costliest replies by peak memory (reply number, class, outcome, what it was):")
    for peak, number, name, outcome, note in tally.top:
        print(f"  {peak / model_bytes:.2f}x  #{number} {name} {outcome}: {note[:600]}")
    print()
    print("slowest replies by CPU (reply number, class, outcome; CPU as measured in the run, "
          "then the least of 5 replays):")
    for cpu, number, name, outcome, note, reply, stage in tally.slow:
        again = replay_cpu(reply, name, stage, model, args.strategy, args.max_update_norm)
        print(f"  {cpu * 1e3:.2f} ms, replayed {again * 1e3:.2f} ms ({again / honest:.1f}x the "
              f"median honest)  #{number} {name} {outcome}: {note[:300]}")
    if args.dump:
        os.makedirs(args.dump, exist_ok=True)
        for number, blob in tally.top_blobs.items():
            path = os.path.join(args.dump, f"seed{args.seed}-reply{number}.payload")
            with open(path, "wb") as fh:
                fh.write(blob)
            print(f"  wrote {path}")
    for line in tally.escapes[:20]:
        print("ESCAPE", line)
    return 1 if tally.escapes else 0


if __name__ == "__main__":
    sys.exit(main())
