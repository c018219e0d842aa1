"""The SecAgg+ protocol (Bell et al., CCS 2020), pure: no Flower, no I/O.

A round has four stages; the server routes every message and learns only the
modular sum of the survivors' vectors:

1. **advertise keys**: device ``i`` draws X25519 key pairs ``(c_pk, c_sk)``
   (share encryption) and ``(s_pk, s_sk)`` (pairwise masks), a self-mask seed
   ``b_i``, and sends ``c_pk, s_pk`` and a SHA-256 commitment to ``b_i``.
2. **share keys**: ``i`` Shamir-shares ``s_sk_i`` and ``b_i`` among its
   neighbours and itself (``threshold`` shares recover them) and sends each
   neighbour's shares encrypted (AES-GCM under the X25519 key it agrees with
   that neighbour, bound to the round, sender and receiver).
3. **masked input**: ``i`` decrypts the shares it received, and sends
   ``y_i = x_i + PRG(b_i) + sum_j +-PRG(s_ij)  (mod 2**bits)`` over the
   neighbours ``j`` whose shares it received intact (``+`` if ``i < j``). A
   neighbour whose ciphertext does not authenticate is named in ``complaints``
   and left out of ``i``'s masks.
4. **unmasking**: every survivor reveals, for each neighbour, *either* its
   share of ``b_j`` (``j`` survived) *or* its share of ``s_sk_j`` (``j``
   dropped after sharing, or was named in a complaint), never both, and answers
   once per round. The server recombines, checks each secret against its
   commitment (``b``) or public key (``s_sk``), removes the self masks of the
   survivors and the dropped devices' pairwise masks, and is left with
   ``sum_i x_i mod 2**bits``.

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

import math
import secrets
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from numpy.typing import NDArray

from flowerpress.secagg import crypto, shamir
from flowerpress.secagg.graph import communication_graph

#: Bytes of one encrypted share pair (nonce, 3 ids, two shares, tag).
PLAIN_SHARE_BYTES = 24 + 2 * shamir.SHARE_BYTES
CIPHER_SHARE_BYTES = crypto.NONCE_BYTES + PLAIN_SHARE_BYTES + crypto.TAG_BYTES
STREAM_SELF = 1
STREAM_PAIR = 2


class SecAggAbort(RuntimeError):  # noqa: N818 (reads as what happened)
    """The round cannot be completed securely (too few survivors or shares); it is skipped."""


class SecAggViolation(ValueError):  # noqa: N818
    """One device's message breaks the protocol; the server drops that device."""


class StageError(ValueError):
    """A device refuses a request (wrong stage, replay, a request that would unmask)."""


@dataclass(frozen=True)
class PublicKeys:
    """What a device advertises in stage 1."""

    c_pk: bytes  # X25519 public key for share encryption
    s_pk: bytes  # X25519 public key for pairwise masks
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


# --- device side ---------------------------------------------------------------------


@dataclass(frozen=True)
class ClientSession:
    """A device's secrets and progress in one round (never leaves the device)."""

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
    # Shares this device holds: source -> (share of b_src, share of s_sk_src).
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
    """Stage 1: fresh keys and self-mask seed; the public part to send.

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
    c_sk, s_sk = crypto.generate_private_key(), crypto.generate_private_key()
    b = secrets.token_bytes(shamir.SECRET_BYTES)
    session = ClientSession(node=node, round_id=round_id, bits=bits, length=length,
                            threshold=threshold, neighbours=nb, c_sk=c_sk, s_sk=s_sk, b=b)
    keys = PublicKeys(crypto.public_key(c_sk), crypto.public_key(s_sk),
                      crypto.commitment(b, round_id=round_id, node=node))
    return session, keys


def client_share_keys(session: ClientSession, roster: Mapping[int, PublicKeys]
                      ) -> tuple[ClientSession, dict[int, bytes]]:
    """Stage 2: encrypted shares of ``s_sk`` and ``b`` for every neighbour in ``roster``."""
    if session.stage != 1:
        raise StageError(f"share-keys request in stage {session.stage} (replayed?)")
    if not set(roster) <= set(session.neighbours):
        raise StageError("roster names devices that are not this device's neighbours")
    for peer, keys in roster.items():
        if {len(keys.c_pk), len(keys.s_pk), len(keys.b_commit)} != {crypto.KEY_BYTES}:
            raise StageError(f"neighbour {peer}'s keys are malformed")
    holders = [*sorted(roster), session.node]
    if len(holders) < session.threshold:
        raise StageError(f"only {len(holders)} holders left, {session.threshold} needed")
    b_shares = shamir.split(session.b, threshold=session.threshold, holders=holders)
    sk_shares = shamir.split(session.s_sk, threshold=session.threshold, holders=holders)
    out: dict[int, bytes] = {}
    c_sk = crypto.load_private(session.c_sk)
    for peer in sorted(roster):
        key = crypto.agree(c_sk, roster[peer].c_pk, label=b"enc",
                           round_id=session.round_id, pair=(session.node, peer))
        plain = (struct.pack("<QQQ", session.round_id, session.node, peer)
                 + b_shares[peer] + sk_shares[peer])
        out[peer] = crypto.encrypt(key, plain, associated=_share_ad(
            session.round_id, session.node, peer))
    own = (b_shares[session.node], sk_shares[session.node])
    return replace(session, stage=2, roster=dict(roster), held={session.node: own}), out


def client_mask(session: ClientSession, inbox: Mapping[int, bytes],
                vector: NDArray[np.uint64]) -> tuple[ClientSession, NDArray[np.uint64], list[int]]:
    """Stage 3: the masked vector and the neighbours whose shares did not authenticate.

    ``inbox`` maps a neighbour to the ciphertext it sent this device; a
    neighbour is in it exactly when it completed stage 2.
    """
    if session.stage != 2:
        raise StageError(f"masked-input request in stage {session.stage} (replayed?)")
    x = np.asarray(vector)
    if x.shape != (session.length,) or x.dtype != np.uint64:
        raise StageError(f"input must be uint64 of shape ({session.length},)")
    if x.size and int(x.max()) >= 1 << session.bits:
        raise StageError(f"input values must be below 2**{session.bits}")
    held = dict(session.held)
    complaints: list[int] = []
    masked_with: list[int] = []
    c_sk, s_sk = crypto.load_private(session.c_sk), crypto.load_private(session.s_sk)
    for src in sorted(inbox):
        keys = session.roster.get(src)
        if keys is None:
            complaints.append(src)
            continue
        key = crypto.agree(c_sk, keys.c_pk, label=b"enc", round_id=session.round_id,
                           pair=(session.node, src))
        try:
            plain = crypto.decrypt(key, inbox[src], associated=_share_ad(
                session.round_id, src, session.node))
        except crypto.DecryptionError:
            complaints.append(src)
            continue
        header = struct.unpack("<QQQ", plain[:24]) if len(plain) >= 24 else None
        if len(plain) != PLAIN_SHARE_BYTES or header != (session.round_id, src, session.node):
            complaints.append(src)
            continue
        held[src] = (plain[24:24 + shamir.SHARE_BYTES], plain[24 + shamir.SHARE_BYTES:])
        masked_with.append(src)
    if len(masked_with) + 1 < session.threshold:
        raise StageError(f"only {len(masked_with) + 1} intact share sets, "
                         f"{session.threshold} needed")
    y = x + crypto.prg(session.b, session.length, 64, stream=STREAM_SELF)
    for peer in masked_with:
        seed = pairwise_seed(s_sk, session.roster[peer].s_pk,
                             round_id=session.round_id, me=session.node, peer=peer)
        mask = crypto.prg(seed, session.length, 64, stream=STREAM_PAIR)
        y = y + mask if _sign(session.node, peer) > 0 else y - mask
    y &= np.uint64((1 << session.bits) - 1)
    return replace(session, stage=3, held=held), y, complaints


def client_unmask(session: ClientSession, alive: Iterable[int], dropped: Iterable[int]
                  ) -> tuple[ClientSession, dict[int, bytes], dict[int, bytes]]:
    """Stage 4: shares of ``b_j`` for ``j`` alive, of ``s_sk_j`` for ``j`` dropped.

    Answered once per round. Refused if a device is in both sets, if a named
    device is no neighbour, or if fewer than ``threshold`` devices are alive
    (the sum of so few inputs is not released).
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
    sk_out = {j: session.held[j][1] for j in sorted(gone) if j in session.held}
    return replace(session, stage=4), b_out, sk_out


# --- server side ---------------------------------------------------------------------


@dataclass
class ServerSession:
    """The server's view of one round: routing, validation, reconstruction.

    Every ``add_*`` method validates one device's message and raises
    :class:`SecAggViolation` naming the problem; the caller drops that device.
    Nothing a device sends is trusted: lengths, ids and sets are checked
    against what the round fixed.
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
        self.masked: dict[int, NDArray[np.uint64]] = {}
        self.complaints: dict[int, set[int]] = {}
        self.b_shares: dict[int, dict[int, bytes]] = {}  # owner -> holder -> share
        self.sk_shares: dict[int, dict[int, bytes]] = {}
        self.answered: set[int] = set()
        self.u1: list[int] = []
        self.u2: list[int] = []
        self.survivors: list[int] = []

    def _min_devices(self) -> int:
        # Both: enough holders in a neighbourhood, and ceil(fraction * n) summands in the
        # sum (each device's noise share assumes that many).
        return max(self.threshold, math.ceil(self.fraction * len(self.nodes) - 1e-9))

    def _check_enough(self, count: int, stage: str) -> None:
        if count < self._min_devices():
            raise SecAggAbort(f"{stage}: {count} devices left, the threshold needs "
                              f"{self._min_devices()}")

    # stage 1
    def setup_for(self, node: int) -> dict[str, Any]:
        """What device ``node`` is told in stage 1."""
        return {"round": self.round_id, "bits": self.bits, "length": self.length,
                "threshold": self.threshold, "neighbours": list(self.graph[node])}

    def add_keys(self, node: int, keys: PublicKeys) -> None:
        """Record a device's advertised keys."""
        if node not in self.graph or node in self.keys:
            raise SecAggViolation(f"node {node}: keys not expected (unknown node or replay)")
        if {len(keys.c_pk), len(keys.s_pk), len(keys.b_commit)} != {crypto.KEY_BYTES}:
            raise SecAggViolation(f"node {node}: advertised keys must be {crypto.KEY_BYTES} "
                                  "bytes each")
        if keys.c_pk == keys.s_pk:
            raise SecAggViolation(f"node {node}: the two public keys must differ")
        self.keys[node] = keys

    def close_keys(self) -> list[int]:
        """End stage 1; SecAggAbort if too few devices advertised."""
        self.u1 = sorted(self.keys)
        self._check_enough(len(self.u1), "advertise keys")
        return self.u1

    # stage 2
    def roster_for(self, node: int) -> dict[int, PublicKeys]:
        """The keys of ``node``'s neighbours that advertised."""
        return {j: self.keys[j] for j in self.graph[node] if j in self.keys}

    def add_shares(self, node: int, cts: Mapping[int, bytes]) -> None:
        """Record a device's encrypted shares: exactly one per advertised neighbour."""
        if node not in self.keys or node in self.ciphertexts:
            raise SecAggViolation(f"node {node}: shares not expected (stage 1 missed or replay)")
        expected = set(self.roster_for(node))
        if set(cts) != expected:
            raise SecAggViolation(f"node {node}: shares must address exactly its "
                                  f"{len(expected)} neighbours, got {len(cts)}")
        for dst, ct in cts.items():
            if len(ct) != CIPHER_SHARE_BYTES:
                raise SecAggViolation(f"node {node}: share for {dst} has {len(ct)} bytes, "
                                      f"expected {CIPHER_SHARE_BYTES}")
        self.ciphertexts[node] = dict(cts)

    def close_shares(self) -> list[int]:
        """End stage 2; SecAggAbort if too few devices shared."""
        self.u2 = sorted(self.ciphertexts)
        self._check_enough(len(self.u2), "share keys")
        return self.u2

    # stage 3
    def inbox_for(self, node: int) -> dict[int, bytes]:
        """The ciphertexts addressed to ``node`` by devices that completed stage 2."""
        return {src: self.ciphertexts[src][node] for src in self.u2
                if node in self.ciphertexts[src]}

    def add_masked(self, node: int, masked: NDArray[np.uint64], complaints: Sequence[int]
                   ) -> None:
        """Record a masked vector (already unpacked to ``length`` words)."""
        if node not in self.ciphertexts or node in self.masked:
            raise SecAggViolation(f"node {node}: masked input not expected (replay?)")
        y = np.asarray(masked)
        if y.shape != (self.length,) or y.dtype != np.uint64:
            raise SecAggViolation(f"node {node}: masked vector must be {self.length} words")
        if y.size and int(y.max()) >= 1 << self.bits:
            raise SecAggViolation(f"node {node}: masked values must be below 2**{self.bits}")
        inbox = set(self.inbox_for(node))
        if not set(complaints) <= inbox:
            raise SecAggViolation(f"node {node}: complaints name devices that sent it nothing")
        self.masked[node] = y
        self.complaints[node] = set(complaints)

    def close_masked(self) -> list[int]:
        """End stage 3: survivors are devices that sent input and no one complained about.

        A device naming more neighbours than a neighbourhood may lose
        (``k + 1 - threshold``) is not believed: it is dropped itself and its
        complaints are ignored, so one lying device cannot remove more honest
        devices than the dropout budget of its neighbourhood.
        """
        accused: set[int] = set()
        for node, named in self.complaints.items():
            if len(named) > len(self.graph[node]) + 1 - self.threshold:
                accused.add(node)
            else:
                accused |= named
        self.survivors = sorted(n for n in self.masked if n not in accused)
        self._check_enough(len(self.survivors), "masked input")
        return self.survivors

    # stage 4
    def unmask_request(self, node: int) -> tuple[list[int], list[int]]:
        """``(alive, dropped)`` in ``node``'s neighbourhood (``node`` itself is alive)."""
        live = set(self.survivors)
        alive = sorted(j for j in (*self.graph[node], node) if j in live)
        dropped = sorted(j for j in self.graph[node] if j in self.ciphertexts and j not in live)
        return alive, dropped

    def add_unmask(self, node: int, b_shares: Mapping[int, bytes],
                   sk_shares: Mapping[int, bytes]) -> None:
        """Record a survivor's revealed shares."""
        if node not in self.survivors or node in self.answered:
            raise SecAggViolation(f"node {node}: unmask answer not expected (replay?)")
        alive, dropped = self.unmask_request(node)
        if not set(b_shares) <= set(alive) or not set(sk_shares) <= set(dropped):
            raise SecAggViolation(f"node {node}: revealed shares for devices it was not asked "
                                  "about")
        for share in (*b_shares.values(), *sk_shares.values()):
            if len(share) != shamir.SHARE_BYTES:
                raise SecAggViolation(f"node {node}: a share has {len(share)} bytes, expected "
                                      f"{shamir.SHARE_BYTES}")
        for owner, share in b_shares.items():
            self.b_shares.setdefault(owner, {})[node] = share
        for owner, share in sk_shares.items():
            self.sk_shares.setdefault(owner, {})[node] = share
        self.answered.add(node)

    def _recover(self, owner: int, shares: Mapping[int, bytes], check: Any, what: str) -> bytes:
        if len(shares) < self.threshold:
            raise SecAggAbort(f"{what} of node {owner}: {len(shares)} shares, "
                              f"{self.threshold} needed")
        holders = sorted(shares)
        rng = np.random.default_rng([self.seed, self.round_id, owner])
        for attempt in range(self.max_reconstruction_tries):
            subset = holders[:self.threshold] if attempt == 0 else sorted(
                rng.choice(holders, size=self.threshold, replace=False).tolist())
            try:
                secret = shamir.combine({h: shares[h] for h in subset})
            except ValueError:
                continue
            if check(secret):
                return secret
            if len(holders) == self.threshold:
                break
        raise SecAggAbort(f"{what} of node {owner}: no set of {self.threshold} shares matches "
                          "its commitment (inconsistent shares)")

    def finish(self) -> NDArray[np.uint64]:
        """The modular sum of the survivors' inputs.

        Raises
        ------
        SecAggAbort
            Fewer than the threshold answered stage 4, or a secret cannot be
            recovered and verified.
        """
        mod_mask = np.uint64((1 << self.bits) - 1)
        total = np.zeros(self.length, dtype=np.uint64)
        for node in self.survivors:
            total += self.masked[node]
            b = self._recover(node, self.b_shares.get(node, {}), lambda s, n=node: (
                crypto.commitment(s, round_id=self.round_id, node=n) == self.keys[n].b_commit),
                "self-mask seed")
            total -= crypto.prg(b, self.length, 64, stream=STREAM_SELF)
        live = set(self.survivors)
        for gone in (j for j in self.u2 if j not in live):
            # A live peer masked with `gone` iff it received gone's shares intact.
            peers = [p for p in self.graph[gone] if p in live and p in self.ciphertexts[gone]
                     and gone not in self.complaints.get(p, set())]
            if not peers:
                continue
            s_sk = self._recover(gone, self.sk_shares.get(gone, {}), lambda s, n=gone: (
                crypto.public_key(s) == self.keys[n].s_pk), "mask key")
            key = crypto.load_private(s_sk)
            for peer in peers:
                seed = pairwise_seed(key, self.keys[peer].s_pk, round_id=self.round_id,
                                     me=gone, peer=peer)
                mask = crypto.prg(seed, self.length, 64, stream=STREAM_PAIR)
                # peer added sign(peer, gone) * mask.
                total = total - mask if _sign(peer, gone) > 0 else total + mask
        return total & mod_mask
