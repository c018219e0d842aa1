"""The phases of one round, written once: plan, send, collect, close.

Every round, whatever travels in it, has the same skeleton (ARCHITECTURE.md,
"One round, named phases")::

    plan      the cohort's messages (the broadcast, history downloads, a
              secure-aggregation stage's requests)
    send      push them; count the bytes sent                      (exchange)
    collect   for each reply as it arrives, inside one guard:      (exchange)
                accept   a reply we asked for, Flower's own errors apart
                count    its bytes (protocol.message_bytes, bounded)
                validate / decode / fold   (the caller's handler)
    close     the strategy's result (checked), who was asked / replied /
              rejected / timed out                                 (close_round)

:class:`RoundBook` holds the round's bookkeeping: who was asked, who replied,
who was rejected and why, bytes both ways, per-device link times, and the
devices caught breaking a protocol (excluded from later rounds). A plain
round (``loop.run_round``) and every stage of a secure-aggregation round
(``secagg_round``) send and collect through :func:`exchange` into the same
book, so their counters cannot drift apart.

A failure inside collect costs one reply: one log line and one entry in
``RoundBook.rejected``. A failure of the user's own code (strategy, codec,
task on the server) is not the device's fault: :func:`user_call` turns it
into :class:`UserCodeError`, which the guard lets through and which ends the
run with one line naming the user's class.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from flwr.app import Message
from flwr.serverapp import Grid

from flowerpress import protocol
from flowerpress.server.membership import EXPIRED_ERROR_CODE, is_unavailable_error

log = logging.getLogger(__name__)

T = TypeVar("T")

POLL_MIN_S = 0.005
POLL_MAX_S = 0.05
#: After a pull that took t seconds, wait at least this many times t: pulling takes at
#: most a fifth of the server's time. Flower's ``pull_messages`` checks every pending
#: message id (availability, TTL) in its LinkState, so with 1,000 replies pending one
#: pull costs milliseconds; at the 5 ms pace the ServerApp's thread would hold the GIL
#: of Flower's simulation process (its engine's threads) most of the time.
PULL_WAIT_FACTOR = 4.0

#: Handles one device's reply inside the guard: validate, decode, fold. Raises
#: to reject the reply (any exception but :class:`RunFailedError`).
ReplyHandler = Callable[[int, Message], None]
#: Called for a node whose reply was rejected (after it is counted).
RejectHook = Callable[[int], None]


class RunFailedError(RuntimeError):
    """The run cannot go on; ``str(exc)`` is the one line a user reads."""


class UserCodeError(RunFailedError):
    """The user's own code (strategy, codec, task) raised on the server: a bug, not a device."""


class StrategyFailedError(UserCodeError):
    """The strategy raised or its result is not a usable model; the round was not applied."""


class RepeatedRejectionError(RunFailedError):
    """Every reply of several rounds in a row was rejected for the same reason."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message`` (bounded), for one-line failures."""
    text = str(exc).strip()
    line = text.splitlines()[0][:limit] if text else ""
    return f"{type(exc).__name__}{': ' + line if line else ''}"


def user_call(owner: str, fn: Callable[..., T], *args: Any,
              error: type[UserCodeError] = UserCodeError, **kwargs: Any) -> T:
    """Call the user's ``fn``; an exception from it becomes ``error`` (a UserCodeError).

    ``owner`` names the user's object as the failure line shows it, e.g.
    ``"strategy MyRule"``.
    """
    try:
        return fn(*args, **kwargs)
    except RunFailedError:
        raise
    except Exception as exc:
        raise error(f"{owner} raised {first_line(exc)}") from exc


def reason_kind(reason: str) -> str:
    """A rejection reason without its numbers (node ids, sizes, rounds), for grouping."""
    return re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "#", " ".join(reason.split()))[:160]


def poll_replies(grid: Grid, message_ids: Iterable[str], *, timeout: float,
                 settle: float | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> Iterator[Message]:
    """Yield replies to ``message_ids`` as they arrive, until all came or ``timeout``.

    A short adaptive poll (5 ms doubling to 50 ms while nothing arrives, and
    never less than :data:`PULL_WAIT_FACTOR` times what the last pull took)
    instead of Flower's ``send_and_receive``, which sleeps a fixed 3 s between
    pulls when it talks to a real SuperLink. With ``settle``, the first reply
    shortens the wait to ``settle`` seconds from its arrival (the long
    ``timeout`` covers the engine's or the devices' start-up, not a silent node).
    """
    pending = set(message_ids)
    deadline = clock() + timeout
    settled = settle is None
    delay = POLL_MIN_S
    while pending:
        pulled_at = clock()
        try:
            got = list(grid.pull_messages(pending))
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            # Flower inflates replies inside pull_messages: a reply it cannot
            # inflate must not end the run. Transport errors still propagate.
            log.warning("a reply could not be read: %s: %.300s", type(exc).__name__, exc)
            got = []
        spent = clock() - pulled_at
        for reply in got:
            mid = reply.metadata.reply_to_message_id
            if mid in pending:
                pending.discard(mid)
                if not settled and settle is not None:
                    settled = True
                    deadline = min(deadline, clock() + settle)
                yield reply
        if not pending:
            return
        remaining = deadline - clock()
        if remaining <= 0:
            return
        delay = POLL_MIN_S if got else min(delay * 2, POLL_MAX_S)
        sleep(min(max(delay, PULL_WAIT_FACTOR * spent), remaining))


@dataclass
class RoundBook:
    """The bookkeeping of one round, kept by every phase and transport alike."""

    server_round: int
    asked: list[int]
    #: nodes that answered at least one message of the round (they are there)
    replied: set[int] = field(default_factory=set)
    #: node -> why its reply (or, in secure aggregation, its part) was rejected
    rejected: dict[int, str] = field(default_factory=dict)
    #: Flower answered "node unavailable" instead of the node
    unavailable: set[int] = field(default_factory=set)
    #: asked in an exchange and no reply came within the timeout
    silent: set[int] = field(default_factory=set)
    #: nodes whose update is in the new model, in the order they were folded
    accepted: list[int] = field(default_factory=list)
    reply_metrics: list[dict[str, float]] = field(default_factory=list)
    upload: int = 0
    download: int = 0
    upload_payload: int = 0
    download_payload: int = 0
    down_of: dict[int, int] = field(default_factory=dict)  # bytes sent to each node
    up_of: dict[int, int] = field(default_factory=dict)  # bytes each node sent
    clipped: int = 0
    link_times: list[float] = field(default_factory=list)
    #: nodes caught breaking a protocol on purpose (excluded from later rounds)
    culprits: dict[int, str] = field(default_factory=dict)
    #: the accepted replies' reported compute (reporting only; None: none reported)
    device_flops: float | None = None
    device_seconds: float | None = None
    #: log each rejection (off where the caller logs its own line per node, as the
    #: start-up query does: a rejected answer there excludes the node, one line)
    log_rejections: bool = True

    def reject(self, node: int, stage: str, reason: str) -> None:
        """Count ``node`` as rejected (its first reason is kept); one log line."""
        self.rejected.setdefault(node, reason)
        if self.log_rejections:
            log.warning("round %s: rejected node %s (%s): %.300s", self.server_round, node,
                        stage, reason)

    def count_upload(self, node: int, reply: Message, *,
                     limits: protocol.WireLimits = protocol.WIRE_LIMITS) -> int:
        """Count a reply's bytes as Flower sends them (bounded by ``limits``, e.g.
        ``protocol.reply_limits(model)`` for a train reply; raises UpdateRejected)."""
        up = protocol.message_bytes(reply, limits=limits)
        self.upload += up
        self.up_of[node] = self.up_of.get(node, 0) + up
        if reply.has_content():
            self.upload_payload += protocol.record_bytes(reply.content)
        return up

    def count_download(self, node: int, message: Message) -> int:
        """Count a message the server sends (its own: not bounded)."""
        size = protocol.message_bytes(message, limits=None)
        self.download += size
        self.download_payload += protocol.record_bytes(message.content)
        self.down_of[node] = self.down_of.get(node, 0) + size
        return size

    def accept(self, node: int, metrics: Mapping[str, float] | None = None) -> None:
        """``node``'s update is in the model."""
        self.accepted.append(node)
        self.reply_metrics.append(dict(metrics or {}))

    def count_compute(self, compute: protocol.DeviceCompute | None) -> None:
        """Add an accepted reply's validated compute (CPU seconds, FLOPs) to the round's."""
        if compute is None:
            return
        self.device_seconds = (self.device_seconds or 0.0) + compute.cpu_seconds
        if compute.flops is not None:
            self.device_flops = (self.device_flops or 0.0) + compute.flops

    @property
    def valid(self) -> int:
        return len(self.accepted)

    @property
    def rejected_count(self) -> int:
        """Rejected nodes whose update is not in the model."""
        return len(set(self.rejected) - set(self.accepted))

    @property
    def unavailable_count(self) -> int:
        return len(self.unavailable - set(self.accepted) - set(self.rejected))

    @property
    def timed_out(self) -> int:
        """Silent in an exchange, and neither accepted, rejected nor reported unavailable."""
        return len(self.silent - set(self.accepted) - set(self.rejected) - self.unavailable)

    def outcomes(self) -> dict[int, str]:
        """What became of each asked node's message: ``accepted``, ``rejected: <reason>``,
        ``unavailable`` (Flower's answer) or ``timed out``."""
        accepted = set(self.accepted)
        out: dict[int, str] = {}
        for node in self.asked:
            if node in accepted:
                out[node] = "accepted"
            elif node in self.rejected:
                out[node] = f"rejected: {' '.join(self.rejected[node].split())}"
            elif node in self.unavailable:
                out[node] = "unavailable"
            else:
                out[node] = "timed out"
        return out

    def only_reason(self) -> str | None:
        """The one rejection reason of a round with no valid update, if all share it."""
        if self.accepted or not self.rejected:
            return None
        kinds = {reason_kind(r) for r in self.rejected.values()}
        return next(iter(self.rejected.values())) if len(kinds) == 1 else None


def exchange(grid: Grid, book: RoundBook, stage: str, messages: Mapping[int, Message],
             handle: ReplyHandler, *, timeout: float, settle: float | None = None,
             on_reject: RejectHook | None = None,
             clock: Callable[[], float] = time.monotonic,
             sleep: Callable[[float], None] = time.sleep) -> set[int]:
    """Send: push ``messages`` (node -> message) and count them. Collect: each reply,
    as it arrives, through ``handle`` inside one guard. Returns the silent nodes.

    Flower's own "node unavailable" answers go to ``book.unavailable``; a reply
    that expired unread counts as silent. A device's error reply, or any
    exception ``handle`` raises, rejects that node (one log line) and the
    exchange goes on; only :class:`RunFailedError` (the user's code, a failed
    strategy) propagates.
    """
    nodes = list(messages)
    for node in nodes:
        book.count_download(node, messages[node])
    ids = list(grid.push_messages([messages[n] for n in nodes]))
    id_to_node: dict[str, int] = dict(zip(ids, nodes, strict=True))
    silent = set(nodes)
    for reply in poll_replies(grid, ids, timeout=timeout, settle=settle, clock=clock,
                              sleep=sleep):
        found = id_to_node.get(reply.metadata.reply_to_message_id)
        if found is None:
            continue
        node = found
        if reply.has_error() and is_unavailable_error(reply):
            silent.discard(node)
            book.unavailable.add(node)  # Flower's answer, not the node's: it is not there
            log.info("round %s: node %s is unavailable: %.200s", book.server_round, node,
                     reply.error.reason)
            continue
        if reply.has_error() and int(reply.error.code) == EXPIRED_ERROR_CODE:
            continue  # the reply expired before it was pulled: timed out
        silent.discard(node)
        book.replied.add(node)
        try:
            if reply.has_error():
                book.count_upload(node, reply)
                raise protocol.UpdateRejected(f"replied with an error: {reply.error.reason}")
            handle(node, reply)
        except RunFailedError:
            raise
        except Exception as exc:  # one reply never ends the run
            reason = str(exc) if isinstance(exc, protocol.UpdateRejected) else first_line(exc)
            book.reject(node, stage, reason)
            if on_reject is not None:
                on_reject(node)
    book.silent |= silent
    return silent
