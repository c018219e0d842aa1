"""EF21 upload estimates: the server's per-device copy, kept equal to the device's."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message

from flowerpress import protocol
from flowerpress.client.mods import STATE_KEY
from flowerpress.compression import CodecState
from flowerpress.protocol import UpdateRejected
from flowerpress.server.estimates import UploadEstimates
from flowerpress.server.loop import LoopSettings, RoundOutcome, make_estimates, run_round
from flowerpress.strategies import build_strategy
from flowerpress.testing import InProcessGrid, server_identity
from tests.server.test_download import SHAPES, _initial, _user_app


def _w(value: float) -> list[np.ndarray]:
    return [np.full(s, value, np.float32) for s in SHAPES]


def test_combine_adds_the_held_estimate_or_starts_from_zero() -> None:
    # Prepare
    est = UploadEstimates(budget_bytes=10**8)
    est.commit(7, 3, _w(1.0))

    # Execute / Assert
    assert est.base(7) == 3 and est.base(8) == 0
    np.testing.assert_array_equal(est.combine(7, 3, _w(0.5))[0], _w(1.5)[0])
    np.testing.assert_array_equal(est.combine(7, 0, _w(0.5))[0], _w(0.5)[0])
    with pytest.raises(UpdateRejected, match="round 2"):
        est.combine(7, 2, _w(0.5))
    with pytest.raises(UpdateRejected, match="no valid 'ef21' record"):
        est.combine(7, None, _w(0.5))
    with pytest.raises(UpdateRejected, match="round 3"):
        est.combine(8, 3, _w(0.5))


def test_memory_is_bounded_least_recently_used_first() -> None:
    # Prepare: room for two models
    model = sum(int(np.prod(s)) for s in SHAPES) * 4
    est = UploadEstimates(budget_bytes=2 * model)

    # Execute
    for node in (1, 2, 3):
        est.commit(node, node, _w(float(node)))

    # Assert
    assert sorted(est.devices) == [2, 3] and est.nbytes <= 2 * model
    tiny = UploadEstimates(budget_bytes=model - 1)
    tiny.commit(1, 1, _w(1.0))
    assert tiny.base(1) == 0


def _settings(spec: str) -> LoopSettings:
    return LoopSettings(rounds=1, clients_per_round=2, round_timeout=0.5, min_replies=1,
                        seed=0, compression=spec)


def _rounds(grid: InProcessGrid, estimates: UploadEstimates | None, picks: list[list[int]],
            spec: str) -> list[RoundOutcome]:
    weights = _initial()
    strategy = build_strategy("fedavg")
    outcomes = []
    with server_identity():
        for rnd, nodes in enumerate(picks, start=1):
            out = run_round(grid, rnd, nodes, weights, strategy, _settings(spec),
                            extra_config={}, estimates=estimates,
                            rng=np.random.default_rng(rnd))
            weights = out.new_global
            outcomes.append(out)
    return outcomes


def _device_estimate(grid: InProcessGrid, node: int) -> list[np.ndarray]:
    record = grid._contexts[node].state.array_records[STATE_KEY]
    return list(CodecState.from_record(record).estimates)


def test_server_and_devices_hold_the_same_estimates_across_rounds() -> None:
    # Prepare
    spec = "topk:0.2+q:4+ef21"
    estimates = make_estimates(_settings(spec))
    assert estimates is not None and make_estimates(_settings("topk:0.2+ef")) is None
    grid = InProcessGrid(_user_app(), num_nodes=3)

    # Execute: node 1 comes back twice, node 3 once
    outcomes = _rounds(grid, estimates, [[1, 2], [1, 3], [3, 1]], spec)

    # Assert
    assert all(o.rejected == 0 and o.valid == 2 for o in outcomes)
    assert estimates.base(1) == 3 and estimates.base(2) == 1 and estimates.base(3) == 3
    for node in (1, 2, 3):
        for server, device in zip(estimates.devices[node].weights,
                                  _device_estimate(grid, node), strict=True):
            np.testing.assert_array_equal(server, device)


def test_a_server_that_forgot_makes_the_device_start_from_zero() -> None:
    # Prepare: the device built an estimate; the server's copy is gone
    spec = "topk:0.2+q:4+ef21"
    grid = InProcessGrid(_user_app(), num_nodes=2)
    _rounds(grid, UploadEstimates(budget_bytes=10**8), [[1, 2]], spec)
    fresh = UploadEstimates(budget_bytes=10**8)

    # Execute
    outcomes = _rounds(grid, fresh, [[1, 2]], spec)

    # Assert: accepted, and both copies equal the one decoded payload again
    assert outcomes[0].rejected == 0 and outcomes[0].valid == 2
    for server, device in zip(fresh.devices[1].weights, _device_estimate(grid, 1),
                              strict=True):
        np.testing.assert_array_equal(server, device)


def test_a_false_claim_is_rejected_and_the_device_resynchronizes() -> None:
    # Prepare: node 1 lies about the estimate it built on in round 2
    def lie(reply: Message) -> Message:
        if reply.has_content() and protocol.EF21 in reply.content.config_records:
            reply.content[protocol.EF21] = ConfigRecord({protocol.EF21_BASE: 99})
        return reply

    spec = "topk:0.2+q:4+ef21"
    estimates = UploadEstimates(budget_bytes=10**8)
    honest = InProcessGrid(_user_app(), num_nodes=2)
    _rounds(honest, estimates, [[1, 2]], spec)
    honest.tamper[1] = lie

    # Execute
    out = _rounds(honest, estimates, [[1, 2]], spec)[0]
    honest.tamper.clear()
    after = _rounds(honest, estimates, [[1, 2]], spec)[0]

    # Assert: the lie loses that reply only; next time the device restarts from zero
    assert out.rejected == 1 and out.valid == 1
    assert after.rejected == 0 and after.valid == 2
