"""The history download: devices get the compressed difference from the model they hold.

Under partial participation a device that trained in round S and is picked
again in round T holds the model of round S. Instead of the whole model, the
server sends it the compressed global updates of rounds S+1..T, which it keeps
in a bounded history; a device without a usable version (new, evicted from the
history, or a claim that does not check out) gets the quantized full model.

The server keeps (Gruntkowska, Tyurin and Richtárik, "EF21-P and Friends",
ICML 2023: primal compression with error feedback):

* ``g`` -- its own model, built by the strategy from the devices' updates
  (the loop passes it to ``strategy.begin_round``; devices' deltas are
  applied to it, not to what they trained from);
* *lines* -- the devices that got the full model ``F_A = D(Q(g_A))`` in round A
  form line A. Every round T each line gets ``c = C(g_T - W_A)`` and
  ``W_A += D(c)``, so line A's model at round T is ``F_A`` plus its diffs of
  rounds A+1..T. What ``C`` (or the full model's quantization) drops is still
  in ``g - W_A`` and is sent again next round: server-side error feedback,
  so a device's model never drifts from ``g`` by more than about one round's
  compression error. The server keeps ``W_A`` (one float32 model per line)
  and the diffs of the last rounds;
* per node, the version it said it holds in its last reply (``"A.S"`` and the
  digest), used only if the digest matches the server's record of that
  version and the diffs S+1..T are still kept.

A device on line A holding round S gets the diffs of rounds S+1..T (one
payload each), unless they are not smaller than the full model; then, or
without a usable version, it gets the full model and starts line T. Device and
server apply the same float32 additions in the same order, so the device's
model equals the server's record of it exactly; the train message names the
digest of the target model and the device checks it, replying with an error
(and forgetting its model) if it cannot build it.

Memory: the kept diffs plus the lines' float32 models are bounded by
``download-history`` MB; the least recently used line and the oldest diffs are
dropped first, and their devices get a full model next time. A bound smaller
than one line makes every download a full one; the run never fails for it.

Cross-device populations (most devices new each round): every new device
gets the quantized full model, so its bytes are the floor; the history only
pays for devices picked again while their version is still kept.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord
from numpy.typing import NDArray

from flowerpress import protocol
from flowerpress.compression import Pipeline, decode
from flowerpress.compression.envelope import PAYLOAD_STYPE, payload_record

log = logging.getLogger(__name__)

Weights = list[NDArray[np.float32]]


@dataclass(frozen=True)
class Download:
    """What one device is sent and the model it will hold after decoding it."""

    arrays: ArrayRecord
    record: ConfigRecord
    received: Weights
    full: bool


def _decode(payload: bytes, reference: Sequence[NDArray[np.float32]]) -> Weights:
    arrays = decode(payload, max_elements=sum(int(r.size) for r in reference),
                    max_tensors=len(reference))
    return [np.asarray(a, dtype=np.float32).reshape(r.shape)
            for a, r in zip(arrays, reference, strict=True)]


def apply_diff_inplace(weights: Weights, diff: Sequence[NDArray[np.float32]]) -> None:
    """``weights += diff`` in float32, tensor by tensor (the device does the same)."""
    for w, d in zip(weights, diff, strict=True):
        np.add(w, d, out=w)


@dataclass
class _Line:
    """Devices that got the full model in round ``anchor`` and every diff since."""

    weights: Weights  # what they hold at the current round
    last_used: int  # last round a device of this line was sent something


@dataclass
class DownloadHistory:
    """Server state of the history download (see the module docstring).

    Parameters
    ----------
    diff_codec
        Compresses each line's ``g_T - W_{T-1}`` every round (``download-compression``).
    full_codec
        Compresses the full model for devices without a usable version
        (``download-full-compression``).
    budget_bytes
        Bound on the kept diff payloads plus the lines' models (``download-history`` MB).
    """

    diff_codec: Pipeline
    full_codec: Pipeline
    budget_bytes: int
    server_round: int = 0
    #: anchor round -> the line's model at ``server_round``
    lines: dict[int, _Line] = field(default_factory=dict)
    #: (anchor, round) -> the compressed update of that line in that round
    diffs: dict[tuple[int, int], bytes] = field(default_factory=dict)
    #: (anchor, round) -> digest of that version, for the versions still usable
    digests: dict[tuple[int, int], str] = field(default_factory=dict)
    #: node -> the version it claimed in its last reply (verified on use)
    claims: dict[int, protocol.HeldVersion] = field(default_factory=dict)
    _global: Weights | None = None
    _full: tuple[bytes, Weights] | None = None
    _cache: dict[tuple[int, int], Download | None] = field(default_factory=dict)

    # --- one round --------------------------------------------------------------------
    def advance(self, server_round: int, global_weights: Sequence[NDArray[np.float32]],
                rng: np.random.Generator) -> None:
        """Start round ``server_round``: each line sends ``C(g - W)`` and adds ``D`` of it."""
        self.server_round = server_round
        self._full = None
        self._cache = {}
        g = [np.asarray(w, dtype=np.float32) for w in global_weights]
        self._global = g
        for anchor, line in self.lines.items():
            with np.errstate(over="ignore", invalid="ignore"):
                residual = [(w - h).astype(np.float32)
                            for w, h in zip(g, line.weights, strict=True)]
            payload, _ = self.diff_codec.encode(residual, None, rng=rng)
            apply_diff_inplace(line.weights, _decode(payload, g))
            self.diffs[(anchor, server_round)] = payload
            self.digests[(anchor, server_round)] = protocol.weights_digest(line.weights)
        self._evict()

    def _usable(self, anchor: int, held_round: int) -> bool:
        """Whether version ``anchor.held_round`` can still be brought to the current round."""
        return anchor in self.lines and all(
            (anchor, r) in self.diffs for r in range(held_round + 1, self.server_round + 1))

    # --- memory bound -------------------------------------------------------------------
    def kept_bytes(self) -> int:
        """Bytes the history holds: diff payloads and the lines' float32 models."""
        return (sum(len(p) for p in self.diffs.values())
                + sum(int(w.nbytes) for line in self.lines.values() for w in line.weights))

    def _evict(self) -> None:
        """Drop the oldest entries (diffs by round, lines by last use) until within bound."""
        while self.kept_bytes() > self.budget_bytes and (self.diffs or self.lines):
            oldest_diff = min(self.diffs, key=lambda k: (k[1], k[0]), default=None)
            oldest_line = min(self.lines, key=lambda a: (self.lines[a].last_used, a),
                              default=None)
            if oldest_line is not None and (
                    oldest_diff is None or self.lines[oldest_line].last_used <= oldest_diff[1]):
                del self.lines[oldest_line]
                for key in [k for k in self.diffs if k[0] == oldest_line]:
                    del self.diffs[key]
            elif oldest_diff is not None:
                del self.diffs[oldest_diff]
        self.digests = {k: v for k, v in self.digests.items() if self._usable(*k)}

    # --- per device ---------------------------------------------------------------------
    def acknowledge(self, node: int, held: protocol.HeldVersion | None) -> None:
        """Remember what ``node`` says it holds (``None``: nothing usable)."""
        if held is None:
            self.claims.pop(node, None)
        else:
            self.claims[node] = held

    def _verified(self, node: int) -> tuple[int, int] | None:
        claim = self.claims.get(node)
        if claim is None or claim.server_round >= self.server_round:
            return None
        key = (claim.anchor, claim.server_round)
        if self.digests.get(key) != claim.digest or not self._usable(*key):
            return None
        return key

    def download_for(self, node: int, rng: np.random.Generator) -> Download:
        """The message arrays and ``download`` record for ``node`` this round."""
        key = self._verified(node)
        if key is not None:
            if key not in self._cache:
                self._cache[key] = self._diffs_from(*key, rng)
            cached = self._cache[key]
            if cached is not None:
                self.lines[key[0]].last_used = self.server_round
                return cached
        return self._full_download(rng)

    def _diffs_from(self, anchor: int, held_round: int,
                    rng: np.random.Generator) -> Download | None:
        rounds = range(held_round + 1, self.server_round + 1)
        payloads = {r: self.diffs[(anchor, r)] for r in rounds}
        if sum(len(p) for p in payloads.values()) >= len(self._full_model(rng)[0]):
            return None  # the full model is cheaper
        arrays = ArrayRecord({f"{protocol.DIFF_PREFIX}{r}": Array(
            dtype="bytes", shape=(len(p),), stype=PAYLOAD_STYPE, data=p)
            for r, p in payloads.items()})
        record = ConfigRecord({
            protocol.DOWNLOAD_VERSION: protocol.format_version(anchor, self.server_round),
            protocol.DOWNLOAD_DIGEST: self.digests[(anchor, self.server_round)],
            protocol.DOWNLOAD_BASE: protocol.format_version(anchor, held_round)})
        return Download(arrays, record, self.lines[anchor].weights, full=False)

    def _full_download(self, rng: np.random.Generator) -> Download:
        t = self.server_round
        payload, weights = self._full_model(rng)
        if t not in self.lines:
            # A new line: its devices start from the quantized model and its own
            # diffs from next round on correct what the quantization dropped.
            self.lines[t] = _Line([w.copy() for w in weights], last_used=t)
            self.digests[(t, t)] = protocol.weights_digest(weights)
            self._evict()
        digest = self.digests.get((t, t)) or protocol.weights_digest(weights)
        record = ConfigRecord({protocol.DOWNLOAD_VERSION: protocol.format_version(t, t),
                               protocol.DOWNLOAD_DIGEST: digest,
                               protocol.DOWNLOAD_BASE: ""})
        return Download(payload_record(payload), record, weights, full=True)

    def _full_model(self, rng: np.random.Generator) -> tuple[bytes, Weights]:
        """This round's full-model payload (of the server's model) and its decoding."""
        if self._full is None:
            assert self._global is not None
            payload, _ = self.full_codec.encode(self._global, None, rng=rng)
            self._full = (payload, _decode(payload, self._global))
        return self._full

    def stats(self) -> Mapping[str, int]:
        """What the history holds now (for the round row)."""
        return {"kept_bytes": self.kept_bytes(), "kept_diffs": len(self.diffs),
                "lines": len(self.lines)}
