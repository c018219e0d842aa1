"""The SecAgg stages as Flower messages: keys, builders and parsers for both sides.

Every stage is a ``train`` message (``MessageType.TRAIN``) whose ``"config"``
ConfigRecord names the stage under :data:`STAGE`; a device's reply carries a
ConfigRecord :data:`RECORD`. Flower 1.41 also accepts ``train.<action>`` types,
but the action must be a Python identifier (``train.secagg_advertise``) and the
ClientApp must register a handler for each (``@app.train("secagg_advertise")``),
else it raises before any reply; plain ``train`` keeps ``secagg_mod`` a drop-in
mod for any ClientApp (a user's own included), the way Flower's own
``secaggplus_mod`` works with a stage key. Node ids travel as packed little-endian uint64
(Flower's node ids use all 64 bits; ConfigRecord integers are signed).

=============  ==========================================  ==================================
stage          server -> device (``"config"``)             device -> server (``"secagg"``)
=============  ==========================================  ==================================
advertise      round, bits, length, threshold, neighbours  c-pk, s-pk, b-commit
share-keys     the neighbours' public keys                 dst ids, one ciphertext each
mask           the train instruction, the model, the       packed masked vector, complaints
               ciphertexts addressed to the device
unmask         alive ids, dropped ids                      b owners + shares, sk owners +
                                                           shares
=============  ==========================================  ==================================

The parsers of replies (``parse_*_reply``) are the server's only readers of
what a device sent; they raise :class:`~flowerpress.secagg.core.SecAggViolation`
naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message

from flowerpress.secagg.core import PublicKeys, SecAggViolation

STAGE = "secagg-stage"
RECORD = "secagg"
ADVERTISE, SHARE_KEYS, MASK, UNMASK = "advertise", "share-keys", "mask", "unmask"
STAGES = (ADVERTISE, SHARE_KEYS, MASK, UNMASK)

# server -> device
ROUND = "secagg-round"
BITS = "secagg-bits"
LENGTH = "secagg-length"
THRESHOLD = "secagg-threshold"
NEIGHBOURS = "secagg-neighbours"
PEERS = "secagg-peers"
PEER_C = "secagg-peer-c"
PEER_S = "secagg-peer-s"
PEER_B = "secagg-peer-b"
INBOX_FROM = "secagg-inbox-from"
INBOX = "secagg-inbox"
SPEC = "secagg"  # the settings spec (clip, noise, bits, threshold)
SEED = "secagg-seed"  # the round's public seed: rotation and rand-k support
RANDK = "secagg-randk"  # rand-k fraction (0: none)
MIN_SUMMANDS = "secagg-min-summands"
ALIVE = "secagg-alive"
DROPPED = "secagg-dropped"
# device -> server
C_PK, S_PK, B_COMMIT = "c-pk", "s-pk", "b-commit"
DST, CIPHERTEXTS = "dst", "ciphertexts"
MASKED, COMPLAINTS = "masked", "complaints"
B_OWNERS, B_SHARES, SK_OWNERS, SK_SHARES = "b-owners", "b-shares", "sk-owners", "sk-shares"

MAX_IDS = 1 << 20


def pack_ids(ids: Sequence[int]) -> bytes:
    """Node ids as little-endian uint64."""
    return np.asarray(list(ids), dtype=np.uint64).astype("<u8").tobytes()


def unpack_ids(data: object, *, what: str) -> list[int]:
    """Inverse of :func:`pack_ids`; SecAggViolation if malformed."""
    if not isinstance(data, bytes) or len(data) % 8 or len(data) // 8 > MAX_IDS:
        raise SecAggViolation(f"{what}: expected packed uint64 node ids")
    return [int(v) for v in np.frombuffer(data, dtype="<u8")]


def stage_of(msg: Message) -> str | None:
    """The SecAgg stage a message asks for, or None for any other message."""
    record = msg.content.config_records.get("config")
    stage = None if record is None else record.get(STAGE)
    return stage if isinstance(stage, str) else None


def _record(reply: Message, node: int) -> ConfigRecord:
    if reply.has_error():
        raise SecAggViolation(f"node {node} replied with an error: {reply.error.reason:.200}")
    record = reply.content.config_records.get(RECORD)
    if record is None:
        raise SecAggViolation(f"node {node}: reply has no ConfigRecord {RECORD!r}")
    return record


def _bytes(record: ConfigRecord, key: str, node: int, *, size: int | None = None,
           limit: int = 1 << 31) -> bytes:
    value = record.get(key)
    if not isinstance(value, bytes) or (size is not None and len(value) != size) \
            or len(value) > limit:
        want = f"{size} bytes" if size is not None else "bytes"
        raise SecAggViolation(f"node {node}: {key!r} must be {want}")
    return value


def _bytes_list(record: ConfigRecord, key: str, node: int, count: int) -> list[bytes]:
    value = record.get(key)
    if count == 0 and value in (None, []):
        return []
    if not isinstance(value, list) or len(value) != count or \
            not all(isinstance(v, bytes) for v in value):
        raise SecAggViolation(f"node {node}: {key!r} must be {count} byte strings")
    return [v for v in value if isinstance(v, bytes)]


# --- server side: requests and reply parsers -------------------------------------------


def advertise_request(setup: Mapping[str, Any]) -> ConfigRecord:
    """Stage 1's config: the device's neighbours and the round's parameters."""
    return ConfigRecord({STAGE: ADVERTISE, ROUND: int(setup["round"]), BITS: int(setup["bits"]),
                         LENGTH: int(setup["length"]), THRESHOLD: int(setup["threshold"]),
                         NEIGHBOURS: pack_ids(setup["neighbours"])})


def parse_advertise_reply(reply: Message, node: int) -> PublicKeys:
    """The keys a device advertised."""
    r = _record(reply, node)
    return PublicKeys(_bytes(r, C_PK, node, size=32), _bytes(r, S_PK, node, size=32),
                      _bytes(r, B_COMMIT, node, size=32))


def share_keys_request(round_id: int, roster: Mapping[int, PublicKeys]) -> ConfigRecord:
    """Stage 2's config: the neighbours' public keys."""
    peers = sorted(roster)
    return ConfigRecord({STAGE: SHARE_KEYS, ROUND: round_id, PEERS: pack_ids(peers),
                         PEER_C: [roster[p].c_pk for p in peers],
                         PEER_S: [roster[p].s_pk for p in peers],
                         PEER_B: [roster[p].b_commit for p in peers]})


def parse_share_keys_reply(reply: Message, node: int, *, max_peers: int) -> dict[int, bytes]:
    """The ciphertexts a device addressed to its neighbours."""
    r = _record(reply, node)
    dst = unpack_ids(r.get(DST), what=f"node {node}: {DST!r}")
    if len(dst) > max_peers or len(set(dst)) != len(dst):
        raise SecAggViolation(f"node {node}: {DST!r} repeats ids or names too many")
    cts = _bytes_list(r, CIPHERTEXTS, node, len(dst))
    return dict(zip(dst, cts, strict=True))


def mask_config(round_id: int, inbox: Mapping[int, bytes]) -> dict[str, Any]:
    """Stage 3's extra config entries (the rest is the train instruction)."""
    senders = sorted(inbox)
    return {STAGE: MASK, ROUND: round_id, INBOX_FROM: pack_ids(senders),
            INBOX: [inbox[s] for s in senders]}


def parse_mask_reply(reply: Message, node: int, *, packed_bytes: int
                     ) -> tuple[bytes, list[int]]:
    """The packed masked vector (exactly ``packed_bytes``) and the complaints."""
    r = _record(reply, node)
    masked = _bytes(r, MASKED, node, size=packed_bytes)
    complaints = unpack_ids(r.get(COMPLAINTS, b""), what=f"node {node}: {COMPLAINTS!r}")
    return masked, complaints


def unmask_request(round_id: int, alive: Sequence[int], dropped: Sequence[int]
                   ) -> ConfigRecord:
    """Stage 4's config."""
    return ConfigRecord({STAGE: UNMASK, ROUND: round_id, ALIVE: pack_ids(alive),
                         DROPPED: pack_ids(dropped)})


def parse_unmask_reply(reply: Message, node: int
                       ) -> tuple[dict[int, bytes], dict[int, bytes]]:
    """Revealed shares: ``(b shares by owner, s_sk shares by owner)``."""
    r = _record(reply, node)
    b_owners = unpack_ids(r.get(B_OWNERS, b""), what=f"node {node}: {B_OWNERS!r}")
    sk_owners = unpack_ids(r.get(SK_OWNERS, b""), what=f"node {node}: {SK_OWNERS!r}")
    if len(set(b_owners)) != len(b_owners) or len(set(sk_owners)) != len(sk_owners):
        raise SecAggViolation(f"node {node}: revealed shares repeat an owner")
    b = dict(zip(b_owners, _bytes_list(r, B_SHARES, node, len(b_owners)), strict=True))
    sk = dict(zip(sk_owners, _bytes_list(r, SK_SHARES, node, len(sk_owners)), strict=True))
    return b, sk
