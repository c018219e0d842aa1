"""Turn a client's reply into a validated update, never trusting its bytes.

A reply carries either flowerpress's compressed payload (one Array whose
``stype`` is :data:`PAYLOAD_STYPE`, written by the upload mod) or the plain
ArrayRecord of weights any Flower ClientApp returns. Either way the server
gets ``delta = local - received_global`` back, checked against the global
model's shapes and for finiteness, or an :class:`UpdateRejected` naming why.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from flwr.app import ArrayRecord, Message, RecordDict
from numpy.typing import NDArray

from flowerpress.compression.envelope import PAYLOAD_STYPE, is_payload, payload_record

Weights = list[NDArray[np.float32]]
__all__ = ["ARRAYS_KEY", "PAYLOAD_STYPE", "UpdateRejected", "extract_update", "is_payload",
           "num_examples", "payload_record", "record_bytes"]

#: Key of the ArrayRecord that carries model weights or a payload.
ARRAYS_KEY = "arrays"


class UpdateRejected(ValueError):  # noqa: N818 (reads as a verdict)
    """A reply was dropped; the message says which check failed."""


def record_bytes(content: RecordDict) -> int:
    """Bytes of array data a message carries: what actually travels for the model."""
    return sum(len(arr.data) for rec in content.array_records.values() for arr in rec.values())


def decode_weights(record: ArrayRecord, *, max_elements: int) -> Weights:
    """Arrays from a plain ArrayRecord or a flowerpress payload (float32)."""
    if is_payload(record):
        from flowerpress.compression import decode

        return [np.asarray(a, dtype=np.float32) for a in
                decode(record["payload"].data, max_elements=max_elements)]
    total = 0
    out: Weights = []
    for name, arr in record.items():
        total += int(np.prod(arr.shape, dtype=np.int64)) if arr.shape else 1
        if total > max_elements:
            raise UpdateRejected(f"array {name!r} exceeds the model's {max_elements} elements")
        out.append(np.asarray(arr.numpy(), dtype=np.float32))
    return out


def check_shapes(update: Sequence[NDArray[np.float32]], reference: Sequence[NDArray[np.float32]],
                 what: str = "update") -> None:
    """Raise UpdateRejected unless ``update`` matches ``reference`` tensor for tensor."""
    if len(update) != len(reference):
        raise UpdateRejected(f"{what} has {len(update)} tensors, expected {len(reference)}")
    for i, (u, r) in enumerate(zip(update, reference, strict=True)):
        if u.shape != r.shape:
            raise UpdateRejected(f"{what} tensor {i} has shape {u.shape}, expected {r.shape}")
        if not np.isfinite(u).all():
            raise UpdateRejected(f"{what} tensor {i} holds NaN or Inf values")


def extract_update(reply: Message, received_global: Sequence[NDArray[np.float32]]) -> Weights:
    """The validated delta of one training reply.

    Parameters
    ----------
    reply
        The client's reply message (no error content).
    received_global
        The global weights exactly as the clients decoded them this round.

    Raises
    ------
    UpdateRejected
        If the reply has no arrays, cannot be decoded, or fails validation.
    """
    content = reply.content
    if ARRAYS_KEY not in content.array_records:
        raise UpdateRejected(f"reply has no ArrayRecord {ARRAYS_KEY!r}")
    record = content.array_records[ARRAYS_KEY]
    max_elements = sum(int(g.size) for g in received_global)
    try:
        values = decode_weights(record, max_elements=max_elements)
    except UpdateRejected:
        raise
    except (ValueError, TypeError) as exc:  # PayloadError is a ValueError
        raise UpdateRejected(f"payload could not be decoded: {exc}") from None
    check_shapes(values, received_global)
    if is_payload(record):
        return values  # the upload mod encodes the delta itself
    return [(v - g).astype(np.float32) for v, g in zip(values, received_global, strict=True)]


def num_examples(reply: Message) -> float:
    """The reply's ``num-examples`` weight, validated."""
    metrics = reply.content.metric_records.get("metrics")
    value = None if metrics is None else metrics.get("num-examples")
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise UpdateRejected("reply has no numeric metrics['num-examples']")
    if not np.isfinite(value) or value <= 0:
        raise UpdateRejected(f"num-examples={value} is not a positive number")
    return float(value)
