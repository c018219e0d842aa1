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
advertise      round, bits, length, threshold, neighbours  c-pk, s-pk (one key per
                                                           neighbour), b-commit
share-keys     the neighbours' pair keys                   dst ids, one entry each
                                                           (ciphertext + commitments; its
                                                           own: commitments + check)
mask           the train instruction, the model, the       packed masked vector, complaints,
               entries addressed to the device             evidence (one pair key each)
unmask         alive ids, dropped ids                      b owners + shares, sk owners +
                                                           (share + pair mask key)
=============  ==========================================  ==================================

A reply carries the ConfigRecord :data:`RECORD` with the stage's own keys
(:data:`REPLY_KEYS`) and nothing else: no other record, no metric, no array.
A field beyond the protocol's (the device's training time correlated 0.85 with
its number of examples, the value the mode hides) is refused, not ignored.

The parsers of replies (``parse_*_reply``) are the server's only readers of
what a device sent; they raise :class:`~flowerpress.secagg.core.SecAggViolation`
naming the field (:class:`~flowerpress.secagg.core.SecAggRefused` for an error
reply). :func:`receive_reply` parses a reply into a
:class:`~flowerpress.secagg.core.ServerSession` and names the device in its
``culprits`` when the reply breaks the protocol.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message

from flowerpress.secagg import encoding
from flowerpress.secagg.core import (
    PublicKeys,
    SecAggRefused,
    SecAggViolation,
    ServerSession,
)

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
MASKED, COMPLAINTS, EVIDENCE = "masked", "complaints", "evidence"
B_OWNERS, B_SHARES, SK_OWNERS, SK_SHARES = "b-owners", "b-shares", "sk-owners", "sk-shares"
#: The keys each stage's reply may carry (in :data:`RECORD`); nothing else is accepted.
REPLY_KEYS: dict[str, frozenset[str]] = {
    ADVERTISE: frozenset({C_PK, S_PK, B_COMMIT}),
    SHARE_KEYS: frozenset({DST, CIPHERTEXTS}),
    MASK: frozenset({MASKED, COMPLAINTS, EVIDENCE}),
    UNMASK: frozenset({B_OWNERS, B_SHARES, SK_OWNERS, SK_SHARES}),
}

MAX_IDS = 1 << 20


def pack_ids(ids: Sequence[int]) -> bytes:
    """Node ids as little-endian uint64."""
    return np.asarray(list(ids), dtype=np.uint64).astype("<u8").tobytes()


def unpack_ids(data: object, *, what: str, limit: int = MAX_IDS) -> list[int]:
    """Inverse of :func:`pack_ids`; SecAggViolation if malformed or more than ``limit`` ids
    (checked before any is unpacked: each becomes a Python int)."""
    if not isinstance(data, bytes) or len(data) % 8 or len(data) // 8 > limit:
        raise SecAggViolation(f"{what}: expected at most {limit} packed uint64 node ids")
    return [int(v) for v in np.frombuffer(data, dtype="<u8")]


def stage_of(msg: Message) -> str | None:
    """The SecAgg stage a message asks for, or None for any other message."""
    record = msg.content.config_records.get("config")
    stage = None if record is None else record.get(STAGE)
    return stage if isinstance(stage, str) else None


def _record(reply: Message, node: int, stage: str) -> ConfigRecord:
    """The reply's ConfigRecord, if the reply carries that record with the stage's keys only."""
    if reply.has_error():
        raise SecAggRefused(f"node {node} replied with an error: "
                            f"{reply.error.reason or '':.200}")
    content = reply.content
    record = content.get(RECORD)
    # Counts first (O(1)): a reply's records and keys are only listed once they are few.
    if len(content) != 1 or not isinstance(record, ConfigRecord):
        extra = sorted(str(k)[:40] for k in itertools.islice(content, 8) if k != RECORD)
        raise SecAggViolation(f"node {node}: a {stage} reply carries exactly the ConfigRecord "
                              f"{RECORD!r}, not {extra[:5] or 'nothing'}"
                              f"{' (and more)' if len(content) > 8 else ''}")
    if len(record) > len(REPLY_KEYS[stage]) + 16:  # many: not listed, only counted
        raise SecAggViolation(f"node {node}: a {stage} reply has {len(record)} keys, which are "
                              f"not part of a {stage} reply beyond its {len(REPLY_KEYS[stage])}")
    extra_keys = sorted(set(record) - REPLY_KEYS[stage])
    if extra_keys:
        raise SecAggViolation(f"node {node}: keys {extra_keys[:5]} are not part of a {stage} "
                              "reply")
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
    if count == 0 and (value is None or (isinstance(value, list) and not value)):
        return []
    if not isinstance(value, list) or len(value) != count or \
            not all(isinstance(v, bytes) for v in value):
        raise SecAggViolation(f"node {node}: {key!r} must be {count} byte strings")
    return [v for v in value if isinstance(v, bytes)]


# --- device side: reply records (secagg_mod sends these and nothing else) --------------


def advertise_reply(keys: PublicKeys) -> ConfigRecord:
    """Stage 1's reply."""
    return ConfigRecord({C_PK: keys.c_pk, S_PK: keys.s_pk, B_COMMIT: keys.b_commit})


def share_keys_reply(entries: Mapping[int, bytes]) -> ConfigRecord:
    """Stage 2's reply: one entry per neighbour and one for the device itself."""
    dst = sorted(entries)
    return ConfigRecord({DST: pack_ids(dst), CIPHERTEXTS: [entries[d] for d in dst]})


def mask_reply(packed: bytes, complaints: Mapping[int, bytes]) -> ConfigRecord:
    """Stage 3's reply: the packed masked vector, the complaints and their evidence."""
    accused = sorted(complaints)
    return ConfigRecord({MASKED: packed, COMPLAINTS: pack_ids(accused),
                         EVIDENCE: [complaints[a] for a in accused]})


def unmask_reply(b: Mapping[int, bytes], sk: Mapping[int, bytes]) -> ConfigRecord:
    """Stage 4's reply."""
    return ConfigRecord({B_OWNERS: pack_ids(sorted(b)), B_SHARES: [b[k] for k in sorted(b)],
                         SK_OWNERS: pack_ids(sorted(sk)),
                         SK_SHARES: [sk[k] for k in sorted(sk)]})


# --- server side: requests and reply parsers -------------------------------------------


def advertise_request(setup: Mapping[str, Any]) -> ConfigRecord:
    """Stage 1's config: the device's neighbours and the round's parameters."""
    return ConfigRecord({STAGE: ADVERTISE, ROUND: int(setup["round"]), BITS: int(setup["bits"]),
                         LENGTH: int(setup["length"]), THRESHOLD: int(setup["threshold"]),
                         NEIGHBOURS: pack_ids(setup["neighbours"])})


def parse_advertise_reply(reply: Message, node: int) -> PublicKeys:
    """The keys a device advertised (their count is checked by the session)."""
    r = _record(reply, node, ADVERTISE)
    c_pk = _bytes(r, C_PK, node, limit=32 * MAX_IDS)
    s_pk = _bytes(r, S_PK, node, limit=32 * MAX_IDS)
    if len(c_pk) % 32 or len(s_pk) % 32:
        raise SecAggViolation(f"node {node}: {C_PK!r} and {S_PK!r} must be 32-byte keys")
    return PublicKeys(c_pk, s_pk, _bytes(r, B_COMMIT, node, size=32))


def share_keys_request(round_id: int, roster: Mapping[int, PublicKeys]) -> ConfigRecord:
    """Stage 2's config: the neighbours' public keys."""
    peers = sorted(roster)
    return ConfigRecord({STAGE: SHARE_KEYS, ROUND: round_id, PEERS: pack_ids(peers),
                         PEER_C: [roster[p].c_pk for p in peers],
                         PEER_S: [roster[p].s_pk for p in peers],
                         PEER_B: [roster[p].b_commit for p in peers]})


def parse_share_keys_reply(reply: Message, node: int, *, max_peers: int) -> dict[int, bytes]:
    """The entries a device addressed to its neighbours and itself."""
    r = _record(reply, node, SHARE_KEYS)
    dst = unpack_ids(r.get(DST), what=f"node {node}: {DST!r}", limit=max_peers)
    if len(dst) > max_peers or len(set(dst)) != len(dst):
        raise SecAggViolation(f"node {node}: {DST!r} repeats ids or names too many")
    cts = _bytes_list(r, CIPHERTEXTS, node, len(dst))
    return dict(zip(dst, cts, strict=True))


def mask_config(round_id: int, inbox: Mapping[int, bytes]) -> dict[str, Any]:
    """Stage 3's extra config entries (the rest is the train instruction)."""
    senders = sorted(inbox)
    return {STAGE: MASK, ROUND: round_id, INBOX_FROM: pack_ids(senders),
            INBOX: [inbox[s] for s in senders]}


def parse_mask_reply(reply: Message, node: int, *, packed_bytes: int,
                     max_peers: int = MAX_IDS) -> tuple[bytes, dict[int, bytes]]:
    """The packed masked vector (exactly ``packed_bytes``) and the complaints with their
    evidence (accused id -> the complainer's 32-byte pair key), at most ``max_peers``
    (pass the cohort size, so that memory is never sized by the reply)."""
    r = _record(reply, node, MASK)
    masked = _bytes(r, MASKED, node, size=packed_bytes)
    complaints = unpack_ids(r.get(COMPLAINTS, b""), what=f"node {node}: {COMPLAINTS!r}",
                            limit=max_peers)
    if len(set(complaints)) != len(complaints):
        raise SecAggViolation(f"node {node}: {COMPLAINTS!r} repeats ids")
    evidence = _bytes_list(r, EVIDENCE, node, len(complaints))
    if any(len(e) != 32 for e in evidence):
        raise SecAggViolation(f"node {node}: {EVIDENCE!r} must be 32-byte keys")
    return masked, dict(zip(complaints, evidence, strict=True))


def unmask_request(round_id: int, alive: Sequence[int], dropped: Sequence[int]
                   ) -> ConfigRecord:
    """Stage 4's config."""
    return ConfigRecord({STAGE: UNMASK, ROUND: round_id, ALIVE: pack_ids(alive),
                         DROPPED: pack_ids(dropped)})


def parse_unmask_reply(reply: Message, node: int, *, max_peers: int = MAX_IDS
                       ) -> tuple[dict[int, bytes], dict[int, bytes]]:
    """Revealed shares: ``(b shares by owner, s shares + pair mask keys by owner)``, at
    most ``max_peers`` owners each (pass the cohort size)."""
    r = _record(reply, node, UNMASK)
    b_owners = unpack_ids(r.get(B_OWNERS, b""), what=f"node {node}: {B_OWNERS!r}",
                          limit=max_peers)
    sk_owners = unpack_ids(r.get(SK_OWNERS, b""), what=f"node {node}: {SK_OWNERS!r}",
                           limit=max_peers)
    if len(set(b_owners)) != len(b_owners) or len(set(sk_owners)) != len(sk_owners):
        raise SecAggViolation(f"node {node}: revealed shares repeat an owner")
    b = dict(zip(b_owners, _bytes_list(r, B_SHARES, node, len(b_owners)), strict=True))
    sk = dict(zip(sk_owners, _bytes_list(r, SK_SHARES, node, len(sk_owners)), strict=True))
    return b, sk


def receive_reply(session: ServerSession, stage: str, node: int, reply: Message) -> None:
    """Parse ``node``'s reply to ``stage`` into ``session``.

    Raises
    ------
    SecAggViolation
        The reply breaks the protocol: the device is dropped from the round by
        the caller and named in ``session.culprits`` (an error reply,
        :class:`SecAggRefused`, is dropped without blame).
    """
    try:
        if stage == ADVERTISE:
            session.add_keys(node, parse_advertise_reply(reply, node))
        elif stage == SHARE_KEYS:
            session.add_shares(node, parse_share_keys_reply(reply, node,
                                                            max_peers=len(session.nodes)))
        elif stage == MASK:
            packed, complaints = parse_mask_reply(
                reply, node, packed_bytes=(session.length * session.bits + 7) // 8,
                max_peers=len(session.nodes))
            session.add_masked(node, encoding.unpack_words(packed, session.bits,
                                                           session.length), complaints)
        elif stage == UNMASK:
            session.add_unmask(node, *parse_unmask_reply(reply, node,
                                                         max_peers=len(session.nodes)))
        else:
            raise ValueError(f"unknown stage {stage!r}")
    except SecAggRefused:
        raise
    except SecAggViolation as exc:
        session.blame(node, str(exc).removeprefix(f"node {node}: "))
        raise
