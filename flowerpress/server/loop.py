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

from flowerpress.server.decoding import (
    UpdateRejected,
    extract_update,
    num_examples,
    payload_record,
    record_bytes,
)

log = logging.getLogger(__name__)

Weights = list[NDArray[np.float32]]
Scalar = bool | int | float | str
#: Central evaluation: weights -> {"accuracy", "loss", "f1_macro"}.
EvaluateFn = Callable[[Sequence[NDArray[np.float32]]], Mapping[str, float]]
#: Called with every finished round row (progress display, checkpoints).
RoundCallback = Callable[[Mapping[str, Any]], None]

POLL_MIN_S = 0.005
POLL_MAX_S = 0.05


class AggregationStrategy(Protocol):
    """What the loop needs of a strategy (see ``flowerpress.strategies.Strategy``)."""

    def client_config(self, server_round: int) -> dict[str, Scalar]: ...
    def begin_round(self, server_round: int,
                    global_weights: Sequence[NDArray[np.float32]]) -> None: ...
    def add(self, delta: Sequence[NDArray[np.float32]], weight: float, client_id: int) -> None: ...
    def result(self) -> list[NDArray[np.float32]]: ...


class PrivacyLedger(Protocol):
    """What the loop needs of the server side of privacy (``flowerpress.privacy``)."""

    def train_config(self, server_round: int) -> dict[str, Scalar]: ...
    def can_run_round(self) -> tuple[bool, str]: ...
    def end_round(self, participants: Sequence[int],
                  reply_metrics: Sequence[Mapping[str, float | int]], *,
                  aggregated: int | None = None) -> float: ...
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


def poll_replies(grid: Grid, message_ids: Iterable[str], *, timeout: float,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> Iterator[Message]:
    """Yield replies to ``message_ids`` as they arrive, until all came or ``timeout``."""
    pending = set(message_ids)
    deadline = clock() + timeout
    delay = POLL_MIN_S
    while pending:
        got = list(grid.pull_messages(pending))
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


def discover_nodes(grid: Grid, *, wanted: int, timeout: float,
                   clock: Callable[[], float] = time.monotonic,
                   sleep: Callable[[float], None] = time.sleep) -> list[int]:
    """Connected node ids, sorted by the partition each holds.

    Waits (bounded) for ``wanted`` nodes, then asks every node for its
    ``partition-id`` with a query message, so that sampling by seed picks the
    same partitions in every run although node ids are random.
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
    msgs = [Message(RecordDict({"config": ConfigRecord({"hello": True})}), dst_node_id=n,
                    message_type=MessageType.QUERY) for n in nodes]
    ids = list(grid.push_messages(msgs))
    id_to_node = dict(zip(ids, nodes, strict=True))
    partition: dict[int, int] = {}
    # The first messages wait for the simulation engine's actors (or a device)
    # to start: give the query the whole node-wait budget.
    for reply in poll_replies(grid, ids, timeout=max(deadline - clock(), 5.0), clock=clock,
                              sleep=sleep):
        node = id_to_node.get(reply.metadata.reply_to_message_id)
        if node is None or reply.has_error():
            continue
        info = reply.content.config_records.get("info")
        pid = None if info is None else info.get("partition-id")
        if isinstance(pid, int) and pid >= 0:
            partition[node] = pid
    if len(partition) < len(nodes):
        log.warning("%s of %s nodes did not report a partition id; sampling is not "
                    "reproducible across runs for them", len(nodes) - len(partition), len(nodes))
    big = 1 << 62
    return sorted(nodes, key=lambda n: (partition.get(n, big), n))


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
    reply_metrics: list[dict[str, float | int]]


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
    rng: np.random.Generator,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> RoundOutcome:
    """One round: broadcast, collect, validate and fold each reply as it arrives."""
    if download is None or download.spec == "none":
        broadcast = ArrayRecord(global_weights)
        received: Weights = global_weights
    else:
        # Clients start from the decoded broadcast, so deltas are taken against
        # it and the new global is built on it (the average of client models).
        from flowerpress.compression import decode

        payload, _ = download.encode(global_weights, None, rng=rng)
        broadcast = payload_record(payload)
        received = [np.asarray(a, dtype=np.float32) for a in
                    decode(payload, max_elements=sum(int(g.size) for g in global_weights))]
    config = ConfigRecord({**settings.client_config, **extra_config, "server-round": server_round})
    content = RecordDict({"arrays": broadcast, "config": config})
    messages = [Message(content, dst_node_id=n, message_type=MessageType.TRAIN) for n in nodes]
    download_bytes = record_bytes(content) * len(messages)
    ids = list(grid.push_messages(messages))
    id_to_node = dict(zip(ids, nodes, strict=True))

    strategy.begin_round(server_round, received)
    valid = rejected = upload = 0
    participants: list[int] = []
    reply_metrics: list[dict[str, float | int]] = []
    for reply in poll_replies(grid, ids, timeout=settings.round_timeout, clock=clock, sleep=sleep):
        node = id_to_node[reply.metadata.reply_to_message_id]
        if reply.has_error():
            rejected += 1
            log.warning("round %s: node %s replied with an error: %s", server_round, node,
                        reply.error.reason)
            continue
        upload += record_bytes(reply.content)
        try:
            weight = num_examples(reply)
            delta = extract_update(reply, received)
        except UpdateRejected as exc:
            rejected += 1
            log.warning("round %s: dropped the update of node %s: %s", server_round, node, exc)
            continue
        strategy.add(delta, weight, node)
        valid += 1
        participants.append(node)
        metrics = reply.content.metric_records.get("metrics")
        reply_metrics.append({k: v for k, v in (metrics or {}).items()
                              if isinstance(v, int | float)})
    timed_out = len(nodes) - valid - rejected
    if timed_out:
        log.warning("round %s: %s of %s clients did not reply within %.1f s", server_round,
                    timed_out, len(nodes), settings.round_timeout)
    if valid >= settings.min_replies:
        new_global = [np.asarray(w, dtype=np.float32) for w in strategy.result()]
    else:
        log.warning("round %s: %s valid replies < min-replies=%s; the model is unchanged",
                    server_round, valid, settings.min_replies)
        new_global = global_weights
    return RoundOutcome(new_global, valid, rejected, timed_out, upload, download_bytes,
                        participants, reply_metrics)


def run_federation(
    grid: Grid,
    initial_weights: Weights,
    strategy: AggregationStrategy,
    settings: LoopSettings,
    *,
    evaluate_fn: EvaluateFn,
    privacy: Callable[[int], PrivacyLedger] | None = None,
    download: DownloadCodec | None = None,
    on_round: RoundCallback | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[Weights, list[dict[str, Any]], str | None]:
    """Run all rounds; return the final weights, the round rows and a stop reason.

    The stop reason is ``None`` when every round ran, else a sentence saying
    why the run ended early (e.g. the privacy budget).

    ``privacy`` builds the privacy ledger for the population actually sampled
    from (the number of connected nodes), which the accounting's sampling
    rate depends on.
    """
    rng = np.random.default_rng([settings.seed, 1])
    nodes = discover_nodes(grid, wanted=settings.clients_per_round,
                           timeout=settings.node_wait_timeout, clock=clock, sleep=sleep)
    ledger = None if privacy is None else privacy(len(nodes))
    weights = [np.asarray(w, dtype=np.float32) for w in initial_weights]
    rows: list[dict[str, Any]] = []
    stop: str | None = None
    for server_round in range(1, settings.rounds + 1):
        if ledger is not None:
            ok, reason = ledger.can_run_round()
            if not ok:
                stop = f"stopped before round {server_round}: {reason}"
                log.warning("%s", stop)
                break
        started = clock()
        k = min(settings.clients_per_round, len(nodes))
        picked = sorted(rng.choice(len(nodes), size=k, replace=False).tolist())
        sampled = [nodes[i] for i in picked]
        extra: dict[str, Scalar] = dict(strategy.client_config(server_round))
        if ledger is not None:
            extra.update(ledger.train_config(server_round))
        outcome = run_round(grid, server_round, sampled, weights, strategy, settings,
                            extra_config=extra, download=download, rng=rng,
                            clock=clock, sleep=sleep)
        weights = outcome.new_global
        epsilon = None
        if ledger is not None:
            # Every sampled client may have released a noised update, whether or
            # not it reached us in time: local mode charges all of them. The
            # aggregate holds only the valid replies' noise: distributed mode
            # accounts z * sqrt(valid / sampled).
            epsilon = ledger.end_round(sampled, outcome.reply_metrics,
                                       aggregated=outcome.valid)
        metrics = evaluate_fn(weights)
        row: dict[str, Any] = {
            "round": server_round,
            "accuracy": float(metrics["accuracy"]),
            "loss": float(metrics["loss"]),
            "f1_macro": float(metrics["f1_macro"]),
            "clients": outcome.valid,
            "rejected": outcome.rejected,
            "timed_out": outcome.timed_out,
            "upload_bytes": outcome.upload_bytes,
            "download_bytes": outcome.download_bytes,
            "epsilon": epsilon,
            "seconds": round(clock() - started, 4),
        }
        rows.append(row)
        if on_round is not None:
            on_round(row)
    return weights, rows, stop
