"""The one message contract between flowerpress's ServerApp and ClientApp.

Every key a message carries, every type and bound, and the one place where
each side reads what the other wrote:

* server -> device, ``train`` and ``evaluate`` messages::

      "arrays": ArrayRecord   the global model (plain arrays or a compressed
                              payload, see flowerpress.compression.envelope)
      "config": ConfigRecord  a TrainInstruction: server-round, seed, the
                              upload codec, the cohort size, DP settings and
                              the strategy's own keys (e.g. proximal-mu)

* device -> server, ``train`` reply::

      "arrays": ArrayRecord   the local weights, or the compressed delta
      "metrics": MetricRecord num-examples (> 0), and optional finite numbers
                              (train-loss, local-steps, dp-clip-indicator, ...)

* device -> server, ``evaluate`` reply: ``"metrics"`` with num-examples,
  eval-loss and eval-acc.
* server -> device, ``query``: ``"config"`` {"hello": True}; the reply's
  ``"info"`` ConfigRecord holds partition-id and num-partitions (simulation
  nodes only; -1 and 0 elsewhere).

:func:`validate_train_reply` and :func:`validate_eval_reply` are the only
functions that read a device's reply: they check every field against bounds
computed from the model (never from what the sender claims) and raise
:class:`UpdateRejected` naming the field and the bound.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from numpy.typing import NDArray

from flowerpress.compression.envelope import is_payload, payload_bytes

Scalar = bool | int | float | str
Weights = list[NDArray[np.float32]]

# --- record keys -------------------------------------------------------------------
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
INFO = "info"

# --- instruction keys (server -> device, in "config") --------------------------------
SERVER_ROUND = "server-round"
SEED = "seed"
COMPRESSION = "compression"
COHORT_SIZE = "clients-per-round"  # devices divide distributed DP noise by sqrt of it
DP = "dp"
DP_CLIP = "dp-clip"
HELLO = "hello"

# --- reply keys (device -> server) ---------------------------------------------------
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
LOCAL_STEPS = "local-steps"
CLIP_INDICATOR = "dp-clip-indicator"
EVAL_LOSS = "eval-loss"
EVAL_ACC = "eval-acc"
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"

#: Documented ranges of reply metrics; any other metric must only be finite.
METRIC_RANGES: Mapping[str, tuple[float, float]] = {
    TRAIN_LOSS: (0.0, math.inf),
    LOCAL_STEPS: (0.0, 1e12),
    CLIP_INDICATOR: (-1e6, 1e6),  # noised in [0, 1]; the noise can move it far
    EVAL_LOSS: (0.0, math.inf),
    EVAL_ACC: (0.0, 1.0),
}
#: Upper bound on the number of metrics a reply may carry.
MAX_METRICS = 64
#: Default cap on a reply's ``num-examples`` weight (run-config ``max-client-weight``).
DEFAULT_MAX_WEIGHT = 1_000_000
#: Floating dtypes a plain ArrayRecord reply may use (npy ``descr``).
ALLOWED_DTYPES = frozenset({"<f2", "<f4", "<f8"})
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


class UpdateRejected(ValueError):  # noqa: N818 (reads as a verdict)
    """A reply was dropped; the message names the field and the check that failed."""


def parse_bool(value: object, *, name: str) -> bool:
    """The one boolean parser of run config, node config and messages.

    Accepts a bool, or one of ``true/1/yes/on`` and ``false/0/no/off`` in any case.

    Raises
    ------
    ValueError
        Naming ``name`` and the accepted words.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{name}={value!r} is not allowed; expected true or false")


def message_config(msg: Message) -> dict[str, Scalar]:
    """The scalar entries of a message's ``"config"`` ConfigRecord (empty if absent)."""
    record = msg.content.config_records.get(CONFIG)
    if record is None:
        return {}
    return {k: v for k, v in record.items() if isinstance(v, bool | int | float | str)}


def _int_of(config: Mapping[str, Scalar], key: str, default: int, *, minimum: int = 0) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"instruction {key!r} must be an int >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class TrainInstruction:
    """What the server asks of a device in one ``train`` message.

    Attributes
    ----------
    server_round : int
        The round, from 1.
    seed : int
        The run's root seed (per-node streams are split from it).
    compression : str
        The upload codec spec (``none`` for plain weights).
    cohort_size : int
        How many devices were asked this round (distributed DP divides by its root).
    extra : Mapping[str, Scalar]
        Everything else: DP settings (``dp``, ``dp-clip``) and the strategy's keys.
    """

    server_round: int
    seed: int
    compression: str = "none"
    cohort_size: int = 1
    extra: Mapping[str, Scalar] = field(default_factory=dict)

    def to_record(self) -> ConfigRecord:
        """The ``"config"`` record of the train message."""
        return ConfigRecord({**self.extra, SERVER_ROUND: self.server_round, SEED: self.seed,
                             COMPRESSION: self.compression, COHORT_SIZE: self.cohort_size})

    @classmethod
    def from_message(cls, msg: Message) -> TrainInstruction:
        """Read the instruction of a train (or evaluate) message.

        Raises
        ------
        ValueError
            A framework key has the wrong type (names the key).
        """
        config = message_config(msg)
        spec = config.get(COMPRESSION, "none")
        if not isinstance(spec, str):
            raise ValueError(f"instruction {COMPRESSION!r} must be a string, got {spec!r}")
        known = (SERVER_ROUND, SEED, COMPRESSION, COHORT_SIZE)
        return cls(server_round=_int_of(config, SERVER_ROUND, 0),
                   seed=_int_of(config, SEED, 0), compression=spec,
                   cohort_size=_int_of(config, COHORT_SIZE, 1, minimum=1),
                   extra={k: v for k, v in config.items() if k not in known})


def train_reply(msg: Message, weights: Sequence[NDArray[np.float32]], *, num_examples: int,
                metrics: Mapping[str, float] | None = None) -> Message:
    """The device's reply to a train message: local weights and metrics."""
    record = MetricRecord({NUM_EXAMPLES: int(num_examples),
                           **{k: float(v) for k, v in (metrics or {}).items()}})
    return Message(RecordDict({ARRAYS: ArrayRecord(list(weights)), METRICS: record}),
                   reply_to=msg)


def eval_reply(msg: Message, *, num_examples: int, loss: float, accuracy: float | None,
               metrics: Mapping[str, float] | None = None) -> Message:
    """The device's reply to an evaluate message."""
    values: dict[str, int | float | list[int] | list[float]] = {
        NUM_EXAMPLES: int(num_examples), EVAL_LOSS: float(loss)}
    if accuracy is not None:
        values[EVAL_ACC] = float(accuracy)
    values.update({k: float(v) for k, v in (metrics or {}).items()})
    return Message(RecordDict({METRICS: MetricRecord(values)}), reply_to=msg)


def query_reply(msg: Message, *, partition_id: int, num_partitions: int) -> Message:
    """The device's reply to the server's ``query`` (which partition it holds)."""
    info = ConfigRecord({PARTITION_ID: partition_id, NUM_PARTITIONS: num_partitions})
    return Message(RecordDict({INFO: info}), reply_to=msg)


# --- validation of replies (the server's side) ----------------------------------------


def record_bytes(content: RecordDict) -> int:
    """Bytes of array data a message carries (the payload columns of the round rows)."""
    return sum(len(arr.data) for rec in content.array_records.values() for arr in rec.values())


#: Length of the message ids Flower assigns when a message is pushed (the
#: hex SHA-256 object id of the message, ``Message.object_id``).
MESSAGE_ID_CHARS = 64


def message_bytes(msg: Message) -> int:
    """Bytes of ``msg`` as Flower serializes it: ``message_to_proto(msg).SerializeToString()``.

    Metadata, every record (arrays, metrics, config), the error if any and the
    protobuf framing. A message the ServerApp has not pushed yet has no id:
    it is counted with the 64-character id Flower gives it on push, so the
    count is the same before and after ``Grid.push_messages``.

    Notes
    -----
    In a deployment Flower 1.41 does not send this one protobuf: it pushes the
    message without content plus its content as content-addressed objects
    (``push_objects``), so objects shared by several messages travel from the
    ServerApp to the SuperLink once, and each SuperNode pulls its message's
    objects. The serialized length is what one node's message costs on its
    link, within the few dozen bytes of object framing (docs/benchmarks.md).
    """
    from flwr.common.serde import message_to_proto

    proto = message_to_proto(msg)
    if not proto.metadata.message_id:
        proto.metadata.message_id = "0" * MESSAGE_ID_CHARS
    return int(proto.ByteSize())


def _npy_array(name: str, data: bytes, shape: tuple[int, ...]) -> NDArray[np.float32]:
    """Parse one npy blob whose shape must be ``shape``; allocate nothing the sender sized."""
    from numpy.lib import format as npy

    stream = io.BytesIO(data)
    try:
        version = npy.read_magic(stream)
        if version == (1, 0):
            header = npy.read_array_header_1_0(stream)
        elif version == (2, 0):
            header = npy.read_array_header_2_0(stream)
        else:
            raise ValueError(f"npy version {version}")
    except Exception as exc:  # numpy raises several types for a malformed header
        raise UpdateRejected(f"array {name!r}: malformed npy header ({exc})") from None
    got_shape, fortran, dtype = header
    descr = dtype.str if isinstance(dtype, np.dtype) else str(dtype)
    if descr not in ALLOWED_DTYPES or dtype.fields is not None:
        raise UpdateRejected(f"array {name!r}: dtype {descr!r} is not one of "
                             f"{sorted(ALLOWED_DTYPES)}")
    if tuple(got_shape) != shape:
        raise UpdateRejected(f"array {name!r}: npy shape {tuple(got_shape)}, expected {shape}")
    count = math.prod(shape)
    offset = stream.tell()
    if len(data) - offset != count * dtype.itemsize:
        raise UpdateRejected(f"array {name!r}: {len(data) - offset} data bytes, expected "
                             f"{count * dtype.itemsize}")
    values = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    shaped = values.reshape(shape, order="F") if fortran else values.reshape(shape)
    return np.asarray(shaped, dtype=np.float32)


def decode_weights(record: ArrayRecord, reference: Sequence[NDArray[np.float32]]) -> Weights:
    """The float32 arrays of a reply's ArrayRecord, plain or a compressed payload.

    Bounds come from ``reference`` (the model): tensor count, every shape, the
    total element count; nothing is allocated from a size the sender claims.
    """
    if is_payload(record):
        from flowerpress.compression import PayloadError, decode

        try:
            arrays = decode(payload_bytes(record),
                            max_elements=sum(int(g.size) for g in reference),
                            max_tensors=len(reference))
        except PayloadError as exc:
            raise UpdateRejected(f"payload could not be decoded: {exc}") from None
        return [np.asarray(a, dtype=np.float32) for a in arrays]
    if len(record) != len(reference):
        raise UpdateRejected(f"reply has {len(record)} arrays, expected {len(reference)}")
    out: Weights = []
    for (name, arr), ref in zip(record.items(), reference, strict=True):
        declared = tuple(arr.shape) if isinstance(arr.shape, list | tuple) else None
        if declared != ref.shape:
            raise UpdateRejected(f"array {name!r} declares shape {declared}, expected {ref.shape}")
        if arr.stype != "numpy.ndarray":
            raise UpdateRejected(f"array {name!r} has stype {arr.stype!r}, expected numpy.ndarray")
        out.append(_npy_array(name, arr.data, ref.shape))
    return out


def _check_finite(update: Sequence[NDArray[np.float32]], what: str) -> None:
    for i, u in enumerate(update):
        if not np.isfinite(u).all():
            raise UpdateRejected(f"{what} tensor {i} holds NaN or Inf values")


def _check_shapes(update: Sequence[NDArray[np.float32]],
                  reference: Sequence[NDArray[np.float32]], what: str) -> None:
    if len(update) != len(reference):
        raise UpdateRejected(f"{what} has {len(update)} tensors, expected {len(reference)}")
    for i, (u, r) in enumerate(zip(update, reference, strict=True)):
        if u.shape != r.shape:
            raise UpdateRejected(f"{what} tensor {i} has shape {u.shape}, expected {r.shape}")


def validate_metrics(record: MetricRecord | None, *, required: Sequence[str] = ()
                     ) -> dict[str, float]:
    """A reply's metrics as finite floats within their documented ranges."""
    if record is None:
        if required:
            raise UpdateRejected(f"reply has no MetricRecord {METRICS!r}")
        return {}
    if len(record) > MAX_METRICS:
        raise UpdateRejected(f"reply has {len(record)} metrics, at most {MAX_METRICS} allowed")
    out: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise UpdateRejected(f"metric {key!r}={value!r} is not a number")
        number = float(value)
        if not math.isfinite(number):
            raise UpdateRejected(f"metric {key!r}={value!r} is not finite")
        lo, hi = METRIC_RANGES.get(key, (-math.inf, math.inf))
        if not lo <= number <= hi:
            raise UpdateRejected(f"metric {key!r}={value!r} is outside [{lo:g}, {hi:g}]")
        out[key] = number
    for key in required:
        if key not in out:
            raise UpdateRejected(f"reply has no metric {key!r}")
    return out


def validate_weight(metrics: Mapping[str, float], *, max_weight: float) -> float:
    """``num-examples`` as a positive integer-valued weight no larger than ``max_weight``."""
    value = metrics.get(NUM_EXAMPLES)
    if value is None:
        raise UpdateRejected(f"reply has no numeric metrics[{NUM_EXAMPLES!r}]")
    if value <= 0 or value != math.floor(value):
        raise UpdateRejected(f"{NUM_EXAMPLES}={value} is not a positive integer")
    if value > max_weight:
        raise UpdateRejected(f"{NUM_EXAMPLES}={value:.0f} exceeds max-client-weight="
                             f"{max_weight:g}")
    return float(value)


@dataclass(frozen=True)
class ValidatedReply:
    """A train reply after every check: safe to aggregate."""

    delta: Weights
    weight: float
    metrics: Mapping[str, float]


def validate_train_reply(reply: Message, received: Sequence[NDArray[np.float32]], *,
                         max_weight: float = DEFAULT_MAX_WEIGHT) -> ValidatedReply:
    """Check every field of a train reply; return the delta against ``received``.

    Parameters
    ----------
    reply
        The device's reply (not an error reply).
    received
        The global weights exactly as the devices decoded them this round.
    max_weight
        Cap on ``num-examples``.

    Raises
    ------
    UpdateRejected
        Naming the field and the bound that failed.
    """
    content = reply.content
    metrics = validate_metrics(content.metric_records.get(METRICS), required=(NUM_EXAMPLES,))
    weight = validate_weight(metrics, max_weight=max_weight)
    record = content.array_records.get(ARRAYS)
    if record is None:
        raise UpdateRejected(f"reply has no ArrayRecord {ARRAYS!r}")
    values = decode_weights(record, received)
    _check_shapes(values, received, "update")
    _check_finite(values, "update")
    if is_payload(record):
        delta = values  # the compression mod encodes the delta itself
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            delta = [(v - g).astype(np.float32) for v, g in zip(values, received, strict=True)]
        _check_finite(delta, "delta")  # float32-max weights overflow after subtraction
    return ValidatedReply(delta, weight, {k: v for k, v in metrics.items() if k != NUM_EXAMPLES})


def validate_eval_reply(reply: Message, *, max_weight: float = DEFAULT_MAX_WEIGHT
                        ) -> tuple[float, dict[str, float]]:
    """``(num_examples, metrics)`` of an evaluate reply, validated."""
    metrics = validate_metrics(reply.content.metric_records.get(METRICS),
                               required=(NUM_EXAMPLES, EVAL_LOSS))
    weight = validate_weight(metrics, max_weight=max_weight)
    return weight, {k: v for k, v in metrics.items() if k != NUM_EXAMPLES}


def partition_of_reply(reply: Message) -> int | None:
    """The partition id a query reply reports, or None."""
    info = reply.content.config_records.get(INFO)
    pid = None if info is None else info.get(PARTITION_ID)
    if isinstance(pid, int) and not isinstance(pid, bool) and 0 <= pid < (1 << 31):
        return pid
    return None


# --- the history download (server -> device and back) ---------------------------------
#
# With ``download-history`` on, a train message carries a third record,
# ``"download"`` (a ConfigRecord), and its ``"arrays"`` are either the quantized
# full model (one payload, the envelope of flowerpress.compression.envelope) or
# the compressed difference between the server's model and the version the
# device holds, one payload Array under ``diff.<round>``:
#
#     "download": {"download-version": "A.T",  the version the device will hold
#                  "download-digest": HEX,     weights_digest of that version
#                  "download-base": "A.S"}     the version the difference applies
#                                              to ("" for a full model)
#
# A version "A.T" is a device's model after its download of round T; A is the
# round it last received a full model. The train reply carries
# ``"download"`` back: {"download-held": "A.T", "download-digest": HEX} and,
# outside DP, "compute-seconds" (the device's local training time). The server
# verifies every claim against its own record; nothing it allocates is sized by
# a claim.

DOWNLOAD = "download"
DOWNLOAD_VERSION = "download-version"
DOWNLOAD_DIGEST = "download-digest"
DOWNLOAD_BASE = "download-base"
DOWNLOAD_HELD = "download-held"
COMPUTE_SECONDS = "compute-seconds"
#: Key prefix of the per-round diff payloads in a history download's ArrayRecord.
DIFF_PREFIX = "diff."
#: Hex characters of a weights digest (BLAKE2b, 16 bytes).
DIGEST_CHARS = 32
_VERSION_RE = re.compile(r"^(\d{1,9})\.(\d{1,9})$")
_DIGEST_RE = re.compile(r"^[0-9a-f]{32}$")


def weights_digest(weights: Sequence[NDArray[np.float32]]) -> str:
    """BLAKE2b-128 of the float32 bytes and shapes of ``weights`` (hex).

    Server and device compute it the same way, so equal digests mean
    bit-identical models.
    """
    import hashlib

    h = hashlib.blake2b(digest_size=DIGEST_CHARS // 2)
    for w in weights:
        arr = np.ascontiguousarray(w, dtype=np.float32)
        h.update(repr(arr.shape).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def format_version(anchor: int, server_round: int) -> str:
    """The id ``"A.T"`` of the model of round ``server_round`` anchored at ``anchor``."""
    return f"{anchor}.{server_round}"


def parse_version(text: object) -> tuple[int, int] | None:
    """``(anchor, round)`` of a version id, or None if it is not one (never raises)."""
    if not isinstance(text, str) or len(text) > 19:
        return None
    match = _VERSION_RE.match(text)
    if match is None:
        return None
    anchor, rnd = int(match.group(1)), int(match.group(2))
    return (anchor, rnd) if 0 <= anchor <= rnd else None


def parse_digest(text: object) -> str | None:
    """A well-formed weights digest, or None."""
    if isinstance(text, str) and len(text) == DIGEST_CHARS and _DIGEST_RE.match(text):
        return text
    return None


@dataclass(frozen=True)
class HeldVersion:
    """What a device says it holds after a train round (unverified until the server checks)."""

    anchor: int
    server_round: int
    digest: str
    compute_seconds: float | None = None


def held_version_of_reply(reply: Message) -> HeldVersion | None:
    """The version a train reply claims its device holds, or None (malformed or absent).

    Bounded and strict: a claim is two small integers and a 32-hex digest;
    anything else is no claim (the device then gets a full model).
    """
    if reply.has_error() or not reply.has_content():
        return None
    record = reply.content.config_records.get(DOWNLOAD)
    if record is None:
        return None
    version = parse_version(record.get(DOWNLOAD_HELD))
    digest = parse_digest(record.get(DOWNLOAD_DIGEST))
    if version is None or digest is None:
        return None
    return HeldVersion(version[0], version[1], digest, _seconds(record.get(COMPUTE_SECONDS)))


def _seconds(raw: object) -> float | None:
    if isinstance(raw, int | float) and not isinstance(raw, bool) and math.isfinite(raw) \
            and 0.0 <= raw <= 1e6:
        return float(raw)
    return None


def compute_seconds_of_reply(reply: Message) -> float | None:
    """The local training time a train reply reports (its ``download`` record), or None."""
    if reply.has_error() or not reply.has_content():
        return None
    record = reply.content.config_records.get(DOWNLOAD)
    return None if record is None else _seconds(record.get(COMPUTE_SECONDS))
