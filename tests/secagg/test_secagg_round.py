"""Secure aggregation through the Grid: what the server sees, dropouts, hostile devices."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from conftest import VanishingGrid
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.serde import recorddict_to_proto

from flowerpress.client.app import client_app
from flowerpress.secagg import encoding
from flowerpress.secagg import messages as m
from flowerpress.secagg.core import CIPHER_SHARE_BYTES, COMMIT_BYTES
from flowerpress.secagg.settings import parse_secagg
from flowerpress.server.loop import LoopSettings, RoundOutcome, run_round
from flowerpress.strategies import build_strategy
from flowerpress.strategies.base import ClientUpdate
from flowerpress.tasks.registry import build_task, task_spec
from flowerpress.testing import server_identity

RUN = {"dataset": "digits", "partition": "iid", "model": "logreg", "local-epochs": 1,
       "batch-size": 32, "lr": 0.1, "seed": 0, "num-clients": 10}
SPEC = "on:threshold=0.7,bits=16,clip=2.0"


@dataclass
class RecordingGrid(VanishingGrid):
    """Keeps every reply the server pulls."""

    pulled: list[Message] = field(default_factory=list)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        out = list(super().pull_messages(message_ids))
        self.pulled.extend(out)
        return out


class SpyStrategy:
    """FedAvg that remembers every update it is handed."""

    def __init__(self) -> None:
        self.inner = build_strategy("fedavg")
        self.updates: list[ClientUpdate] = []

    def client_config(self, server_round: int) -> dict[str, Any]:
        return dict(self.inner.client_config(server_round))

    def begin_round(self, server_round: int, global_weights: Any) -> None:
        self.inner.begin_round(server_round, global_weights)

    def add(self, update: ClientUpdate) -> None:
        self.updates.append(update)
        self.inner.add(update)

    def result(self) -> list[np.ndarray]:
        return self.inner.result()


def _spied_task() -> tuple[Any, list[np.ndarray]]:
    """The digits task, recording every local delta it trains (in call order)."""
    task = build_task(task_spec(RUN), RUN)
    deltas: list[np.ndarray] = []
    train = task.train

    def spy(weights: Any, data: Any, ctx: Any) -> Any:
        result = train(weights, data, ctx)
        deltas.append(np.concatenate([(np.asarray(a, np.float64) - np.asarray(b, np.float64))
                                      .ravel() for a, b in zip(result.weights, weights,
                                                               strict=True)]))
        return result

    task.train = spy
    return task, deltas


def _round(grid: VanishingGrid, strategy: Any = None, spec: str = SPEC,
           cohort: int = 10) -> tuple[RoundOutcome, list[np.ndarray]]:
    task = build_task(task_spec(RUN), RUN)
    initial = [np.asarray(w, dtype=np.float32) for w in task.initial_weights()]
    settings = LoopSettings(rounds=1, clients_per_round=cohort, round_timeout=0.3,
                            min_replies=1, seed=0, node_wait_timeout=1.0, secagg=spec)
    with server_identity():
        outcome = run_round(grid, 1, list(range(1, cohort + 1)), initial,
                            strategy or build_strategy("fedavg"), settings,
                            extra_config={}, rng=np.random.default_rng(0))
    return outcome, initial


def _flat(weights: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(w, np.float64).ravel() for w in weights])


def _mask_plan(msg: Message) -> encoding.EncodingPlan:
    config = msg.content.config_records["config"]
    settings = parse_secagg(str(config[m.SPEC]))
    assert settings is not None
    return encoding.make_plan(dim=650, bits=settings.bits, clip=settings.clip,
                              noise=settings.noise, cohort=int(config["clients-per-round"]),
                              min_summands=int(config[m.MIN_SUMMANDS]),
                              seed=int(config[m.SEED]))


def _expected_ints(delta: np.ndarray, plan: encoding.EncodingPlan) -> np.ndarray:
    x = delta * min(1.0, plan.clip / np.linalg.norm(delta))
    padded = np.zeros(plan.padded)
    padded[: x.size] = x
    return encoding.fwht(padded * encoding.rotation_signs(plan.padded, plan.seed)) / plan.gamma


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(abs(np.corrcoef(a, b)[0, 1]))


def test_the_server_sees_no_individual_update() -> None:
    # Prepare: a grid that records every reply; a task that records every delta
    task, deltas = _spied_task()
    grid = RecordingGrid(client_app(task), num_nodes=10, run_config=RUN)
    strategy = SpyStrategy()
    # Execute
    outcome, initial = _round(grid, strategy)
    # Assert: what the server holds is one aggregate, never a device's update
    assert outcome.valid == 10 and outcome.reply_metrics == [{}] * 10
    assert [u.node_id for u in strategy.updates] == [0]
    mask_msgs = [p for p in grid.pushed if m.stage_of(p) == m.MASK]
    plan = _mask_plan(mask_msgs[0])
    expected = {msg.metadata.dst_node_id: _expected_ints(d, plan)
                for msg, d in zip(mask_msgs, deltas, strict=True)}
    wire = [recorddict_to_proto(x.content).SerializeToString()
            for x in (*grid.pushed, *grid.pulled) if not x.has_error()]
    for delta in deltas:  # no delta travels in any float format
        for dtype in (np.float32, np.float64, np.float16):
            chunk = delta[:8].astype(dtype).tobytes()
            assert not any(chunk in blob for blob in wire)
    masked: list[np.ndarray] = []
    for reply in grid.pulled:
        record = reply.content.config_records.get(m.RECORD)
        if record is None or m.MASKED not in record:
            continue
        words = encoding.unpack_words(record[m.MASKED], plan.bits, plan.padded)
        masked.append(words)
        # a masked vector is uniform noise: uncorrelated with every device's encoding
        centred = encoding.from_modular(words, plan.bits).astype(np.float64)
        assert max(_corr(centred, e) for e in expected.values()) < 0.15
    assert len(masked) == 10
    # ... and no reply carries anything beyond its stage's keys (no training time)
    for reply in grid.pulled:
        assert set(reply.content.config_records) == {m.RECORD}
        assert not reply.content.metric_records and not reply.content.array_records
        assert set(reply.content.config_records[m.RECORD]) <= set().union(
            *m.REPLY_KEYS.values())
    # ... while the released aggregate is the mean of the clipped updates
    got = _flat(outcome.new_global) - _flat(initial)
    want = np.mean([d * min(1.0, 2.0 / np.linalg.norm(d)) for d in deltas], axis=0)
    assert _corr(got, want) > 0.99
    np.testing.assert_allclose(got, want, atol=2e-3)


@pytest.mark.parametrize(("stage", "valid"), [(m.UNMASK, 10), (m.MASK, 7)])
def test_thirty_percent_vanishing_is_recovered(stage: str, valid: int) -> None:
    # Prepare: 3 of 10 vanish after sending their masked input (unmask) or before (mask)
    task, deltas = _spied_task()
    grid = VanishingGrid(client_app(task), num_nodes=10, run_config=RUN,
                         vanish={2: stage, 5: stage, 9: stage})
    # Execute
    outcome, initial = _round(grid)
    # Assert: the round completes with the survivors' inputs, exactly summed
    assert (outcome.valid, outcome.rejected, outcome.timed_out) == (valid, 0, 10 - valid)
    survivors = [d for i, d in enumerate(deltas, start=1) if valid == 10 or i not in (2, 5, 9)]
    want = np.mean([d * min(1.0, 2.0 / np.linalg.norm(d)) for d in survivors], axis=0)
    np.testing.assert_allclose(_flat(outcome.new_global) - _flat(initial), want, atol=2e-3)


def test_beyond_the_threshold_the_round_is_skipped_and_counted() -> None:
    # Prepare: 4 of 10 vanish before masking; threshold 0.7 needs 7
    grid = VanishingGrid(client_app(), num_nodes=10, run_config=RUN,
                         vanish={1: m.MASK, 3: m.MASK, 6: m.MASK, 8: m.MASK})
    # Execute
    outcome, initial = _round(grid)
    # Assert: skipped, counted, the model unchanged
    assert (outcome.valid, outcome.rejected, outcome.timed_out) == (0, 0, 4)
    assert all(np.array_equal(a, b) for a, b in zip(outcome.new_global, initial, strict=True))
    assert outcome.upload_bytes > 0 and outcome.download_bytes > 0


def _stage_of_reply(reply: Message) -> str | None:
    record = reply.content.config_records.get(m.RECORD) if not reply.has_error() else None
    if record is None:
        return None
    for key, stage in ((m.C_PK, m.ADVERTISE), (m.DST, m.SHARE_KEYS), (m.MASKED, m.MASK),
                       (m.B_OWNERS, m.UNMASK)):
        if key in record:
            return stage
    return None


def _rewrite(stage: str, change: Callable[[ConfigRecord], None]) -> Callable[[Message], Message]:
    def tamper(reply: Message) -> Message:
        if _stage_of_reply(reply) == stage:
            record = reply.content.config_records[m.RECORD]
            change(record)
        return reply
    return tamper


def _garbage_shares(record: ConfigRecord) -> None:
    # Each neighbour's ciphertext replaced, the commitments and check polynomial kept:
    # every receiver complains and its evidence convicts the dealer.
    cut = CIPHER_SHARE_BYTES
    record[m.CIPHERTEXTS] = [os.urandom(cut) + c[cut:] if len(c) == cut + COMMIT_BYTES else c
                             for c in record[m.CIPHERTEXTS]]


def _short_vector(record: ConfigRecord) -> None:
    record[m.MASKED] = record[m.MASKED][:-2]


def _replayer() -> Callable[[Message], Message]:
    seen: dict[str, RecordDict] = {}

    def tamper(reply: Message) -> Message:
        stage = _stage_of_reply(reply)
        if stage == m.ADVERTISE:
            seen["first"] = reply.content
        elif stage == m.UNMASK:  # answer the unmask request with the stale keys
            reply.content = seen["first"]
        return reply
    return tamper


def test_hostile_devices_are_dropped_and_the_round_completes() -> None:
    # Prepare: node 2 sends shares that do not authenticate, node 3 a short
    # masked vector, node 4 replays its stage-1 reply to the unmask request
    task, deltas = _spied_task()
    grid = VanishingGrid(client_app(task), num_nodes=10, run_config=RUN, tamper={
        2: _rewrite(m.SHARE_KEYS, _garbage_shares), 3: _rewrite(m.MASK, _short_vector),
        4: _replayer()})
    # Execute
    outcome, initial = _round(grid)
    # Assert: 2 and 3 are rejected; 4's input was masked in time and still counts
    assert (outcome.valid, outcome.rejected, outcome.timed_out) == (8, 2, 0)
    assert sorted(outcome.participants) == [1, 4, 5, 6, 7, 8, 9, 10]
    honest = [d for i, d in enumerate(deltas, start=1) if i not in (2, 3)]
    want = np.mean([d * min(1.0, 2.0 / np.linalg.norm(d)) for d in honest], axis=0)
    np.testing.assert_allclose(_flat(outcome.new_global) - _flat(initial), want, atol=2e-3)


def test_a_device_accusing_every_neighbour_is_not_believed() -> None:
    # Prepare: node 6 claims that no neighbour's shares authenticated
    def accuse_all(record: ConfigRecord) -> None:
        record[m.COMPLAINTS] = m.pack_ids([n for n in range(1, 11) if n != 6])

    grid = VanishingGrid(client_app(), num_nodes=10, run_config=RUN,
                         tamper={6: _rewrite(m.MASK, accuse_all)})
    # Execute
    outcome, _ = _round(grid)
    # Assert: the accuser is dropped, everyone else is summed
    assert (outcome.valid, outcome.rejected, outcome.timed_out) == (9, 1, 0)
    assert 6 not in outcome.participants


def test_a_device_refuses_replayed_and_out_of_order_stages() -> None:
    # Prepare: one device, driven by hand
    app = client_app()
    grid = VanishingGrid(app, num_nodes=3, run_config=RUN)
    context = grid.context(1)
    setup = ConfigRecord({m.STAGE: m.ADVERTISE, m.ROUND: 1, m.BITS: 8, m.LENGTH: 4,
                          m.THRESHOLD: 2, m.NEIGHBOURS: m.pack_ids([2])})

    def send(config: ConfigRecord) -> Message:
        with server_identity():
            msg = Message(RecordDict({"config": config}), dst_node_id=1, message_type="train")
        msg.metadata.__dict__["_message_id"] = "x"
        return app(msg, context)

    # Execute
    first = send(setup)
    again = send(setup)
    early = send(ConfigRecord({m.STAGE: m.UNMASK, m.ROUND: 1, m.ALIVE: m.pack_ids([1, 2]),
                               m.DROPPED: b""}))
    # Assert
    assert not first.has_error()
    assert again.has_error() and "replayed advertise" in again.error.reason
    assert early.has_error() and "stage 1" in early.error.reason
