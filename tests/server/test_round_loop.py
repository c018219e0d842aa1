"""The server round loop on an in-process grid running the real ClientApp."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, RecordDict

from flowerpress.client.app import app as client_app
from flowerpress.compression.envelope import PAYLOAD_KEY, PAYLOAD_STYPE
from flowerpress.protocol import message_bytes, record_bytes
from flowerpress.server.loop import LoopSettings, poll_replies, run_federation
from flowerpress.strategies import build_strategy
from flowerpress.tasks import data
from flowerpress.tasks.models import build_model, get_weights, set_weights
from flowerpress.tasks.training import evaluate
from flowerpress.testing import InProcessGrid, server_identity

RUN = {"dataset": "digits", "partition": "iid", "local-epochs": 1, "batch-size": 32,
       "lr": 0.1, "seed": 0, "num-clients": 4}


def _setup(num_nodes: int = 4) -> tuple[Any, list[np.ndarray], Any]:
    test = data.load_test("digits", 0, num_nodes)
    model = build_model("digits", tuple(test.x.shape[1:]), 10, seed=0)

    def evaluate_fn(weights: Sequence[np.ndarray]) -> Mapping[str, float]:
        set_weights(model, list(weights))
        r = evaluate(model, test.x, test.y)
        return {"accuracy": r.accuracy, "loss": r.loss, "f1_macro": r.f1_macro}

    return model, get_weights(model), evaluate_fn


def _run(grid: InProcessGrid, rounds: int = 3, cpr: int = 3, min_replies: int = 1,
         timeout: float = 0.5) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
    _, initial, evaluate_fn = _setup(grid.num_nodes)
    settings = LoopSettings(rounds=rounds, clients_per_round=cpr, round_timeout=timeout,
                            min_replies=min_replies, seed=0,
                            node_wait_timeout=1.0)
    # InProcessGrid answers at push time, so a virtual clock changes nothing but the
    # waits: a silent node's discovery query (5 s at least) and round timeouts pass
    # at once instead of in real time.
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    with server_identity():
        weights, rows, stop = run_federation(grid, initial, build_strategy("fedavg"), settings,
                                             evaluate_fn=evaluate_fn, clock=lambda: now[0],
                                             sleep=sleep)
    assert stop is None
    return weights, rows


def test_accuracy_rises_and_rows_are_complete() -> None:
    # Prepare
    grid = InProcessGrid(client_app, run_config=RUN, num_nodes=4)
    _, initial, evaluate_fn = _setup()
    start = evaluate_fn(initial)["accuracy"]
    # Execute
    _, rows = _run(grid, rounds=4)
    # Assert
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["accuracy"] > start + 0.2
    for row in rows:
        assert row["clients"] == 3 and row["rejected"] == 0 and row["timed_out"] == 0
        assert row["epsilon"] is None


def test_bytes_are_read_from_the_messages() -> None:
    # Prepare
    grid = InProcessGrid(client_app, run_config=RUN, num_nodes=4)
    # Execute
    _, rows = _run(grid, rounds=1)
    # Assert: download = the train messages actually pushed (one hello query each too),
    # as Flower serializes them, and their array payloads apart
    train = [m for m in grid.pushed if m.metadata.message_type == "train"]
    assert rows[0]["download_bytes"] == sum(message_bytes(m) for m in train)
    assert rows[0]["download_payload_bytes"] == sum(record_bytes(m.content) for m in train)
    _, initial, _ = _setup()
    fp32 = sum(w.size for w in initial) * 4
    # float32 arrays plus their small serialisation headers, for 3 clients
    assert 3 * fp32 <= rows[0]["upload_payload_bytes"] < 3 * (fp32 + 1024)
    # the whole reply messages: metadata, metrics and framing on top
    assert rows[0]["upload_payload_bytes"] < rows[0]["upload_bytes"] < 3 * (fp32 + 2048)


def test_silent_client_does_not_stall_the_run() -> None:
    # Prepare: every node but one never answers
    grid = InProcessGrid(client_app, run_config=RUN, num_nodes=4, silent={1, 2, 3})
    # Execute
    _, rows = _run(grid, rounds=2, cpr=4, timeout=0.2)
    # Assert
    assert [r["clients"] for r in rows] == [1, 1]
    assert [r["timed_out"] for r in rows] == [3, 3]


def _garbage(reply: Message) -> Message:
    arr = Array(dtype="bytes", shape=(7,), stype=PAYLOAD_STYPE, data=b"\x00garbage")
    reply.content = RecordDict({"arrays": ArrayRecord({PAYLOAD_KEY: arr}),
                                "metrics": reply.content.metric_records["metrics"]})
    return reply


def _nan(reply: Message) -> Message:
    arrays = reply.content.array_records["arrays"].to_numpy_ndarrays()
    arrays[0][...] = np.nan
    reply.content = RecordDict({"arrays": ArrayRecord(arrays),
                                "metrics": reply.content.metric_records["metrics"]})
    return reply


def _wrong_shape(reply: Message) -> Message:
    arrays = reply.content.array_records["arrays"].to_numpy_ndarrays()
    arrays[0] = np.zeros((3, 3), dtype=np.float32)
    reply.content = RecordDict({"arrays": ArrayRecord(arrays),
                                "metrics": reply.content.metric_records["metrics"]})
    return reply


def _too_many(reply: Message) -> Message:
    arrays = reply.content.array_records["arrays"].to_numpy_ndarrays()
    arrays.append(np.zeros(10**6, dtype=np.float32))
    reply.content = RecordDict({"arrays": ArrayRecord(arrays),
                                "metrics": reply.content.metric_records["metrics"]})
    return reply


@pytest.mark.parametrize("tamper", [_garbage, _nan, _wrong_shape, _too_many])
def test_bad_replies_are_counted_and_never_touch_the_model(tamper: Any) -> None:
    # Prepare: nodes 1-3 send bad updates, node 4 a good one
    bad = InProcessGrid(client_app, run_config=RUN, num_nodes=4,
                        tamper={1: tamper, 2: tamper, 3: tamper})
    good_only = InProcessGrid(client_app, run_config=RUN, num_nodes=4, silent={1, 2, 3})
    # Execute
    w_bad, rows = _run(bad, rounds=1, cpr=4)
    w_good, _ = _run(good_only, rounds=1, cpr=4, timeout=0.2)
    # Assert: the bad replies are rejected; the model equals the honest-only model
    assert rows[0]["rejected"] == 3 and rows[0]["clients"] == 1
    assert all(np.isfinite(w).all() for w in w_bad)
    for a, b in zip(w_bad, w_good, strict=True):
        np.testing.assert_array_equal(a, b)


def test_too_few_replies_leave_the_model_unchanged() -> None:
    # Prepare
    grid = InProcessGrid(client_app, run_config=RUN, num_nodes=4, silent={1, 2, 3, 4})
    _, initial, _ = _setup()
    # Execute
    weights, rows = _run(grid, rounds=1, cpr=4, min_replies=1, timeout=0.1)
    # Assert
    assert rows[0]["clients"] == 0
    for a, b in zip(weights, initial, strict=True):
        np.testing.assert_array_equal(a, b)


def test_same_seed_same_accuracy() -> None:
    # Execute
    _, rows_a = _run(InProcessGrid(client_app, run_config=RUN, num_nodes=4), rounds=2)
    _, rows_b = _run(InProcessGrid(client_app, run_config=RUN, num_nodes=4), rounds=2)
    # Assert: identical in-process (float64 sums; replies folded in sampling order)
    assert [r["accuracy"] for r in rows_a] == [r["accuracy"] for r in rows_b]


class _SlowGrid(InProcessGrid):
    """Replies become visible one pull at a time."""

    def pull_messages(self, message_ids: Any) -> list[Message]:
        ids = [m for m in message_ids if m in self._replies]
        return [self._replies.pop(ids[0])] if ids else []


def test_poll_yields_each_reply_once_and_stops_at_the_timeout() -> None:
    # Prepare: a fake clock; one of three nodes is silent
    now = [0.0]
    grid = _SlowGrid(client_app, run_config=RUN, num_nodes=3, silent={3})
    with server_identity():
        msgs = [Message(RecordDict({}), dst_node_id=n, message_type="query") for n in (1, 2, 3)]
        ids = list(grid.push_messages(msgs))

        def sleep(s: float) -> None:
            now[0] += s

        # Execute
        got = list(poll_replies(grid, ids, timeout=2.0, clock=lambda: now[0], sleep=sleep))
    # Assert
    assert len(got) == 2
    assert 2.0 <= now[0] < 2.3  # gave up at the deadline, not after a fixed long sleep


def test_a_costly_pull_is_not_repeated_at_the_short_pace() -> None:
    # Prepare: every pull takes 20 ms of a fake clock (Flower's LinkState checks each
    # pending id); replies keep coming, which alone would keep the 5 ms pace
    from flowerpress.server.phases import PULL_WAIT_FACTOR

    now, sleeps = [0.0], []

    class _CostlyGrid(_SlowGrid):
        def pull_messages(self, message_ids: Any) -> list[Message]:
            now[0] += 0.02
            return super().pull_messages(message_ids)

    grid = _CostlyGrid(client_app, run_config=RUN, num_nodes=4)
    with server_identity():
        msgs = [Message(RecordDict({}), dst_node_id=n, message_type="query") for n in (1, 2, 3, 4)]
        ids = list(grid.push_messages(msgs))

        def sleep(s: float) -> None:
            sleeps.append(s)
            now[0] += s

        # Execute
        got = list(poll_replies(grid, ids, timeout=10.0, clock=lambda: now[0], sleep=sleep))
    # Assert: every reply, and after each pull a wait of at least 4x its cost
    assert len(got) == 4
    assert sleeps and min(sleeps) >= PULL_WAIT_FACTOR * 0.02 - 1e-9


def test_a_federation_of_another_size_is_refused_in_one_line() -> None:
    # Prepare: 4 simulation nodes (num-partitions=4) but the run config asks for 10
    from flowerpress.server.loop import FederationMismatchError

    grid = InProcessGrid(client_app, run_config=RUN, num_nodes=4)
    _, initial, evaluate_fn = _setup()
    settings = LoopSettings(rounds=1, clients_per_round=2, round_timeout=1.0, min_replies=1,
                            seed=0, node_wait_timeout=1.0, num_clients=10)
    # Execute / Assert
    with server_identity(), pytest.raises(FederationMismatchError) as info:
        run_federation(grid, initial, build_strategy("fedavg"), settings, evaluate_fn=evaluate_fn)
    assert "4 nodes" in str(info.value) and "num-clients=10" in str(info.value)
    assert "\n" not in str(info.value)


def test_a_node_silent_at_start_up_costs_the_settle_time_not_the_node_wait() -> None:
    # Prepare: node 3 of 4 never answers; a virtual clock counts the wait
    from flowerpress.server.loop import discover_partitions

    grid = InProcessGrid(client_app, 4, run_config={"dataset": "digits", "num-clients": 4},
                         silent={3})
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    # Execute
    with server_identity():
        found = discover_partitions(grid, wanted=4, timeout=60.0, settle=2.0,
                                    clock=lambda: now[0], sleep=sleep)
    # Assert: three partitions found, node 3 unknown, and the wait ended ~2 s after the first
    assert found == {1: 0, 2: 1, 3: None, 4: 3}
    assert now[0] < 5.0
