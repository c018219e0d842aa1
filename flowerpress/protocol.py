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
      "download": ConfigRecord  the model version the device holds (history
                              download) and, outside DP and secure aggregation,
                              what its training cost (:class:`DeviceCompute`),
                              packed in one bytes value (:func:`pack_claim`)

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
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from numpy.typing import NDArray

from flowerpress.compression.envelope import PAYLOAD_KEY, is_payload, payload_bytes

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
#: bytes: the server's pruning mask (flowerpress.compression.mask.pack_mask); a train
#: reply then carries only the unmasked coordinates, gathered into one vector.
PRUNE_MASK = "prune-mask"

# --- the message format (server <-> device, in the start-up query and its reply) ------
#: The version of this contract's messages: bumped whenever a message's records
#: change so that another version cannot read them (2: strict secure-aggregation
#: stages, packed download claims; 3: the claim carries the training's wall and
#: CPU seconds and FLOPs). The server's query carries it; the device's reply
#: carries its own and its flowerpress version; the server excludes a device
#: whose format differs, and the device logs one line saying so.
MESSAGE_FORMAT = 3  # 3: the download claim carries the device's compute (issue 23)
FORMAT_KEY = "message-format"
VERSION_KEY = "flowerpress-version"

# --- reply keys (device -> server) ---------------------------------------------------
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
LOCAL_STEPS = "local-steps"
CLIP_INDICATOR = "dp-clip-indicator"
DP_NOISED = "dp-noised"  # 1: the reply went through dp_mod (clipped and noised)
EVAL_LOSS = "eval-loss"
EVAL_ACC = "eval-acc"
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
#: The ClientApp's note to compression_mod in a train reply: the FLOPs its task spent
#: (a MetricRecord ``{"flops": F}``). compression_mod moves it into the download claim
#: (:func:`pack_claim`) and removes it; dp_mod and secagg_mod rebuild the reply without
#: it, so it never leaves a device under DP or secure aggregation.
FLOPS_NOTE = "flops"

#: Documented ranges of reply metrics; any other metric must only be finite.
METRIC_RANGES: Mapping[str, tuple[float, float]] = {
    TRAIN_LOSS: (0.0, math.inf),
    LOCAL_STEPS: (0.0, 1e12),
    # A clip indicator is 0 or 1 plus Gaussian noise of std count-noise / sqrt(cohort)
    # (Andrew et al. 2021, "Differentially Private Learning with Adaptive Clipping").
    # Honest values lie far inside +-1000; the adaptive clip update
    # exp(-clip_lr * (mean - quantile)) overflows a float beyond about 709 / clip_lr.
    CLIP_INDICATOR: (-1e3, 1e3),
    DP_NOISED: (1.0, 1.0),
    EVAL_LOSS: (0.0, math.inf),
    EVAL_ACC: (0.0, 1.0),
}
#: Upper bound on the number of metrics a reply may carry.
MAX_METRICS = 64
#: Upper bound on the number of records a reply may carry (a train reply has at most
#: four: arrays, metrics, the download claim and the EF21 base).
MAX_RECORDS = 16
#: Upper bound on the entries and list elements a reply's records other than
#: ``"arrays"`` hold together (metrics, claims, anything else a ClientApp adds).
MAX_REPLY_VALUES = 1024
#: Upper bound on the length of a metric's name.
MAX_METRIC_NAME = 256
#: Default cap on a reply's ``num-examples`` weight (run-config ``max-client-weight``).
DEFAULT_MAX_WEIGHT = 1_000_000
#: Floating dtypes a plain ArrayRecord reply may use (npy ``descr``), with Flower's names.
ALLOWED_DTYPES: Mapping[str, str] = {"<f2": "float16", "<f4": "float32", "<f8": "float64"}
#: Largest npy header accepted (numpy writes 118 bytes for a tensor of up to eight
#: dimensions, 310 for 64; its own parser allows 10,000).
MAX_NPY_HEADER = 1024
#: Bytes an npy header's text may hold: printable ASCII (numpy writes a Python dict
#: literal padded with spaces and ended by a newline).
_NPY_HEADER_BYTES = frozenset(range(0x20, 0x7F)) | {0x0A}
#: Largest finite float32: a local model beyond it is not a float32 model.
FLOAT32_MAX = float(np.finfo(np.float32).max)
#: Elements checked at a time (bounds temporary memory).
_CHUNK = 1 << 14
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


def _config_record(content: RecordDict, key: str) -> ConfigRecord | None:
    """The ConfigRecord under ``key``, or None: O(1), whatever else the content holds
    (``RecordDict.config_records`` builds a view of every record)."""
    record = content.get(key)
    return record if isinstance(record, ConfigRecord) else None


def message_config(msg: Message) -> dict[str, Scalar]:
    """The scalar entries of a message's ``"config"`` ConfigRecord (empty if absent)."""
    record = _config_record(msg.content, CONFIG)
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
        known = (SERVER_ROUND, SEED, COMPRESSION, COHORT_SIZE, PRUNE_MASK)
        return cls(server_round=_int_of(config, SERVER_ROUND, 0),
                   seed=_int_of(config, SEED, 0), compression=spec,
                   cohort_size=_int_of(config, COHORT_SIZE, 1, minimum=1),
                   extra={k: v for k, v in config.items() if k not in known})


def prune_mask_of(msg: Message, reference: Sequence[NDArray[np.float32]]
                  ) -> list[NDArray[np.bool_]] | None:
    """The pruning mask a train message carries (None: no pruning), shaped as ``reference``.

    Raises
    ------
    ValueError
        The mask is malformed or its shapes are not the model's (one line).
    """
    config = _config_record(msg.content, CONFIG) if msg.has_content() else None
    raw = None if config is None else config.get(PRUNE_MASK)
    if raw is None:
        return None
    from flowerpress.compression.mask import unpack_mask

    if not isinstance(raw, bytes):
        raise ValueError(f"instruction {PRUNE_MASK!r} is a {type(raw).__name__}, not bytes")
    mask = unpack_mask(raw, max_elements=sum(int(w.size) for w in reference),
                       max_tensors=len(reference))
    if [m.shape for m in mask] != [np.shape(w) for w in reference]:
        raise ValueError(f"instruction {PRUNE_MASK!r} does not have the model's shapes")
    return mask


def train_reply(msg: Message, weights: Sequence[NDArray[np.float32]], *, num_examples: int,
                metrics: Mapping[str, float] | None = None,
                flops: float | None = None) -> Message:
    """The device's reply to a train message: local weights, metrics and the FLOPs note.

    ``flops`` (the training's FLOPs, finite and non-negative, else left out) goes
    in the :data:`FLOPS_NOTE` record for compression_mod (:func:`take_flops_note`).
    """
    record = MetricRecord({NUM_EXAMPLES: int(num_examples),
                           **{k: float(v) for k, v in (metrics or {}).items()}})
    content = RecordDict({ARRAYS: ArrayRecord(list(weights)), METRICS: record})
    if flops is not None and math.isfinite(flops) and flops >= 0:
        content[FLOPS_NOTE] = MetricRecord({FLOPS_NOTE: float(flops)})
    return Message(content, reply_to=msg)


def take_flops_note_inplace(reply: Message) -> float | None:
    """Remove the ClientApp's FLOPs note from a train reply; return its value (or None)."""
    if reply.has_error() or not reply.has_content() or FLOPS_NOTE not in reply.content:
        return None
    record = reply.content.pop(FLOPS_NOTE)
    value = record.get(FLOPS_NOTE) if isinstance(record, MetricRecord) else None
    if isinstance(value, int | float) and not isinstance(value, bool) \
            and math.isfinite(value) and value >= 0:
        return float(value)
    return None


def eval_reply(msg: Message, *, num_examples: int, loss: float, accuracy: float | None,
               metrics: Mapping[str, float] | None = None) -> Message:
    """The device's reply to an evaluate message."""
    values: dict[str, int | float | list[int] | list[float]] = {
        NUM_EXAMPLES: int(num_examples), EVAL_LOSS: float(loss)}
    if accuracy is not None:
        values[EVAL_ACC] = float(accuracy)
    values.update({k: float(v) for k, v in (metrics or {}).items()})
    return Message(RecordDict({METRICS: MetricRecord(values)}), reply_to=msg)


def hello_query() -> RecordDict:
    """The server's start-up query: which partition a device holds; the server's format
    and flowerpress version (so a device of another format can say which it met)."""
    from flowerpress import __version__

    return RecordDict({CONFIG: ConfigRecord({HELLO: True, FORMAT_KEY: MESSAGE_FORMAT,
                                             VERSION_KEY: __version__})})


def query_reply(msg: Message, *, partition_id: int, num_partitions: int) -> Message:
    """The device's reply to the server's ``query``: its partition, format and version."""
    from flowerpress import __version__

    info = ConfigRecord({PARTITION_ID: partition_id, NUM_PARTITIONS: num_partitions,
                         FORMAT_KEY: MESSAGE_FORMAT, VERSION_KEY: __version__})
    return Message(RecordDict({INFO: info}), reply_to=msg)


#: Longest flowerpress version string a device's hello reply may name.
MAX_VERSION_TEXT = 40
_VERSION_TEXT = re.compile(rf"[0-9A-Za-z.+!_-]{{1,{MAX_VERSION_TEXT}}}")


def parse_flowerpress_version(value: object) -> str | None:
    """A sender's flowerpress version string, or None if it is not one (never raises).

    Strict and bounded: 1 to :data:`MAX_VERSION_TEXT` characters of a PEP 440
    version or local label (letters, digits, ``.+!_-``), so it can be printed
    and stored as it is.
    """
    if isinstance(value, str) and _VERSION_TEXT.fullmatch(value):
        return value
    return None


def version_of_reply(reply: Message) -> tuple[int | None, str | None]:
    """``(message format, flowerpress version)`` a hello reply names; None where absent
    or malformed (a format is an int in 0..2**31)."""
    if reply.has_error() or not reply.has_content():
        return None, None
    info = _config_record(reply.content, INFO)
    if info is None:
        return None, None
    fmt = info.get(FORMAT_KEY)
    version = parse_flowerpress_version(info.get(VERSION_KEY))
    if isinstance(fmt, int) and not isinstance(fmt, bool) and 0 <= fmt < (1 << 31):
        return fmt, version
    return None, version


def format_mismatch(theirs: object, their_version: object, *, side: str) -> str | None:
    """One line when another side's message format differs from ours, else None.

    ``side`` names the other side (``"node 7"``, ``"the server"``); sender
    values are cut before they are printed.
    """
    from flowerpress import __version__

    if isinstance(theirs, int) and not isinstance(theirs, bool) and theirs == MESSAGE_FORMAT:
        return None
    fmt = _short(theirs) if theirs is not None else "none (flowerpress 0.1 or older)"
    version = parse_flowerpress_version(their_version) or "unknown"
    return (f"{side} speaks message format {fmt} (flowerpress {version}); this side speaks "
            f"{MESSAGE_FORMAT} (flowerpress {__version__}): install the same flowerpress "
            "wheel on the server and every device")


# --- validation of replies (the server's side) ----------------------------------------


def record_bytes(content: RecordDict) -> int:
    """Bytes of array data a message carries (the payload columns of the round rows)."""
    return sum(len(arr.data) for rec in content.array_records.values() for arr in rec.values())


#: Length of the message ids Flower assigns when a message is pushed (the
#: hex SHA-256 object id of the message, ``Message.object_id``).
MESSAGE_ID_CHARS = 64


@dataclass(frozen=True)
class WireLimits:
    """How much of a message :func:`message_bytes` walks before it refuses it.

    Every bound is checked with ``len()`` before the container is walked, so
    counting costs at most about ``max_entries`` steps however large the
    message is: a reply cannot make counting its bytes slow.
    """

    #: Records in the message's RecordDict.
    max_records: int = 64
    #: Arrays, record entries, list elements and shape dimensions, all records together
    #: (a query reply holds 3, a secure-aggregation reply about twice its neighbours; a
    #: train reply the model's tensors and dims besides: see :func:`reply_limits`).
    max_entries: int = 1024
    #: Characters of non-ASCII text, all strings together (an ASCII string's size is
    #: read in O(1), a non-ASCII one is encoded a chunk at a time to count its bytes).
    max_text: int = 1 << 16


#: The bounds :func:`message_bytes` applies unless told otherwise.
WIRE_LIMITS = WireLimits()


def reply_limits(reference: Sequence[NDArray[np.float32]]) -> WireLimits:
    """The bounds for counting a train or evaluate reply to a round on ``reference``.

    What a reply that passes :func:`validate_train_reply` can hold: the
    model's tensors (an entry each, plus their dimensions), at most
    :data:`MAX_RECORDS` records and :data:`MAX_REPLY_VALUES` other values.
    """
    tensors = sum(1 + g.ndim for g in reference)
    return WireLimits(max_records=MAX_RECORDS, max_entries=tensors + MAX_REPLY_VALUES + 2)
_UNBOUNDED = WireLimits(max_records=1 << 62, max_entries=1 << 62, max_text=1 << 62)

# Protobuf wire facts for Flower's messages (flwr/proto/*.proto): a field's tag
# is the varint of (number << 3 | wire type); field numbers below 16 take one byte.
_INT64_MIN, _INT64_MAX, _UINT64_MAX = -(1 << 63), (1 << 63) - 1, (1 << 64) - 1
_INT32_MIN, _INT32_MAX = -(1 << 31), (1 << 31) - 1
_TEXT_CHUNK = 1 << 14


def _varint(value: int) -> int:
    """Bytes of the varint of ``0 <= value < 2**64``."""
    return (value.bit_length() + 6) // 7 or 1


def _framed(size: int) -> int:
    """A length-delimited field of ``size`` bytes with a one-byte tag."""
    return 1 + _varint(size) + size


def _zigzag(value: int) -> int:
    """Bytes of a ``sint64`` varint."""
    return _varint(value << 1 if value >= 0 else (-value << 1) - 1)


class _Walk:
    """One count of a message: the entries budget and what is being counted (for errors)."""

    def __init__(self, limits: WireLimits) -> None:
        self.limits = limits
        self.left = limits.max_entries
        self.text_left = limits.max_text

    def spend(self, count: int, what: str) -> None:
        self.left -= count
        if self.left < 0:
            raise UpdateRejected(f"{what}: more than the {self.limits.max_entries} entries "
                                 "(arrays, record entries, list elements) a message may hold")

    def text(self, value: object, what: str) -> int:
        """UTF-8 bytes of a protobuf string (never copies more than a chunk)."""
        if not isinstance(value, str):
            raise UpdateRejected(f"{what} is a {type(value).__name__}, not a string")
        if value.isascii():
            return len(value)
        self.text_left -= len(value)
        if self.text_left < 0:
            raise UpdateRejected(f"{what}: more than the {self.limits.max_text} characters "
                                 "of non-ASCII text a message may hold")
        try:
            return sum(len(value[i:i + _TEXT_CHUNK].encode("utf-8"))
                       for i in range(0, len(value), _TEXT_CHUNK))
        except UnicodeEncodeError:
            raise UpdateRejected(f"{what} is not valid UTF-8 text") from None

    def string_field(self, value: object, what: str) -> int:
        """A proto3 ``string`` field with a one-byte tag (absent when empty)."""
        size = self.text(value, what)
        return _framed(size) if size else 0


def _uint64(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _UINT64_MAX:
        raise UpdateRejected(f"{what}={_short(value)} is not a uint64")
    return value


def _double_set(value: object, what: str) -> bool:
    """Whether a proto3 ``double`` is written (any bit pattern but +0.0 is)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UpdateRejected(f"{what}={_short(value)} is not a double")
    try:
        number = float(value)
    except OverflowError:
        raise UpdateRejected(f"{what} is an int beyond the double range") from None
    return number != 0.0 or math.copysign(1.0, number) < 0


def _metadata_size(metadata: object, walk: _Walk) -> int:
    """Bytes of ``flwr.proto.Metadata`` (``metadata_to_proto``), with the pushed message id."""
    size = 0
    for name in ("run_id", "src_node_id", "dst_node_id"):
        value = _uint64(getattr(metadata, name, None), f"metadata {name}")
        size += 1 + _varint(value) if value else 0
    message_id = getattr(metadata, "message_id", None)
    size += _framed(MESSAGE_ID_CHARS) if message_id == "" else walk.string_field(
        message_id, "metadata message_id")
    for name in ("reply_to_message_id", "group_id", "message_type"):
        size += walk.string_field(getattr(metadata, name, None), f"metadata {name}")
    for name in ("ttl", "created_at"):
        size += 9 if _double_set(getattr(metadata, name, None), f"metadata {name}") else 0
    for name in ("src_task_id", "dst_task_id"):  # optional: written when set, even to 0
        task = getattr(metadata, name, None)
        if task is not None:
            size += 1 + _varint(_uint64(task, f"metadata {name}"))
    return size


def _error_size(error: object, walk: _Walk) -> int:
    """Bytes of ``flwr.proto.Error`` (``error_to_proto``)."""
    code = getattr(error, "code", None)
    if isinstance(code, bool) or not isinstance(code, int) \
            or not _INT64_MIN <= code <= _INT64_MAX:
        raise UpdateRejected(f"error code {_short(code)} is not an int64")
    reason = getattr(error, "reason", None)
    return (1 + _zigzag(code) if code else 0) + walk.string_field(
        "" if reason is None else reason, "error reason")


def _array_size(array: object, what: str, walk: _Walk) -> int:
    """Bytes of ``flwr.proto.Array``: dtype, packed int32 shape, stype, data (never read)."""
    if not isinstance(array, Array):
        raise UpdateRejected(f"{what} is a {type(array).__name__}, not an Array")
    shape = array.shape
    if not isinstance(shape, tuple | list):
        raise UpdateRejected(f"{what} shape is a {type(shape).__name__}, not a tuple")
    walk.spend(len(shape), f"{what} shape")
    packed = 0
    for dim in shape:
        number = int(dim) if isinstance(dim, np.integer) else dim
        if type(number) is not int or not _INT32_MIN <= number <= _INT32_MAX:
            raise UpdateRejected(f"{what} shape has dimension {_short(dim)}, not an int32")
        packed += _varint(number) if number >= 0 else 10  # a negative int32 is sign-extended
    data = array.data
    if not isinstance(data, bytes):
        raise UpdateRejected(f"{what} data is a {type(data).__name__}, not bytes")
    return (walk.string_field(array.dtype, f"{what} dtype") + (_framed(packed) if packed else 0)
            + walk.string_field(array.stype, f"{what} stype")
            + (_framed(len(data)) if data else 0))


def _list_size(values: list[Any], kind: type, what: str, walk: _Walk) -> int:
    """Bytes of the ``vals`` of a DoubleList, SintList, UintList, BoolList, StringList or
    BytesList (field 1; packed for numbers, one field per element for text)."""
    if not values:
        return 0
    if kind is float:
        return _framed(8 * len(values))
    if kind is bool:
        return _framed(len(values))
    if kind is int:
        if any(v > _INT64_MAX for v in values):  # Flower then picks a UintList
            return _framed(sum(_varint(_uint64(v, what)) for v in values))
        if any(v < _INT64_MIN for v in values):
            raise UpdateRejected(f"{what} holds an int below the int64 range")
        return _framed(sum(_zigzag(v) for v in values))
    if kind is str:
        return sum(_framed(walk.text(v, what)) for v in values)
    return sum(_framed(len(v)) for v in values)


def _value_size(value: Any, allowed: tuple[type, ...], what: str, walk: _Walk) -> int:
    """Bytes of a ``MetricRecordValue`` / ``ConfigRecordValue``: the oneof field Flower's
    ``record_value_dict_to_proto`` picks (the first type of ``allowed`` that fits)."""
    is_list = isinstance(value, list)
    if is_list:
        walk.spend(len(value), what)
    for kind in allowed:
        if isinstance(value, kind):
            single: Any = value  # (isinstance against a type variable narrows to object)
            if kind is float:
                return 9  # a oneof double is written even when 0.0
            if kind is bool:
                return 2
            if kind is int:
                if single > _INT64_MAX:
                    return 1 + _varint(_uint64(single, what))
                if single < _INT64_MIN:
                    raise UpdateRejected(f"{what} is an int below the int64 range")
                return 1 + _zigzag(single)
            if kind is str:
                return _framed(walk.text(single, what))
            return _framed(len(single))
        if is_list and all(isinstance(v, kind) for v in value):
            inner = _list_size(value, kind, what, walk)
            return 2 + _varint(inner) + inner  # fields 21-26 take a two-byte tag
    raise UpdateRejected(f"{what} is a {type(value).__name__}, which Flower's "
                         f"{'ConfigRecord' if str in allowed else 'MetricRecord'} cannot carry")


_METRIC_TYPES = (float, int)
_CONFIG_TYPES = (bool, int, float, str, bytes)


def _record_size(record: object, what: str, walk: _Walk) -> int:
    """Bytes of an ArrayRecord, MetricRecord or ConfigRecord message (its items)."""
    if isinstance(record, ArrayRecord):
        allowed: tuple[type, ...] | None = None
    elif isinstance(record, MetricRecord):
        allowed = _METRIC_TYPES
    elif isinstance(record, ConfigRecord):
        allowed = _CONFIG_TYPES
    else:
        raise UpdateRejected(f"{what} is a {type(record).__name__}, not a record Flower carries")
    walk.spend(len(record), what)
    size = 0
    # Labels are formatted only for an error (this loop runs once per entry).
    for key, value in record.items():
        try:
            entry = walk.string_field(key, "key")
            inner = (_array_size(value, "array", walk) if allowed is None
                     else _value_size(value, allowed, "value", walk))
        except UpdateRejected as exc:
            raise UpdateRejected(f"{what}[{_short(key)}]: {exc}") from None
        entry += _framed(inner)  # the value message is always written
        size += _framed(entry)
    return size


def message_bytes(msg: Message, *, limits: WireLimits | None = WIRE_LIMITS) -> int:
    """Bytes of ``msg`` as Flower serializes it: ``message_to_proto(msg).ByteSize()``.

    Metadata, every record (arrays, metrics, config), the error if any and the
    protobuf framing. A message the ServerApp has not pushed yet has no id:
    it is counted with the 64-character id Flower gives it on push, so the
    count is the same before and after ``Grid.push_messages``.

    The size is computed from the protobuf wire format, field by field, and
    never builds the protobuf: array data and bytes values are measured with
    ``len()``, never copied, and every count is checked against ``limits``
    before a container is walked. Whatever a reply holds, counting costs
    O(``limits.max_entries``) time and no memory sized by the reply.
    ``limits=None`` counts without bounds: for the server's own messages (a
    model of many tensors, a secure-aggregation stage naming the cohort).

    Raises
    ------
    UpdateRejected
        One line, if ``msg`` holds something Flower's wire types cannot carry
        (a shape dimension outside int32, an int outside int64/uint64, text
        that is not UTF-8, a value of another type), or more than ``limits``.

    Notes
    -----
    In a deployment Flower 1.41 does not send this one protobuf: it pushes the
    message without content plus its content as content-addressed objects
    (``push_objects``), so objects shared by several messages travel from the
    ServerApp to the SuperLink once, and each SuperNode pulls its message's
    objects. The serialized length is what one node's message costs on its
    link, within the few dozen bytes of object framing (docs/benchmarks.md).
    An Array's metadata travels as JSON in those objects, so a reply can hold
    values (a shape dimension of 2**40) that ``message_to_proto`` refuses
    with ``ValueError``: here they are an :class:`UpdateRejected`.
    """
    if limits is None:
        limits = _UNBOUNDED
    walk = _Walk(limits)
    size = _framed(_metadata_size(msg.metadata, walk))
    if msg.has_content():
        content = msg.content
        if not isinstance(content, RecordDict):
            raise UpdateRejected(f"content is a {type(content).__name__}, not a RecordDict")
        if len(content) > limits.max_records:
            raise UpdateRejected(f"message has {len(content)} records, at most "
                                 f"{limits.max_records} counted")
        items = 0
        for name, record in content.items():
            label = f"record {_short(name)}"
            inner = _record_size(record, label, walk)
            items += _framed(walk.string_field(name, "record name") + _framed(inner))
        size += _framed(items)
    if msg.has_error():
        size += _framed(_error_size(msg.error, walk))
    return size


def _short(value: object) -> str:
    """A sender-chosen value, cut for log lines and error messages (never repr'd whole)."""
    if isinstance(value, str | bytes) and len(value) > 60:
        return repr(value[:60]) + f"... ({len(value)} long)"
    if isinstance(value, list | tuple) and len(value) > 8:
        return f"a {type(value).__name__} of {len(value)} items"
    if not isinstance(value, str | bytes | int | float | list | tuple | type(None)):
        return f"a {type(value).__name__}"
    text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


def _npy_array(name: str, data: object, shape: tuple[int, ...],
               declared_dtype: object) -> NDArray[np.float32]:
    """Parse one npy blob whose shape must be ``shape`` (the model's tensor).

    Every size comes from ``shape``, never from the sender: the blob may be at
    most ``MAX_NPY_HEADER`` bytes plus the tensor at float64 before any of it
    is parsed, the header is parsed with that bound, its dtype must be one of
    :data:`ALLOWED_DTYPES` (no structured, object or zero-itemsize dtype), its
    shape must equal ``shape`` (compared, never multiplied), and the data must
    hold exactly the tensor's bytes. The array is a view of ``data`` until it
    is converted to float32, so the only allocation is one tensor.
    """
    from numpy.lib import format as npy

    label = f"array {_short(name)}"
    if not isinstance(data, bytes):
        raise UpdateRejected(f"{label}: data is {type(data).__name__}, expected bytes")
    count = math.prod(shape)  # the model's tensor: small, exact
    limit = MAX_NPY_HEADER + 16 + 8 * count
    if len(data) > limit:
        raise UpdateRejected(f"{label}: {len(data)} bytes, more than the {limit} a tensor of "
                             f"shape {shape} takes in float64 with its npy header")
    # The header length field, read before numpy copies that many bytes.
    if len(data) >= 12 and data[:6] == b"\x93NUMPY" and data[6] in (1, 2):
        size = int.from_bytes(data[8:10] if data[6] == 1 else data[8:12], "little")
        if size > MAX_NPY_HEADER:
            raise UpdateRejected(f"{label}: npy header of {size} bytes, at most "
                                 f"{MAX_NPY_HEADER} allowed")
        # Only a dict literal of printable ASCII goes to numpy's parser: anything
        # else would take its slow path (re-tokenizing the text as a Python 2 header).
        start = 10 if data[6] == 1 else 12
        text = data[start:start + size]
        if not text.startswith(b"{") or not _NPY_HEADER_BYTES.issuperset(text):
            raise UpdateRejected(f"{label}: malformed npy header (not a printable-ASCII dict "
                                 "literal)")
    stream = io.BytesIO(data)
    try:
        version = npy.read_magic(stream)
        if version == (1, 0):
            header = npy.read_array_header_1_0(stream, max_header_size=MAX_NPY_HEADER)
        elif version == (2, 0):
            header = npy.read_array_header_2_0(stream, max_header_size=MAX_NPY_HEADER)
        else:
            raise ValueError(f"npy version {version} is not 1.0 or 2.0")
    except Exception as exc:  # numpy raises several types for a malformed header
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise UpdateRejected(f"{label}: malformed npy header ({reason})") from None
    got_shape, fortran, dtype = header
    descr = dtype.str if isinstance(dtype, np.dtype) else repr(dtype)[:40]
    if (not isinstance(dtype, np.dtype) or dtype.fields is not None
            or dtype.subdtype is not None or descr not in ALLOWED_DTYPES):
        raise UpdateRejected(f"{label}: dtype {descr!r} is not one of {sorted(ALLOWED_DTYPES)}")
    if not isinstance(declared_dtype, str) or declared_dtype != ALLOWED_DTYPES[descr]:
        raise UpdateRejected(f"{label}: declares dtype {_short(declared_dtype)} but its npy "
                             f"header says {ALLOWED_DTYPES[descr]}")
    if not isinstance(got_shape, tuple) or got_shape != shape:
        raise UpdateRejected(f"{label}: npy shape {_short(got_shape)}, expected {shape}")
    offset = stream.tell()
    if len(data) - offset != count * dtype.itemsize:
        raise UpdateRejected(f"{label}: {len(data) - offset} data bytes, expected "
                             f"{count * dtype.itemsize} ({count} x {descr})")
    values = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    shaped = values.reshape(shape, order="F") if fortran else values.reshape(shape)
    with np.errstate(over="ignore", invalid="ignore"):  # out-of-range float64 -> inf, refused
        return np.asarray(shaped, dtype=np.float32)


def _declared_shape(value: object) -> tuple[int, ...] | None:
    """``Array.shape`` as a tuple of int32 dims (Flower's wire type), or None.

    The length is checked before any dimension is read.
    """
    if not isinstance(value, list | tuple) or len(value) > 64:
        return None
    if not all(type(d) is int and _INT32_MIN <= d <= _INT32_MAX for d in value):
        return None  # no bools, floats, int subclasses or dims Flower's int32 cannot carry
    return tuple(value)


def unflatten(arrays: Weights, reference: Sequence[NDArray[np.float32]]) -> Weights:
    """Split a ``flat`` payload's one vector into the model's shapes; else return ``arrays``.

    A payload encoded with the ``flat`` stage decodes to one 1-D vector of
    exactly the model's element count (the update's tensors concatenated in
    model order); anything else is returned unchanged for the shape checks.
    The split makes views of the vector: no allocation is sized by the sender.
    """
    if len(arrays) != 1 or (len(reference) == 1 and arrays[0].shape == reference[0].shape):
        return arrays
    vector = arrays[0]
    sizes = [int(g.size) for g in reference]
    if vector.ndim != 1 or vector.size != sum(sizes):
        return arrays
    bounds = np.cumsum([0, *sizes])
    return [vector[int(a):int(b)].reshape(g.shape)
            for a, b, g in zip(bounds[:-1], bounds[1:], reference, strict=True)]


def decode_weights(record: ArrayRecord, reference: Sequence[NDArray[np.float32]]) -> Weights:
    """The float32 arrays of a reply's ArrayRecord, plain or a compressed payload.

    Bounds come from ``reference`` (the model): tensor count, every shape, the
    total element count, the bytes of each blob; nothing is allocated from a
    size the sender claims.

    Raises
    ------
    UpdateRejected
        Naming the array and the bound. (A compressed payload is decoded by
        :func:`flowerpress.compression.decode`, whose contract is to raise
        ``PayloadError`` and nothing else for bad bytes.)
    """
    if not isinstance(record, ArrayRecord):
        raise UpdateRejected(f"{ARRAYS!r} is a {type(record).__name__}, expected an ArrayRecord")
    if is_payload(record):
        from flowerpress.compression import PayloadError, decode

        envelope = record[PAYLOAD_KEY]
        if _declared_shape(getattr(envelope, "shape", None)) is None:
            raise UpdateRejected(f"payload declares shape {_short(envelope.shape)}, not a "
                                 "tuple of int32 dimensions")
        payload = payload_bytes(record)
        if not isinstance(payload, bytes):
            raise UpdateRejected(f"payload is {type(payload).__name__}, expected bytes")
        total = sum(int(g.size) for g in reference)
        try:
            arrays = decode(payload, max_elements=total, max_tensors=len(reference))
        except PayloadError as exc:
            raise UpdateRejected(f"payload could not be decoded: {str(exc)[:300]}") from None
        return unflatten([np.asarray(a, dtype=np.float32) for a in arrays], reference)
    if len(record) != len(reference):
        raise UpdateRejected(f"reply has {len(record)} arrays, expected {len(reference)}")
    out: Weights = []
    for (name, arr), ref in zip(record.items(), reference, strict=True):
        label = f"array {_short(name)}"
        declared = _declared_shape(getattr(arr, "shape", None))
        if declared != ref.shape:
            raise UpdateRejected(f"{label} declares shape "
                                 f"{_short(getattr(arr, 'shape', None))}, expected {ref.shape}")
        stype = getattr(arr, "stype", None)
        if not isinstance(stype, str) or stype != "numpy.ndarray":
            raise UpdateRejected(f"{label} has stype {_short(stype)}, expected numpy.ndarray")
        out.append(_npy_array(str(name), getattr(arr, "data", None), ref.shape,
                              getattr(arr, "dtype", None)))
    return out


def check_float32_model(received: Sequence[NDArray[np.float32]],
                        delta: Sequence[NDArray[np.float32]], what: str = "update") -> None:
    """Raise UpdateRejected unless ``received + delta`` is a finite float32 model.

    The sum is formed in float32, where IEEE rounding turns exactly the sums
    beyond the float32 range into inf; a chunk at a time, in one reused
    buffer (memory bounded by ``_CHUNK`` elements). A delta that passes keeps
    every convex combination of such deltas (FedAvg's mean) in range too.
    """
    buffer = np.empty(min(_CHUNK, max((int(d.size) for d in delta), default=0)), np.float32)
    for i, (g, d) in enumerate(zip(received, delta, strict=True)):
        flat_g, flat_d = g.reshape(-1), d.reshape(-1)
        for lo in range(0, flat_d.size, _CHUNK):
            out = buffer[:min(_CHUNK, flat_d.size - lo)]
            with np.errstate(over="ignore", invalid="ignore"):
                np.add(flat_g[lo:lo + _CHUNK], flat_d[lo:lo + _CHUNK], out=out)
            if not np.isfinite(out).all():
                raise UpdateRejected(f"{what} tensor {i}: received + delta leaves the "
                                     f"float32 range (|x| <= {FLOAT32_MAX:.4g})")


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


def _check_structure(content: RecordDict) -> None:
    """Bound every count of a train or evaluate reply before anything is read or counted.

    At most :data:`MAX_RECORDS` records; every record but ``"arrays"`` (whose
    tensor count is the model's, checked by :func:`decode_weights`) holds at
    most :data:`MAX_METRICS` entries, and a list value at most as many
    elements, :data:`MAX_REPLY_VALUES` in all. So :func:`message_bytes` of a
    validated reply, with :func:`reply_limits`, never refuses it.
    """
    if not isinstance(content, RecordDict):
        raise UpdateRejected(f"content is a {type(content).__name__}, not a RecordDict")
    if len(content) > MAX_RECORDS:
        raise UpdateRejected(f"reply has {len(content)} records, at most {MAX_RECORDS} allowed")
    values = 0
    for name, record in content.items():
        if name == ARRAYS or not isinstance(record, MetricRecord | ConfigRecord | ArrayRecord):
            continue  # checked where it is read (a record of another type: refused there)
        if len(record) > MAX_METRICS:
            raise UpdateRejected(f"record {_short(name)} has {len(record)} entries, at most "
                                 f"{MAX_METRICS} allowed")
        values += len(record)
        for key, value in record.items():
            if isinstance(value, list):
                if len(value) > MAX_METRICS:
                    raise UpdateRejected(f"record {_short(name)}[{_short(key)}] is a list of "
                                         f"{len(value)} values, at most {MAX_METRICS} allowed")
                values += len(value)
            elif isinstance(value, Array) and isinstance(value.shape, tuple | list):
                values += len(value.shape)
        if values > MAX_REPLY_VALUES:
            raise UpdateRejected(f"reply holds more than {MAX_REPLY_VALUES} values besides "
                                 f"its {ARRAYS!r}")


def validate_metrics(record: object, *, required: Sequence[str] = ()
                     ) -> dict[str, float]:
    """A reply's metrics as finite floats within their documented ranges.

    The count (at most :data:`MAX_METRICS`) is checked before any metric is read.
    """
    if record is None:
        if required:
            raise UpdateRejected(f"reply has no MetricRecord {METRICS!r}")
        return {}
    if not isinstance(record, MetricRecord):
        raise UpdateRejected(f"{METRICS!r} is a {type(record).__name__}, expected a MetricRecord")
    if len(record) > MAX_METRICS:
        raise UpdateRejected(f"reply has {len(record)} metrics, at most {MAX_METRICS} allowed")
    out: dict[str, float] = {}
    for key, value in record.items():
        if not isinstance(key, str) or len(key) > MAX_METRIC_NAME:
            raise UpdateRejected(f"metric name {_short(key)} is not a string of at most "
                                 f"{MAX_METRIC_NAME} characters")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise UpdateRejected(f"metric {_short(key)} is a {type(value).__name__}, "
                                 "not a number")
        try:
            number = float(value)
        except OverflowError:  # an int beyond float range
            raise UpdateRejected(f"metric {_short(key)} is an int beyond the float "
                                 "range") from None
        if not math.isfinite(number):
            raise UpdateRejected(f"metric {_short(key)}={number!r} is not finite")
        lo, hi = METRIC_RANGES.get(key, (-math.inf, math.inf))
        if not lo <= number <= hi:
            raise UpdateRejected(f"metric {_short(key)}={number!r} is outside [{lo:g}, {hi:g}]")
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
    """A train reply after every check: safe to aggregate.

    ``compute`` is what the device says its training cost, within
    :class:`ComputeBounds` (None when it reported none: under DP, secure
    aggregation, or from a ClientApp without flowerpress's mods).
    """

    delta: Weights
    weight: float
    metrics: Mapping[str, float]
    compute: DeviceCompute | None = None


#: The only metrics a reply under differential privacy may carry.
DP_REPLY_METRICS = frozenset({NUM_EXAMPLES, DP_NOISED, CLIP_INDICATOR})


def _check_dp_contract(metrics: Mapping[str, float]) -> None:
    """A DP reply went through dp_mod: num-examples 1, the marker, nothing data-derived."""
    if metrics.get(DP_NOISED) != 1.0:
        raise UpdateRejected(f"reply lacks {DP_NOISED}=1: it did not go through dp_mod")
    if metrics.get(NUM_EXAMPLES) != 1.0:
        raise UpdateRejected(f"{NUM_EXAMPLES}={metrics.get(NUM_EXAMPLES)} under DP; expected 1")
    extra = sorted(set(metrics) - DP_REPLY_METRICS)
    if extra:
        raise UpdateRejected(f"metrics {extra} are not allowed under DP (only "
                             f"{sorted(DP_REPLY_METRICS)})")


def validate_train_reply(reply: Message, received: Sequence[NDArray[np.float32]], *,
                         max_weight: float = DEFAULT_MAX_WEIGHT,
                         dp: bool = False,
                         compute: ComputeBounds | None = None) -> ValidatedReply:
    """Check every field of a train reply; return the delta against ``received``.

    Parameters
    ----------
    reply
        The device's reply (not an error reply).
    received
        The global weights exactly as the devices decoded them this round.
    max_weight
        Cap on ``num-examples``.
    dp
        The run is differentially private: the reply must follow dp_mod's
        contract (``num-examples`` 1, the ``dp-noised`` marker, no other metric
        than the noised clip indicator) and report no compute (the time and
        FLOPs of training grow with the examples DP hides).
    compute
        Bounds on the compute the reply reports (:func:`compute_bounds`, from
        the model and the run); ``None``: the loose :class:`ComputeBounds`
        defaults.

    Raises
    ------
    UpdateRejected
        Naming the field and the bound that failed.
    """
    content = reply.content
    _check_structure(content)
    metrics = validate_metrics(content.get(METRICS), required=(NUM_EXAMPLES,))
    weight = validate_weight(metrics, max_weight=max_weight)
    if dp:
        _check_dp_contract(metrics)
    spent = compute_of_reply(reply, compute or ComputeBounds())
    if dp and spent is not None:
        raise UpdateRejected("the reply reports its compute under DP (the training time "
                             "and FLOPs reveal the example count DP hides)")
    record = content.get(ARRAYS)
    if not isinstance(record, ArrayRecord):
        raise UpdateRejected(f"reply has no ArrayRecord {ARRAYS!r}" if record is None else
                             f"{ARRAYS!r} is a {type(record).__name__}, expected an ArrayRecord")
    values = decode_weights(record, received)
    _check_shapes(values, received, "update")
    _check_finite(values, "update")
    if is_payload(record):
        delta = values  # the compression mod encodes the delta itself
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            delta = [np.subtract(v, g, dtype=np.float32)
                     for v, g in zip(values, received, strict=True)]
        del values
        _check_finite(delta, "delta")  # float32-max weights overflow after subtraction
    check_float32_model(received, delta)
    return ValidatedReply(delta, weight, {k: v for k, v in metrics.items() if k != NUM_EXAMPLES},
                          spent)


def validate_eval_reply(reply: Message, *, max_weight: float = DEFAULT_MAX_WEIGHT
                        ) -> tuple[float, dict[str, float]]:
    """``(num_examples, metrics)`` of an evaluate reply, validated."""
    _check_structure(reply.content)
    metrics = validate_metrics(reply.content.get(METRICS),
                               required=(NUM_EXAMPLES, EVAL_LOSS))
    weight = validate_weight(metrics, max_weight=max_weight)
    return weight, {k: v for k, v in metrics.items() if k != NUM_EXAMPLES}


def partition_of_reply(reply: Message) -> int | None:
    """The partition id a query reply reports, or None."""
    info = _config_record(reply.content, INFO)
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
# round it last received a full model, or 0 when its chain starts from the
# run's initial model (the anchor ``"0.0"``, :data:`ANCHOR_VERSION`), which a
# device that knows its task builds itself: its first download is then a
# difference with base "0.0". A device says it can build the anchor in its
# answer to the server's hello query: ``"info": {..., "download-anchor": HEX}``,
# the digest of the initial model it builds; the server uses the anchor only
# for a device whose digest equals its own. The train reply carries
# ``"download"`` back with one packed bytes value (issue 14: 51 bytes of message
# instead of 124 as two named strings and a named float):
#
#     "download": {"h": ">II16s" anchor, round, digest   the version held (24 bytes)
#                       [+ ">fff" compute]}               outside DP (36 bytes)
#     "download": {"h": ">fff" compute}                   a device holding no model
#
# where compute is the device's wall-clock seconds of local training, its CPU
# seconds and the FLOPs of the training it did (NaN: not counted), float32 each
# (:class:`DeviceCompute`; bounded by :class:`ComputeBounds` in
# :func:`validate_train_reply`). Devices send no compute under DP or in a
# secure-aggregation stage.
#
# The digest is the whole BLAKE2b-128 of :func:`weights_digest`, raw instead
# of hex, not truncated (see :func:`held_version_of_reply`). The server
# verifies every claim against its own record; nothing it allocates is sized by
# a claim.

DOWNLOAD = "download"
DOWNLOAD_VERSION = "download-version"
DOWNLOAD_DIGEST = "download-digest"
DOWNLOAD_BASE = "download-base"
DOWNLOAD_HELD = "download-held"
#: Key of the hello reply's ``info`` record: digest of the initial model the device builds.
DOWNLOAD_ANCHOR = "download-anchor"
#: The version id of the run's initial model (the anchor of a device's first difference).
ANCHOR_VERSION = (0, 0)
#: Key of the reply's packed claim (and training time) in its ``download`` record.
DOWNLOAD_CLAIM = "h"
_CLAIM = struct.Struct(">II16s")
_COMPUTE = struct.Struct(">fff")
#: Largest anchor or round a claim may name (the nine digits of a version id).
_MAX_VERSION_PART = 999_999_999
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


@dataclass(frozen=True)
class DeviceCompute:
    """What one device's local training cost it, as its train reply reports it (issue 23).

    Reporting only: the server sums it into the round's compute columns and
    the link-time estimate; nothing is aggregated or weighted by it.

    Attributes
    ----------
    seconds : float
        Wall-clock seconds of the ClientApp's training (the link-time estimate).
    cpu_seconds : float
        CPU seconds the device's process spent meanwhile (``time.process_time``).
    flops : float or None
        Floating-point operations of the training actually done, counted with
        PyTorch's FLOP counter or declared by the task; None: not counted.
    """

    seconds: float
    cpu_seconds: float
    flops: float | None = None


#: Wall seconds of training a device may report: this many round timeouts (plus a minute).
SECONDS_FACTOR = 2.0
#: CPU seconds per wall second a device may report (its cores: threads of training).
CPU_SECONDS_FACTOR = 256.0
#: FLOPs a device may report: this many times the task's own count for
#: ``max-client-weight`` examples (augmentation, extra steps, a miscounting task).
FLOPS_FACTOR = 16.0
#: Without the task's count: FLOPs per parameter per example and epoch (6 for a
#: dense layer's forward and backward, times a weight's reuse across up to 2**20
#: positions of a convolution) and the local epochs allowed.
_FLOPS_PER_PARAMETER = 6.0 * (1 << 20)
_MAX_EPOCHS = 1000.0


@dataclass(frozen=True)
class ComputeBounds:
    """What a train reply may report as its compute (:func:`compute_bounds`).

    The defaults are loose: finite and non-negative, at most 1e6 seconds and
    the float32 range of FLOPs.
    """

    max_seconds: float = 1e6
    max_cpu_seconds: float = 1e6
    max_flops: float = FLOAT32_MAX


def compute_bounds(reference: Sequence[NDArray[np.float32]], *, round_timeout: float,
                   max_examples: float, train_flops: float | None = None) -> ComputeBounds:
    """Bounds on a train reply's compute, from the model and the run, never from the reply.

    Parameters
    ----------
    reference
        The model (its parameter count bounds the FLOPs when the task gives none).
    round_timeout
        Seconds a round waits: a reply that arrives trained for at most that
        long; allowed :data:`SECONDS_FACTOR` times it plus a minute, and
        :data:`CPU_SECONDS_FACTOR` CPU seconds per wall second.
    max_examples
        The largest plausible partition (``max-client-weight``).
    train_flops
        The task's FLOPs of one round of local training on ``max_examples``
        examples (:meth:`flowerpress.tasks.Task.train_flops`); allowed
        :data:`FLOPS_FACTOR` times it. None: ``6 * 2**20`` FLOPs per parameter,
        example and epoch, for up to 1,000 epochs (a bound against garbage, not
        a measurement).
    """
    seconds = SECONDS_FACTOR * max(float(round_timeout), 0.0) + 60.0
    if train_flops is not None and math.isfinite(train_flops) and train_flops > 0:
        flops = FLOPS_FACTOR * float(train_flops)
    else:
        parameters = sum(int(g.size) for g in reference)
        flops = _FLOPS_PER_PARAMETER * parameters * max(float(max_examples), 1.0) * _MAX_EPOCHS
    return ComputeBounds(max_seconds=seconds, max_cpu_seconds=seconds * CPU_SECONDS_FACTOR,
                         max_flops=min(flops, FLOAT32_MAX))


def pack_claim(version: tuple[int, int] | None, digest: str | None,
               compute: DeviceCompute | None) -> bytes | None:
    """The reply's packed ``download`` value: the held version, its digest, the compute.

    ``version`` and ``digest`` (a 32-hex :func:`weights_digest`) go together or
    not at all; ``compute`` is packed as three float32 (left out unless its
    seconds are finite and within 0 to 1e6 s; FLOPs that are not a finite
    float32 count travel as NaN, "not counted"). None when there is nothing to
    say.

    Raises
    ------
    ValueError
        The version or the digest is not well formed.
    """
    out = b""
    if version is not None or digest is not None:
        anchor, rnd = version if version is not None else (-1, -1)
        if digest is None or parse_digest(digest) is None or not (
                0 <= anchor <= rnd <= _MAX_VERSION_PART):
            raise ValueError(f"not a claim: version {version}, digest {digest!r}")
        out = _CLAIM.pack(anchor, rnd, bytes.fromhex(digest))
    if compute is not None:
        wall, cpu = _seconds(compute.seconds), _seconds(compute.cpu_seconds)
        flops = compute.flops
        if flops is None or not (math.isfinite(flops) and 0.0 <= flops <= FLOAT32_MAX):
            flops = math.nan
        if wall is not None and cpu is not None:
            out += _COMPUTE.pack(wall, cpu, flops)
    return out or None


def _claim_bytes(reply: Message) -> bytes | None:
    """The reply's packed ``download`` value if it has one of the three sizes, else None."""
    if reply.has_error() or not reply.has_content():
        return None
    record = _config_record(reply.content, DOWNLOAD)
    if record is None or len(record) != 1:
        return None
    raw = record.get(DOWNLOAD_CLAIM)
    if not isinstance(raw, bytes) or len(raw) not in (
            _COMPUTE.size, _CLAIM.size, _CLAIM.size + _COMPUTE.size):
        return None
    return raw


def held_version_of_reply(reply: Message) -> HeldVersion | None:
    """The version a train reply claims its device holds, or None (malformed or absent).

    Bounded and strict: the ``download`` record holds exactly one bytes value of
    24 or 36 bytes (:func:`pack_claim`), two integers ``0 <= anchor <= round <=
    999999999`` and a 16-byte digest; anything else is no claim (the device then
    gets a full model, or its first contact again).

    Notes
    -----
    The claim is not a credential: the server sends a difference only if the
    claim equals its own record of what it sent that node (version and digest),
    and a device that lies only gets a difference it cannot use. What the
    digest catches is an honest desynchronisation, e.g. a server resumed from an
    older checkpoint that reuses a version id for another model. It stays the
    whole 128-bit digest the download itself is checked with: 16 raw bytes cost
    16 fewer than its hex form, and truncating it would save at most 8 more.
    """
    raw = _claim_bytes(reply)
    if raw is None or len(raw) < _CLAIM.size:
        return None
    anchor, rnd, digest = _CLAIM.unpack_from(raw)
    if not 0 <= anchor <= rnd <= _MAX_VERSION_PART:
        return None
    return HeldVersion(anchor, rnd, digest.hex())


def anchor_of_reply(reply: Message) -> str | None:
    """The initial-model digest a hello reply says its device builds, or None.

    Bounded and strict: a well-formed 32-hex digest or nothing (the device then
    gets full models, as a device that does not know its task).
    """
    if reply.has_error() or not reply.has_content():
        return None
    info = _config_record(reply.content, INFO)
    return None if info is None else parse_digest(info.get(DOWNLOAD_ANCHOR))


def _seconds(raw: object) -> float | None:
    if isinstance(raw, int | float) and not isinstance(raw, bool) and math.isfinite(raw) \
            and 0.0 <= raw <= 1e6:
        return float(raw)
    return None


def compute_of_reply(reply: Message, bounds: ComputeBounds) -> DeviceCompute | None:
    """The compute a train reply reports (its ``download`` record), checked against ``bounds``.

    None when the reply reports none (no ``download`` record, a claim without
    compute, or a record that is not one of :func:`pack_claim`'s three sizes,
    which :func:`held_version_of_reply` ignores too). Called by
    :func:`validate_train_reply`.

    Raises
    ------
    UpdateRejected
        A reported value that is not finite, is negative or exceeds its bound
        (FLOPs may be NaN: not counted).
    """
    raw = _claim_bytes(reply)
    if raw is None or len(raw) == _CLAIM.size:
        return None
    wall, cpu, flops = _COMPUTE.unpack_from(raw, len(raw) - _COMPUTE.size)
    for name, value, bound in (("seconds", wall, bounds.max_seconds),
                               ("CPU seconds", cpu, bounds.max_cpu_seconds),
                               ("FLOPs", flops, bounds.max_flops)):
        if name == "FLOPs" and math.isnan(value):
            continue
        if not (math.isfinite(value) and 0.0 <= value <= bound):
            raise UpdateRejected(f"compute: {name} {value!r} outside [0, {bound:.4g}]")
    return DeviceCompute(float(wall), float(cpu), None if math.isnan(flops) else float(flops))


# --- EF21 upload estimates (the ``ef21`` codec stage) -----------------------------------
#
# With ``ef21`` in the upload spec the server keeps, per device, the estimate
# ``g`` that device's replies have built (the sum of its decoded payloads since
# a zero start) and aggregates ``g`` instead of the payload. Both sides must
# hold the same ``g``: the train message's config names the round of the
# device's last accepted reply, ``"ef21-base": R`` (0: the server holds no
# estimate), and the reply says which estimate it built on, a ConfigRecord
# ``"ef21": {"ef21-base": R or 0}``. A device holding another estimate starts
# from zero and says 0; the server rejects any other claim.

EF21 = "ef21"
EF21_BASE = "ef21-base"


def ef21_base_of_reply(reply: Message) -> int | None:
    """The estimate round a train reply says it built on (0: none), or None if absent/bad.

    Bounded and strict: one small non-negative integer; anything else is None.
    """
    if reply.has_error() or not reply.has_content():
        return None
    record = _config_record(reply.content, EF21)
    if record is None or len(record) != 1:
        return None
    value = record.get(EF21_BASE)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < (1 << 31):
        return value
    return None
