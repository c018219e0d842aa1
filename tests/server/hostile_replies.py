"""Hostile reply rewrites for the server tests (the classes of issue 12)."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from flowerpress.compression.envelope import PAYLOAD_KEY, PAYLOAD_STYPE

Tamper = Callable[[Message], Message]


def _with(reply: Message, arrays: ArrayRecord, metrics: MetricRecord | None = None) -> Message:
    reply.content = RecordDict({"arrays": arrays,
                                "metrics": metrics or reply.content.metric_records["metrics"]})
    return reply


def _first_blob(reply: Message, blob: bytes, shape: tuple[int, ...] | None = None) -> Message:
    record = reply.content.array_records["arrays"]
    items = list(record.items())
    name, first = items[0]
    out = ArrayRecord({name: Array(dtype=first.dtype, shape=tuple(shape or first.shape),
                                   stype=first.stype, data=blob), **dict(items[1:])})
    return _with(reply, out)


def malformed_header(reply: Message) -> Message:
    """A plain array whose npy header is cut short."""
    return _first_blob(reply, b"\x93NUMPY\x01\x00\xff\x00{'descr'")


def overflowing_shape(reply: Message) -> Message:
    """A header whose shape's element product overflows int64."""
    first = reply.content.array_records["arrays"].to_numpy_ndarrays()[0]
    buf = io.BytesIO()
    np.save(buf, first)
    shape = str(first.shape).encode()
    return _first_blob(reply, buf.getvalue().replace(shape, b"(4294967296, 4294967296)"[
        :len(shape)].ljust(len(shape))))


def zero_itemsize(reply: Message) -> Message:
    """A 128-byte zero-itemsize structured array claiming 10^12 elements."""
    header = (b"{'descr': [('a', '|V0')], 'fortran_order': False, "
              b"'shape': (1000000, 1000000), }").ljust(118) + b"\n"
    return _first_blob(reply, b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header)


def huge_weight(reply: Message) -> Message:
    """An honest update claiming 10^13 training examples."""
    metrics = MetricRecord({"num-examples": 10**13})
    return _with(reply, reply.content.array_records["arrays"], metrics)


def nan_metric(reply: Message) -> Message:
    """An honest update with a NaN train-loss and an out-of-range clip indicator."""
    metrics = MetricRecord({"num-examples": 10, "train-loss": float("nan"),
                            "dp-clip-indicator": -1e9})
    return _with(reply, reply.content.array_records["arrays"], metrics)


def garbage_payload(reply: Message) -> Message:
    """A compressed-payload envelope holding junk that declares many tensors."""
    arr = Array(dtype="bytes", shape=(16,), stype=PAYLOAD_STYPE,
                data=b"FPZ\x01" + b"\xff" * 12)
    return _with(reply, ArrayRecord({PAYLOAD_KEY: arr}))


def float32_max(reply: Message) -> Message:
    """Every weight float32-max: finite, but the delta against the global overflows."""
    arrays = reply.content.array_records["arrays"].to_numpy_ndarrays()
    big = [np.full_like(a, np.finfo(np.float32).max) for a in arrays]
    big[0].reshape(-1)[::2] *= -1
    return _with(reply, ArrayRecord(big))


def finite_but_huge(reply: Message) -> Message:
    """A plausible-looking reply whose local weights are +-1e30: finite, accepted as data."""
    arrays = reply.content.array_records["arrays"].to_numpy_ndarrays()
    rng = np.random.default_rng(len(arrays))
    huge = [np.where(rng.random(a.shape) < 0.5, -1e30, 1e30).astype(np.float32) for a in arrays]
    return _with(reply, ArrayRecord(huge))


def int32_shape(reply: Message) -> Message:
    """A declared shape dimension outside int32: Flower 1.41 carries it (JSON metadata), its
    protobuf cannot (``message_to_proto`` raises ``ValueError: Value out of range``)."""
    record = reply.content.array_records["arrays"]
    next(iter(record.values())).__dict__["shape"] = (2**40, 1)
    return reply


#: The malformed classes, one per round in turn.
MALFORMED: tuple[Tamper, ...] = (malformed_header, overflowing_shape, zero_itemsize, huge_weight,
                                 nan_metric, garbage_payload, float32_max)


def rotating(tampers: tuple[Tamper, ...]) -> Tamper:
    """A tamper that applies the next of ``tampers`` to each reply it sees."""
    calls = [0]

    def tamper(reply: Message) -> Message:
        chosen = tampers[calls[0] % len(tampers)]
        calls[0] += 1
        return chosen(reply)

    return tamper
