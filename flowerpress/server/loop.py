"""The server's round loop: sample, push, pull as replies arrive, aggregate, account.

The loop owns everything around the aggregation rule (STYLE.md, habit 1):
node discovery, reproducible sampling, messaging with a bounded round,
decoding and validating every reply, the privacy ledger, bytes, central
evaluation and the round rows of ``results.json``. Strategies only fold
validated updates into new weights.

Replies are pulled with a short adaptive poll (5 ms doubling to 50 ms while
nothing arrives) instead of Flower's ``send_and_receive``, which sleeps a
fixed 3 s between pulls when it talks to a real SuperLink.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from numpy.typing import NDArray

from flowerpress import protocol
from flowerpress.compression.envelope import payload_record
from flowerpress.config import LinkProfile
from flowerpress.protocol import UpdateRejected, message_bytes, record_bytes
from flowerpress.server.bounds import bound_update_norm
from flowerpress.server.checkpoint import LoopState
from flowerpress.server.download import DownloadHistory
from flowerpress.server.estimates import UploadEstimates
from flowerpress.server.membership import EXPIRED_ERROR_CODE, Membership, is_unavailable_error
from flowerpress.server.schedule import warmup_spec
from flowerpress.strategies.base import ClientUpdate

log = logging.getLogger(__name__)

Weights = list[NDArray[np.float32]]
Scalar = bool | int | float | str
#: Central evaluation: weights -> {"accuracy", "loss", ...} (values may be None).
EvaluateFn = Callable[[Sequence[NDArray[np.float32]]], Mapping[str, float | None]]
#: Called with every finished round row (progress display, checkpoints).
RoundCallback = Callable[[Mapping[str, Any]], None]
#: Called with the round and the new global model after every round (checkpoints).
ModelCallback = Callable[[int, "Weights"], None]
#: Called with the loop's whole state after every round, before the round's row
#: and model are reported (the checkpoint).
StateCallback = Callable[[LoopState], None]

POLL_MIN_S = 0.005
POLL_MAX_S = 0.05


class AggregationStrategy(Protocol):
    """What the loop needs of a strategy (see ``flowerpress.strategies.Strategy``)."""

    def client_config(self, server_round: int) -> dict[str, Scalar]: ...
    def begin_round(self, server_round: int,
                    global_weights: Sequence[NDArray[np.float32]]) -> None: ...
    def add(self, update: ClientUpdate) -> None: ...
    def result(self) -> list[NDArray[np.float32]]: ...


class PrivacyLedger(Protocol):
    """What the loop needs of the server side of privacy (``flowerpress.privacy``)."""

    @property
    def sampling(self) -> str: ...
    @property
    def epsilon_json(self) -> float | None: ...
    @property
    def private(self) -> bool: ...
    @property
    def nominal_epsilon(self) -> float: ...
    def train_config(self, server_round: int, *,
                     cohort_size: int | None = None) -> dict[str, int | float | str | bool]: ...
    def can_run_round(self, *, cohort_size: int | None = None,
                      population: int | None = None) -> tuple[bool, str]: ...
    def end_round(self, participants: Sequence[int | str],
                  reply_metrics: Sequence[Mapping[str, float | int]], *,
                  aggregated: int | None = None, cohort_size: int | None = None,
                  population: int | None = None) -> float: ...
    def privacy_block(self) -> dict[str, Any]: ...


class DownloadCodec(Protocol):
    """Encodes the broadcast global model (``flowerpress.compression.Pipeline``)."""

    @property
    def spec(self) -> str: ...

    def encode(self, update: Sequence[NDArray[np.float32]], state: Any = None, *,
               rng: np.random.Generator | None = None) -> tuple[bytes, Any]: ...


@dataclass(frozen=True)
class LoopSettings:
    """How the loop runs; built from the run config."""

    rounds: int
    clients_per_round: int
    round_timeout: float  # seconds a round waits for replies
    min_replies: int  # valid replies a round needs to update the model
    seed: int
    # Keys every train message's ConfigRecord carries (dataset, lr, ...).
    client_config: Mapping[str, Scalar] = field(default_factory=dict)
    node_wait_timeout: float = 60.0  # seconds to wait for enough nodes to connect
    compression: str = "none"  # the upload codec devices apply (their compression_mod)
    max_client_weight: float = protocol.DEFAULT_MAX_WEIGHT  # cap on a reply's num-examples
    # Under DP every reply must follow dp_mod's contract and weighs 1.
    dp: bool = False
    # The federation size the run config describes; simulation nodes reporting
    # another number of partitions stop the run (None: not checked).
    num_clients: int | None = None
    # Skip a node that missed this many consecutive rounds until it answers a
    # probe (0: never skip for missed rounds).
    max_missed_rounds: int = 3
    # L2 bound on each validated update before the strategy sees it; 0 = off
    # (run-config max-update-norm; flowerpress.server.bounds).
    max_update_norm: float = 0.0
    secagg: str = "off"  # secure aggregation (flowerpress.server.secagg_round)
    # The history download (flowerpress.server.download): bound on its memory in
    # bytes (0: off, every device gets the broadcast) and the full-model codec.
    download_history_bytes: int = 0
    download_full: str = "q:8"
    # Codec of a first contact's difference from the initial model ("": the
    # download-compression codec; "off": full models); devices that build the
    # initial model only.
    download_first: str = ""
    # Devices' link (config.LinkProfile): turns bytes and compute into round time.
    link: LinkProfile | None = None
    # Rounds of top-k density warm-up (server/schedule.py; 0: off).
    compression_warmup: int = 0
    # Bound on the EF21 upload estimates (server/estimates.py), used when the
    # upload spec has ``ef21``.
    ef21_memory_bytes: int = 64_000_000


def poll_replies(grid: Grid, message_ids: Iterable[str], *, timeout: float,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> Iterator[Message]:
    """Yield replies to ``message_ids`` as they arrive, until all came or ``timeout``."""
    pending = set(message_ids)
    deadline = clock() + timeout
    delay = POLL_MIN_S
    while pending:
        try:
            got = list(grid.pull_messages(pending))
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            # Flower inflates replies inside pull_messages: a reply it cannot
            # inflate must not end the run. Transport errors still propagate.
            log.warning("a reply could not be read: %s: %.300s", type(exc).__name__, exc)
            got = []
        for reply in got:
            mid = reply.metadata.reply_to_message_id
            if mid in pending:
                pending.discard(mid)
                yield reply
        if not pending:
            return
        remaining = deadline - clock()
        if remaining <= 0:
            return
        delay = POLL_MIN_S if got else min(delay * 2, POLL_MAX_S)
        sleep(min(delay, remaining))


class FederationMismatchError(RuntimeError):
    """The federation Flower started is not the one the run config describes."""


def discover_partitions(grid: Grid, *, wanted: int, timeout: float,
                        clock: Callable[[], float] = time.monotonic,
                        sleep: Callable[[float], None] = time.sleep,
                        num_clients: int | None = None,
                        anchors: dict[int, str] | None = None) -> dict[int, int | None]:
    """Connected node ids and the partition each reports (None: no answer).

    Waits (bounded) for ``wanted`` nodes, then asks every node for its
    ``partition-id`` with a query message, so that sampling by seed picks the
    same partitions in every run although node ids are random. ``anchors``,
    if given, receives the initial-model digest each node named (the history
    download's anchor).

    Raises
    ------
    FederationMismatchError
        ``num_clients`` is given and simulation nodes report another number of
        partitions (``flwr run .`` started a federation of another size).
    """
    deadline = clock() + timeout
    nodes = sorted(grid.get_node_ids())
    while len(nodes) < wanted and clock() < deadline:
        sleep(0.2)
        nodes = sorted(grid.get_node_ids())
    if not nodes:
        raise RuntimeError(f"no node connected within {timeout:.0f} s; expected {wanted}")
    if len(nodes) < wanted:
        log.warning("only %s of %s wanted nodes connected; going on with them", len(nodes), wanted)
    msgs = [Message(RecordDict({protocol.CONFIG: ConfigRecord({protocol.HELLO: True})}),
                    dst_node_id=n,
                    message_type=MessageType.QUERY) for n in nodes]
    ids = list(grid.push_messages(msgs))
    id_to_node = dict(zip(ids, nodes, strict=True))
    partition: dict[int, int | None] = dict.fromkeys(nodes)
    reported_sizes: set[int] = set()
    # The first messages wait for the simulation engine's actors (or a device)
    # to start: give the query the whole node-wait budget.
    for reply in poll_replies(grid, ids, timeout=max(deadline - clock(), 5.0), clock=clock,
                              sleep=sleep):
        node = id_to_node.get(reply.metadata.reply_to_message_id)
        if node is None or reply.has_error():
            continue
        partition[node] = protocol.partition_of_reply(reply)
        anchor = protocol.anchor_of_reply(reply)
        if anchors is not None and anchor is not None:
            anchors[node] = anchor
        info = reply.content.config_records.get(protocol.INFO)
        size = None if info is None else info.get(protocol.NUM_PARTITIONS)
        if isinstance(size, int) and not isinstance(size, bool) and size > 0:
            reported_sizes.add(size)
    if num_clients is not None and reported_sizes and reported_sizes != {num_clients}:
        from flowerpress.federation import federation_mismatch

        line = federation_mismatch(max(reported_sizes), {"num-clients": num_clients})
        raise FederationMismatchError(line or "the federation size differs from num-clients")
    missing = sum(p is None for p in partition.values())
    if missing:
        log.warning("%s of %s nodes did not report a partition id; sampling is not "
                    "reproducible across runs for them", missing, len(nodes))
    return partition


def discover_nodes(grid: Grid, *, wanted: int, timeout: float,
                   clock: Callable[[], float] = time.monotonic,
                   sleep: Callable[[float], None] = time.sleep,
                   num_clients: int | None = None) -> list[int]:
    """Connected node ids, sorted by the partition each holds (see :func:`discover_partitions`).

    Raises
    ------
    FederationMismatchError
        As :func:`discover_partitions`.
    """
    partition = discover_partitions(grid, wanted=wanted, timeout=timeout, clock=clock,
                                    sleep=sleep, num_clients=num_clients)
    big = 1 << 62
    return sorted(partition, key=lambda n: (big if partition[n] is None else partition[n], n))


class StrategyFailedError(RuntimeError):
    """The strategy's result is not a usable model; the round's result was not applied."""


def check_strategy_result(result: Sequence[NDArray[Any]], reference: Sequence[NDArray[np.float32]],
                          name: str) -> Weights:
    """The strategy's new global weights as float32, or StrategyFailedError naming the problem."""
    if len(result) != len(reference):
        raise StrategyFailedError(f"strategy {name} returned {len(result)} tensors, expected "
                             f"{len(reference)}")
    out: Weights = []
    for i, (r, g) in enumerate(zip(result, reference, strict=True)):
        arr = np.asarray(r)
        if arr.shape != g.shape:
            raise StrategyFailedError(f"strategy {name} returned tensor {i} of shape {arr.shape}, "
                                 f"expected {g.shape}")
        if arr.dtype.kind not in "fiu":
            raise StrategyFailedError(f"strategy {name} returned tensor {i} of dtype {arr.dtype}")
        with np.errstate(over="ignore", invalid="ignore"):
            f32 = arr.astype(np.float32)
        if not np.isfinite(f32).all():
            raise StrategyFailedError(f"strategy {name} returned NaN or Inf in tensor {i} "
                                 "(as float32)")
        out.append(f32)
    return out


@dataclass
class RoundOutcome:
    """What one round produced, before it becomes a results row."""

    new_global: Weights
    valid: int
    rejected: int
    timed_out: int
    upload_bytes: int
    download_bytes: int
    participants: list[int]
    reply_metrics: list[dict[str, float]]
    # Flower answered "node unavailable" instead of the node.
    unavailable: int = 0
    # Nodes that answered (valid or rejected): they are there.
    replied: list[int] = field(default_factory=list)
    clipped: int = 0  # updates scaled down to max-update-norm
    upload_payload_bytes: int = 0
    download_payload_bytes: int = 0
    #: how many devices got the full model / compressed diffs (history download)
    full_downloads: int = 0
    diff_downloads: int = 0
    #: the estimated round time under ``settings.link`` (None without a link)
    link_seconds: float | None = None


def _broadcast(global_weights: Weights, download: DownloadCodec | None,
               rng: np.random.Generator) -> tuple[ArrayRecord, Weights]:
    """The ArrayRecord sent to devices and the weights they will decode from it."""
    if download is None or download.spec == "none":
        return ArrayRecord(global_weights), global_weights
    # Clients start from the decoded broadcast, so deltas are taken against it
    # and the new global is built on it (the average of client models).
    from flowerpress.compression import decode

    payload, _ = download.encode(global_weights, None, rng=rng)
    received = [np.asarray(a, dtype=np.float32) for a in
                decode(payload, max_elements=sum(int(g.size) for g in global_weights),
                       max_tensors=len(global_weights))]
    return payload_record(payload), received


@dataclass
class _Downloads:
    """This round's train messages and, per node, the model it will train from."""

    messages: list[Message]
    received: dict[int, Weights]
    base: Weights  # what the strategy builds the new global on
    full: int = 0
    diffs: int = 0


def _build_downloads(nodes: Sequence[int], server_round: int, global_weights: Weights,
                     instruction: protocol.TrainInstruction, download: DownloadCodec | None,
                     history: DownloadHistory | None, rng: np.random.Generator,
                     seed: int, anchors: Mapping[int, str] | None = None,
                     estimates: UploadEstimates | None = None) -> _Downloads:
    """One train message per node: the broadcast, or each node's history download."""
    shared = instruction.to_record()

    def config_for(node: int) -> ConfigRecord:
        if estimates is None:
            return shared
        return ConfigRecord({**shared, protocol.EF21_BASE: estimates.base(node)})

    if history is None:
        broadcast, received = _broadcast(global_weights, download, rng)
        return _Downloads([Message(RecordDict({protocol.ARRAYS: broadcast,
                                               protocol.CONFIG: config_for(n)}),
                                   dst_node_id=n, message_type=MessageType.TRAIN)
                           for n in nodes], dict.fromkeys(nodes, received), received)
    # A stream of its own, so that switching the history on does not change sampling.
    down_rng = np.random.default_rng([seed, server_round, 5])
    history.advance(server_round, global_weights, down_rng)
    out = _Downloads([], {}, global_weights)
    for n in nodes:
        item = history.download_for(n, down_rng,
                                    anchor=None if anchors is None else anchors.get(n))
        content = RecordDict({protocol.ARRAYS: item.arrays, protocol.CONFIG: config_for(n),
                              protocol.DOWNLOAD: item.record})
        out.messages.append(Message(content, dst_node_id=n, message_type=MessageType.TRAIN))
        out.received[n] = item.received
        out.full += item.full
        out.diffs += not item.full
    return out


def run_round(
    grid: Grid,
    server_round: int,
    nodes: Sequence[int],
    global_weights: Weights,
    strategy: AggregationStrategy,
    settings: LoopSettings,
    *,
    extra_config: Mapping[str, Scalar],
    download: DownloadCodec | None = None,
    history: DownloadHistory | None = None,
    anchors: Mapping[int, str] | None = None,
    estimates: UploadEstimates | None = None,
    rng: np.random.Generator,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> RoundOutcome:
    """One round: send, collect, validate and fold each reply as it arrives.

    Whatever goes wrong with one reply rejects that reply (one log line naming
    the node and the reason) and the round goes on.

    Without ``history`` every node gets the same broadcast and the new global
    is built on what they decoded. With it each node gets its own download
    (``flowerpress.server.download``) and the strategy builds on the server's
    model ``global_weights`` (EF21-P: what the compression dropped is sent in
    later rounds, not lost). ``anchors`` maps a node to the initial-model
    digest its hello reply named (first contacts from the initial model).

    With ``estimates`` (an ``ef21`` upload) each node's config names the EF21
    estimate the server holds for it, and the strategy gets the node's new
    estimate ``g_i + c`` instead of its decoded payload ``c``.
    """
    instruction = protocol.TrainInstruction(
        server_round=server_round, seed=settings.seed,
        compression=warmup_spec(settings.compression, server_round,
                                settings.compression_warmup),
        cohort_size=len(nodes), extra={**settings.client_config, **extra_config})
    plan = _build_downloads(nodes, server_round, global_weights, instruction, download,
                            history, rng, settings.seed, anchors, estimates)
    messages = plan.messages
    # Bytes as Flower sends them (the whole serialized message) and, apart, the arrays.
    sizes = [message_bytes(m) for m in messages]
    download_bytes = sum(sizes)
    download_payload = sum(record_bytes(m.content) for m in messages)
    ids = list(grid.push_messages(messages))
    id_to_node = dict(zip(ids, nodes, strict=True))
    down_of = dict(zip(nodes, sizes, strict=True))
    received = plan.base

    strategy.begin_round(server_round, plan.base)
    valid = rejected = upload = upload_payload = unavailable = clipped = 0
    participants: list[int] = []
    replied: list[int] = []
    reply_metrics: list[dict[str, float]] = []
    link_times: list[float] = []
    for reply in poll_replies(grid, ids, timeout=settings.round_timeout, clock=clock, sleep=sleep):
        node = id_to_node[reply.metadata.reply_to_message_id]
        if reply.has_error() and is_unavailable_error(reply):
            unavailable += 1  # Flower's answer, not the node's: it is not there
            log.info("round %s: node %s is unavailable: %.200s", server_round, node,
                     reply.error.reason)
            continue
        if reply.has_error() and int(reply.error.code) == EXPIRED_ERROR_CODE:
            continue  # the reply expired before it was pulled: counted as timed out
        replied.append(node)
        up = message_bytes(reply)
        upload += up
        if reply.has_error():
            rejected += 1
            log.warning("round %s: node %s replied with an error: %.200s", server_round, node,
                        reply.error.reason)
            if history is not None:
                history.acknowledge(node, None)
            continue
        try:
            upload_payload += record_bytes(reply.content)
            checked = protocol.validate_train_reply(reply, plan.received[node],
                                                    max_weight=settings.max_client_weight,
                                                    dp=settings.dp)
            estimate = None
            if estimates is not None:
                estimate = estimates.combine(node, protocol.ef21_base_of_reply(reply),
                                             checked.delta)
            delta, norm, was_clipped = bound_update_norm(
                checked.delta if estimate is None else estimate, settings.max_update_norm)
            strategy.add(ClientUpdate(delta=delta, weight=checked.weight,
                                      node_id=node, metrics=checked.metrics))
            if estimates is not None and estimate is not None:
                estimates.commit(node, server_round, estimate)
        except UpdateRejected as exc:
            rejected += 1
            log.warning("round %s: dropped the update of node %s: %.300s", server_round, node,
                        exc)
            continue
        except Exception as exc:  # one reply never ends the run
            rejected += 1
            log.warning("round %s: dropped the update of node %s: %s: %.300s", server_round,
                        node, type(exc).__name__, exc)
            continue
        valid += 1
        if was_clipped:
            clipped += 1
            log.info("round %s: update of node %s clipped from norm %.4g to max-update-norm=%g",
                     server_round, node, norm, settings.max_update_norm)
        participants.append(node)
        reply_metrics.append(dict(checked.metrics))
        held = protocol.held_version_of_reply(reply)
        if history is not None:
            history.acknowledge(node, held)
        if settings.link is not None:
            link_times.append(settings.link.client_seconds(
                download_bytes=down_of[node], upload_bytes=up,
                compute_seconds=protocol.compute_seconds_of_reply(reply) or 0.0))
    timed_out = len(nodes) - valid - rejected - unavailable
    if timed_out:
        log.warning("round %s: %s of %s clients did not reply within %.1f s", server_round,
                    timed_out, len(nodes), settings.round_timeout)
    if valid >= settings.min_replies:
        name = type(strategy).__name__
        try:
            result = strategy.result()
        except Exception as exc:  # a strategy bug (or a metric it trusted): one line
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            raise StrategyFailedError(f"strategy {name} raised {type(exc).__name__}"
                                      f"{': ' + first if first else ''}") from exc
        new_global = check_strategy_result(result, received, name)
    else:
        log.warning("round %s: %s valid replies < min-replies=%s; the model is unchanged",
                    server_round, valid, settings.min_replies)
        new_global = global_weights
    return RoundOutcome(new_global, valid, rejected, timed_out, upload, download_bytes,
                        participants, reply_metrics, unavailable=unavailable, replied=replied,
                        clipped=clipped, upload_payload_bytes=upload_payload,
                        download_payload_bytes=download_payload, full_downloads=plan.full,
                        diff_downloads=plan.diffs,
                        link_seconds=None if settings.link is None else
                        settings.link.round_seconds(link_times))


def evaluate_on_nodes(grid: Grid, server_round: int, nodes: Sequence[int], weights: Weights,
                      settings: LoopSettings, *, clock: Callable[[], float] = time.monotonic,
                      sleep: Callable[[float], None] = time.sleep) -> dict[str, float | None]:
    """Federated evaluation: the example-weighted mean of the nodes' metrics.

    Used when the task has no central test set. Invalid replies are ignored
    (logged); ``evaluated_by`` counts the replies that were used.
    """
    config = ConfigRecord({protocol.SERVER_ROUND: server_round, protocol.SEED: settings.seed})
    content = RecordDict({protocol.ARRAYS: ArrayRecord(weights), protocol.CONFIG: config})
    messages = [Message(content, dst_node_id=n, message_type=MessageType.EVALUATE)
                for n in nodes]
    ids = list(grid.push_messages(messages))
    id_to_node = dict(zip(ids, nodes, strict=True))
    totals: dict[str, float] = {}
    weight_sum = 0.0
    used = 0
    for reply in poll_replies(grid, ids, timeout=settings.round_timeout, clock=clock,
                              sleep=sleep):
        if reply.has_error():
            continue
        try:
            weight, metrics = protocol.validate_eval_reply(
                reply, max_weight=settings.max_client_weight)
        except UpdateRejected as exc:
            log.warning("round %s: dropped the evaluation of node %s: %.300s", server_round,
                        id_to_node.get(reply.metadata.reply_to_message_id), exc)
            continue
        except Exception as exc:  # one reply never ends the run
            log.warning("round %s: dropped the evaluation of node %s: %s: %.300s", server_round,
                        id_to_node.get(reply.metadata.reply_to_message_id),
                        type(exc).__name__, exc)
            continue
        for key, value in metrics.items():
            totals[key] = totals.get(key, 0.0) + weight * value
        weight_sum += weight
        used += 1
    out: dict[str, float | None] = {
        "accuracy": None, "loss": None, "f1_macro": None, "evaluated_by": float(used)}
    if weight_sum > 0:
        names = {protocol.EVAL_LOSS: "loss", protocol.EVAL_ACC: "accuracy"}
        for key, total in totals.items():
            out[names.get(key, key)] = total / weight_sum
    return out


def run_federation(
    grid: Grid,
    initial_weights: Weights,
    strategy: AggregationStrategy,
    settings: LoopSettings,
    *,
    evaluate_fn: EvaluateFn | None,
    privacy: Callable[[int], PrivacyLedger] | None = None,
    download: DownloadCodec | None = None,
    on_round: RoundCallback | None = None,
    on_model: ModelCallback | None = None,
    on_state: StateCallback | None = None,
    resume: LoopState | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[Weights, list[dict[str, Any]], str | None]:
    """Run all rounds; return the final weights, the round rows and a stop reason.

    The stop reason is ``None`` when every round ran, else a sentence saying
    why the run ended early (e.g. the privacy budget).

    ``evaluate_fn`` evaluates the global model centrally; ``None`` evaluates it
    on the round's nodes instead (federated evaluation).

    ``privacy`` builds the privacy ledger for the population actually sampled
    from (the number of connected nodes), which the accounting's sampling
    rate depends on.

    Membership follows the devices (:mod:`flowerpress.server.membership`):
    before every round the connected nodes are refreshed; without DP the
    cohort is drawn from the nodes available now, under DP from every node the
    server knows (so a device's chance of being sampled never exceeds the
    rate the accountant assumes), and unavailable members are not asked.

    ``on_state`` receives the loop's whole state after every round (for the
    checkpoint); ``resume`` continues from such a state: the rows, model,
    strategy state, privacy ledger, sampling generator and membership.

    Raises
    ------
    StrategyFailedError
        The strategy returned an unusable model; the last good one is in
        ``on_round``'s rows so far (the caller keeps it).
    """
    rng = np.random.default_rng([settings.seed, 1])
    membership = Membership(max_missed=settings.max_missed_rounds)
    weights = [np.asarray(w, dtype=np.float32) for w in initial_weights]
    rows: list[dict[str, Any]] = []
    first = 1
    population: int | None = None
    resumed_at: list[int] = []
    if resume is not None:
        weights = [np.asarray(w, dtype=np.float32) for w in resume.weights]
        rows = [dict(r) for r in resume.rows]
        rng.bit_generator.state = resume.rng
        membership.load_state_dict(resume.membership)
        _load_strategy_state(strategy, resume.strategy)
        first = resume.server_round + 1
        population = resume.privacy_population
        resumed_at = [*resume.resumed_at, resume.server_round]
        log.info("resuming after round %s of %s", resume.server_round, settings.rounds)
    ledger = None
    if privacy is not None and population is not None:  # resumed: the saved population
        ledger = privacy(population)
        _load_privacy_state(ledger, None if resume is None else resume.privacy)
    if first > settings.rounds:  # a finished run, resumed: nothing left to do
        return weights, rows, None
    anchors: dict[int, str] = {}
    membership.add_discovered(discover_partitions(
        grid, wanted=settings.clients_per_round, timeout=settings.node_wait_timeout,
        clock=clock, sleep=sleep, num_clients=settings.num_clients, anchors=anchors),
        anchors=anchors)
    if privacy is not None and ledger is None:
        population = len(membership.known(first))
        ledger = privacy(population)
    stop: str | None = None
    history = make_history(settings, download, initial_weights)
    if history is not None and resume is not None and resume.download is not None:
        try:
            history.load_state_dict(resume.download, weights)
        except (ValueError, TypeError, KeyError) as exc:
            raise ResumeError(f"the checkpoint's download history does not fit this run: "
                              f"{exc}") from None
    estimates = make_estimates(settings)
    for server_round in range(first, settings.rounds + 1):
        started = clock()
        membership.refresh(grid, server_round)
        known = membership.known(server_round)
        available = membership.available(server_round)
        if ledger is not None and population is not None:
            # Under DP: draw from the whole population (the one accounted), at
            # most the accounted cohort; drawn nodes that are away are dropouts.
            pool, k = known, min(settings.clients_per_round, population, len(known))
        else:
            pool, k = available, min(settings.clients_per_round, len(available))
        drawn = sample_round(pool, k, rng, None if ledger is None else ledger.sampling)
        can_ask = set(available)
        sampled = [n for n in drawn if n in can_ask]
        # The population the ledger accounts: the pool, but never more nodes than it
        # was built for. A device that joined a DP run later is drawn from a larger
        # pool than the accounted one; charging the draw as one from the smaller
        # population overstates the sampling rate, so epsilon is never below the truth.
        accounted = None if population is None else min(len(pool), population)
        if ledger is not None:
            # Accounted as a draw of len(drawn) from `accounted`; devices size their
            # noise by the len(sampled) <= len(drawn) actually asked (more noise).
            ok, reason = ledger.can_run_round(cohort_size=len(drawn), population=accounted)
            if not ok:
                stop = f"stopped before round {server_round}: {reason}"
                log.warning("%s", stop)
                break
        if not sampled:
            log.warning("round %s: none of the %s known nodes can be asked; waiting %.0f s",
                        server_round, len(known), settings.round_timeout)
            sleep(settings.round_timeout)
        extra: dict[str, Scalar] = dict(strategy.client_config(server_round))
        if ledger is not None:
            extra.update(ledger.train_config(server_round, cohort_size=len(sampled)))
        if settings.secagg != "off":
            from flowerpress.server.secagg_round import run_secagg_round

            outcome = run_secagg_round(grid, server_round, sampled, weights, strategy, settings,
                                       extra_config=extra, download=download, rng=rng,
                                       clock=clock, sleep=sleep)
        else:
            outcome = run_round(grid, server_round, sampled, weights, strategy, settings,
                                extra_config=extra, download=download, history=history,
                                anchors=membership.anchors(), estimates=estimates,
                                rng=rng, clock=clock, sleep=sleep)
        membership.record_round(sampled, outcome.replied)
        weights = outcome.new_global
        epsilon = nominal = None
        if ledger is not None:
            # Every asked client may have released a noised update, whether or
            # not it reached us in time: local mode charges all of them. The
            # aggregate holds only the valid replies' noise: distributed mode
            # accounts z * sqrt(valid / sampled); an unchanged model released none.
            released = outcome.valid if outcome.valid >= settings.min_replies else 0
            # Per-client charges are keyed by the partition a node holds where it
            # reports one (it survives a node's re-registration), else its node id.
            ledger.end_round([membership.stable_id(n) for n in sampled],
                             outcome.reply_metrics, aggregated=released,
                             cohort_size=len(drawn), population=accounted)
            epsilon = ledger.epsilon_json
            if not ledger.private:  # rng=seeded: no guarantee, the nominal value apart
                nominal = ledger.nominal_epsilon
        if evaluate_fn is not None:
            metrics: Mapping[str, float | None] = evaluate_fn(weights)
        else:
            metrics = evaluate_on_nodes(grid, server_round, sampled, weights, settings,
                                        clock=clock, sleep=sleep)
        row: dict[str, Any] = {
            "round": server_round,
            "accuracy": _opt_float(metrics.get("accuracy")),
            "loss": _opt_float(metrics.get("loss")),
            "f1_macro": _opt_float(metrics.get("f1_macro")),
            "clients": outcome.valid,
            "rejected": outcome.rejected,
            "timed_out": outcome.timed_out,
            "unavailable": len(known) - len(available) + outcome.unavailable,
            "clipped": outcome.clipped,
            "upload_bytes": outcome.upload_bytes,
            "download_bytes": outcome.download_bytes,
            "upload_payload_bytes": outcome.upload_payload_bytes,
            "download_payload_bytes": outcome.download_payload_bytes,
            "link_seconds": outcome.link_seconds,
            "epsilon": epsilon,
            "seconds": round(clock() - started, 4),
        }
        if evaluate_fn is None:
            row["evaluated_by"] = int(metrics.get("evaluated_by") or 0)
        if nominal is not None:
            row["nominal_epsilon"] = nominal
        if history is not None:
            row["download"] = {"full": outcome.full_downloads, "diffs": outcome.diff_downloads,
                               **history.stats()}
        rows.append(row)
        if on_state is not None:
            state_dict = getattr(strategy, "state_dict", None)
            privacy_state = getattr(ledger, "state_dict", None)
            on_state(LoopState(
                server_round=server_round, weights=weights, rows=rows,
                rng=dict(rng.bit_generator.state), membership=membership.state_dict(),
                strategy=state_dict() if callable(state_dict) else {},
                privacy=privacy_state() if callable(privacy_state) else None,
                privacy_population=population, resumed_at=resumed_at,
                download=None if history is None else history.state_dict()))
        if on_model is not None:
            on_model(server_round, weights)
        if on_round is not None:
            on_round(row)
    return weights, rows, stop


def sample_round(nodes: Sequence[int], clients_per_round: int, rng: np.random.Generator,
                 sampling: str | None) -> list[int]:
    """The round's cohort.

    Without DP: ``clients_per_round`` nodes uniformly without replacement from
    the run's seeded generator (reproducible). Under DP the scheme the privacy
    ledger accounts: ``fixed`` and ``poisson`` draw from the operating system's
    CSPRNG (not derivable from the published seed), ``predictable`` from the
    seeded generator (accounted without amplification).
    """
    k = min(clients_per_round, len(nodes))
    if sampling in ("fixed", "poisson"):
        from flowerpress.privacy.sampling import sample_cohort

        return sample_cohort(list(nodes), sampling=sampling, size=k,
                             probability=k / len(nodes))
    picked = sorted(rng.choice(len(nodes), size=k, replace=False).tolist())
    return [nodes[i] for i in picked]


class ResumeError(RuntimeError):
    """The saved state cannot be loaded into this run's strategy or privacy ledger."""


def _load_strategy_state(strategy: AggregationStrategy, state: Mapping[str, Any]) -> None:
    load = getattr(strategy, "load_state_dict", None)
    if callable(load):
        try:
            load(dict(state))
        except (ValueError, TypeError, KeyError) as exc:
            raise ResumeError(f"the checkpoint's strategy state does not fit strategy "
                              f"{type(strategy).__name__}: {exc}") from None
    elif state:
        raise ResumeError(f"strategy {type(strategy).__name__} has no load_state_dict; its "
                          "saved state cannot be restored")


def _load_privacy_state(ledger: PrivacyLedger, state: Mapping[str, Any] | None) -> None:
    # Epsilon must continue where it was: a ledger that cannot load its state
    # would silently restart the accounting, so that refuses the resume.
    if state is None:
        raise ResumeError("the checkpoint has no privacy ledger state but this run uses DP")
    load = getattr(ledger, "load_state_dict", None)
    if not callable(load):
        raise ResumeError("the privacy ledger has no load_state_dict; resuming would restart "
                          "the privacy accounting")
    try:
        load(state)
    except (ValueError, TypeError, KeyError) as exc:
        raise ResumeError(f"the checkpoint's privacy state does not fit this run: {exc}") from None


def make_history(settings: LoopSettings, download: DownloadCodec | None,
                 initial_weights: Sequence[NDArray[np.float32]] | None = None
                 ) -> DownloadHistory | None:
    """The history download's server state, or None when it is off.

    With ``initial_weights`` devices that build the same initial model get
    their first download as a difference from it (``download-first``).
    """
    if settings.download_history_bytes <= 0:
        return None
    from flowerpress.compression import parse

    diff = parse(download.spec if download is not None else "none")
    spec = settings.download_first.strip()
    first = parse(spec) if spec not in ("", "off") else None
    anchor = None if initial_weights is None or spec == "off" else list(initial_weights)
    return DownloadHistory(diff_codec=diff, full_codec=parse(settings.download_full),
                           budget_bytes=settings.download_history_bytes,
                           initial=anchor,
                           first_codec=first)


def make_estimates(settings: LoopSettings) -> UploadEstimates | None:
    """The server's EF21 upload estimates when the upload spec has ``ef21``, else None."""
    from flowerpress.compression import parse

    if not parse(settings.compression).ef21:
        return None
    return UploadEstimates(budget_bytes=max(1, settings.ef21_memory_bytes))


def _opt_float(value: float | None) -> float | None:
    """A finite float or None (results.json stays valid JSON)."""
    if value is None:
        return None
    number = float(value)
    return number if np.isfinite(number) else None
