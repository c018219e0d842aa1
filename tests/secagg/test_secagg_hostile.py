"""Hostile devices within the dropout budget cannot stop a round or corrupt its sum.

Every reply travels as a Flower Message through the server's parsers
(``messages.receive_reply``) into a :class:`ServerSession`, as the round loop
routes it; hostile devices deal inconsistent or undecryptable shares, complain
falsely or without evidence, reveal garbage in unmasking, or add fields to a
reply. The sum must be the exact modular sum of the survivors' inputs and every
hostile device must be named in ``ServerSession.culprits``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import struct
from collections.abc import Mapping
from dataclasses import replace

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict

from flowerpress.secagg import crypto, encoding, shamir
from flowerpress.secagg import messages as m
from flowerpress.secagg.core import (
    CIPHER_SHARE_BYTES,
    ClientSession,
    PublicKeys,
    SecAggAbort,
    SecAggRefused,
    SecAggViolation,
    ServerSession,
    _commit,
    _share_ad,
    challenge,
    client_advertise,
    client_mask,
    client_share_keys,
    client_unmask,
    dealing_digest,
    pair_private,
)
from flowerpress.secagg.graph import default_degree
from flowerpress.testing import server_identity

BITS = 16
#: Misbehaviours that get a device dropped from the round (its input is not summed).
DROPPED = ("inconsistent", "garbage-shares", "false-complaint", "no-evidence", "extra-field",
           "extra-record")
#: Misbehaviours after masking: the device's input stays in the sum, its reveals are discarded.
KEPT = ("garbage-reveal", "bad-pair-key")
BEHAVIOURS = DROPPED + KEPT


def _inputs(n: int, length: int, seed: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {1000 + 13 * i: rng.integers(0, 1 << BITS, size=length, dtype=np.uint64)
            for i in range(n)}


def _modsum(vectors: list[np.ndarray]) -> np.ndarray:
    total = np.zeros_like(vectors[0])
    for v in vectors:
        total += v
    return total & np.uint64((1 << BITS) - 1)


def _deal_inconsistently(session: ClientSession, roster: Mapping[int, PublicKeys],
                         victims: set[int]) -> dict[int, bytes]:
    """Stage 2 as a cheat: the victims' shares of b are off the polynomial, yet every
    share matches its commitment and every ciphertext authenticates."""
    t, rid, me = session.threshold, session.round_id, session.node
    holders = [*sorted(roster), me]
    polys = [shamir.random_polynomial(int.from_bytes(v, "big"), threshold=t)
             for v in (session.b, session.s_sk)]
    polys.append(shamir.random_polynomial(secrets.randbelow(shamir.PRIME), threshold=t))
    shares = {x: [shamir.field_bytes(shamir.evaluate(f, x)) for f in polys] for x in holders}
    for x in victims:
        shares[x][0] = shamir.field_bytes(secrets.randbelow(shamir.PRIME))
    commitments = {x: _commit(rid, me, x, *shares[x]) for x in holders}
    r1, r2 = challenge(dealing_digest(rid, me, commitments))
    check = [(a + r1 * b + r2 * c) % shamir.PRIME for a, b, c in zip(*polys, strict=True)]
    out = {}
    for peer in sorted(roster):
        key = crypto.agree(pair_private(session.c_sk, b"c", round_id=rid, me=me, peer=peer),
                           roster[peer].c_pk, label=b"enc", round_id=rid, pair=(me, peer))
        plain = struct.pack("<QQQ", rid, me, peer) + b"".join(shares[peer])
        out[peer] = crypto.encrypt(key, plain, associated=_share_ad(rid, me, peer)) + b"".join(
            commitments[peer])
    out[me] = b"".join(commitments[me]) + b"".join(shamir.field_bytes(c) for c in check)
    return out


def _deliver(server: ServerSession, stage: str, node: int, record: ConfigRecord,
             *, extra_record: bool = False) -> None:
    """One reply through the server's parser; a violation drops the device (as the loop does)."""
    content = RecordDict({m.RECORD: record})
    if extra_record:
        content["metrics"] = MetricRecord({"train-seconds": 1.25})
    with server_identity():
        reply = Message(content, dst_node_id=node, message_type="train")
    with contextlib.suppress(SecAggViolation):
        m.receive_reply(server, stage, node, reply)


def run_session(inputs: Mapping[int, np.ndarray], hostile: Mapping[int, str], *,
                round_id: int = 3, degree: int = 0, fraction: float = 0.7
                ) -> tuple[ServerSession, np.ndarray]:
    """All four stages through the parsers; ``hostile`` maps a node to its misbehaviour."""
    nodes = sorted(inputs)
    length = len(next(iter(inputs.values())))
    server = ServerSession(round_id=round_id, nodes=nodes, bits=BITS, length=length,
                           fraction=fraction, degree=degree or default_degree(len(nodes)),
                           seed=round_id)
    sessions: dict[int, ClientSession] = {}
    for n in nodes:
        setup = server.setup_for(n)
        sessions[n], keys = client_advertise(node=n, round_id=round_id, bits=BITS,
                                             length=length, threshold=setup["threshold"],
                                             neighbours=setup["neighbours"])
        _deliver(server, m.ADVERTISE, n, m.advertise_reply(keys))
    server.close_keys()
    for n in server.u1:
        roster = server.roster_for(n)
        how = hostile.get(n)
        if how == "inconsistent":
            entries = _deal_inconsistently(sessions[n], roster, set(sorted(roster)[::2]))
            sessions[n] = replace(sessions[n], stage=2, roster=dict(roster))
        else:
            sessions[n], entries = client_share_keys(sessions[n], roster)
        if how == "garbage-shares":  # authenticates nowhere, commitments intact
            entries = {d: os.urandom(CIPHER_SHARE_BYTES) + e[CIPHER_SHARE_BYTES:]
                       if d != n else e for d, e in entries.items()}
        _deliver(server, m.SHARE_KEYS, n, m.share_keys_reply(entries))
    server.close_shares()
    for n in server.u2:
        inbox = server.inbox_for(n)
        how = hostile.get(n)
        victim = min(inbox)
        if how == "false-complaint":  # sees a tampered copy: complains with its real key
            entry = bytearray(inbox[victim])
            entry[20] ^= 1
            inbox = {**inbox, victim: bytes(entry)}
        sessions[n], y, complaints = client_mask(sessions[n], inbox, inputs[n])
        if how == "no-evidence":
            complaints = {**complaints, victim: os.urandom(32)}
        record = m.mask_reply(encoding.pack_words(y, BITS), complaints)
        if how == "extra-field":
            record["train-seconds"] = 1.25
        _deliver(server, m.MASK, n, record, extra_record=how == "extra-record")
    server.close_masked()
    for n in server.survivors:
        alive, dropped = server.unmask_request(n)
        sessions[n], b, sk = client_unmask(sessions[n], alive, dropped)
        if hostile.get(n) == "garbage-reveal":  # well-formed field elements, wrong values
            b = {o: shamir.field_bytes(secrets.randbelow(shamir.PRIME)) for o in b}
        if hostile.get(n) == "bad-pair-key":
            sk = {o: r[:shamir.SHARE_BYTES] + os.urandom(32) for o, r in sk.items()}
            b = {o: shamir.field_bytes(secrets.randbelow(shamir.PRIME)) for o in b} if not sk \
                else b
        _deliver(server, m.UNMASK, n, m.unmask_reply(b, sk))
    return server, server.finish()


def _assert_correct(server: ServerSession, total: np.ndarray,
                    inputs: Mapping[int, np.ndarray], hostile: Mapping[int, str]) -> None:
    dropped = {n for n, how in hostile.items() if how in DROPPED}
    assert set(server.survivors) == set(inputs) - dropped
    np.testing.assert_array_equal(total, _modsum([inputs[s] for s in server.survivors]))
    assert set(server.culprits) == set(hostile), server.culprits
    assert all(isinstance(r, str) and "\n" not in r for r in server.culprits.values())


@pytest.mark.parametrize("how", BEHAVIOURS)
def test_one_hostile_device_is_named_and_the_sum_is_exact(how: str) -> None:
    # Prepare
    inputs = _inputs(10, 21, seed=1)
    hostile = {sorted(inputs)[4]: how}
    # Execute
    server, total = run_session(inputs, hostile)
    # Assert
    _assert_correct(server, total, inputs, hostile)


@pytest.mark.parametrize("hows", [("inconsistent", "garbage-shares", "false-complaint"),
                                  ("garbage-reveal",) * 3,
                                  ("extra-field", "no-evidence", "garbage-reveal"),
                                  ("inconsistent", "extra-record", "bad-pair-key")])
def test_three_hostile_devices_of_ten_cannot_stop_the_round(hows: tuple[str, ...]) -> None:
    # Prepare: threshold 0.7 of 10 is 7, so three is the whole dropout budget
    inputs = _inputs(10, 21, seed=2)
    hostile = dict(zip(sorted(inputs)[1::3], hows, strict=True))
    # Execute
    server, total = run_session(inputs, hostile)
    # Assert
    _assert_correct(server, total, inputs, hostile)


def test_twenty_consecutive_sessions_with_hostile_devices_complete() -> None:
    # Prepare: each session draws 3 hostile devices of 10 and their misbehaviours
    rng = np.random.default_rng(21)
    inputs = _inputs(10, 9, seed=3)
    nodes = sorted(inputs)
    for session in range(20):
        chosen = rng.choice(nodes, size=3, replace=False).tolist()
        hostile = {int(n): str(rng.choice(BEHAVIOURS)) for n in chosen}
        if {"inconsistent", "garbage-shares"} & set(hostile.values()):
            # a lying pair key next to a cheating dealer is the one pair that can cost a
            # round (test_a_lying_pair_key_next_to_a_cheating_dealer_skips_the_round)
            hostile = {n: "garbage-reveal" if how == "bad-pair-key" else how
                       for n, how in hostile.items()}
        # Execute
        server, total = run_session(inputs, hostile, round_id=session + 1)
        # Assert
        _assert_correct(server, total, inputs, hostile)


def test_a_lying_pair_key_next_to_a_cheating_dealer_skips_the_round() -> None:
    # Prepare: a dealer sends undecryptable shares to every neighbour but one
    # survivor's, whose reveal of its key of that pair is a lie: the pair's mask can
    # then be removed neither with the survivor's key nor with the dealer's root (too
    # few verified shares of it). Neither device can be dropped after masking.
    inputs = _inputs(10, 9, seed=6)
    nodes = sorted(inputs)
    dealer, liar = nodes[0], nodes[5]
    server = ServerSession(round_id=2, nodes=nodes, bits=BITS, length=9, fraction=0.7,
                           degree=9, seed=2)
    sessions: dict[int, ClientSession] = {}
    for n in nodes:
        setup = server.setup_for(n)
        sessions[n], keys = client_advertise(node=n, round_id=2, bits=BITS, length=9,
                                             threshold=setup["threshold"],
                                             neighbours=setup["neighbours"])
        server.add_keys(n, keys)
    server.close_keys()
    for n in nodes:
        sessions[n], entries = client_share_keys(sessions[n], server.roster_for(n))
        if n == dealer:
            entries = {d: os.urandom(CIPHER_SHARE_BYTES) + e[CIPHER_SHARE_BYTES:]
                       if d not in (n, liar) else e for d, e in entries.items()}
        server.add_shares(n, entries)
    server.close_shares()
    for n in nodes:
        sessions[n], y, complaints = client_mask(sessions[n], server.inbox_for(n), inputs[n])
        server.add_masked(n, y, complaints)
    for n in server.close_masked():
        sessions[n], b, sk = client_unmask(sessions[n], *server.unmask_request(n))
        if n == liar:
            sk = {o: r[:shamir.SHARE_BYTES] + os.urandom(32) for o, r in sk.items()}
            with pytest.raises(SecAggViolation, match="mask key"):
                server.add_unmask(n, b, sk)
            continue
        server.add_unmask(n, b, sk)
    # Execute / Assert: no sum (never a wrong one); both are named
    with pytest.raises(SecAggAbort, match=f"node {dealer}"):
        server.finish()
    assert set(server.culprits) == {dealer, liar}


def test_hostile_devices_in_a_sparse_graph() -> None:
    # Prepare: 24 devices, 6 neighbours each (threshold: a majority of 7 holders)
    inputs = _inputs(24, 9, seed=4)
    nodes = sorted(inputs)
    hostile = {nodes[2]: "inconsistent", nodes[11]: "garbage-reveal",
               nodes[19]: "false-complaint"}
    # Execute
    server, total = run_session(inputs, hostile, degree=6, fraction=0.6)
    # Assert
    _assert_correct(server, total, inputs, hostile)


def test_consistent_shares_of_another_secret_skip_the_round_and_name_the_dealer() -> None:
    # Prepare: a dealer shares a seed other than the one it masks with (no share is
    # off its polynomial, so no receiver can tell); only the commitment can
    inputs = _inputs(10, 9, seed=5)
    cheat = sorted(inputs)[6]
    server = ServerSession(round_id=1, nodes=sorted(inputs), bits=BITS, length=9,
                           fraction=0.7, degree=9, seed=1)
    sessions: dict[int, ClientSession] = {}
    for n in sorted(inputs):
        setup = server.setup_for(n)
        sessions[n], keys = client_advertise(node=n, round_id=1, bits=BITS, length=9,
                                             threshold=setup["threshold"],
                                             neighbours=setup["neighbours"])
        server.add_keys(n, keys)
    server.close_keys()
    for n in sorted(inputs):
        real_b = sessions[n].b
        if n == cheat:
            sessions[n] = replace(sessions[n], b=os.urandom(32))
        sessions[n], entries = client_share_keys(sessions[n], server.roster_for(n))
        sessions[n] = replace(sessions[n], b=real_b)
        server.add_shares(n, entries)
    server.close_shares()
    for n in sorted(inputs):
        sessions[n], y, complaints = client_mask(sessions[n], server.inbox_for(n), inputs[n])
        server.add_masked(n, y, complaints)
    for n in server.close_masked():
        sessions[n], b, sk = client_unmask(sessions[n], *server.unmask_request(n))
        server.add_unmask(n, b, sk)
    # Execute / Assert: no sum (never a wrong one), and the dealer is named
    with pytest.raises(SecAggAbort, match=f"node {cheat}"):
        server.finish()
    assert set(server.culprits) == {cheat}


def test_an_extra_key_is_a_culprit_an_error_reply_a_dropout() -> None:
    # Prepare
    server = ServerSession(round_id=1, nodes=[1, 2, 3], bits=8, length=4, fraction=0.7,
                           degree=2, seed=0)
    _, keys = client_advertise(node=2, round_id=1, bits=8, length=4, threshold=3,
                               neighbours=[1, 3])
    record = m.advertise_reply(keys)
    record["train-seconds"] = 0.5
    with server_identity():
        extra = Message(RecordDict({m.RECORD: record}), dst_node_id=2, message_type="train")
        request = Message(RecordDict(), dst_node_id=3, message_type="train")
    request.metadata.__dict__["_message_id"] = "x"
    refusal = Message(Error(code=0, reason="training diverged"), reply_to=request)
    # Execute / Assert: a key beyond the stage's own names the device ...
    with pytest.raises(SecAggViolation, match="not part of a advertise reply"):
        m.receive_reply(server, m.ADVERTISE, 2, extra)
    # ... an error reply drops it without blame, and nodes outside the round are never named
    with pytest.raises(SecAggRefused):
        m.receive_reply(server, m.ADVERTISE, 3, refusal)
    server.blame(99, "not in the round")
    assert list(server.culprits) == [2]


def test_mask_replies_carry_the_protocols_keys_only() -> None:
    # Prepare / Execute / Assert: what a device sends, key for key
    assert m.REPLY_KEYS[m.MASK] == {m.MASKED, m.COMPLAINTS, m.EVIDENCE}
    record = m.mask_reply(b"\x00" * 4, {})
    assert set(record) <= m.REPLY_KEYS[m.MASK]
