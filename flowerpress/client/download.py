"""The device's side of the history download (see ``flowerpress.server.download``).

The device keeps the last global model it received in ``Context.state`` under
:data:`HELD_KEY` (the weights) and :data:`HELD_META_KEY` (its version and
digest). A train message with a ``"download"`` record carries either a full
model or the compressed difference between the server's model and the
version the device holds; the device adds it in float32, exactly as the server
did, and checks the digest of the result against the one the server named.
Any mismatch (lost state, a claim that was not true, a corrupted payload)
raises: the device forgets its model, replies with an error this round and
gets a full model next time. It never trains on a model other than the one
the server intended.

A device that can build the run's initial model (its ClientApp knows the
task: :func:`flowerpress.client_app` passes ``Task.initial_weights`` to the
mod as an :data:`InitialWeights` provider) may get a difference with base
``"0.0"`` (the anchor) instead of a full model: it builds the initial model,
adds the difference, and checks the digest as for any other difference.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from numpy.typing import NDArray

from flowerpress import protocol
from flowerpress.compression import decode
from flowerpress.compression.envelope import PAYLOAD_STYPE, is_payload, payload_bytes

Weights = list[NDArray[np.float32]]

#: Where the held model is kept in ``Context.state``.
HELD_KEY = "flowerpress.download"
#: Its version and digest (a ConfigRecord).
HELD_META_KEY = "flowerpress.download.meta"


#: Builds the run's initial model on the device (``Task.initial_weights``), or None
#: when this device cannot; called with the node's Context.
InitialWeights = Callable[[Context], Sequence[NDArray[np.float32]] | None]


class DownloadMismatchError(ValueError):
    """The device cannot build the model the server intended (it forgets its own)."""


def _forget_inplace(context: Context) -> None:
    for key in (HELD_KEY, HELD_META_KEY):
        if key in context.state:
            del context.state[key]


def _held_version(context: Context) -> tuple[tuple[int, int], str] | None:
    """``((anchor, round), digest)`` of the model this device's state names, or None."""
    meta = context.state.config_records.get(HELD_META_KEY)
    if meta is None:
        return None
    version = protocol.parse_version(meta.get(protocol.DOWNLOAD_HELD))
    digest = protocol.parse_digest(meta.get(protocol.DOWNLOAD_DIGEST))
    return None if version is None or digest is None else (version, digest)


def held_model(context: Context) -> tuple[tuple[int, int], str, Weights] | None:
    """``((anchor, round), digest, weights)`` this device holds, or None."""
    held = _held_version(context)
    record = context.state.array_records.get(HELD_KEY)
    if held is None or record is None:
        return None
    version, digest = held
    weights = [np.array(a, dtype=np.float32) for a in record.to_numpy_ndarrays()]
    return version, digest, weights


def _decode_diff(payload: bytes, reference: Sequence[NDArray[np.float32]]) -> Weights:
    arrays = decode(payload, max_elements=sum(int(r.size) for r in reference),
                    max_tensors=len(reference))
    if len(arrays) != len(reference):
        raise DownloadMismatchError(f"diff has {len(arrays)} tensors, expected "
                                    f"{len(reference)}")
    out: Weights = []
    for a, r in zip(arrays, reference, strict=True):
        arr = np.asarray(a, dtype=np.float32)
        if arr.size != r.size:
            raise DownloadMismatchError(f"diff tensor of {arr.size} elements, expected {r.size}")
        out.append(arr.reshape(r.shape))
    return out


def anchor_weights(initial: InitialWeights | None, context: Context) -> Weights | None:
    """The initial model as float32 copies (the anchor ``"0.0"``), or None if not buildable."""
    if initial is None:
        return None
    built = initial(context)
    return None if built is None else [np.array(w, dtype=np.float32) for w in built]


def receive_download(msg: Message, context: Context, *, max_elements: int,
                     initial: InitialWeights | None = None) -> Weights:
    """The model a history-download train message brings; kept in ``context.state``.

    ``initial`` builds the run's initial model, the base of a difference from
    ``"0.0"`` (a first contact); without it such a difference is refused.

    Raises
    ------
    DownloadMismatchError
        The result is not the model the server named (the held model is forgotten).
    """
    record = msg.content.config_records[protocol.DOWNLOAD]
    incoming = msg.content.array_records.get(protocol.ARRAYS)
    target = protocol.parse_version(record.get(protocol.DOWNLOAD_VERSION))
    digest = protocol.parse_digest(record.get(protocol.DOWNLOAD_DIGEST))
    if incoming is None or target is None or digest is None:
        _forget_inplace(context)
        raise DownloadMismatchError("download record without a valid version, digest or arrays")
    try:
        if is_payload(incoming):
            weights = [np.array(a, dtype=np.float32) for a in
                       decode(payload_bytes(incoming), max_elements=max_elements)]
        else:
            base = protocol.parse_version(record.get(protocol.DOWNLOAD_BASE))
            weights = _apply_diffs(incoming, base, target, context, initial)
    except DownloadMismatchError:
        _forget_inplace(context)
        raise
    except ValueError as exc:  # PayloadError and shape problems
        _forget_inplace(context)
        raise DownloadMismatchError(f"download could not be decoded: {exc}") from None
    if protocol.weights_digest(weights) != digest:
        _forget_inplace(context)
        raise DownloadMismatchError(
            f"the model built from the download does not have digest {digest} "
            f"(version {protocol.format_version(*target)})")
    context.state[HELD_KEY] = ArrayRecord(weights)
    context.state[HELD_META_KEY] = ConfigRecord({
        protocol.DOWNLOAD_HELD: protocol.format_version(*target),
        protocol.DOWNLOAD_DIGEST: digest})
    return weights


def _base_weights(base: tuple[int, int] | None, target: tuple[int, int], context: Context,
                  initial: InitialWeights | None) -> Weights:
    """The model a difference applies to: the anchor (built here) or the held one."""
    if base is not None and base == protocol.ANCHOR_VERSION and target[0] == 0 < target[1]:
        try:
            anchor = anchor_weights(initial, context)
        except Exception as exc:  # the task cannot be built here: no anchor
            raise DownloadMismatchError(f"cannot build the initial model: "
                                        f"{type(exc).__name__}: {exc}") from None
        if anchor is None:
            raise DownloadMismatchError("a difference from the initial model was sent but "
                                        "this device cannot build it")
        return anchor
    held = held_model(context)
    if held is None:
        raise DownloadMismatchError("a difference was sent but this device holds no model")
    version, held_digest, weights = held
    if base is None or version != base or base[0] != target[0] or base[1] >= target[1]:
        raise DownloadMismatchError(
            f"holds version {protocol.format_version(*version)}; the difference goes from "
            f"{'?' if base is None else protocol.format_version(*base)} to "
            f"{protocol.format_version(*target)}")
    if protocol.weights_digest(weights) != held_digest:
        raise DownloadMismatchError("the held model does not match its own digest")
    return weights


def _apply_diffs(incoming: ArrayRecord, base: tuple[int, int] | None,
                 target: tuple[int, int], context: Context,
                 initial: InitialWeights | None) -> Weights:
    weights = _base_weights(base, target, context, initial)
    keys = sorted(incoming, key=lambda k: (len(k), k))
    if not keys or any(not k.startswith(protocol.DIFF_PREFIX) for k in keys):
        raise DownloadMismatchError(f"expected {protocol.DIFF_PREFIX}<round> arrays, got "
                                    f"{keys[:4]}")
    for key in keys:
        arr = incoming[key]
        if arr.stype != PAYLOAD_STYPE:
            raise DownloadMismatchError(f"array {key!r} is not a payload")
        step = _decode_diff(arr.data, weights)
        for w, d in zip(weights, step, strict=True):
            np.add(w, d, out=w)
    return weights


def held_record(context: Context,
                compute: protocol.DeviceCompute | None) -> ConfigRecord | None:
    """The reply's ``download`` record: the version held now (and what training cost).

    One packed bytes value (:func:`flowerpress.protocol.pack_claim`); None when
    there is nothing to say.
    """
    held = _held_version(context)
    version, digest = (None, None) if held is None else held
    packed = protocol.pack_claim(version, digest, compute)
    return None if packed is None else ConfigRecord({protocol.DOWNLOAD_CLAIM: packed})
