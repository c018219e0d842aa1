"""The history download: devices get the compressed difference from the model they hold.

Under partial participation a device that trained in round S and is picked
again in round T holds the model of round S. Instead of the whole model, the
server sends it one compressed difference between its model and the device's
(it keeps the device's exact model, bounded); a device without a usable
version (new, evicted from the history, or a claim that does not check out)
gets the compressed difference from the run's initial model if it can build
that model, else the quantized full model.

The server keeps (Gruntkowska, Tyurin and Richtárik, "EF21-P and Friends",
ICML 2023: primal compression with error feedback):

* ``g`` -- its own model, built by the strategy from the devices' updates
  (the loop passes it to ``strategy.begin_round``; devices' deltas are
  applied to it, not to what they trained from);
* per remembered device, ``W`` -- the model the device holds, exactly, with
  its version id ``"A.S"`` (the device got its last full model in round A and
  its last download in round S) and the digest of its weights.

A device picked in round T whose reply said it holds ``"A.S"`` with the
digest the server recorded gets ``c = C(g_T - W)`` (``download-compression``,
one payload however many rounds it missed) and both sides set
``W += D(c)``. What ``C`` dropped is still in ``g - W`` and is sent the next
time that device is picked: server-side error feedback, so devices never
drift from the server's model. A device the server does not remember (new,
evicted, or a claim that does not check out) gets the quantized full model
``Q(g_T)`` (``download-full-compression``) and starts ``"T.T"``. Device and
server add the same float32 arrays in the same order, so the device's model
equals the server's record of it exactly; the train message names the digest
of the target model and the device checks it, replying with an error (and
forgetting its model) when it cannot build it.

Memory: one float32 model per remembered device, bounded by
``download-history`` MB; the least recently picked device is forgotten first
and gets a full model next time. A bound smaller than one model makes every
download a full one; the run never fails for it. (Keeping per-round diffs
instead, as a chain every device replays, costs a device that missed k rounds
k payloads; one difference per device costs one.)

First contact from the initial model (the anchor ``"0.0"``): the initial
model ``W0`` is a deterministic function of the run (``Task.initial_weights``),
so a device whose ClientApp knows the task can build it. Such a device says so
in its hello reply (the digest of the ``W0`` it builds); if that digest is the
server's, a device the server does not remember gets ``c0 = C0(g_T - W0)``
(``download-first-compression``; empty: ``download-compression``) with base
``"0.0"`` instead of ``Q(g_T)``, and both sides set ``W = W0 + D(c0)``,
version ``"0.T"``. ``c0`` is the same for every such device in a round, so it
is computed once per round. A device that cannot build ``W0`` after all, or
builds another one (the digest of the result does not match), replies with an
error once; the server then never sends it an anchored download again (full
models, as before). Devices that did not advertise the anchor (a plain
ClientApp with :func:`flowerpress.client.mods.compression_mod`) get full
models. The anchor costs no memory beyond ``W0`` itself.

Cross-device populations (most devices new each round): every new device
gets the first-contact payload (the anchored difference, or the quantized full
model without the anchor), so its bytes are the floor; the history only pays
for devices picked again while their version is still kept.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

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
class _Held:
    """What the server knows one device holds."""

    anchor: int  # round of its last full model
    server_round: int  # round of its last download
    digest: str
    weights: Weights
    last_used: int


@dataclass
class DownloadHistory:
    """Server state of the history download (see the module docstring).

    Parameters
    ----------
    diff_codec
        Compresses ``g - W`` for a device the server remembers (``download-compression``).
    full_codec
        Compresses the full model for the others (``download-full-compression``).
    budget_bytes
        Bound on the remembered devices' float32 models (``download-history`` MB).
    initial
        The run's initial model ``W0``, the anchor ``"0.0"`` of first contacts
        (None: every first contact is a full model).
    first_codec
        Compresses ``g - W0`` for a first contact (``download-first-compression``;
        None: ``diff_codec``).
    """

    diff_codec: Pipeline
    full_codec: Pipeline
    budget_bytes: int
    initial: Weights | None = None
    first_codec: Pipeline | None = None
    server_round: int = 0
    #: node -> the model it holds (what the server sent it, exactly)
    devices: dict[int, _Held] = field(default_factory=dict)
    #: node -> the version it claimed in its last reply (checked on use)
    claims: dict[int, protocol.HeldVersion] = field(default_factory=dict)
    #: nodes that failed an anchored download: full models only from then on
    refused: set[int] = field(default_factory=set)
    _global: Weights | None = None
    _full: tuple[bytes, Weights, str] | None = None
    _first: tuple[bytes, Weights, str] | None = None
    _anchored: set[int] = field(default_factory=set)  # sent an anchored download this round
    _rng: np.random.Generator | None = None
    _anchor_digest: str | None = None

    def __post_init__(self) -> None:
        if self.initial is not None:
            self.initial = [np.array(w, dtype=np.float32) for w in self.initial]
            self._anchor_digest = protocol.weights_digest(self.initial)

    @property
    def anchor_digest(self) -> str | None:
        """Digest of the initial model (what a device's hello reply must name), or None."""
        return self._anchor_digest

    def advance(self, server_round: int, global_weights: Sequence[NDArray[np.float32]],
                rng: np.random.Generator) -> None:
        """Start round ``server_round`` with the server's model ``g``."""
        self.server_round = server_round
        self._global = [np.asarray(w, dtype=np.float32) for w in global_weights]
        self._full = None
        self._first = None
        self._anchored = set()
        self._rng = rng

    # --- memory bound -------------------------------------------------------------------
    def kept_bytes(self) -> int:
        """Bytes of the remembered devices' models."""
        return sum(int(w.nbytes) for held in self.devices.values() for w in held.weights)

    def _evict(self) -> None:
        """Forget the least recently picked devices until within the bound."""
        while self.devices and self.kept_bytes() > self.budget_bytes:
            oldest = min(self.devices, key=lambda n: (self.devices[n].last_used, n))
            del self.devices[oldest]

    # --- per device ---------------------------------------------------------------------
    def acknowledge(self, node: int, held: protocol.HeldVersion | None) -> None:
        """Remember what ``node`` says it holds (``None``: nothing usable)."""
        if held is None:
            self.claims.pop(node, None)
            if node in self._anchored:
                # It could not build W0 + c0 (or lost it at once): no anchor again.
                self.refused.add(node)
                log.info("node %s failed a download from the initial model; it gets full "
                         "models from now on", node)
        else:
            self.claims[node] = held

    def _verified(self, node: int) -> _Held | None:
        claim, held = self.claims.get(node), self.devices.get(node)
        if claim is None or held is None:
            return None
        if (claim.anchor, claim.server_round, claim.digest) != (
                held.anchor, held.server_round, held.digest):
            return None
        return held

    def download_for(self, node: int, rng: np.random.Generator, *,
                     anchor: str | None = None) -> Download:
        """The message arrays and ``download`` record for ``node`` this round.

        ``anchor`` is the initial-model digest the node's hello reply named
        (None: it did not); it must be the server's for an anchored first contact.
        """
        assert self._global is not None, "advance() first"
        held = self._verified(node)
        t = self.server_round
        if held is None or held.server_round >= t:
            self.devices.pop(node, None)
            if (anchor is not None and anchor == self._anchor_digest
                    and node not in self.refused):
                return self._first_download(node)
            return self._full_download(node)
        g = self._global
        with np.errstate(over="ignore", invalid="ignore"):
            residual = [(w - h).astype(np.float32) for w, h in zip(g, held.weights, strict=True)]
        payload, _ = self.diff_codec.encode(residual, None, rng=rng)
        if len(payload) >= len(self._full_model()[0]):
            return self._full_download(node)  # the full model is cheaper
        base = protocol.format_version(held.anchor, held.server_round)
        apply_diff_inplace(held.weights, _decode(payload, g))
        held.server_round, held.last_used = t, t
        held.digest = protocol.weights_digest(held.weights)
        arrays = ArrayRecord({f"{protocol.DIFF_PREFIX}{t}": Array(
            dtype="bytes", shape=(len(payload),), stype=PAYLOAD_STYPE, data=payload)})
        record = ConfigRecord({
            protocol.DOWNLOAD_VERSION: protocol.format_version(held.anchor, t),
            protocol.DOWNLOAD_DIGEST: held.digest, protocol.DOWNLOAD_BASE: base})
        return Download(arrays, record, [w.copy() for w in held.weights], full=False)

    def _full_download(self, node: int) -> Download:
        t = self.server_round
        payload, weights, digest = self._full_model()
        self.devices[node] = _Held(t, t, digest, [w.copy() for w in weights], last_used=t)
        self._evict()
        record = ConfigRecord({protocol.DOWNLOAD_VERSION: protocol.format_version(t, t),
                               protocol.DOWNLOAD_DIGEST: digest,
                               protocol.DOWNLOAD_BASE: ""})
        return Download(payload_record(payload), record, weights, full=True)

    def _first_download(self, node: int) -> Download:
        """``C0(g - W0)`` from the anchor ``"0.0"``, or the full model if that is cheaper."""
        t = self.server_round
        payload, weights, digest = self._first_model()
        if len(payload) >= len(self._full_model()[0]):
            return self._full_download(node)
        self.devices[node] = _Held(0, t, digest, [w.copy() for w in weights], last_used=t)
        self._evict()
        self._anchored.add(node)
        arrays = ArrayRecord({f"{protocol.DIFF_PREFIX}{t}": Array(
            dtype="bytes", shape=(len(payload),), stype=PAYLOAD_STYPE, data=payload)})
        record = ConfigRecord({
            protocol.DOWNLOAD_VERSION: protocol.format_version(0, t),
            protocol.DOWNLOAD_DIGEST: digest,
            protocol.DOWNLOAD_BASE: protocol.format_version(*protocol.ANCHOR_VERSION)})
        return Download(arrays, record, weights, full=False)

    def _first_model(self) -> tuple[bytes, Weights, str]:
        """This round's first-contact payload ``C0(g - W0)``, ``W0 + D(c0)``, its digest.

        The same for every new device of the round: built once a round.
        """
        if self._first is None:
            assert self._global is not None and self._rng is not None
            assert self.initial is not None
            codec = self.first_codec if self.first_codec is not None else self.diff_codec
            with np.errstate(over="ignore", invalid="ignore"):
                residual = [(g - w0).astype(np.float32)
                            for g, w0 in zip(self._global, self.initial, strict=True)]
            payload, _ = codec.encode(residual, None, rng=self._rng)
            weights = [w.copy() for w in self.initial]
            apply_diff_inplace(weights, _decode(payload, self._global))
            self._first = (payload, weights, protocol.weights_digest(weights))
        return self._first

    def _full_model(self) -> tuple[bytes, Weights, str]:
        """This round's full-model payload, its decoding and digest (built once a round)."""
        if self._full is None:
            assert self._global is not None and self._rng is not None
            payload, _ = self.full_codec.encode(self._global, None, rng=self._rng)
            weights = _decode(payload, self._global)
            self._full = (payload, weights, protocol.weights_digest(weights))
        return self._full

    # --- checkpoint -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The remembered devices' models, their claims and the refused nodes (checkpoint).

        The models are the live arrays (not copies: up to ``budget_bytes``):
        save them before the next round changes them.
        """
        return {
            "devices": [{"node": n, "anchor": h.anchor, "round": h.server_round,
                         "digest": h.digest, "last_used": h.last_used,
                         "weights": list(h.weights)}
                        for n, h in sorted(self.devices.items())],
            "claims": [{"node": n, "anchor": c.anchor, "round": c.server_round,
                        "digest": c.digest} for n, c in sorted(self.claims.items())],
            "refused": sorted(self.refused),
        }

    def load_state_dict(self, state: Mapping[str, Any], model: Sequence[NDArray[Any]]) -> None:
        """Restore :meth:`state_dict`; every model must have the shapes of ``model``.

        Raises
        ------
        ValueError
            A saved model does not fit ``model`` or does not match its digest.
        """
        devices: dict[int, _Held] = {}
        for item in state.get("devices", []):
            weights = [np.asarray(w, dtype=np.float32).copy() for w in item["weights"]]
            if len(weights) != len(model) or any(
                    w.shape != m.shape for w, m in zip(weights, model, strict=True)):
                raise ValueError(f"the saved model of node {item['node']} is not this model")
            if protocol.weights_digest(weights) != item["digest"]:
                raise ValueError(f"the saved model of node {item['node']} does not match its "
                                 "digest")
            devices[int(item["node"])] = _Held(int(item["anchor"]), int(item["round"]),
                                               str(item["digest"]), weights,
                                               last_used=int(item["last_used"]))
        self.devices = devices
        self.claims = {int(c["node"]): protocol.HeldVersion(int(c["anchor"]), int(c["round"]),
                                                            str(c["digest"]))
                       for c in state.get("claims", [])}
        self.refused = {int(n) for n in state.get("refused", [])}
        self._evict()

    def stats(self) -> Mapping[str, int]:
        """What the history holds now (for the round row)."""
        return {"kept_bytes": self.kept_bytes(), "devices": len(self.devices)}
