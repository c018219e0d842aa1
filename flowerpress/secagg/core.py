"""The SecAgg+ protocol (Bell et al., CCS 2020), pure: no Flower, no I/O.

A round has four stages; the server routes every message and learns only the
modular sum of the survivors' vectors:

1. **advertise keys**: device ``i`` draws two 32-byte roots ``c_i`` (share
   encryption) and ``s_i`` (pairwise masks) and a self-mask seed ``b_i``. From
   each root it derives one X25519 key pair *per neighbour* (HKDF, so revealing
   one pair's private key reveals nothing of the root or of other pairs) and
   sends the public keys and a SHA-256 commitment to ``b_i``.
2. **share keys**: ``i`` Shamir-shares ``b_i`` and ``s_i`` among its neighbours
   and itself (``threshold`` shares recover them), with a third, blinding
   polynomial ``g_i`` of random constant term. It publishes a SHA-256
   commitment to every share and the *check polynomial*
   ``h_i = f_b + r_1 f_s + r_2 g_i`` whose challenge ``(r_1, r_2)`` hashes all
   those commitments, and sends each neighbour its three shares encrypted
   (AES-GCM under the pair's X25519 key, bound to the round, sender and
   receiver).
3. **masked input**: ``i`` decrypts what it received and checks every share
   set against its commitments and ``h_j(i)`` (a set off the dealer's
   polynomials fails with probability ``1 - 2**-521`` per challenge: the blinded
   degree test of verifiable secret sharing). It sends
   ``y_i = x_i + PRG(b_i) + sum_j +-PRG(s_ij)  (mod 2**bits)`` over the
   neighbours whose shares verified (``+`` if ``i < j``) and, for each other
   neighbour, a complaint with its private key *of that pair* as evidence.
4. **unmasking**: every survivor reveals, for each neighbour, *either* its
   share of ``b_j`` (``j`` survived) *or* its share of ``s_j`` and its own
   mask key of the pair ``(i, j)`` (``j`` dropped after sharing, or was caught
   cheating), never both, and answers once per round. The server checks every
   revealed share against its commitment and every pair key against its public
   key, removes the survivors' self masks and the dropped devices' pairwise
   masks, and is left with ``sum_i x_i mod 2**bits``.

Devices that cheat (Bonawitz et al., CCS 2017, leave robustness against
malicious *clients* open: their protocol may abort; here every misbehaviour
below is attributed, and the round completes when the threshold holds):

* a **dealer of bad shares** (undecryptable, off its commitments or off its
  polynomials) is convicted by the receiver's complaint: the server decrypts
  with the revealed pair key (checked against its public key) and re-runs the
  receiver's checks. It is dropped like a device that vanished after sharing:
  the survivors that masked with it reveal their pair keys, and its own
  (verified) shares of ``s_j`` are a fallback;
* a **false complainer** is convicted by the same check (the shares verify) and
  dropped likewise: it left the accused out of its masks;
* a **bad revealer** in stage 4 is caught by the commitments; its reveals are
  discarded and each secret is rebuilt from any ``threshold`` authentic shares
  (its own input stays in the sum: its masks are removed by the others);
* a dealer whose authentic shares are inconsistent, or consistent with a
  secret other than the committed one, is named when the server recombines;
  the round is then skipped only if that secret cannot be recovered (never a
  wrong sum).

Each is named in :attr:`ServerSession.culprits` (node id -> one-line reason)
as soon as the evidence is in, so the round loop can exclude it from later
rounds.

Dropout tolerance: a secret is recovered while ``threshold`` of its holders
answer stage 4: ``ceil(t * n)`` in the complete graph (up to ``(1 - t)`` of
the cohort may vanish), a majority of the ``k + 1`` holders in a k-regular
graph. The server also needs at least
``ceil(t * n)`` survivors of the cohort of ``n`` (each device's noise share
assumes that many summands). Below either the round raises
:class:`SecAggAbort` and nothing is revealed that was not already.

The session objects carry their state explicitly (STYLE.md, habit 2): a
device keeps :class:`ClientSession` between stages (in ``Context.state``,
see :meth:`ClientSession.to_record`), the server keeps :class:`ServerSession`.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from numpy.typing import NDArray

from flowerpress.secagg import crypto, shamir
from flowerpress.secagg.graph import communication_graph

K = crypto.KEY_BYTES
SB = shamir.SHARE_BYTES
#: Plaintext of one encrypted share set: round, sender, receiver; shares of b, s, g.
PLAIN_SHARE_BYTES = 24 + 3 * SB
CIPHER_SHARE_BYTES = crypto.NONCE_BYTES + PLAIN_SHARE_BYTES + crypto.TAG_BYTES
#: Commitments to one holder's three shares (b, s, g), SHA-256 each.
COMMIT_BYTES = 3 * K
#: A stage-4 reveal for a dropped owner: the share of its root ``s`` and the pair's mask key.
SK_REVEAL_BYTES = SB + K
STREAM_SELF = 1
STREAM_PAIR = 2
_ENC, _MASK = b"c", b"s"


class SecAggAbort(RuntimeError):  # noqa: N818 (reads as what happened)
    """The round cannot be completed securely (too few survivors or shares); it is skipped."""


class SecAggViolation(ValueError):  # noqa: N818
    """One device's message breaks the protocol; the server drops that device."""


class SecAggRefused(SecAggViolation):
    """A device answered with an error reply: dropped from the round, but no proof of cheating."""


class StageError(ValueError):
    """A device refuses a request (wrong stage, replay, a request that would unmask)."""


@dataclass(frozen=True)
class PublicKeys:
    """What a device advertises in stage 1 (and what a roster passes on in stage 2).

    Advertised, ``c_pk`` and ``s_pk`` hold one 32-byte X25519 public key per
    neighbour, in the order of the sorted neighbour ids. In a roster (the keys
    of neighbour ``j`` sent to device ``i``) they hold the single key ``j``
    derived for the pair ``(j, i)``.
    """

    c_pk: bytes  # X25519 public key(s) for share encryption
    s_pk: bytes  # X25519 public key(s) for pairwise masks
    b_commit: bytes  # SHA-256 commitment to the self-mask seed


def required_shares(fraction: float, neighbourhood: int) -> int:
    """Shares needed to recover a secret shared among ``neighbourhood`` holders.

    Raises
    ------
    ValueError
        ``fraction`` is not in (0.5, 1]: at or below one half, disjoint sets of
        holders could hand the server both secrets of one device.
    """
    if not 0.5 < fraction <= 1.0:
        raise ValueError(f"threshold={fraction} must be in (0.5, 1]")
    return max(1, min(neighbourhood, math.ceil(fraction * neighbourhood)))


def _sign(i: int, j: int) -> int:
    return 1 if i < j else -1


def _share_ad(round_id: int, src: int, dst: int) -> bytes:
    return b"share" + struct.pack("<QQQ", round_id, src, dst)


def pairwise_seed(s_sk: bytes | X25519PrivateKey, peer_s_pk: bytes, *, round_id: int,
                  me: int, peer: int) -> bytes:
    """The seed of the mask ``me`` and ``peer`` add with opposite signs."""
    return crypto.agree(s_sk, peer_s_pk, label=b"mask", round_id=round_id, pair=(me, peer))


def pair_private(root: bytes, kind: bytes, *, round_id: int, me: int, peer: int) -> bytes:
    """``me``'s private key of kind ``c`` (encryption) or ``s`` (masks) for ``peer``."""
    return crypto.derive_private(root, label=kind, round_id=round_id, me=me, peer=peer)


def _pair_publics(root: bytes, kind: bytes, *, round_id: int, me: int,
                  neighbours: Sequence[int]) -> bytes:
    return b"".join(crypto.public_key(pair_private(root, kind, round_id=round_id, me=me,
                                                   peer=p)) for p in neighbours)


# --- verifiable dealing (shared by both sides) -----------------------------------------


@dataclass(frozen=True)
class Dealing:
    """A dealer's public stage-2 data: share commitments and the check polynomial.

    ``commitments[holder] = (H(b share), H(s share), H(g share))``; ``check`` the
    coefficients of ``h = f_b + r_1 f_s + r_2 g`` (constant first); ``digest``
    hashes the round, the dealer and every commitment, and seeds the challenge.
    """

    commitments: Mapping[int, tuple[bytes, bytes, bytes]]
    check: tuple[int, ...]
    digest: bytes


def dealing_digest(round_id: int, dealer: int,
                   commitments: Mapping[int, tuple[bytes, bytes, bytes]]) -> bytes:
    """SHA-256 over the round, the dealer and every holder's commitments (holder order)."""
    h = hashlib.sha256(b"flowerpress/secagg/v2/dealing" + struct.pack("<QQ", round_id, dealer))
    for holder in sorted(commitments):
        h.update(struct.pack("<Q", holder) + b"".join(commitments[holder]))
    return h.digest()


def challenge(digest: bytes) -> tuple[int, int]:
    """``(r_1, r_2)`` of the degree test, fixed by the digest (Fiat-Shamir).

    The dealer commits to every share before the challenge exists, so a share
    set off its polynomials passes for at most one challenge in ``2**521``.
    """
    raw = hashlib.shake_256(b"flowerpress/secagg/v2/challenge" + digest).digest(2 * 80)
    return (int.from_bytes(raw[:80], "big") % shamir.PRIME,
            int.from_bytes(raw[80:], "big") % shamir.PRIME)


def _commit(round_id: int, dealer: int, holder: int, sb: bytes, ss: bytes, sg: bytes
            ) -> tuple[bytes, bytes, bytes]:
    kw = {"round_id": round_id, "dealer": dealer, "holder": holder}
    return (crypto.share_commitment(b"b", sb, **kw), crypto.share_commitment(b"s", ss, **kw),
            crypto.share_commitment(b"g", sg, **kw))


def verify_share_set(plain: bytes, *, round_id: int, dealer: int, holder: int,
                     dealing: Dealing) -> tuple[bytes, bytes] | None:
    """``(b share, s share)`` if a decrypted share set is the dealer's, else None.

    Checks the header (round, dealer, holder), the three commitments and the
    degree test ``b + r_1 s + r_2 g == h(holder)``.
    """
    if len(plain) != PLAIN_SHARE_BYTES or struct.unpack("<QQQ", plain[:24]) != (
            round_id, dealer, holder):
        return None
    sb, ss, sg = plain[24:24 + SB], plain[24 + SB:24 + 2 * SB], plain[24 + 2 * SB:]
    if _commit(round_id, dealer, holder, sb, ss, sg) != dealing.commitments.get(holder):
        return None
    try:
        vb, vs, vg = shamir.field_int(sb), shamir.field_int(ss), shamir.field_int(sg)
    except ValueError:
        return None
    r1, r2 = challenge(dealing.digest)
    if (vb + r1 * vs + r2 * vg) % shamir.PRIME != shamir.evaluate(dealing.check, holder):
        return None
    return sb, ss


def _check_bytes(check: Sequence[int]) -> bytes:
    return b"".join(shamir.field_bytes(c) for c in check)


def _check_of(data: bytes, threshold: int) -> tuple[int, ...]:
    if len(data) != threshold * SB:
        raise ValueError(f"check polynomial must be {threshold} field elements")
    return tuple(shamir.field_int(data[i * SB:(i + 1) * SB]) for i in range(threshold))


def _commitments_of(data: bytes) -> tuple[bytes, bytes, bytes]:
    return data[:K], data[K:2 * K], data[2 * K:3 * K]


# --- device side ---------------------------------------------------------------------


@dataclass(frozen=True)
class ClientSession:
    """A device's secrets and progress in one round (never leaves the device).

    ``c_sk`` and ``s_sk`` are the roots of the per-pair encryption and mask keys.
    """

    node: int
    round_id: int
    bits: int
    length: int
    threshold: int
    neighbours: tuple[int, ...]
    c_sk: bytes
    s_sk: bytes
    b: bytes
    stage: int = 1
    roster: Mapping[int, PublicKeys] = field(default_factory=dict)
    # Shares this device holds: source -> (share of b_src, share of s_src).
    held: Mapping[int, tuple[bytes, bytes]] = field(default_factory=dict)

    # -- persistence in Context.state (a ConfigRecord of scalars, bytes and lists) --
    def to_record(self) -> dict[str, Any]:
        """The session as ConfigRecord values (node ids packed: they use all 64 bits)."""
        peers = sorted(self.roster)
        held = sorted(self.held)
        return {
            "node": _ids([self.node]), "round": self.round_id, "bits": self.bits,
            "length": self.length, "threshold": self.threshold,
            "neighbours": _ids(self.neighbours), "c-sk": self.c_sk, "s-sk": self.s_sk,
            "b": self.b, "stage": self.stage,
            "roster": _ids(peers), "roster-c": [self.roster[p].c_pk for p in peers],
            "roster-s": [self.roster[p].s_pk for p in peers],
            "roster-b": [self.roster[p].b_commit for p in peers],
            "held": _ids(held), "held-b": [self.held[h][0] for h in held],
            "held-s": [self.held[h][1] for h in held],
        }

    @classmethod
    def from_record(cls, r: Mapping[str, Any]) -> ClientSession:
        """Inverse of :meth:`to_record`."""
        roster = {p: PublicKeys(c, s, b) for p, c, s, b in zip(
            _unids(r["roster"]), r["roster-c"] or [], r["roster-s"] or [], r["roster-b"] or [],
            strict=True)}
        held = {h: (b, s) for h, b, s in zip(_unids(r["held"]), r["held-b"] or [],
                                             r["held-s"] or [], strict=True)}
        return cls(node=_unids(r["node"])[0], round_id=int(r["round"]), bits=int(r["bits"]),
                   length=int(r["length"]), threshold=int(r["threshold"]),
                   neighbours=tuple(_unids(r["neighbours"])), c_sk=bytes(r["c-sk"]),
                   s_sk=bytes(r["s-sk"]), b=bytes(r["b"]), stage=int(r["stage"]),
                   roster=roster, held=held)


def _ids(ids: Iterable[int]) -> bytes:
    return b"".join(struct.pack("<Q", i) for i in ids)


def _unids(data: bytes) -> list[int]:
    return [v for (v,) in struct.iter_unpack("<Q", data)]


def client_advertise(*, node: int, round_id: int, bits: int, length: int, threshold: int,
                     neighbours: Sequence[int]) -> tuple[ClientSession, PublicKeys]:
    """Stage 1: fresh roots and self-mask seed; the per-pair public keys to send.

    Raises
    ------
    StageError
        The request is one a device must refuse (names what is wrong).
    """
    nb = tuple(sorted(set(int(v) for v in neighbours)))
    if node in nb or len(nb) != len(neighbours):
        raise StageError("neighbour list repeats ids or contains this node")
    if not 1 <= bits <= 62 or length < 1:
        raise StageError(f"bits={bits} must be in [1, 62] and length={length} >= 1")
    if not (len(nb) + 1) / 2 < threshold <= len(nb) + 1:
        raise StageError(f"threshold={threshold} must exceed half of the {len(nb) + 1} "
                         "holders (else the server could learn both secrets of a device)")
    c_root, s_root = secrets.token_bytes(K), secrets.token_bytes(K)
    b = secrets.token_bytes(shamir.SECRET_BYTES)
    session = ClientSession(node=node, round_id=round_id, bits=bits, length=length,
                            threshold=threshold, neighbours=nb, c_sk=c_root, s_sk=s_root, b=b)
    keys = PublicKeys(_pair_publics(c_root, _ENC, round_id=round_id, me=node, neighbours=nb),
                      _pair_publics(s_root, _MASK, round_id=round_id, me=node, neighbours=nb),
                      crypto.commitment(b, round_id=round_id, node=node))
    return session, keys


def client_share_keys(session: ClientSession, roster: Mapping[int, PublicKeys]
                      ) -> tuple[ClientSession, dict[int, bytes]]:
    """Stage 2: for each neighbour in ``roster`` its encrypted shares and their commitments.

    The entry for this device itself carries its own share commitments and the
    check polynomial (``COMMIT_BYTES + threshold * SHARE_BYTES``); a
    neighbour's entry is ``ciphertext || commitments`` (what the server routes
    on, with the dealing's public part, in stage 3).
    """
    if session.stage != 1:
        raise StageError(f"share-keys request in stage {session.stage} (replayed?)")
    if not set(roster) <= set(session.neighbours):
        raise StageError("roster names devices that are not this device's neighbours")
    for peer, keys in roster.items():
        if {len(keys.c_pk), len(keys.s_pk), len(keys.b_commit)} != {K}:
            raise StageError(f"neighbour {peer}'s keys are malformed")
    holders = [*sorted(roster), session.node]
    t = session.threshold
    if len(holders) < t:
        raise StageError(f"only {len(holders)} holders left, {t} needed")
    f_b = shamir.random_polynomial(int.from_bytes(session.b, "big"), threshold=t)
    f_s = shamir.random_polynomial(int.from_bytes(session.s_sk, "big"), threshold=t)
    g = shamir.random_polynomial(secrets.randbelow(shamir.PRIME), threshold=t)
    shares = {x: tuple(shamir.field_bytes(shamir.evaluate(f, x)) for f in (f_b, f_s, g))
              for x in holders}
    commitments = {x: _commit(session.round_id, session.node, x, *shares[x]) for x in holders}
    r1, r2 = challenge(dealing_digest(session.round_id, session.node, commitments))
    check = [(a + r1 * c + r2 * d) % shamir.PRIME for a, c, d in zip(f_b, f_s, g, strict=True)]
    out: dict[int, bytes] = {}
    for peer in sorted(roster):
        key = crypto.agree(pair_private(session.c_sk, _ENC, round_id=session.round_id,
                                        me=session.node, peer=peer),
                           roster[peer].c_pk, label=b"enc", round_id=session.round_id,
                           pair=(session.node, peer))
        plain = struct.pack("<QQQ", session.round_id, session.node, peer) + b"".join(
            shares[peer])
        out[peer] = crypto.encrypt(key, plain, associated=_share_ad(
            session.round_id, session.node, peer)) + b"".join(commitments[peer])
    out[session.node] = b"".join(commitments[session.node]) + _check_bytes(check)
    own = shares[session.node]
    return replace(session, stage=2, roster=dict(roster),
                   held={session.node: (own[0], own[1])}), out


def inbox_entry_bytes(threshold: int) -> int:
    """Size of one inbox entry: ciphertext, commitments, digest, check polynomial."""
    return CIPHER_SHARE_BYTES + COMMIT_BYTES + K + threshold * SB


def client_mask(session: ClientSession, inbox: Mapping[int, bytes],
                vector: NDArray[np.uint64]
                ) -> tuple[ClientSession, NDArray[np.uint64], dict[int, bytes]]:
    """Stage 3: the masked vector and the complaints, each with its evidence.

    ``inbox`` maps a neighbour to what the server routes from it (see
    :meth:`ServerSession.inbox_for`); a neighbour is in it exactly when it
    completed stage 2. A neighbour whose share set does not decrypt, or does
    not verify (commitments, degree test), is left out of the masks and named
    in a complaint whose evidence is this device's private encryption key *of
    that pair* (it opens only what that neighbour and this device exchanged).
    """
    if session.stage != 2:
        raise StageError(f"masked-input request in stage {session.stage} (replayed?)")
    x = np.asarray(vector)
    if x.shape != (session.length,) or x.dtype != np.uint64:
        raise StageError(f"input must be uint64 of shape ({session.length},)")
    if x.size and int(x.max()) >= 1 << session.bits:
        raise StageError(f"input values must be below 2**{session.bits}")
    if not set(inbox) <= set(session.neighbours):
        raise StageError("inbox names devices that are not this device's neighbours")
    held = dict(session.held)
    complaints: dict[int, bytes] = {}
    masked_with: list[int] = []
    for src in sorted(inbox):
        c_pair = pair_private(session.c_sk, _ENC, round_id=session.round_id, me=session.node,
                              peer=src)
        opened = _open_entry(inbox[src], c_pair, session.roster.get(src),
                             threshold=session.threshold, round_id=session.round_id,
                             dealer=src, holder=session.node)
        if opened is None:
            complaints[src] = c_pair
            continue
        held[src] = opened
        masked_with.append(src)
    if len(masked_with) + 1 < session.threshold:
        raise StageError(f"only {len(masked_with) + 1} intact share sets, "
                         f"{session.threshold} needed")
    y = x + crypto.prg(session.b, session.length, 64, stream=STREAM_SELF)
    for peer in masked_with:
        s_pair = pair_private(session.s_sk, _MASK, round_id=session.round_id, me=session.node,
                              peer=peer)
        seed = pairwise_seed(s_pair, session.roster[peer].s_pk, round_id=session.round_id,
                             me=session.node, peer=peer)
        mask = crypto.prg(seed, session.length, 64, stream=STREAM_PAIR)
        y = y + mask if _sign(session.node, peer) > 0 else y - mask
    y &= np.uint64((1 << session.bits) - 1)
    return replace(session, stage=3, held=held), y, complaints


def _open_entry(entry: bytes, c_pair: bytes, keys: PublicKeys | None, *, threshold: int,
                round_id: int, dealer: int, holder: int) -> tuple[bytes, bytes] | None:
    """The holder's verified ``(b share, s share)`` from an inbox entry, or None."""
    if keys is None or len(entry) != inbox_entry_bytes(threshold):
        return None
    ct = entry[:CIPHER_SHARE_BYTES]
    at = CIPHER_SHARE_BYTES
    commitments = _commitments_of(entry[at:at + COMMIT_BYTES])
    digest = entry[at + COMMIT_BYTES:at + COMMIT_BYTES + K]
    try:
        check = _check_of(entry[at + COMMIT_BYTES + K:], threshold)
        key = crypto.agree(c_pair, keys.c_pk, label=b"enc", round_id=round_id,
                           pair=(holder, dealer))
        plain = crypto.decrypt(key, ct, associated=_share_ad(round_id, dealer, holder))
    except ValueError:  # DecryptionError included
        return None
    # The holder sees only its own commitments: the digest binds them to the dealing.
    return verify_share_set(plain, round_id=round_id, dealer=dealer, holder=holder,
                            dealing=Dealing({holder: commitments}, check, digest))


def client_unmask(session: ClientSession, alive: Iterable[int], dropped: Iterable[int]
                  ) -> tuple[ClientSession, dict[int, bytes], dict[int, bytes]]:
    """Stage 4: shares of ``b_j`` for ``j`` alive; for ``j`` dropped, the share of ``s_j``
    and this device's mask key of the pair ``(me, j)`` (``SK_REVEAL_BYTES``).

    The pair key opens only the mask this device shares with ``j``, which the
    server can compute from ``s_j`` anyway. Answered once per round. Refused if
    a device is in both sets, if a named device is no neighbour, or if fewer
    than ``threshold`` devices are alive (the sum of so few inputs is not
    released).
    """
    if session.stage != 3:
        raise StageError(f"unmask request in stage {session.stage} (replayed?)")
    live, gone = set(alive), set(dropped)
    known = set(session.neighbours) | {session.node}
    if live & gone:
        raise StageError("unmask request names a device both alive and dropped")
    if not live | gone <= known:
        raise StageError("unmask request names devices that are not neighbours")
    if session.node not in live:
        raise StageError("unmask request lists this device as dropped")
    if len(live) < session.threshold:
        raise StageError(f"only {len(live)} neighbours alive, {session.threshold} needed")
    b_out = {j: session.held[j][0] for j in sorted(live) if j in session.held}
    sk_out = {j: session.held[j][1] + pair_private(session.s_sk, _MASK,
                                                   round_id=session.round_id,
                                                   me=session.node, peer=j)
              for j in sorted(gone) if j in session.held}
    return replace(session, stage=4), b_out, sk_out


# --- server side ---------------------------------------------------------------------


@dataclass
class ServerSession:
    """The server's view of one round: routing, validation, judging, reconstruction.

    Every ``add_*`` method validates one device's message and raises
    :class:`SecAggViolation` naming the problem; the caller drops that device.
    Nothing a device sends is trusted: lengths, ids and sets are checked
    against what the round fixed, shares against their commitments, complaints
    against their evidence.

    :attr:`culprits` maps a device caught breaking the protocol to a one-line
    reason (Bell et al. 2020 and Bonawitz et al. 2017 let such a device abort
    the round; here it is dropped from it where the threshold allows and named
    so that the caller can exclude it from later rounds). It is filled by
    ``add_*`` (a malformed or unexpected message, a share or pair key that does
    not match its commitment), by :meth:`close_masked` (dealers convicted by a
    complaint, false complainers), by :meth:`finish` (dealers whose authentic
    shares are inconsistent; recorded before any :class:`SecAggAbort`) and by
    :meth:`blame` (what the caller's parsers reject). Error replies
    (:class:`SecAggRefused`) are dropouts, not culprits.
    """

    round_id: int
    nodes: Sequence[int]
    bits: int
    length: int
    fraction: float  # threshold as a fraction of each neighbourhood (incl. the device)
    degree: int
    seed: int
    max_reconstruction_tries: int = 64  # random subsets tried against a commitment

    def __post_init__(self) -> None:
        self.graph = communication_graph(list(self.nodes), degree=self.degree, seed=self.seed)
        k = len(next(iter(self.graph.values()))) if self.graph else 0
        # Complete graph: `fraction` of the cohort holds the shares. k-regular graph: a
        # majority of each neighbourhood, so that a neighbourhood losing more than its
        # share of the cohort's dropouts still recovers (Bell et al.'s t ~ k/2 regime);
        # the cohort as a whole must still keep `fraction` (`_min_devices`).
        self.threshold = (required_shares(self.fraction, k + 1) if k >= len(self.nodes) - 1
                          else max((k + 1) // 2 + 1, 1))
        self.keys: dict[int, PublicKeys] = {}
        self.ciphertexts: dict[int, dict[int, bytes]] = {}  # src -> dst -> ct
        self.dealings: dict[int, Dealing] = {}
        self.masked: dict[int, NDArray[np.uint64]] = {}
        self.complaints: dict[int, set[int]] = {}
        self.evidence: dict[int, dict[int, bytes]] = {}  # complainer -> accused -> pair key
        self.b_shares: dict[int, dict[int, bytes]] = {}  # owner -> holder -> share
        self.sk_shares: dict[int, dict[int, bytes]] = {}
        self.pair_keys: dict[int, dict[int, bytes]] = {}  # dropped owner -> survivor -> key
        self.answered: set[int] = set()
        self.u1: list[int] = []
        self.u2: list[int] = []
        self.survivors: list[int] = []
        self.culprits: dict[int, str] = {}

    # -- culprits --
    def blame(self, node: int, reason: str) -> None:
        """Name ``node`` a culprit (its first reason is kept); ignores nodes not in the round."""
        if node in self.graph and node not in self.culprits:
            self.culprits[node] = " ".join(reason.split())[:300]

    def _violation(self, node: int, reason: str) -> SecAggViolation:
        self.blame(node, reason)
        return SecAggViolation(f"node {node}: {reason}")

    def _min_devices(self) -> int:
        # Both: enough holders in a neighbourhood, and ceil(fraction * n) summands in the
        # sum (each device's noise share assumes that many).
        return max(self.threshold, math.ceil(self.fraction * len(self.nodes) - 1e-9))

    def _check_enough(self, count: int, stage: str) -> None:
        if count < self._min_devices():
            raise SecAggAbort(f"{stage}: {count} devices left, the threshold needs "
                              f"{self._min_devices()}")

    def _pair_public(self, owner: int, peer: int, kind: bytes) -> bytes:
        """The key ``owner`` advertised for the pair with ``peer``."""
        i = self.graph[owner].index(peer)
        keys = self.keys[owner]
        data = keys.c_pk if kind == _ENC else keys.s_pk
        return data[i * K:(i + 1) * K]

    # stage 1
    def setup_for(self, node: int) -> dict[str, Any]:
        """What device ``node`` is told in stage 1."""
        return {"round": self.round_id, "bits": self.bits, "length": self.length,
                "threshold": self.threshold, "neighbours": list(self.graph[node])}

    def add_keys(self, node: int, keys: PublicKeys) -> None:
        """Record a device's advertised keys (one encryption and one mask key per neighbour)."""
        if node not in self.graph or node in self.keys:
            raise self._violation(node, "keys not expected (unknown node or replay)")
        want = K * len(self.graph[node])
        if len(keys.c_pk) != want or len(keys.s_pk) != want or len(keys.b_commit) != K:
            raise self._violation(node, f"advertised keys must be {want}, {want} and {K} bytes")
        if any(keys.c_pk[i:i + K] == keys.s_pk[i:i + K] for i in range(0, want, K)):
            raise self._violation(node, "a pair's encryption and mask keys must differ")
        self.keys[node] = keys

    def close_keys(self) -> list[int]:
        """End stage 1; SecAggAbort if too few devices advertised."""
        self.u1 = sorted(self.keys)
        self._check_enough(len(self.u1), "advertise keys")
        return self.u1

    # stage 2
    def roster_for(self, node: int) -> dict[int, PublicKeys]:
        """The keys ``node``'s advertised neighbours derived for their pair with ``node``."""
        return {j: PublicKeys(self._pair_public(j, node, _ENC), self._pair_public(j, node, _MASK),
                              self.keys[j].b_commit)
                for j in self.graph[node] if j in self.keys}

    def add_shares(self, node: int, cts: Mapping[int, bytes]) -> None:
        """Record a device's dealing: one entry per advertised neighbour and one for itself."""
        if node not in self.keys or node in self.ciphertexts:
            raise self._violation(node, "shares not expected (stage 1 missed or replay)")
        expected = set(self.roster_for(node)) | {node}
        if set(cts) != expected:
            raise self._violation(node, f"shares must address exactly its {len(expected) - 1} "
                                  f"neighbours and itself, got {len(cts)} entries")
        own_bytes = COMMIT_BYTES + self.threshold * SB
        commitments: dict[int, tuple[bytes, bytes, bytes]] = {}
        out: dict[int, bytes] = {}
        for dst, entry in cts.items():
            want = own_bytes if dst == node else CIPHER_SHARE_BYTES + COMMIT_BYTES
            if len(entry) != want:
                raise self._violation(node, f"entry for {dst} has {len(entry)} bytes, "
                                      f"expected {want}")
            if dst != node:
                out[dst] = entry[:CIPHER_SHARE_BYTES]
                commitments[dst] = _commitments_of(entry[CIPHER_SHARE_BYTES:])
            else:
                commitments[dst] = _commitments_of(entry[:COMMIT_BYTES])
        try:
            check = _check_of(cts[node][COMMIT_BYTES:], self.threshold)
        except ValueError as exc:
            raise self._violation(node, str(exc)) from None
        self.ciphertexts[node] = out
        self.dealings[node] = Dealing(commitments, check,
                                      dealing_digest(self.round_id, node, commitments))

    def close_shares(self) -> list[int]:
        """End stage 2; SecAggAbort if too few devices shared."""
        self.u2 = sorted(self.ciphertexts)
        self._check_enough(len(self.u2), "share keys")
        return self.u2

    # stage 3
    def inbox_for(self, node: int) -> dict[int, bytes]:
        """What ``node`` receives from each device that completed stage 2: its encrypted
        shares, their commitments, the dealing's digest and check polynomial."""
        return {src: self.ciphertexts[src][node] + b"".join(
                    self.dealings[src].commitments[node]) + self.dealings[src].digest
                + _check_bytes(self.dealings[src].check)
                for src in self.u2 if node in self.ciphertexts[src]}

    def add_masked(self, node: int, masked: NDArray[np.uint64],
                   complaints: Mapping[int, bytes] | Sequence[int]) -> None:
        """Record a masked vector (already unpacked to ``length`` words) and the complaints.

        ``complaints`` maps each accused neighbour to the evidence (the
        complainer's private encryption key of that pair); a bare sequence of
        ids is complaints without evidence, which :meth:`close_masked` rejects.
        """
        if node not in self.ciphertexts or node in self.masked:
            raise self._violation(node, "masked input not expected (replay?)")
        y = np.asarray(masked)
        if y.shape != (self.length,) or y.dtype != np.uint64:
            raise self._violation(node, f"masked vector must be {self.length} words")
        if y.size and int(y.max()) >= 1 << self.bits:
            raise self._violation(node, f"masked values must be below 2**{self.bits}")
        evidence = dict(complaints) if isinstance(complaints, Mapping) else {}
        named = set(complaints)
        if not named <= set(self.inbox_for(node)):
            raise self._violation(node, "complaints name devices that sent it nothing")
        self.masked[node] = y
        self.complaints[node] = named
        self.evidence[node] = evidence

    def _judge(self, complainer: int, accused: int) -> None:
        """Blame whichever of the two the evidence convicts (one of them always is)."""
        key = self.evidence.get(complainer, {}).get(accused)
        if key is None or len(key) != K:
            self.blame(complainer, f"complained about {accused} without evidence")
            return
        if crypto.public_key(key) != self._pair_public(complainer, accused, _ENC):
            self.blame(complainer, f"evidence against {accused} is not its advertised pair key")
            return
        entry = self.inbox_for(complainer)[accused]
        opened = _open_entry(entry, key, self.roster_for(complainer).get(accused),
                             threshold=self.threshold, round_id=self.round_id, dealer=accused,
                             holder=complainer)
        if opened is None:
            self.blame(accused, f"dealt {complainer} shares that do not decrypt or verify "
                       "(commitments, degree test)")
        else:
            self.blame(complainer, f"falsely complained about {accused}: its shares verify")

    def close_masked(self) -> list[int]:
        """End stage 3: judge every complaint; survivors are the devices that sent input and
        were not convicted (a convicted dealer or false complainer counts as dropped)."""
        for node in sorted(self.complaints):
            for accused in sorted(self.complaints[node]):
                self._judge(node, accused)
        self.survivors = sorted(n for n in self.masked if n not in self.culprits)
        self._check_enough(len(self.survivors), "masked input")
        return self.survivors

    def _masked_with(self, node: int, peer: int) -> bool:
        """``node`` added the pairwise mask with ``peer`` (it received and verified its shares)."""
        return (node in self.masked and node in self.ciphertexts.get(peer, {})
                and peer not in self.complaints.get(node, set()))

    # stage 4
    def unmask_request(self, node: int) -> tuple[list[int], list[int]]:
        """``(alive, dropped)`` in ``node``'s neighbourhood (``node`` itself is alive)."""
        live = set(self.survivors)
        alive = sorted(j for j in (*self.graph[node], node) if j in live)
        dropped = sorted(j for j in self.graph[node] if j in self.ciphertexts and j not in live)
        return alive, dropped

    def add_unmask(self, node: int, b_shares: Mapping[int, bytes],
                   sk_shares: Mapping[int, bytes]) -> None:
        """Record a survivor's reveals, each checked against its commitment or public key.

        Reveals that verify are kept; one that does not names the device a
        culprit and raises after the others are kept (its input stays in the
        sum: the others' shares remove its self mask, and the pair keys it did
        reveal correctly still remove its masks with dropped devices).
        """
        if node not in self.survivors or node in self.answered:
            raise self._violation(node, "unmask answer not expected (replay?)")
        alive, dropped = self.unmask_request(node)
        if not set(b_shares) <= set(alive) or not set(sk_shares) <= set(dropped):
            raise self._violation(node, "revealed shares for devices it was not asked about")
        self.answered.add(node)
        kw = {"round_id": self.round_id, "holder": node}
        bad: list[str] = []
        for owner, share in sorted(b_shares.items()):
            held = self.dealings[owner].commitments.get(node)
            if held is None or len(share) != SB or crypto.share_commitment(
                    b"b", share, dealer=owner, **kw) != held[0]:
                bad.append(f"a share of b_{owner} that does not match its commitment")
            else:
                self.b_shares.setdefault(owner, {})[node] = share
        for owner, reveal in sorted(sk_shares.items()):
            held = self.dealings[owner].commitments.get(node)
            if held is None or len(reveal) != SK_REVEAL_BYTES or crypto.share_commitment(
                    b"s", reveal[:SB], dealer=owner, **kw) != held[1]:
                bad.append(f"a share of s_{owner} that does not match its commitment")
            else:
                self.sk_shares.setdefault(owner, {})[node] = reveal[:SB]
            if len(reveal) != SK_REVEAL_BYTES or crypto.public_key(
                    reveal[SB:]) != self._pair_public(node, owner, _MASK):
                bad.append(f"a mask key for {owner} that is not its advertised one")
            else:
                self.pair_keys.setdefault(owner, {})[node] = reveal[SB:]
        if bad:
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise self._violation(node, f"revealed {bad[0]}{more}")

    def _recover(self, owner: int, shares: Mapping[int, bytes], check: Callable[[bytes], bool],
                 what: str) -> bytes:
        """The owner's secret from authentic shares (checked against its commitments).

        Authentic shares off the polynomial that the committed secret lies on
        were dealt off it: the owner is blamed, the secret still returned. If
        no ``threshold`` of them give the committed secret, the owner is
        blamed and the round aborts.
        """
        t = self.threshold
        if len(shares) < t:
            raise SecAggAbort(f"{what} of node {owner}: {len(shares)} shares, {t} needed")
        points = {h: shamir.field_int(s) for h, s in shares.items()}  # checked in add_unmask
        # The owner's own share is the one no receiver checked: use it last.
        order = [h for h in sorted(points) if h != owner] + [h for h in points if h == owner]
        rng = np.random.default_rng([self.seed, self.round_id, owner])
        for attempt in range(self.max_reconstruction_tries):
            subset = order[:t] if attempt == 0 else [order[int(i)] for i in sorted(
                rng.choice(len(order), size=t, replace=False).tolist())]
            base = {h: points[h] for h in subset}
            value = shamir.interpolate(base, 0)
            off = sorted(h for h in points if h not in base
                         and shamir.interpolate(base, h) != points[h])
            secret = value.to_bytes(shamir.SECRET_BYTES, "big") \
                if value < 1 << (8 * shamir.SECRET_BYTES) else None
            if secret is not None and check(secret):
                if off:
                    self.blame(owner, f"dealt shares of its {what} off its polynomial "
                               f"(holders {off[:5]})")
                return secret
            if not off or len(points) == t:
                break  # all shares agree: they encode another secret; no subset helps
        self.blame(owner, f"its authentic shares do not reconstruct its committed {what}")
        raise SecAggAbort(f"{what} of node {owner}: no set of {t} authentic shares matches "
                          "its commitment (the dealer is blamed)")

    def _commitment_check(self, owner: int) -> Callable[[bytes], bool]:
        def check(secret: bytes) -> bool:
            return crypto.commitment(secret, round_id=self.round_id,
                                     node=owner) == self.keys[owner].b_commit
        return check

    def _root_check(self, owner: int) -> Callable[[bytes], bool]:
        return lambda root: self._root_matches(owner, root)

    def _root_matches(self, owner: int, root: bytes) -> bool:
        return all(crypto.public_key(pair_private(root, _MASK, round_id=self.round_id, me=owner,
                                                  peer=p)) == self._pair_public(owner, p, _MASK)
                   for p in self.graph[owner])

    def finish(self) -> NDArray[np.uint64]:
        """The modular sum of the survivors' inputs.

        Raises
        ------
        SecAggAbort
            Fewer than the threshold answered stage 4, or a secret cannot be
            recovered and verified (its dealer is then in :attr:`culprits`).
        """
        mod_mask = np.uint64((1 << self.bits) - 1)
        total = np.zeros(self.length, dtype=np.uint64)
        for node in self.survivors:
            total += self.masked[node]
            b = self._recover(node, self.b_shares.get(node, {}),
                              self._commitment_check(node), "self-mask seed")
            total -= crypto.prg(b, self.length, 64, stream=STREAM_SELF)
        live = set(self.survivors)
        for gone in (j for j in self.u2 if j not in live):
            peers = [p for p in self.graph[gone] if p in live and self._masked_with(p, gone)]
            root: bytes | None = None
            for peer in peers:
                key = self.pair_keys.get(gone, {}).get(peer)
                if key is not None:  # the survivor's own key of the pair (checked)
                    seed = pairwise_seed(key, self._pair_public(gone, peer, _MASK),
                                         round_id=self.round_id, me=peer, peer=gone)
                else:  # it did not answer stage 4: rebuild the dropped device's root
                    if root is None:
                        root = self._recover(gone, self.sk_shares.get(gone, {}),
                                             self._root_check(gone), "mask key")
                    seed = pairwise_seed(pair_private(root, _MASK, round_id=self.round_id,
                                                      me=gone, peer=peer),
                                         self._pair_public(peer, gone, _MASK),
                                         round_id=self.round_id, me=gone, peer=peer)
                mask = crypto.prg(seed, self.length, 64, stream=STREAM_PAIR)
                # peer added sign(peer, gone) * mask.
                total = total - mask if _sign(peer, gone) > 0 else total + mask
        return total & mod_mask
