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

import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from numpy.typing import NDArray

from flowerpress import protocol
from flowerpress.compression.envelope import payload_record
from flowerpress.config import LinkProfile
from flowerpress.server.bounds import UpdateNormBound
from flowerpress.server.checkpoint import LoopState
from flowerpress.server.download import DownloadHistory
from flowerpress.server.estimates import UploadEstimates
from flowerpress.server.membership import Membership, check_hello, hello_message
from flowerpress.server.phases import POLL_MAX_S as POLL_MAX_S
from flowerpress.server.phases import POLL_MIN_S as POLL_MIN_S
from flowerpress.server.phases import RepeatedRejectionError, RoundBook, exchange, user_call
from flowerpress.server.phases import RunFailedError as RunFailedError
from flowerpress.server.phases import StrategyFailedError as StrategyFailedError
from flowerpress.server.phases import UserCodeError as UserCodeError
from flowerpress.server.phases import poll_replies as poll_replies
from flowerpress.server.prune import Pruner
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
    # L2 bound on each validated update before the strategy sees it (run-config
    # max-update-norm; flowerpress.server.bounds.UpdateNormBound): > 0 fixes it;
    # 0 derives it from the model and the norms accepted so far; never off.
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
    # Fail the run when every reply of this many consecutive rounds was rejected
    # for the same reason (a bug in the task or codec, not a hostile device);
    # 0: never.
    max_rejected_rounds: int = 3
    # Bounds on the compute a train reply reports (protocol.compute_bounds, from
    # the model, the task's FLOP count and the round timeout); None: loose defaults.
    compute: protocol.ComputeBounds | None = None
    # Federated pruning (run-config prune; flowerpress.server.prune): "none" or
    # magnitude:sparsity=S,start=A,end=B.
    prune: str = "none"


class FederationMismatchError(RuntimeError):
    """The federation Flower started is not the one the run config describes."""


def discover_partitions(grid: Grid, *, wanted: int, timeout: float,
                        clock: Callable[[], float] = time.monotonic,
                        sleep: Callable[[float], None] = time.sleep,
                        num_clients: int | None = None,
                        anchors: dict[int, str] | None = None,
                        excluded: dict[int, str] | None = None,
                        settle: float | None = None,
                        versions: dict[int, str] | None = None) -> dict[int, int | None]:
    """Connected node ids and the partition each reports (None: no answer).

    Waits (bounded) for ``wanted`` nodes, then asks every node for its
    ``partition-id`` with a query message, so that sampling by seed picks the
    same partitions in every run although node ids are random. ``anchors``,
    if given, receives the initial-model digest each node named (the history
    download's anchor); ``versions`` the flowerpress version each named (also
    for nodes that are then excluded).

    Every answer is validated (:func:`check_hello`) inside the same guard as a
    round's replies: a node whose answer is impossible (a partition count
    other than ``num_clients``, an id out of range or claimed by another node)
    is left out of the result, logged once and, if ``excluded`` is given,
    recorded there with the reason; the run goes on without it.

    The query may wait ``timeout`` for the first answer (the simulation
    engine's actors, or a device, starting up); with ``settle``, the others
    then get ``settle`` seconds more. A node whose answer comes later keeps
    partition None here and is asked again every few rounds
    (:meth:`~flowerpress.server.membership.Membership.refresh`).

    Raises
    ------
    FederationMismatchError
        ``num_clients`` is given and most nodes report another number of
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
    # A rejected answer excludes its node: the caller logs that, one line per node.
    book = RoundBook(0, list(nodes), log_rejections=excluded is None)
    partition: dict[int, int | None] = dict.fromkeys(nodes)
    claimed: dict[int, int] = {}
    sizes: dict[int, int] = {}  # node -> the partition count it reported

    def hello(node: int, reply: Message) -> None:
        book.count_upload(node, reply)
        info = reply.content.config_records.get(protocol.INFO) if reply.has_content() else None
        raw = None if info is None else info.get(protocol.NUM_PARTITIONS)
        if isinstance(raw, int) and not isinstance(raw, bool) and raw > 0:
            sizes[node] = raw
        version = protocol.version_of_reply(reply)[1]
        if versions is not None and version is not None:
            versions[node] = version
        pid, _, anchor = check_hello(reply, num_clients=num_clients, claimed=claimed)
        partition[node] = pid
        if pid is not None:
            claimed[pid] = node
        if anchors is not None and anchor is not None:
            anchors[node] = anchor

    # The first messages wait for the simulation engine's actors (or a device)
    # to start: give the query the whole node-wait budget.
    exchange(grid, book, "start-up query",
             {n: hello_message(n) for n in nodes},
             hello, timeout=max(deadline - clock(), 5.0), settle=settle, clock=clock,
             sleep=sleep)
    if num_clients is not None and sizes:
        # Most nodes agreeing on another size: the federation is not the configured one
        # (a configuration error); a few nodes claiming another size: those nodes lie.
        counts = Counter(sizes.values())
        common, votes = counts.most_common(1)[0]
        if common != num_clients and votes * 2 > len(sizes):
            from flowerpress.federation import federation_mismatch

            line = federation_mismatch(common, {"num-clients": num_clients})
            raise FederationMismatchError(line or "the federation size differs from num-clients")
    for node, reason in book.rejected.items():
        partition.pop(node, None)
        if excluded is not None:
            excluded[node] = f"start-up query: {reason}"
    missing = sum(p is None for p in partition.values())
    if missing:
        log.warning("%s of %s nodes did not report a partition id; sampling is not "
                    "reproducible across runs for them", missing, len(partition))
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
    #: updates in what the server saw aggregated: the privacy charge's count
    #: (a secure sum counts whenever it was decoded, whatever min-replies says)
    released: int = 0
    #: nodes caught breaking a protocol on purpose: excluded from later rounds
    culprits: dict[int, str] = field(default_factory=dict)
    #: the one reason every reply was rejected for, in a round with no valid update
    only_reason: str | None = None
    #: the accepted replies' reported FLOPs and CPU seconds (None: none reported,
    #: as under DP and secure aggregation)
    device_flops: float | None = None
    device_seconds: float | None = None
    #: node -> what became of its message (RoundBook.outcomes)
    node_outcomes: dict[int, str] = field(default_factory=dict)


def _broadcast(global_weights: Weights, download: DownloadCodec | None,
               rng: np.random.Generator, pruner: Pruner | None = None
               ) -> tuple[ArrayRecord, Weights]:
    """The ArrayRecord sent to devices and the weights they will decode from it.

    Under pruning (a mask) only the unmasked coordinates travel, gathered into
    one vector before the download codec; devices scatter it with the mask
    their message carries.
    """
    sent = global_weights if pruner is None else pruner.reference(global_weights)
    if download is None or download.spec == "none":
        return ArrayRecord(sent), global_weights if pruner is None else pruner.expand(sent)
    # Clients start from the decoded broadcast, so deltas are taken against it
    # and the new global is built on it (the average of client models).
    from flowerpress.compression import decode

    payload, _ = download.encode(sent, None, rng=rng)
    received = [np.asarray(a, dtype=np.float32) for a in
                decode(payload, max_elements=sum(int(g.size) for g in sent),
                       max_tensors=len(sent))]
    return payload_record(payload), received if pruner is None else pruner.expand(received)


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
                     estimates: UploadEstimates | None = None,
                     pruner: Pruner | None = None) -> _Downloads:
    """One train message per node: the broadcast, or each node's history download.

    With ``pruner``'s mask, the mask's wire form travels in every train
    message's config, and the broadcast carries only the unmasked coordinates
    (the history download sends model-shaped differences; devices mask them).
    """
    shared = instruction.to_record()
    if pruner is not None and pruner.packed is not None:
        shared[protocol.PRUNE_MASK] = pruner.packed
    else:
        pruner = None

    def config_for(node: int) -> ConfigRecord:
        if estimates is None:
            return shared
        return ConfigRecord({**shared, protocol.EF21_BASE: estimates.base(node)})

    if history is None:
        broadcast, received = _broadcast(global_weights, download, rng, pruner)
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
    bound: UpdateNormBound | None = None,
    pruner: Pruner | None = None,
    rng: np.random.Generator,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> RoundOutcome:
    """One round: plan, send, collect (validate, decode, fold each reply), close.

    Whatever goes wrong with one reply rejects that reply (one log line naming
    the node and the reason) and the round goes on; an exception from the
    strategy fails the run (:class:`~flowerpress.server.phases.StrategyFailedError`).

    Without ``history`` every node gets the same broadcast and the new global
    is built on what they decoded. With it each node gets its own download
    (``flowerpress.server.download``) and the strategy builds on the server's
    model ``global_weights`` (EF21-P: what the compression dropped is sent in
    later rounds, not lost). ``anchors`` maps a node to the initial-model
    digest its hello reply named (first contacts from the initial model).

    With ``estimates`` (an ``ef21`` upload) each node's config names the EF21
    estimate the server holds for it, and the strategy gets the node's new
    estimate ``g_i + c`` instead of its decoded payload ``c``.

    ``bound`` clips every accepted update before the strategy sees it
    (:class:`~flowerpress.server.bounds.UpdateNormBound`: fixed, derived from
    the model and the accepted norms, or the DP bound); ``None`` builds the
    rule of ``settings.max_update_norm`` for this round alone.

    With ``settings.secagg`` on, the updates travel as one secure sum
    (:func:`flowerpress.server.secagg_round.secure_sum`, four exchanges into
    the same round book) and the strategy folds that sum as one update.

    With ``pruner`` (federated pruning) every train message carries the
    server's mask, every reply is validated against the unmasked coordinates of
    what the node received (shapes from the server's mask) and scattered back
    into the model's shapes before it is clipped and folded.
    """
    book = RoundBook(server_round, list(nodes))
    name = type(strategy).__name__
    plan: _Downloads | None = None
    if settings.secagg != "off":
        from flowerpress.server.secagg_round import secure_sum

        base, mean = secure_sum(grid, book, nodes, global_weights, settings,
                                extra_config=extra_config, download=download, rng=rng,
                                clock=clock, sleep=sleep)
        user_call(f"strategy {name}", strategy.begin_round, server_round, base,
                  error=StrategyFailedError)
        released = 0
        if mean is not None:  # the server saw the survivors' sum: it is released
            released = book.valid
            user_call(f"strategy {name}", strategy.add,
                      ClientUpdate(delta=mean, weight=float(book.valid), node_id=0),
                      error=StrategyFailedError)
    else:
        if bound is None:
            bound = UpdateNormBound(global_weights, max_norm=settings.max_update_norm)
        plan, base = _collect_updates(grid, book, global_weights, strategy, settings,
                                      extra_config=extra_config, download=download,
                                      history=history, anchors=anchors, estimates=estimates,
                                      bound=bound, pruner=pruner, rng=rng, clock=clock,
                                      sleep=sleep)
        released = book.valid if book.valid >= settings.min_replies else 0
    return _close_round(book, strategy, base, global_weights, settings, released=released,
                        plan=plan)


def _collect_updates(grid: Grid, book: RoundBook, global_weights: Weights,
                     strategy: AggregationStrategy, settings: LoopSettings, *,
                     extra_config: Mapping[str, Scalar], download: DownloadCodec | None,
                     history: DownloadHistory | None, anchors: Mapping[int, str] | None,
                     estimates: UploadEstimates | None, bound: UpdateNormBound,
                     pruner: Pruner | None = None,
                     rng: np.random.Generator, clock: Callable[[], float],
                     sleep: Callable[[float], None]) -> tuple[_Downloads, Weights]:
    """Plan, send and collect a plain round: each reply validated, decoded and folded."""
    server_round, nodes = book.server_round, book.asked
    name = type(strategy).__name__
    instruction = protocol.TrainInstruction(
        server_round=server_round, seed=settings.seed,
        compression=warmup_spec(settings.compression, server_round,
                                settings.compression_warmup),
        cohort_size=len(nodes), extra={**settings.client_config, **extra_config})
    plan = _build_downloads(nodes, server_round, global_weights, instruction, download,
                            history, rng, settings.seed, anchors, estimates, pruner)
    user_call(f"strategy {name}", strategy.begin_round, server_round, plan.base,
              error=StrategyFailedError)

    def fold(node: int, reply: Message) -> None:
        up = book.count_upload(node, reply,
                               limits=protocol.reply_limits(plan.received[node]))
        received = plan.received[node]
        checked = protocol.validate_train_reply(
            reply, received if pruner is None else pruner.reference(received),
            max_weight=settings.max_client_weight, dp=settings.dp, compute=settings.compute)
        if pruner is not None:  # the unmasked vector, back in the model's shapes
            checked = dataclasses.replace(checked, delta=pruner.expand(checked.delta))
        estimate = None
        if estimates is not None:
            estimate = estimates.combine(node, protocol.ef21_base_of_reply(reply),
                                         checked.delta)
        delta, norm, was_clipped = bound.apply(
            checked.delta if estimate is None else estimate, server_round=server_round)
        user_call(f"strategy {name}", strategy.add,
                  ClientUpdate(delta=delta, weight=checked.weight, node_id=node,
                               metrics=checked.metrics), error=StrategyFailedError)
        if estimates is not None and estimate is not None:
            estimates.commit(node, server_round, estimate)
        book.accept(node, checked.metrics)
        book.count_compute(checked.compute)
        if was_clipped:
            book.clipped += 1
            log.info("round %s: update of node %s clipped from norm %.4g to the %s bound %.4g",
                     server_round, node, norm, bound.mode, bound.current())
        if history is not None:
            history.acknowledge(node, protocol.held_version_of_reply(reply))
        if settings.link is not None:
            book.link_times.append(settings.link.client_seconds(
                download_bytes=book.down_of.get(node, 0), upload_bytes=up,
                compute_seconds=0.0 if checked.compute is None else checked.compute.seconds))

    def forget(node: int) -> None:
        if history is not None:  # what the device holds now is unknown
            history.acknowledge(node, None)

    exchange(grid, book, "train", {n: plan.messages[i] for i, n in enumerate(nodes)}, fold,
             timeout=settings.round_timeout, on_reject=forget, clock=clock, sleep=sleep)
    return plan, plan.base


def _close_round(book: RoundBook, strategy: AggregationStrategy, base: Weights,
                 global_weights: Weights, settings: LoopSettings, *, released: int,
                 plan: _Downloads | None) -> RoundOutcome:
    """Close: the strategy's result (checked) and the round's counters."""
    server_round = book.server_round
    if book.timed_out:
        log.warning("round %s: %s of %s clients did not reply within %.1f s", server_round,
                    book.timed_out, len(book.asked), settings.round_timeout)
    if book.valid >= settings.min_replies:
        name = type(strategy).__name__
        result = user_call(f"strategy {name}", strategy.result, error=StrategyFailedError)
        new_global = check_strategy_result(result, base, name)
    else:
        log.warning("round %s: %s valid replies < min-replies=%s; the model is unchanged",
                    server_round, book.valid, settings.min_replies)
        new_global = global_weights
    return RoundOutcome(
        new_global, book.valid, book.rejected_count, book.timed_out, book.upload,
        book.download, list(book.accepted), list(book.reply_metrics),
        unavailable=book.unavailable_count, replied=sorted(book.replied),
        clipped=book.clipped, upload_payload_bytes=book.upload_payload,
        download_payload_bytes=book.download_payload,
        full_downloads=0 if plan is None else plan.full,
        diff_downloads=0 if plan is None else plan.diffs,
        link_seconds=None if settings.link is None else
        settings.link.round_seconds(book.link_times),
        released=released, culprits=dict(book.culprits), only_reason=book.only_reason(),
        device_flops=book.device_flops, device_seconds=book.device_seconds,
        node_outcomes=book.outcomes())


def evaluate_on_nodes(grid: Grid, server_round: int, nodes: Sequence[int], weights: Weights,
                      settings: LoopSettings, *, clock: Callable[[], float] = time.monotonic,
                      sleep: Callable[[float], None] = time.sleep) -> dict[str, float | None]:
    """Federated evaluation: the example-weighted mean of the nodes' metrics.

    Used when the task has no central test set. Every reply goes through the
    same guard as a train reply (:func:`~flowerpress.server.phases.exchange`):
    an invalid one is ignored (logged); ``evaluated_by`` counts the replies
    that were used.
    """
    config = ConfigRecord({protocol.SERVER_ROUND: server_round, protocol.SEED: settings.seed})
    content = RecordDict({protocol.ARRAYS: ArrayRecord(weights), protocol.CONFIG: config})
    book = RoundBook(server_round, list(nodes))
    totals: dict[str, float] = {}
    weight_sum = 0.0

    def add(node: int, reply: Message) -> None:
        nonlocal weight_sum
        book.count_upload(node, reply, limits=protocol.reply_limits(weights))
        weight, metrics = protocol.validate_eval_reply(
            reply, max_weight=settings.max_client_weight)
        for key, value in metrics.items():
            totals[key] = totals.get(key, 0.0) + weight * value
        weight_sum += weight
        book.accept(node)

    exchange(grid, book, "evaluate",
             {n: Message(content, dst_node_id=n, message_type=MessageType.EVALUATE)
              for n in nodes}, add, timeout=settings.round_timeout, clock=clock, sleep=sleep)
    out: dict[str, float | None] = {
        "accuracy": None, "loss": None, "f1_macro": None, "evaluated_by": float(book.valid)}
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
    membership = Membership(max_missed=settings.max_missed_rounds,
                            num_clients=settings.num_clients)
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
    excluded: dict[int, str] = {}
    versions: dict[int, str] = {}
    membership.add_discovered(discover_partitions(
        grid, wanted=settings.clients_per_round, timeout=settings.node_wait_timeout,
        clock=clock, sleep=sleep, num_clients=settings.num_clients, anchors=anchors,
        excluded=excluded, settle=settings.round_timeout, versions=versions),
        anchors=anchors, versions=versions)
    for node, reason in excluded.items():
        membership.exclude(node, reason)
    failures: list[str] = []  # the current streak of all-rejected rounds (one reason)
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
    pruner = make_pruner(settings)
    if pruner is not None and resume is not None and resume.prune is not None:
        try:
            pruner.load_state_dict(resume.prune, weights)
        except (ValueError, TypeError, KeyError) as exc:
            raise ResumeError(f"the checkpoint's pruning mask does not fit this run: "
                              f"{exc}") from None
    bound = UpdateNormBound(initial_weights, max_norm=settings.max_update_norm,
                            dp_bound=getattr(ledger, "update_bound", None))
    if resume is not None and resume.bound is not None:
        try:
            bound.load_state_dict(resume.bound)
        except (ValueError, TypeError, KeyError) as exc:
            raise ResumeError(f"the checkpoint's update bound does not fit this run: "
                              f"{exc}") from None
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
        extra: dict[str, Scalar] = dict(user_call(
            f"strategy {type(strategy).__name__}", strategy.client_config, server_round,
            error=StrategyFailedError))
        if ledger is not None:
            extra.update(ledger.train_config(server_round, cohort_size=len(sampled)))
        if pruner is not None:  # the round's mask (the schedule), applied to the model
            weights = pruner.begin_round(server_round, weights)
        outcome = run_round(grid, server_round, sampled, weights, strategy, settings,
                            extra_config=extra, download=download, history=history,
                            anchors=membership.anchors(), estimates=estimates,
                            bound=bound, pruner=pruner, rng=rng, clock=clock, sleep=sleep)
        membership.record_round(sampled, outcome.replied, server_round=server_round,
                                outcomes=outcome.node_outcomes)
        for node, reason in outcome.culprits.items():
            membership.exclude(node, f"round {server_round}: {reason}")
        # A strategy with server momentum (FedAdam, ...) may move pruned weights: re-mask.
        weights = outcome.new_global if pruner is None else pruner.apply(outcome.new_global)
        epsilon = nominal = None
        if ledger is not None:
            # Every asked client may have released a noised update, whether or
            # not it reached us in time: local mode charges all of them. The
            # aggregate holds only the valid replies' noise: distributed mode
            # accounts z * sqrt(valid / sampled); an unchanged model released none.
            released = outcome.released
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
            "excluded": membership.excluded_count(),
            "upload_bytes": outcome.upload_bytes,
            "download_bytes": outcome.download_bytes,
            "upload_payload_bytes": outcome.upload_payload_bytes,
            "download_payload_bytes": outcome.download_payload_bytes,
            "link_seconds": outcome.link_seconds,
            **compute_columns(rows, outcome.device_flops, outcome.device_seconds),
            "epsilon": epsilon,
            "seconds": round(clock() - started, 4),
        }
        if evaluate_fn is None:
            row["evaluated_by"] = int(metrics.get("evaluated_by") or 0)
        if nominal is not None:
            row["nominal_epsilon"] = nominal
        if pruner is not None:
            row["sparsity"] = round(pruner.sparsity, 6)
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
                download=None if history is None else history.state_dict(),
                bound=bound.state_dict(),
                prune=None if pruner is None else pruner.state_dict()))
        if on_model is not None:
            on_model(server_round, weights)
        if on_round is not None:
            on_round(row)
        failing = _repeated_rejection(rows, failures, outcome, settings)
        if failing is not None:
            raise RepeatedRejectionError(failing)
    return weights, rows, stop


def compute_columns(rows: Sequence[Mapping[str, Any]], flops: float | None,
                    seconds: float | None) -> dict[str, float | None]:
    """A round row's compute columns: this round's and the run's so far (``rows`` before it).

    ``device_flops`` and ``device_seconds`` sum what the round's accepted
    replies reported (FLOPs of local training, CPU seconds); ``cum_*`` add the
    earlier rounds'. Null where nothing was reported (DP, secure aggregation, a
    task that counts no FLOPs); a cumulative column stays null until a round
    reports.
    """
    out: dict[str, float | None] = {"device_flops": flops, "device_seconds": seconds}
    for key, value in (("device_flops", flops), ("device_seconds", seconds)):
        earlier = rows[-1].get(f"cum_{key}") if rows else None
        out[f"cum_{key}"] = (None if value is None and earlier is None
                             else float(earlier or 0.0) + float(value or 0.0))
    return out


def _repeated_rejection(rows: Sequence[Mapping[str, Any]], failures: list[str],
                        outcome: RoundOutcome, settings: LoopSettings) -> str | None:
    """The failure line once ``max_rejected_rounds`` rounds in a row rejected every reply
    for the same reason (a task, codec or configuration bug), else None.

    ``failures`` holds the reasons of the current streak (updated in place).
    """
    from flowerpress.server.phases import reason_kind

    if settings.max_rejected_rounds <= 0:
        return None
    reason = outcome.only_reason
    if reason is None or (failures and reason_kind(failures[-1]) != reason_kind(reason)):
        failures.clear()
    if reason is None:
        return None
    failures.append(reason)
    if len(failures) < settings.max_rejected_rounds:
        return None
    last = rows[-1]["round"] if rows else "?"
    return (f"every reply of rounds {int(last) - len(failures) + 1}-{last} was rejected for "
            f"the same reason (max-rejected-rounds={settings.max_rejected_rounds}): "
            f"{' '.join(reason.split())[:300]}")


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


def make_pruner(settings: LoopSettings) -> Pruner | None:
    """The server's pruning mask when the run config's ``prune`` is on, else None.

    Raises
    ------
    ValueError
        ``prune`` is malformed, or combined with secure aggregation or ef21
        (:func:`flowerpress.config.validate` refuses those first, in one line).
    """
    from flowerpress.compression import parse
    from flowerpress.compression.mask import parse_prune

    prune = parse_prune(settings.prune)
    if prune is None:
        return None
    if settings.secagg != "off":
        raise ValueError("prune is not supported with secure aggregation")
    if parse(settings.compression).ef21:
        raise ValueError("prune is not supported with an ef21 upload")
    return Pruner(prune)


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
