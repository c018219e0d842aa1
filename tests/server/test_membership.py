"""Membership that follows the devices: joins, departures, missed rounds, Flower's errors."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pytest
from flwr.app import Error, Message

from flowerpress.client.app import app as client_app
from flowerpress.server.loop import LoopSettings, run_federation
from flowerpress.server.membership import Membership
from flowerpress.strategies import build_strategy
from flowerpress.tasks import data
from flowerpress.tasks.models import build_model, get_weights, set_weights
from flowerpress.tasks.training import evaluate
from flowerpress.testing import InProcessGrid, server_identity

RUN = {"dataset": "digits", "partition": "iid", "local-epochs": 1, "batch-size": 32,
       "lr": 0.1, "seed": 0, "num-clients": 5}


@dataclass
class DynamicGrid(InProcessGrid):
    """An in-process grid whose nodes come and go as Flower would report them.

    ``offline`` nodes are not listed and Flower answers messages to them with
    its NODE_UNAVAILABLE error; ``unreachable`` nodes are listed but get the
    same error (a heartbeat lost during the round).
    """

    offline: set[int] = field(default_factory=set)
    unreachable: set[int] = field(default_factory=set)

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self._contexts if n not in self.offline]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        msgs = list(messages)
        gone = [m for m in msgs if m.metadata.dst_node_id in self.offline | self.unreachable]
        ids = list(super().push_messages(msgs))
        for msg, mid in zip(msgs, ids, strict=True):
            if msg in gone:
                self._replies.pop(mid, None)
                msg.metadata.__dict__["_message_id"] = mid
                self._replies[mid] = Message(Error(code=5, reason="Node Unavailable"),
                                             reply_to=msg)
        return ids


def _run(grid: InProcessGrid, *, rounds: int, cpr: int, max_missed: int = 3,
         after_round: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    test = data.load_test("digits", 0, 5)
    model = build_model("digits", tuple(test.x.shape[1:]), 10, seed=0)

    def evaluate_fn(weights: Sequence[np.ndarray]) -> Mapping[str, float]:
        set_weights(model, list(weights))
        r = evaluate(model, test.x, test.y)
        return {"accuracy": r.accuracy, "loss": r.loss, "f1_macro": r.f1_macro}

    settings = LoopSettings(rounds=rounds, clients_per_round=cpr, round_timeout=0.2,
                            min_replies=1, seed=0, node_wait_timeout=0.5,
                            max_missed_rounds=max_missed)
    # The grid answers at push time: a virtual clock only makes the waits for silent
    # nodes (the discovery query waits 5 s at least) pass at once.
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    with server_identity():
        _, rows, _ = run_federation(
            grid, get_weights(model), build_strategy("fedavg"), settings,
            evaluate_fn=evaluate_fn,
            on_round=None if after_round is None else lambda row: after_round(row["round"]),
            clock=lambda: now[0], sleep=sleep)
    return rows


def _asked(grid: InProcessGrid, kind: str = "train") -> list[set[int]]:
    """Per round, the nodes a message of ``kind`` was pushed to (grouped by round)."""
    out: dict[int, set[int]] = {}
    for msg in grid.pushed:
        if msg.metadata.message_type == kind:
            rnd = int(msg.content.config_records["config"]["server-round"])
            out.setdefault(rnd, set()).add(msg.metadata.dst_node_id)
    return [out.get(r, set()) for r in range(1, max(out, default=0) + 1)]


def test_a_node_that_joins_is_sampled_from_the_next_round_on() -> None:
    # Prepare: node 5 connects after round 1
    grid = DynamicGrid(client_app, run_config=RUN, num_nodes=5, offline={5})

    def after(server_round: int) -> None:
        if server_round == 1:
            grid.offline.clear()

    # Execute
    rows = _run(grid, rounds=3, cpr=5, after_round=after)
    # Assert: discovered before round 2 (asked its partition once), sampled in round 3
    assert [r["clients"] for r in rows] == [4, 4, 5]
    assert [r["unavailable"] for r in rows] == [0, 0, 0]
    queries = [m for m in grid.pushed if m.metadata.message_type == "query"
               and m.metadata.dst_node_id == 5]
    assert len(queries) == 1
    assert 5 in _asked(grid)[2] and 5 not in _asked(grid)[1]


def test_a_node_flower_stops_listing_is_skipped_until_it_is_back() -> None:
    # Prepare: node 2 is offline during round 2 only
    grid = DynamicGrid(client_app, run_config=RUN, num_nodes=4)

    def after(server_round: int) -> None:
        if server_round == 1:
            grid.offline.add(2)
        if server_round == 2:
            grid.offline.clear()

    # Execute
    rows = _run(grid, rounds=3, cpr=4, after_round=after)
    # Assert: not asked (no timeout waited), counted as unavailable, back in round 3
    assert [r["clients"] for r in rows] == [4, 3, 4]
    assert [r["unavailable"] for r in rows] == [0, 1, 0]
    assert [r["timed_out"] for r in rows] == [0, 0, 0]
    assert 2 not in _asked(grid)[1]


def test_a_node_that_misses_its_last_rounds_is_skipped_and_probed_back() -> None:
    # Prepare: node 3 is listed but silent in rounds 1-2, answers again afterwards
    grid = DynamicGrid(client_app, run_config=RUN, num_nodes=4, silent={3})

    def after(server_round: int) -> None:
        if server_round == 2:
            grid.silent.clear()

    # Execute
    rows = _run(grid, rounds=4, cpr=4, max_missed=2, after_round=after)
    # Assert: timed out twice, skipped (and probed) in round 3, sampled again in round 4
    assert [r["timed_out"] for r in rows] == [1, 1, 0, 0]
    assert [r["unavailable"] for r in rows] == [0, 0, 1, 0]
    assert [r["clients"] for r in rows] == [3, 3, 3, 4]
    assert 3 not in _asked(grid)[2]
    probes = [m for m in grid.pushed if m.metadata.message_type == "query"
              and m.metadata.dst_node_id == 3]
    # the discovery query, the same query again (its answer never came) and one probe
    assert len(probes) == 3


def test_flowers_node_unavailable_error_is_not_a_rejected_update() -> None:
    # Prepare: node 1 is listed, but Flower answers its messages with NODE_UNAVAILABLE
    grid = DynamicGrid(client_app, run_config=RUN, num_nodes=4, unreachable={1})
    # Execute
    rows = _run(grid, rounds=1, cpr=4)
    # Assert
    assert rows[0]["unavailable"] == 1
    assert rows[0]["rejected"] == 0 and rows[0]["timed_out"] == 0 and rows[0]["clients"] == 3


def test_sampling_is_reproducible_for_a_fixed_membership() -> None:
    # Execute: two runs, 5 nodes, 2 per round
    grids = [DynamicGrid(client_app, run_config=RUN, num_nodes=5) for _ in range(2)]
    for grid in grids:
        _run(grid, rounds=3, cpr=2)
    # Assert: the same nodes each round, and not always the same ones
    first, second = (_asked(g) for g in grids)
    assert first == second
    assert len({frozenset(s) for s in first}) > 1


def test_membership_state_round_trips_and_matches_a_new_node_id_by_partition() -> None:
    # Prepare
    members = Membership(max_missed=2)
    members.add_discovered({11: 0, 12: 1, 13: None})
    members.record_round([11, 12, 13], answered=[11])
    members.record_round([12], answered=[])
    # Execute: restore, then a restarted federation reports partition 1 under a new node id
    restored = Membership(max_missed=2)
    restored.load_state_dict(members.state_dict())
    restored.add_discovered({11: 0, 99: 1, 13: None})
    # Assert
    assert restored.state_dict()["nodes"][0] == members.state_dict()["nodes"][0]
    # the checkpoint's format: every record's fields, as dataclasses.asdict gives them
    assert members.state_dict()["nodes"] == [asdict(members.records[n]) for n in (11, 12, 13)]
    assert sorted(restored.records) == [11, 13, 99]
    assert restored.records[99].missed == 2  # the bookkeeping of partition 1 moved over
    assert restored.available(1) == [11, 13]  # 99 is skipped: it missed its last 2 rounds
    assert restored.known(1) == [11, 99, 13]  # ordered by partition, unknown last


def test_each_node_keeps_its_version_last_round_and_outcome_across_a_checkpoint() -> None:
    # Prepare: three nodes; in round 2 node 11 is accepted, 12 rejected, 13 silent
    members = Membership(max_missed=3)
    members.add_discovered({11: 0, 12: 1, 13: None}, versions={11: "0.2.0", 12: "0.2.0"})
    members.record_round([11, 12, 13], [11, 12, 13], server_round=1,
                         outcomes=dict.fromkeys([11, 12, 13], "accepted"))
    members.record_round([11, 12, 13], [11, 12], server_round=2,
                         outcomes={11: "accepted", 12: "rejected: num-examples 0 < 1"})
    # Execute: through the checkpoint's state
    restored = Membership(max_missed=3)
    restored.load_state_dict(members.state_dict())
    # Assert
    report = {n["node_id"]: n for n in restored.report()}
    assert report == {n["node_id"]: n for n in members.report()}
    assert (report[11]["version"], report[11]["outcome"], report[11]["answered"]) == (
        "0.2.0", "accepted", 2)
    assert report[12]["outcome"] == "rejected: num-examples 0 < 1"
    assert (report[13]["version"], report[13]["last_round"], report[13]["outcome"],
            report[13]["answered"]) == (None, 2, "timed out", 1)


def test_a_checkpoint_from_before_node_reports_loads_with_empty_ones() -> None:
    # Prepare: a membership state as flowerpress 0.2.0 saved it
    old = {"max_missed": 3, "nodes": [{"node_id": 5, "partition": 0, "since": 0, "missed": 0,
                                       "listed": True, "anchor": None, "excluded": None}]}
    members = Membership(max_missed=3)
    # Execute
    members.load_state_dict(old)
    # Assert
    (entry,) = members.report()
    assert (entry["version"], entry["last_round"], entry["outcome"], entry["answered"]) == (
        None, 0, None, 0)


def test_max_missed_must_be_a_non_negative_int() -> None:
    with pytest.raises(ValueError, match="max_missed"):
        Membership(max_missed=-1)


def test_a_node_that_joins_a_dp_run_is_accounted_without_undercharging() -> None:
    # Prepare: a DP run over 4 nodes; node 5 connects after round 1 (a device added
    # with `flowerpress certs add-node` while the run goes)
    from flowerpress.privacy import ServerPrivacy, parse_dp

    dp = parse_dp("local:clip=1.0,noise=1.0")
    assert dp is not None
    grid = DynamicGrid(client_app, run_config=RUN, num_nodes=5, offline={5})
    ledgers: list[ServerPrivacy] = []

    def ledger(n: int) -> ServerPrivacy:
        # predictable (seeded) sampling: the cohort drawn from the 5 known nodes is
        # the same in every run (the default CSPRNG draw would leave node 5 out of
        # round 3 in one run of five)
        ledgers.append(ServerPrivacy(dp, num_clients=n, clients_per_round=n, delta=1e-5,
                                     max_epsilon=None, sampling="predictable"))
        return ledgers[-1]

    def after(server_round: int) -> None:
        if server_round == 1:
            grid.offline.clear()

    test = data.load_test("digits", 0, 5)
    model = build_model("digits", tuple(test.x.shape[1:]), 10, seed=0)
    settings = LoopSettings(rounds=3, clients_per_round=5, round_timeout=5.0, min_replies=1,
                            seed=0, node_wait_timeout=0.5, dp=True)
    # Execute
    with server_identity():
        _, rows, stopped = run_federation(
            grid, get_weights(model), build_strategy("fedavg"), settings,
            evaluate_fn=lambda w: {"accuracy": 0.0, "loss": 0.0}, privacy=ledger,
            on_round=lambda row: after(row["round"]))
    # Assert: every round ran; the ledger built for 4 nodes charged every round as a
    # draw of its whole population (no amplification), the new node included
    assert stopped is None and [r["round"] for r in rows] == [1, 2, 3]
    assert len(ledgers) == 1 and ledgers[0].num_clients == 4
    eps = [float(r["epsilon"]) for r in rows]
    assert eps[0] < eps[1] < eps[2]
    assert 5 in set().union(*_asked(grid)[1:])


def test_a_node_whose_start_up_answer_never_came_is_asked_again() -> None:
    # Prepare: node 3 is listed but silent during discovery and round 1, then answers
    grid = DynamicGrid(client_app, run_config=RUN, num_nodes=4, silent={3})

    def after(server_round: int) -> None:
        if server_round == 1:
            grid.silent.clear()

    # Execute
    rows = _run(grid, rounds=4, cpr=4, max_missed=0, after_round=after)
    # Assert: asked its partition again after the start-up query went unanswered
    queries = [m for m in grid.pushed if m.metadata.message_type == "query"
               and m.metadata.dst_node_id == 3]
    assert len(queries) >= 2
    assert rows[-1]["clients"] == 4


def test_a_re_registered_node_takes_the_unlisted_record_of_its_partition() -> None:
    # Prepare: a restored run knew partition 2 as node 1000, now unlisted; node 3
    # (partition 2) was listed at start-up but its answer never came
    grid = InProcessGrid(client_app, run_config=RUN, num_nodes=4)
    members = Membership(max_missed=2, num_clients=4)
    members.load_state_dict({"nodes": [{"node_id": 1000, "partition": 2, "since": 0}]})
    members.add_discovered({1: 0, 2: 1, 3: None, 4: 3})
    # Execute: round 1 asks node 3 again (answered at push time), round 2 takes the answer
    with server_identity():
        members.refresh(grid, 1)
        members.refresh(grid, 2)
    # Assert: node 3 holds partition 2; the old record is gone from the population
    assert members.records[3].partition == 2
    assert 1000 not in members.records
    assert members.known(3) == [1, 2, 3, 4]
