"""Which nodes a round may use: membership that follows the devices.

Flower's ``Grid.get_node_ids()`` lists the nodes that are online now (a
SuperNode that stops sending heartbeats drops out of it). :class:`Membership`
refreshes that list before every round:

- a node seen for the first time is asked once for its partition id (the
  ``query`` message of :mod:`flowerpress.protocol`, not waited for) and may be
  sampled from the next round on;
- a node Flower no longer lists is skipped until Flower lists it again;
- a node that was asked in its last ``max_missed`` rounds and never answered
  (timed out, or Flower answered "node unavailable") is skipped and probed
  with the same query message, one probe at a time; its answer brings it back
  from the next round on.

Nodes are ordered by the partition each reports (then by node id), so that a
fixed membership gives the same sampled partitions in every run although
Flower's node ids are random. The whole bookkeeping is one serializable value
(:meth:`Membership.state_dict`), saved in every checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from flwr.app import Message, MessageType
from flwr.serverapp import Grid

from flowerpress import protocol

log = logging.getLogger(__name__)

#: Flower's error codes for "the destination node is not there"
#: (``flwr.common.constant.ErrorCode``): MESSAGE_UNAVAILABLE (3, the instruction
#: expired or the node was removed) and NODE_UNAVAILABLE (5, no heartbeat).
UNAVAILABLE_ERROR_CODES = frozenset({3, 5})
#: REPLY_MESSAGE_UNAVAILABLE: the node answered, but its reply expired unread.
EXPIRED_ERROR_CODE = 4
#: A probe without an answer is sent again after this many rounds.
PROBE_RETRY_ROUNDS = 3
_LAST = 1 << 62  # sort key of a node that reported no partition
#: What became of a node's message in the last round it was asked in (a rejection
#: is ``"rejected: <reason>"``).
OUTCOMES = ("accepted", "rejected", "timed out", "unavailable")
#: Longest outcome text kept (a rejection reason is cut).
MAX_OUTCOME = 300


def is_unavailable_error(reply: Message) -> bool:
    """Whether ``reply`` is Flower's error saying the node was not there (not the node's)."""
    return reply.has_error() and int(reply.error.code) in UNAVAILABLE_ERROR_CODES


def check_hello(reply: Message, *, num_clients: int | None,
                claimed: Mapping[int, int]) -> tuple[int | None, int | None, str | None]:
    """``(partition id, num-partitions, anchor)`` of a start-up query reply, validated.

    Raises
    ------
    protocol.UpdateRejected
        The node speaks another message format (another flowerpress version),
        or its answer is impossible: a partition count other than the run's
        ``num_clients`` (where the run knows it), a partition id outside the
        count, or an id another node already claimed this run (``claimed``:
        partition -> node).
    """
    info = reply.content.config_records.get(protocol.INFO) if reply.has_content() else None
    mismatch = protocol.format_mismatch(
        None if info is None else info.get(protocol.FORMAT_KEY),
        None if info is None else info.get(protocol.VERSION_KEY), side="the node")
    if mismatch is not None:
        raise protocol.UpdateRejected(mismatch)
    pid = protocol.partition_of_reply(reply)
    anchor = protocol.anchor_of_reply(reply)
    size = None if info is None else info.get(protocol.NUM_PARTITIONS)
    if not (isinstance(size, int) and not isinstance(size, bool) and size > 0):
        size = None
    if size is not None and num_clients is not None and size != num_clients:
        raise protocol.UpdateRejected(f"it reports {size} partitions, the run has "
                                      f"num-clients={num_clients}")
    if pid is not None:
        bound = size if size is not None else num_clients
        if bound is not None and pid >= bound:
            raise protocol.UpdateRejected(f"partition id {pid} is outside 0..{bound - 1}")
        if pid in claimed:
            raise protocol.UpdateRejected(f"partition id {pid} is already claimed by node "
                                          f"{claimed[pid]}")
    return pid, size, anchor


def hello_message(node_id: int) -> Message:
    """The query that asks a node for its partition id (and proves it is there)."""
    return Message(protocol.hello_query(), dst_node_id=node_id, message_type=MessageType.QUERY)


@dataclass
class NodeRecord:
    """What the server knows about one node."""

    node_id: int
    partition: int | None = None  # from its query reply; None until it answered
    since: int = 0  # the round before which it became known (sampled from since + 1)
    missed: int = 0  # consecutive rounds it was asked and did not answer
    listed: bool = True  # Flower listed it at the last refresh
    anchor: str | None = None  # initial-model digest its query reply named (history download)
    # Why the node is excluded from the run (an impossible answer, a protocol it
    # broke on purpose); None: it is not.
    excluded: str | None = None
    # -- what an operator reads (results.json ``nodes``, ``flowerpress devices``)
    version: str | None = None  # the flowerpress version its query reply named
    last_round: int = 0  # the last round it was asked in (0: never)
    outcome: str | None = None  # what became of that round's message (OUTCOMES, + reason)
    answered: int = 0  # the last round it answered in, accepted or rejected (0: never)


#: NodeRecord's fields, all scalars: a record's state is its field values.
_RECORD_FIELDS = tuple(f.name for f in fields(NodeRecord))

class Membership:
    """The nodes the server knows, which of them a round may use, and why not.

    Parameters
    ----------
    max_missed : int
        Skip a node that missed this many consecutive rounds (no reply in
        time, or Flower said it is unavailable) until it answers a probe.
        ``0`` never skips for missed rounds.
    num_clients : int or None
        The run's federation size: a joining node reporting another partition
        count, or a partition id outside it, is excluded (:func:`check_hello`).
    """

    def __init__(self, *, max_missed: int, num_clients: int | None = None) -> None:
        if isinstance(max_missed, bool) or not isinstance(max_missed, int) or max_missed < 0:
            raise ValueError(f"max_missed must be an int >= 0, got {max_missed!r}")
        self.max_missed = max_missed
        self.num_clients = num_clients
        self.records: dict[int, NodeRecord] = {}
        # Query message id -> (node id, round it was sent in).
        self._queries: dict[str, tuple[int, int]] = {}

    # -- building ----------------------------------------------------------------------

    def add_discovered(self, partitions: Mapping[int, int | None],
                       anchors: Mapping[int, str] | None = None,
                       versions: Mapping[int, str] | None = None) -> None:
        """Add nodes found by the blocking discovery at the start (sampled from round 1).

        ``versions`` holds the flowerpress version each node's answer named
        (nodes :meth:`exclude` will refuse included: what an operator needs to
        see is which version they run).

        A node id the records already hold keeps its bookkeeping; a new node id
        that reports the partition of a known node Flower no longer lists takes
        that node's place (a simulation restarted with new node ids, a device
        re-registered): the old record is dropped.
        """
        by_partition = {r.partition: r for r in self.records.values()
                        if r.partition is not None and r.node_id not in partitions}
        for node, pid in partitions.items():
            record = self.records.get(node)
            if record is None:
                old = by_partition.pop(pid, None) if pid is not None else None
                if old is not None:
                    del self.records[old.node_id]
                    record = NodeRecord(node, pid, since=old.since, missed=old.missed)
                else:
                    record = NodeRecord(node, pid, since=0)
                self.records[node] = record
            if record.partition is None:
                record.partition = pid
            if anchors is not None and node in anchors:
                record.anchor = anchors[node]
            record.listed = True
        for node, version in (versions or {}).items():
            self.records.setdefault(node, NodeRecord(node, since=0)).version = version

    # -- every round --------------------------------------------------------------------

    def refresh(self, grid: Grid, server_round: int) -> None:
        """Bring the records up to date before ``server_round``; never blocks.

        Reads Flower's node list, collects the answers to earlier queries,
        asks new nodes for their partition id and probes skipped ones.
        """
        listed = set(grid.get_node_ids())
        self._collect(grid)
        for node in sorted(listed - set(self.records)):
            self.records[node] = NodeRecord(node, since=server_round)
            log.info("round %s: node %s joined; it is sampled from round %s on", server_round,
                     node, server_round + 1)
        for record in self.records.values():
            back = record.node_id in listed
            if back and not record.listed:
                log.info("round %s: node %s is listed again", server_round, record.node_id)
                record.missed = 0
            elif record.listed and not back:
                log.info("round %s: node %s is no longer listed by Flower; skipped until it "
                         "is back", server_round, record.node_id)
            record.listed = back
        # A node is asked while its partition is unknown (joined now, or its
        # start-up answer never came: _ask spaces the retries) or while skipped.
        due = [r.node_id for r in self.records.values() if r.listed and r.excluded is None and (
            r.partition is None or self._skipped(r))]
        self._ask(grid, due, server_round)

    def _skipped(self, record: NodeRecord) -> bool:
        return self.max_missed > 0 and record.missed >= self.max_missed

    def _ask(self, grid: Grid, nodes: Iterable[int], server_round: int) -> None:
        """Send one query to each of ``nodes`` that has none outstanding (or a stale one)."""
        outstanding = {node: (mid, sent) for mid, (node, sent) in self._queries.items()}
        wanted = []
        for node in nodes:
            old = outstanding.get(node)
            if old is not None and server_round - old[1] < PROBE_RETRY_ROUNDS:
                continue
            if old is not None:
                del self._queries[old[0]]
            wanted.append(node)
        if not wanted:
            return
        ids = list(grid.push_messages([hello_message(n) for n in wanted]))
        for mid, node in zip(ids, wanted, strict=True):
            if mid:
                self._queries[mid] = (node, server_round)

    def _collect(self, grid: Grid) -> None:
        """Take the answers to queries that arrived since the last refresh."""
        if not self._queries:
            return
        for reply in grid.pull_messages(list(self._queries)):
            entry = self._queries.pop(reply.metadata.reply_to_message_id, None)
            if entry is None:
                continue
            record = self.records.get(entry[0])
            if record is None or reply.has_error() or record.excluded is not None:
                continue
            record.version = protocol.version_of_reply(reply)[1] or record.version
            # The same validation as the start-up query: an impossible answer
            # excludes the node (one log line), never the run.
            claimed = {r.partition: r.node_id for r in self.records.values()
                       if r.partition is not None and r.node_id != record.node_id
                       and r.excluded is None and r.listed}
            try:
                pid, _, anchor = check_hello(reply, num_clients=self.num_clients,
                                             claimed=claimed)
            except Exception as exc:  # one reply never ends the run
                self.exclude(record.node_id, f"query reply: {exc}")
                continue
            if record.partition is None and pid is not None:
                self._take_place(record, pid)
            record.anchor = anchor
            if self._skipped(record):
                log.info("node %s answered a probe; it is sampled again", record.node_id)
            record.missed = 0

    def _take_place(self, record: NodeRecord, pid: int) -> None:
        """Give ``record`` partition ``pid``; a record Flower no longer lists that held it
        (the same device under an earlier node id) is dropped, as in :meth:`add_discovered`."""
        for old in [r for r in self.records.values() if r.partition == pid
                    and r.node_id != record.node_id and not r.listed]:
            log.info("node %s reports partition %s of unlisted node %s; it takes its place",
                     record.node_id, pid, old.node_id)
            del self.records[old.node_id]
            record.since = min(record.since, old.since)
        record.partition = pid

    def record_round(self, asked: Iterable[int], answered: Iterable[int], *,
                     server_round: int = 0, outcomes: Mapping[int, str] | None = None) -> None:
        """Count a missed round for every node in ``asked`` that did not answer.

        With ``server_round``, every asked node's record keeps the round and
        ``outcomes[node]`` (what became of its message, :data:`OUTCOMES` or
        ``"rejected: <reason>"``; ``"timed out"`` where none is given).
        """
        got = set(answered)
        for node in asked:
            record = self.records.get(node)
            if record is None:
                continue
            record.missed = 0 if node in got else record.missed + 1
            if server_round > 0:
                record.last_round = server_round
                record.outcome = (outcomes or {}).get(node, "timed out")[:MAX_OUTCOME]
                if node in got:
                    record.answered = server_round
            if node not in got and record.missed == self.max_missed:
                log.warning("node %s missed its last %s rounds; skipped until it answers",
                            node, record.missed)
                # Its probe goes out at the next refresh, whatever query is outstanding.
                self._queries = {mid: entry for mid, entry in self._queries.items()
                                 if entry[0] != node}

    def exclude(self, node: int, reason: str) -> None:
        """Exclude ``node`` from the rest of the run (one log line); it is never asked again."""
        record = self.records.get(node)
        if record is None:
            record = self.records[node] = NodeRecord(node, since=0)
        if record.excluded is None:
            log.warning("node %s is excluded from the run: %.300s", node, reason)
        record.excluded = reason
        record.partition = None  # its claim is not believed

    def excluded_count(self) -> int:
        """How many nodes are excluded from the run."""
        return sum(r.excluded is not None for r in self.records.values())

    # -- views --------------------------------------------------------------------------

    def _order(self, records: Iterable[NodeRecord]) -> list[int]:
        keyed = sorted(records, key=lambda r: (_LAST if r.partition is None else r.partition,
                                               r.node_id))
        return [r.node_id for r in keyed]

    def stable_id(self, node: int) -> str:
        """An id for the privacy ledger that survives re-registration: ``p<partition>``
        where the node reported its partition, else ``n<node id>``."""
        record = self.records.get(node)
        if record is not None and record.partition is not None:
            return f"p{record.partition}"
        return f"n{node}"

    def known(self, server_round: int) -> list[int]:
        """Nodes known before ``server_round`` (the population), in sampling order."""
        return self._order(r for r in self.records.values()
                           if r.since < server_round and r.excluded is None)

    def available(self, server_round: int) -> list[int]:
        """Known nodes ``server_round`` may ask: listed and not skipped, in sampling order."""
        return self._order(r for r in self.records.values()
                           if r.since < server_round and r.listed and not self._skipped(r)
                           and r.excluded is None)

    def report(self) -> list[dict[str, Any]]:
        """One entry per node for results.json's ``nodes``: what an operator reads."""
        return [{"node_id": r.node_id, "partition": r.partition, "version": r.version,
                 "listed": r.listed, "excluded": r.excluded, "last_round": r.last_round,
                 "outcome": r.outcome, "answered": r.answered, "missed": r.missed}
                for r in sorted(self.records.values(), key=lambda r: r.node_id)]

    def anchors(self) -> dict[int, str]:
        """Node -> the initial-model digest its query reply named (nodes that named one)."""
        return {r.node_id: r.anchor for r in self.records.values() if r.anchor is not None}

    # -- persistence --------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable bookkeeping (outstanding queries are not kept)."""
        # Every round's checkpoint holds it: plain field reads, not dataclasses.asdict's
        # recursive deep copy (a third of the server's own time per round at 1,000 nodes).
        names = _RECORD_FIELDS
        return {"max_missed": self.max_missed,
                "nodes": [{name: getattr(r, name) for name in names}
                          for r in sorted(self.records.values(), key=lambda r: r.node_id)]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s records (``max_missed`` stays this run's)."""
        records: dict[int, NodeRecord] = {}
        for item in state["nodes"]:
            pid = item.get("partition")
            record = NodeRecord(node_id=int(item["node_id"]),
                                partition=None if pid is None else int(pid),
                                since=int(item.get("since", 0)), missed=int(item.get("missed", 0)),
                                listed=bool(item.get("listed", True)),
                                anchor=protocol.parse_digest(item.get("anchor")),
                                excluded=None if item.get("excluded") is None
                                else str(item["excluded"])[:500],
                                version=protocol.parse_flowerpress_version(item.get("version")),
                                last_round=int(item.get("last_round", 0)),
                                outcome=None if item.get("outcome") is None
                                else str(item["outcome"])[:MAX_OUTCOME],
                                answered=int(item.get("answered", 0)))
            records[record.node_id] = record
        self.records = records
        self._queries = {}
