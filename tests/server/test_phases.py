"""One round skeleton (issue 21): every transport keeps the same books, user code fails loudly.

In-process (``flowerpress.testing.InProcessGrid``, Flower's real Message and
ClientApp): secure aggregation over more rounds than ``max-missed-rounds``
with full and partial participation, a strategy that raises, a codec bug
that rejects every reply, a start-up query answer that is impossible, a
reply whose metadata does not fit Flower's protobuf, and a secure sum below
``min-replies`` that is still charged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from flowerpress import protocol
from flowerpress.config import validate
from flowerpress.server.app import serve
from flowerpress.server.phases import (
    RepeatedRejectionError,
    RoundBook,
    StrategyFailedError,
    reason_kind,
)
from flowerpress.simulations.app import app as client_app
from flowerpress.strategies.base import ClientUpdate, MeanStrategy
from flowerpress.testing import InProcessGrid, server_identity

BASE = {"dataset": "digits", "partition": "iid", "model": "logreg", "num-clients": 6,
        "clients-per-round": 6, "rounds": 5, "local-epochs": 1, "round-timeout": 5.0,
        "max-missed-rounds": 2}


def _serve(grid_kwargs: dict[str, Any] | None = None, out: Path | None = None,
           strategy: Any = None, **overrides: Any) -> dict[str, Any]:
    config = validate({**BASE, **overrides})
    with server_identity():
        grid = InProcessGrid(client_app, int(config["num-clients"]), run_config=config,
                             **(grid_kwargs or {}))
        return serve(grid, config, strategy=strategy, out_dir=out)


# --- secure aggregation is a transport of the one round -------------------------------

@pytest.mark.parametrize("per_round", [6, 4])
def test_secagg_runs_more_rounds_than_max_missed_with_every_device_counted(
        per_round: int) -> None:
    # Execute: 5 rounds with max-missed-rounds=2, full and partial participation
    doc = _serve(secagg="on:threshold=0.7,clip=2.0", compression="q:8",
                 **{"clients-per-round": per_round})
    # Assert: every round used its whole cohort; nobody was skipped as missed
    rows = doc["rounds"]
    assert [r["round"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(r["clients"] == per_round and r["rejected"] == 0 and r["timed_out"] == 0
               and r["unavailable"] == 0 for r in rows)
    assert all(r["upload_bytes"] > 0 and r["download_bytes"] > 0 for r in rows)


def test_a_secure_sum_below_min_replies_is_still_charged() -> None:
    # Prepare: noise on, one device silent and min-replies the whole cohort: 5 of 6
    # devices meet the threshold, so the sum is decoded, but the model never moves
    doc = _serve({"silent": {4}}, secagg="on:threshold=0.7,clip=2.0,noise=0.5",
                 compression="q:12", rounds=2, **{"min-replies": 6, "round-timeout": 0.5})
    # Assert: the server decoded a sum each round, so epsilon grows
    eps = [r["epsilon"] for r in doc["rounds"]]
    assert all(r["clients"] == 5 for r in doc["rounds"])
    assert all(e is not None and e > 0 for e in eps) and eps[1] > eps[0]


# --- the user's code fails the run in one line ----------------------------------------

class AddRaises(MeanStrategy):
    """A user's rule with a bug in add()."""

    def add(self, update: ClientUpdate) -> None:
        raise KeyError("bias")


def test_a_strategy_whose_add_raises_fails_the_run_naming_the_class(tmp_path: Path) -> None:
    # Execute
    with pytest.raises(StrategyFailedError) as info:
        _serve(out=tmp_path, strategy=AddRaises(), rounds=2)
    # Assert: one line naming the user's class; traceback and results on disk
    line = str(info.value)
    assert "AddRaises" in line and "KeyError" in line and "\n" not in line
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["summary"]["failed"] == line
    assert "KeyError" in (tmp_path / "error.log").read_text()
    assert (tmp_path / "model.npz").exists()
    # the run's log beside them: the run's lines, then the one failure line
    log = (tmp_path / "server.log").read_text().splitlines()
    assert any("initial accuracy" in line for line in log)
    assert "flowerpress: run failed: StrategyFailedError" in log[-1] and log[-1].endswith(line)


def _nan_reply(reply: Message) -> Message:
    """A reply whose payload is a plain float32 model full of NaN (what a codec bug sends)."""
    arrays = reply.content.array_records[protocol.ARRAYS]
    bad = ArrayRecord({k: Array(np.full(v.shape, np.nan, np.float32))
                       for k, v in arrays.items()})
    reply.content = RecordDict({protocol.ARRAYS: bad, **{
        k: v for k, v in reply.content.items() if k != protocol.ARRAYS}})
    return reply


def test_every_reply_rejected_for_one_reason_fails_the_run_after_max_rejected_rounds(
        tmp_path: Path) -> None:
    # Prepare: every device's update decodes to NaN (a codec bug, not a hostile federation)
    tamper = dict.fromkeys(range(1, 7), _nan_reply)
    # Execute
    with pytest.raises(RepeatedRejectionError) as info:
        _serve({"tamper": tamper}, out=tmp_path, rounds=6, **{"max-rejected-rounds": 3})
    # Assert: the run stopped after 3 rounds with the reason, not after 6 with exit 0
    line = str(info.value)
    assert "rounds 1-3" in line and "NaN" in line
    doc = json.loads((tmp_path / "results.json").read_text())
    assert len(doc["rounds"]) == 3 and doc["summary"]["failed"] == line


def test_one_hostile_device_does_not_count_as_a_failing_round() -> None:
    # Execute: one device's replies are always NaN; the others are honest
    doc = _serve({"tamper": {2: _nan_reply}}, rounds=4, **{"max-rejected-rounds": 2})
    # Assert: all rounds ran, the hostile device rejected each round
    assert [r["rejected"] for r in doc["rounds"]] == [1, 1, 1, 1]
    assert all(r["clients"] == 5 for r in doc["rounds"])


# --- the start-up query is validated like a train reply --------------------------------

def _hello(pid: int, size: int) -> Any:
    def tamper(reply: Message) -> Message:
        info = ConfigRecord({protocol.PARTITION_ID: pid, protocol.NUM_PARTITIONS: size,
                             protocol.FORMAT_KEY: protocol.MESSAGE_FORMAT,
                             protocol.VERSION_KEY: "0.2.0"})
        reply.content = RecordDict({protocol.INFO: info})
        return reply
    return tamper


class QueryTamperGrid(InProcessGrid):
    """Rewrites the replies of some nodes to query messages."""

    query_tamper: dict[int, Any]

    def __init__(self, *args: Any, query_tamper: dict[int, Any], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.query_tamper = query_tamper

    def pull_messages(self, message_ids: Any) -> Any:
        out = []
        for reply in super().pull_messages(message_ids):
            node = reply.metadata.src_node_id
            if (node in self.query_tamper and not reply.has_error()
                    and protocol.INFO in reply.content.config_records):
                reply = self.query_tamper[node](reply)
            out.append(reply)
        return out


@pytest.mark.parametrize(("dp", "sampling", "pid", "size"), [
    ("off", "fixed", 2, 10_000),
    ("off", "fixed", 99, 6),
    ("distributed:clip=1.0,noise=0.5", "predictable", 0, 6),
    ("distributed:clip=1.0,noise=0.5", "fixed", 0, 6),
    ("local:clip=1.0,noise=0.5", "poisson", 0, 6),
    ("distributed:clip=1.0,noise=0.5", "poisson", 2, 10_000),
])
def test_an_impossible_start_up_answer_excludes_the_node_and_the_run_goes_on(
        dp: str, sampling: str, pid: int, size: int) -> None:
    # Prepare: node 5 claims a huge federation, partition 0 (node 1's) or an id out of
    # range; under DP with every sampling scheme (a claimed id once ended DP runs)
    config = validate({**BASE, "rounds": 2, "dp": dp, "dp-sampling": sampling})
    # Execute
    with server_identity():
        grid = QueryTamperGrid(client_app, 6, run_config=config,
                               query_tamper={5: _hello(pid, size)})
        doc = serve(grid, config)
    # Assert: the run completed without node 5, which is counted as excluded
    assert [r["round"] for r in doc["rounds"]] == [1, 2]
    assert all(r["excluded"] == 1 for r in doc["rounds"])
    # Poisson sampling draws a cohort of random size; the others ask all 5 left
    assert all(r["clients"] == 5 for r in doc["rounds"]) or sampling == "poisson"
    if dp != "off":
        assert all(r["epsilon"] is not None for r in doc["rounds"])


def _old_version(reply: Message) -> Message:
    info = reply.content.config_records[protocol.INFO]
    info[protocol.FORMAT_KEY] = protocol.MESSAGE_FORMAT - 1
    info[protocol.VERSION_KEY] = "0.1.0"
    return reply


def test_a_device_speaking_another_message_format_is_excluded_naming_both_versions(
        caplog: pytest.LogCaptureFixture) -> None:
    # Prepare
    config = validate({**BASE, "rounds": 1})
    # Execute
    with server_identity(), caplog.at_level("WARNING", logger="flowerpress.server"):
        grid = QueryTamperGrid(client_app, 6, run_config=config,
                               query_tamper={2: _old_version})
        doc = serve(grid, config)
    # Assert: one line on the server naming both versions; the run goes on without node 2
    lines = [r.getMessage() for r in caplog.records if "node 2 " in r.getMessage()]
    assert len(lines) == 1 and "excluded from the run" in lines[0]
    assert "flowerpress 0.1.0" in lines[0]
    assert (doc["rounds"][0]["clients"], doc["rounds"][0]["excluded"]) == (5, 1)
    # results.json's nodes: every node's version; node 2 excluded and why, never asked
    nodes = {n["node_id"]: n for n in doc["nodes"]}
    assert sorted(nodes) == [1, 2, 3, 4, 5, 6]
    assert nodes[2]["version"] == "0.1.0"
    assert f"message format {protocol.MESSAGE_FORMAT - 1}" in nodes[2]["excluded"]
    assert (nodes[2]["last_round"], nodes[2]["outcome"]) == (0, None)
    from flowerpress import __version__

    assert all(n["version"] == __version__ and n["excluded"] is None
               and (n["last_round"], n["outcome"], n["answered"]) == (1, "accepted", 1)
               for i, n in nodes.items() if i != 2)


def test_the_device_says_in_one_line_when_the_server_speaks_another_format(
        caplog: pytest.LogCaptureFixture) -> None:
    # Prepare: a query from a server of another format
    from flowerpress.client.app import client_app as device_app

    content = RecordDict({protocol.CONFIG: ConfigRecord({
        protocol.HELLO: True, protocol.FORMAT_KEY: protocol.MESSAGE_FORMAT + 1,
        protocol.VERSION_KEY: "9.0.0"})})
    # Execute
    with server_identity(), caplog.at_level("ERROR"):
        query = Message(content, dst_node_id=1, message_type="query")
        grid = InProcessGrid(device_app(), 1, run_config=validate({**BASE, "num-clients": 1,
                                                                   "clients-per-round": 1}))
        ids = list(grid.push_messages([query]))
        replies = list(grid.pull_messages(ids))
    # Assert: the device still answers (with its format), and says why it will be excluded
    assert len(replies) == 1 and not replies[0].has_error()
    info = replies[0].content.config_records[protocol.INFO]
    assert info[protocol.FORMAT_KEY] == protocol.MESSAGE_FORMAT
    (line,) = [r.getMessage() for r in caplog.records
               if "the server speaks message format" in r.getMessage()]
    assert f"message format {protocol.MESSAGE_FORMAT + 1} (flowerpress 9.0.0)" in line


# --- nothing reads a reply before the guard ---------------------------------------------

def _huge_shape(reply: Message) -> Message:
    """A plain Array whose declared shape does not fit Flower's int32 protobuf field."""
    arr = Array(dtype="float32", shape=(1 << 40,), stype="numpy.ndarray", data=b"\x00" * 8)
    reply.content = RecordDict({protocol.ARRAYS: ArrayRecord({"0": arr}),
                                **{k: v for k, v in reply.content.items()
                                   if k != protocol.ARRAYS}})
    return reply


def test_a_reply_whose_shape_overflows_the_wire_format_costs_one_reply() -> None:
    # Execute
    doc = _serve({"tamper": {3: _huge_shape}}, rounds=2)
    # Assert
    assert all(r["rejected"] == 1 and r["clients"] == 5 for r in doc["rounds"])


# --- the book ------------------------------------------------------------------------

def test_reason_kind_groups_reasons_that_differ_only_in_numbers() -> None:
    a = "tensor 0: 12 NaN values in update of node 3"
    b = "tensor 1: 7 NaN values in update of node 44"
    assert reason_kind(a) == reason_kind(b)
    assert reason_kind(a) != reason_kind("replied with an error: boom")


def test_the_book_counts_a_survivor_rejected_late_as_valid_and_silence_as_timed_out() -> None:
    book = RoundBook(1, [1, 2, 3, 4])
    book.accept(1)
    book.accept(2)
    book.reject(2, "secagg unmask", "bad share")
    book.reject(3, "train", "NaN")
    book.silent |= {4}
    assert (book.valid, book.rejected_count, book.timed_out) == (2, 1, 1)
    assert book.only_reason() is None


def _extra_field(reply: Message) -> Message:
    """A secure-stage reply with a record beyond the protocol's own (a side channel)."""
    if not reply.has_error():
        reply.content = RecordDict({**dict(reply.content.items()),
                                    "side": ConfigRecord({"seconds": 1.25})})
    return reply


def test_a_device_caught_breaking_secure_aggregation_is_excluded_from_later_rounds() -> None:
    # Prepare: node 3 adds a field beyond the protocol to every secure-stage reply
    doc = _serve({"tamper": {3: _extra_field}}, secagg="on:threshold=0.7,clip=2.0",
                 compression="q:8")
    # Assert: round 1 drops it (rejected); from round 2 on it is excluded and never asked
    rows = doc["rounds"]
    assert [r["round"] for r in rows] == [1, 2, 3, 4, 5]
    assert (rows[0]["clients"], rows[0]["rejected"], rows[0]["excluded"]) == (5, 1, 1)
    assert all((r["clients"], r["rejected"], r["excluded"]) == (5, 0, 1) for r in rows[1:])


def test_each_asked_node_has_one_outcome() -> None:
    # Prepare: node 1 accepted, 2 rejected, 3 reported unavailable by Flower, 4 silent
    from flowerpress.server.phases import RoundBook

    book = RoundBook(3, [1, 2, 3, 4])
    book.accept(1)
    book.reject(2, "train", "num-examples 0\n< 1")
    book.unavailable.add(3)
    book.silent |= {3, 4}
    # Execute / Assert: the reason on one line
    assert book.outcomes() == {1: "accepted", 2: "rejected: num-examples 0 < 1",
                               3: "unavailable", 4: "timed out"}
