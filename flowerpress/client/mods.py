"""``compression_mod``: compressed download in, compressed update out, for any ClientApp.

A Flower mod (``(msg, context, call_next) -> Message``) that

1. decodes a compressed global model the server broadcast (``download-compression``)
   into the plain ArrayRecord ``"arrays"`` the wrapped ClientApp expects;
2. lets the ClientApp (and inner mods such as :func:`flowerpress.privacy.dp_mod`) run;
3. turns the train reply's weights into ``delta = local - received`` (the weights
   the client actually received, which differ from the server's under a lossy
   broadcast), encodes it with the run's ``compression`` pipeline and replies with
   the payload instead of the weights.

Error-feedback residuals and low-rank warm starts live in ``Context.state`` under
:data:`STATE_KEY` between rounds (STYLE.md, habit 2). Place the mod outermost::

    app = ClientApp(mods=[compression_mod, dp_mod])

so the order on the way out is train -> clip -> noise -> compress: compression
after noise is post-processing and keeps the DP guarantee, and the residuals are
computed from the privatized update. :func:`plugins_mod` goes outside it: it
imports the run's plug-in modules before any spec is parsed.

:func:`make_compression_mod` builds the same mod with a provider of the run's
initial model (``Task.initial_weights``; :func:`flowerpress.client_app` passes
its task's): the device then tells the server, in its answer to the hello
query, the digest of the initial model it builds, and its first history
download can be a difference from that model instead of a full model
(:mod:`flowerpress.client.download`). Plain ``compression_mod`` has no
provider: such devices keep getting full models first.
"""

from __future__ import annotations

import logging
import time

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.constant import ErrorCode

from flowerpress import protocol
from flowerpress.client.download import (
    DownloadMismatchError,
    InitialWeights,
    anchor_weights,
    held_record,
    receive_download,
)
from flowerpress.compression import CodecState, decode, parse
from flowerpress.compression.envelope import is_payload, payload_bytes, payload_record
from flowerpress.compression.mask import Mask, gather, scatter, unpack_mask
from flowerpress.registry import PluginError, import_plugins
from flowerpress.secagg.messages import stage_of as secagg_stage_of

log = logging.getLogger(__name__)

ARRAYS_KEY = protocol.ARRAYS

#: Where the pipeline state is kept in ``Context.state``.
STATE_KEY = "flowerpress.codec"
#: Where the round of the device's last ef21 reply is kept in ``Context.state``.
EF21_STATE_KEY = "flowerpress.ef21"
#: Where the pruning mask of the device's last encoded reply is kept in ``Context.state``.
PRUNE_STATE_KEY = "flowerpress.prune"
#: Upper bound on the elements of a broadcast a client decodes, unless the node
#: config sets ``max-model-elements`` (a device refuses absurd allocations).
DEFAULT_MAX_ELEMENTS = 1 << 28


def _max_elements(context: Context) -> int:
    value = context.node_config.get("max-model-elements")
    return value if isinstance(value, int) and value > 0 else DEFAULT_MAX_ELEMENTS


def _with_arrays(content: RecordDict, arrays: ArrayRecord) -> RecordDict:
    """A copy of ``content`` whose ``"arrays"`` record is replaced."""
    out = RecordDict({k: v for k, v in content.items() if k != ARRAYS_KEY})
    out[ARRAYS_KEY] = arrays
    return out


#: Plug-in failures this process has logged (one log line each, not one per message).
_LOGGED_PLUGIN_ERRORS: set[str] = set()


def plugins_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Import the run config's ``plugins`` modules, once per process, before anything runs.

    Flower's simulation engine ships a loaded ClientApp to its Ray actors and a
    SuperNode starts a fresh process per message: the user's app module does
    not run there, so the names it registers (codec stages, tasks, DP
    mechanisms) would be unknown. Place this mod outermost, before any mod that
    parses a spec (:func:`compression_mod` decodes the broadcast with it). A
    module that fails to import is one log line per process and an error reply
    naming it; the server counts the reply as rejected.
    """
    try:
        import_plugins(str(context.run_config.get("plugins", "") or ""))
    except PluginError as exc:
        line = str(exc)
        if line not in _LOGGED_PLUGIN_ERRORS:
            _LOGGED_PLUGIN_ERRORS.add(line)
            log.error("flowerpress ClientApp: %s", line)
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                             reason=f"PluginError: {line}"), reply_to=msg)
    return call_next(msg, context)


def device_log_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Log one line per message to the node config's ``log-file`` (if set), and problems.

    Place it outermost, so the line says what the server receives: the
    message type and round, the seconds this ClientApp took and ``ok`` or the
    error reply's reason (:mod:`flowerpress.deploy.devicelog`). An exception
    raised inside is logged with its traceback and raised again (Flower turns
    it into an error reply). Without ``log-file`` the mod does nothing.
    """
    from flowerpress.deploy.devicelog import device_log_path, install_device_log

    try:
        path = device_log_path(context.node_config)
    except ValueError as exc:
        log.warning("flowerpress: %s; no device log", exc)
        path = None
    if path is None or not install_device_log(path):
        return call_next(msg, context)
    kind = msg.metadata.message_type
    rnd = protocol.message_config(msg).get(protocol.SERVER_ROUND) if msg.has_content() else None
    what = f"{kind} message" + (f" (round {rnd})" if isinstance(rnd, int) else "")
    started = time.monotonic()
    try:
        reply = call_next(msg, context)
    except Exception:
        log.exception("node %s, run %s, %s: the ClientApp raised", context.node_id,
                      context.run_id, what)
        raise
    outcome = "ok"
    if reply.has_error():
        outcome = f"error reply: {' '.join((reply.error.reason or '').split())[:300]}"
    # The message's age (its creation on the server, by this device's clock): the time
    # the server waited for this reply, ClientApp start-up included: what round-timeout
    # must cover.
    age = time.time() - float(msg.metadata.created_at or 0.0)
    waited = f" ({age:.1f} s after the server sent it)" if 0.0 < age < 1e6 else ""
    log.info("node %s, run %s, %s: replied in %.2f s%s, %s", context.node_id, context.run_id,
             what, time.monotonic() - started, waited, outcome)
    return reply


def compression_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Decode a compressed broadcast and compress the train reply's update (see module doc)."""
    return _compression(msg, context, call_next, None)


def make_compression_mod(*, initial_weights: InitialWeights | None = None) -> Mod:
    """:func:`compression_mod` for a device that can build the run's initial model.

    Parameters
    ----------
    initial_weights
        Returns the run's initial model on this node (``Task.initial_weights()``;
        the same on every call), or None when it cannot. With it the device
        advertises the model's digest in its hello reply and accepts a first
        history download as a difference from it (EF21-P anchored at the
        initial model; Gruntkowska, Tyurin and Richtárik, ICML 2023).
    """
    if initial_weights is None:
        return compression_mod

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        return _compression(msg, context, call_next, initial_weights)

    mod.__name__ = mod.__qualname__ = "compression_mod"
    return mod


def _advertise_anchor(reply: Message, context: Context, initial: InitialWeights) -> Message:
    """Add the initial model's digest to a hello reply's ``info`` record (if buildable)."""
    if reply.has_error() or not reply.has_content():
        return reply
    info = reply.content.config_records.get(protocol.INFO)
    if info is None:
        return reply
    try:
        anchor = anchor_weights(initial, context)
    except Exception as exc:  # a task that cannot be built here: no anchor, full models
        log.warning("the initial model cannot be built on this node: %s: %s",
                    type(exc).__name__, exc)
        return reply
    if anchor is not None:
        info[protocol.DOWNLOAD_ANCHOR] = protocol.weights_digest(anchor)
    return reply


def _compression(msg: Message, context: Context, call_next: ClientAppCallable,
                 initial: InitialWeights | None) -> Message:
    kind = msg.metadata.message_type.split(".")[0]
    if kind == MessageType.QUERY and initial is not None:
        config = msg.content.config_records.get(protocol.CONFIG) if msg.has_content() else None
        reply = call_next(msg, context)
        if config is not None and config.get(protocol.HELLO) is True:
            reply = _advertise_anchor(reply, context, initial)
        return reply
    if kind not in (MessageType.TRAIN, MessageType.EVALUATE):
        return call_next(msg, context)
    incoming = msg.content.array_records.get(ARRAYS_KEY)
    if incoming is None:
        return call_next(msg, context)
    history = kind == MessageType.TRAIN and protocol.DOWNLOAD in msg.content.config_records
    if history:
        # The history download: the diffs since the model this device holds, or a
        # full model; either way exactly the model the server names.
        try:
            received = receive_download(msg, context, max_elements=_max_elements(context),
                                        initial=initial)
        except DownloadMismatchError as exc:
            # Only this device loses the round; it has forgotten its model and
            # tells the server so (no claim), which sends a full model next time.
            log.warning("history download refused: %s", exc)
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                 reason=f"download: {exc}"), reply_to=msg)
        msg.content = _with_arrays(msg.content, ArrayRecord(received))
    elif is_payload(incoming):
        arrays = decode(payload_bytes(incoming), max_elements=_max_elements(context))
        received = [np.asarray(a, dtype=np.float32) for a in arrays]
        msg.content = _with_arrays(msg.content, ArrayRecord(received))
    else:
        received = [np.asarray(a, dtype=np.float32) for a in incoming.to_numpy_ndarrays()]
    if kind == MessageType.TRAIN and not history and _packed_mask(msg) is not None:
        # Federated pruning: the broadcast is the unmasked coordinates, one vector.
        try:
            received = _scatter_broadcast(received, _packed_mask(msg), context)
        except ValueError as exc:
            log.warning("pruned download refused: %s", exc)
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                 reason=f"download: {exc}"), reply_to=msg)
        msg.content = _with_arrays(msg.content, ArrayRecord(received))

    started, cpu_started = time.perf_counter(), time.process_time()
    reply = call_next(msg, context)
    seconds = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu_started
    # The ClientApp's FLOPs note never travels as it is: it goes into the claim below.
    flops = protocol.take_flops_note_inplace(reply)
    instruction = protocol.TrainInstruction.from_message(msg)
    # A secure-aggregation stage's reply carries the protocol's fields and nothing
    # else: the training time correlates 0.85 with the number of examples the mode
    # hides (issue 21), and the server's parsers refuse any extra record.
    secure = secagg_stage_of(msg) is not None
    if kind == MessageType.TRAIN and not reply.has_error() and not secure:
        # What this device holds now (the server verifies it) and, outside DP,
        # what local training cost: wall seconds (the link-time estimate), CPU
        # seconds and FLOPs (the compute columns). Under DP none of it: it grows
        # with the example count DP hides.
        dp_on = str(instruction.extra.get(protocol.DP, "off")).strip() not in ("", "off")
        compute = protocol.DeviceCompute(seconds, cpu_seconds, flops)
        record = held_record(context, None if dp_on else compute)
        if record is not None:
            reply.content[protocol.DOWNLOAD] = record
    if kind == MessageType.TRAIN and not reply.has_error() \
            and context.run_config.get("train-metrics") is False:
        _drop_train_metrics_inplace(reply)
    spec = instruction.compression
    if kind != MessageType.TRAIN or reply.has_error():
        return reply
    # Federated pruning: the reply carries only the unmasked coordinates, gathered
    # into one vector before the run's codec spec (which then composes unchanged).
    packed = None if secure else _packed_mask(msg)
    if spec == "none" and packed is None:
        return reply
    local_record = reply.content.array_records.get(ARRAYS_KEY)
    if local_record is None:
        return reply
    local = local_record.to_numpy_ndarrays()
    if len(local) != len(received):
        raise ValueError(f"train reply has {len(local)} arrays, expected {len(received)} "
                         "(one per tensor of the received model)")
    mask = None if packed is None else protocol.prune_mask_of(msg, received)
    if mask is not None:
        local, received = [gather(local, mask)], [gather(received, mask)]
        if spec == "none":
            reply.content = _with_arrays(reply.content, ArrayRecord(local))
            return reply
    delta = [np.asarray(w, dtype=np.float32) - g for w, g in zip(local, received, strict=True)]
    pipeline = parse(spec)
    saved = context.state.array_records.get(STATE_KEY)
    state = CodecState.from_record(saved) if saved is not None else None
    if packed is not None and mask is not None:
        state = _remap_state(state, context, packed, mask)
        context.state[PRUNE_STATE_KEY] = ConfigRecord({"mask": packed})
    pid = context.node_config.get("partition-id")
    stream = pid if isinstance(pid, int) else context.node_id
    rng = np.random.default_rng(
        [instruction.seed, abs(stream), instruction.server_round, 3])
    base = 0
    if pipeline.ef21:
        base, state = _ef21_base(instruction.extra.get(protocol.EF21_BASE), context, state)
    payload, state = pipeline.encode(delta, state, rng=rng)
    if pipeline.has_error_feedback or not state.is_empty:
        context.state[STATE_KEY] = state.to_record()
    reply.content = _with_arrays(reply.content, payload_record(payload))
    if pipeline.ef21:
        context.state[EF21_STATE_KEY] = ConfigRecord({"round": instruction.server_round})
        reply.content[protocol.EF21] = ConfigRecord({protocol.EF21_BASE: base})
    return reply


def _packed_mask(msg: Message) -> bytes | None:
    """The pruning mask's wire form a train message carries (None: no pruning)."""
    config = msg.content.config_records.get(protocol.CONFIG) if msg.has_content() else None
    raw = None if config is None else config.get(protocol.PRUNE_MASK)
    return raw if isinstance(raw, bytes) else None


def _scatter_broadcast(received: list[np.ndarray], packed: bytes | None,
                       context: Context) -> list[np.ndarray]:
    """The model a pruned broadcast (one vector of the unmasked coordinates) stands for.

    Raises
    ------
    ValueError
        The mask is malformed or the broadcast is not one vector of its kept count.
    """
    if packed is None:
        return received
    mask = unpack_mask(packed, max_elements=_max_elements(context))
    kept = sum(int(np.count_nonzero(m)) for m in mask)
    if len(received) != 1 or received[0].shape != (kept,):
        raise ValueError(f"a pruned broadcast is one vector of the {kept} kept weights, got "
                         f"{len(received)} arrays")
    return scatter(received[0], mask)


def _remap_state(state: CodecState | None, context: Context, packed: bytes,
                 mask: Mask) -> CodecState | None:
    """Error-feedback residuals moved onto this round's mask (pruned coordinates dropped).

    The gathered vector shrinks as the mask grows: a residual kept for the last
    mask is scattered back to the model's shapes and gathered with the new one.
    A state that fits neither mask restarts from zero; warm starts (low-rank
    ``Q`` factors) are dropped whenever the mask changes.
    """
    meta = context.state.config_records.get(PRUNE_STATE_KEY)
    old_packed = None if meta is None else meta.get("mask")
    if state is None or old_packed == packed:
        return state
    total = sum(int(m.size) for m in mask)
    try:
        residuals: tuple[np.ndarray, ...] = state.residuals
        if residuals:
            if isinstance(old_packed, bytes):
                old = unpack_mask(old_packed, max_elements=total, max_tensors=len(mask))
                full = scatter(np.asarray(residuals[0], dtype=np.float32), old)
            else:  # dense until this round: one residual per tensor
                full = [np.asarray(r, dtype=np.float32) for r in residuals]
            residuals = (gather(full, mask),)
    except ValueError:
        return None
    return CodecState.from_arrays(residuals, None, state.estimates)


def _drop_train_metrics_inplace(reply: Message) -> None:
    """Keep only ``num-examples`` and DP's markers in a train reply's metrics.

    The run config's ``train-metrics=false``: the server's FedAvg needs none of
    the task's training metrics, and each costs about 25 bytes per reply.
    """
    record = reply.content.metric_records.get(protocol.METRICS)
    if record is None:
        return
    kept = {k: v for k, v in record.items() if k in protocol.DP_REPLY_METRICS}
    if len(kept) != len(record):
        reply.content[protocol.METRICS] = MetricRecord(kept)


def _ef21_base(wanted: object, context: Context,
               state: CodecState | None) -> tuple[int, CodecState | None]:
    """The estimate this reply builds on: the server's (``wanted``) if held, else zero.

    The device's estimate is the one of its last reply; the server names the
    round of the last reply it accepted. If they differ (a rejected or lost
    reply, a server that forgot), the device starts again from zero and says so.
    """
    meta = context.state.config_records.get(EF21_STATE_KEY)
    held = None if meta is None else meta.get("round")
    if (isinstance(wanted, int) and not isinstance(wanted, bool) and wanted > 0
            and held == wanted and state is not None and state.estimates):
        return wanted, state
    if state is None:
        return 0, None
    return 0, CodecState(state.residuals, state.lowrank_q, ())
