"""Federated pruning: the schedule, the mask on the wire, masked training, uploads, resume."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message

from flowerpress.client.app import app as client_app
from flowerpress.compression.mask import (
    PruneSettings,
    gather,
    magnitude_mask,
    mask_sparsity,
    pack_mask,
    parse_prune,
    scatter,
    unpack_mask,
)
from flowerpress.config import ConfigError, validate
from flowerpress.server.app import serve
from flowerpress.server.checkpoint import LoopState, load_checkpoint, save_checkpoint
from flowerpress.server.loop import LoopSettings, run_federation
from flowerpress.server.prune import Pruner
from flowerpress.simulations.app import app as sim_client_app
from flowerpress.strategies import build_strategy
from flowerpress.tasks import data
from flowerpress.tasks.models import build_model, get_weights, set_weights
from flowerpress.tasks.training import TrainSettings, evaluate, train
from flowerpress.testing import InProcessGrid, server_identity

RUN = {"dataset": "digits", "partition": "iid", "local-epochs": 1, "batch-size": 32,
       "lr": 0.1, "seed": 0, "num-clients": 4}
PRUNE = "magnitude:sparsity=0.5,start=1,end=2"


def _setup() -> tuple[list[np.ndarray], Any]:
    test = data.load_test("digits", 0, 4)
    model = build_model("digits", tuple(test.x.shape[1:]), 10, seed=0)

    def evaluate_fn(weights: Sequence[np.ndarray]) -> Mapping[str, float]:
        set_weights(model, list(weights))
        r = evaluate(model, test.x, test.y)
        return {"accuracy": r.accuracy, "loss": r.loss, "f1_macro": r.f1_macro}

    return get_weights(model), evaluate_fn


def _run(*, prune: str = PRUNE, compression: str = "none", rounds: int = 3,
         resume: LoopState | None = None, states: list[LoopState] | None = None,
         tamper: Mapping[int, Any] | None = None,
         ) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
    grid = InProcessGrid(client_app, run_config=RUN, num_nodes=4, tamper=dict(tamper or {}))
    initial, evaluate_fn = _setup()
    settings = LoopSettings(rounds=rounds, clients_per_round=3, round_timeout=0.5,
                            min_replies=1, seed=0, node_wait_timeout=1.0,
                            compression=compression, prune=prune)
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    with server_identity():
        weights, rows, stop = run_federation(
            grid, initial, build_strategy("fedavg"), settings, evaluate_fn=evaluate_fn,
            clock=lambda: now[0], sleep=sleep, resume=resume,
            on_state=None if states is None else states.append)
    assert stop is None
    return weights, rows


# --- the schedule and the mask ----------------------------------------------------------

def test_cubic_schedule_of_zhu_and_gupta() -> None:
    # Prepare
    s = PruneSettings(sparsity=0.9, start=5, end=20)
    # Execute
    targets = [s.target(r) for r in range(1, 31)]
    # Assert: 0 before start, 0.9 from end on, rising fastest early (cubic)
    assert targets[:5] == [0.0] * 5
    assert all(t == 0.9 for t in targets[19:])
    assert all(a <= b for a, b in itertools.pairwise(targets))
    assert s.target(10) == pytest.approx(0.9 * (1 - (1 - 5 / 15) ** 3))
    assert targets[6] - targets[5] > targets[18] - targets[17]


def test_global_magnitude_mask_prunes_smallest_weights_and_only_grows() -> None:
    # Prepare
    rng = np.random.default_rng(0)
    weights = [rng.normal(size=(20, 10)).astype(np.float32), rng.normal(size=10).astype(
        np.float32), (3 * rng.normal(size=(10, 5))).astype(np.float32)]
    # Execute
    first = magnitude_mask(weights, 0.5)
    second = magnitude_mask(weights, 0.8, first)
    # Assert: biases are dense; the threshold is global (the larger-scale layer keeps more)
    assert first[1].all() and second[1].all()
    prunable = 200 + 50
    assert (prunable - first[0].sum() - first[2].sum()) == round(0.5 * prunable)
    assert first[2].mean() > first[0].mean()
    kept = np.concatenate([np.abs(w[m]) for w, m in zip(weights, first, strict=True)
                           if w.ndim == 2])
    dropped = np.concatenate([np.abs(w[~m]) for w, m in zip(weights, first, strict=True)
                              if w.ndim == 2])
    assert kept.min() >= dropped.max()
    assert all(not (s & ~f).any() for s, f in zip(second, first, strict=True))
    assert mask_sparsity(second) == pytest.approx(round(0.8 * prunable) / 260)


def test_mask_wire_form_round_trips_compactly_and_refuses_bad_bytes() -> None:
    # Prepare
    rng = np.random.default_rng(1)
    weights = [rng.normal(size=(64, 64)).astype(np.float32), np.zeros(64, np.float32)]
    mask = magnitude_mask(weights, 0.95)
    # Execute
    blob = pack_mask(mask)
    back = unpack_mask(blob, max_elements=64 * 64 + 64)
    # Assert: exact, smaller than one bit per weight (zstd), bounded on decode
    assert all(np.array_equal(a, b) for a, b in zip(mask, back, strict=True))
    assert len(blob) < (64 * 64 + 64) / 8
    with pytest.raises(ValueError, match="more than"):
        unpack_mask(blob, max_elements=100)
    with pytest.raises(ValueError):
        unpack_mask(blob[:-3], max_elements=10_000)
    with pytest.raises(ValueError, match="header"):
        unpack_mask(b"XXXX" + blob[4:], max_elements=10_000)
    vector = gather(weights, mask)
    assert vector.size == sum(int(m.sum()) for m in mask)
    assert all(np.array_equal(a, np.where(m, w, 0)) for a, w, m in
               zip(scatter(vector, mask), weights, mask, strict=True))


@pytest.mark.parametrize(("value", "needle"), [
    ("magnitude", "needs sparsity"),
    ("magnitude:sparsity=1", "must be in (0, 1)"),
    ("magnitude:sparsity=0.5,start=0", "start=0 must be >= 1"),
    ("magnitude:sparsity=0.5,start=4,end=2", "end=2 must be >= start=4"),
    ("random:sparsity=0.5", "unknown"),
    ("magnitude:sparsity=0.5,step=2", "expected sparsity=S"),
])
def test_config_refuses_bad_prune_specs_in_one_line(value: str, needle: str) -> None:
    with pytest.raises(ConfigError, match="prune=") as info:
        validate({"prune": value})
    assert needle in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("extra", [{"secagg": "on"}, {"compression": "q:8+ef21"}])
def test_config_refuses_prune_with_secagg_and_ef21(extra: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match=r"prune=.*not allowed"):
        validate({"prune": PRUNE, **extra})
    assert parse_prune("none") is None
    assert validate({"prune": PRUNE})["prune"] == PRUNE


def test_bundled_training_keeps_pruned_weights_zero() -> None:
    # Prepare
    model = build_model("digits", (64,), 10, seed=0)
    weights = get_weights(model)
    mask = magnitude_mask(weights, 0.9)
    set_weights(model, [np.where(m, w, 0) for w, m in zip(weights, mask, strict=True)])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 64)).astype(np.float32)
    y = rng.integers(0, 10, size=64)
    # Execute
    train(model, x, y, TrainSettings(local_epochs=2, batch_size=16, lr=0.5),
          generator=torch.Generator().manual_seed(0), mask=mask)
    # Assert
    after = get_weights(model)
    assert all((a[~m] == 0).all() for a, m in zip(after, mask, strict=True))
    assert any((a != w)[m].any() for a, w, m in zip(after, weights, mask, strict=True))


# --- the loop: mask travel, masked training, uploads ---------------------------------------

def test_pruned_run_keeps_zeros_and_uploads_only_unmasked_coordinates() -> None:
    # Execute
    dense_weights, dense = _run(prune="none", rounds=2)
    weights, rows = _run(rounds=3)
    # Assert: the schedule shows in the rows, the model keeps its zeros and learns
    assert [r["sparsity"] for r in rows][1:] == [pytest.approx(rows[-1]["sparsity"])] * 2
    total = sum(int(w.size) for w in weights)
    assert rows[-1]["sparsity"] == pytest.approx(
        sum(int((w == 0).sum()) for w in weights) / total, abs=0.01)
    assert 0.45 < rows[-1]["sparsity"] < 0.5
    assert "sparsity" not in dense[-1]
    assert rows[-1]["accuracy"] > rows[0]["accuracy"] + 0.15
    assert all(r["rejected"] == 0 and r["clients"] == 3 for r in rows)
    # the upload payload is the kept coordinates only: about (1 - sparsity) of dense
    ratio = rows[-1]["upload_payload_bytes"] / dense[-1]["upload_payload_bytes"]
    assert ratio < 1 - rows[-1]["sparsity"] + 0.05
    assert dense_weights[0].shape == weights[0].shape
    # the broadcast too (plus the mask, about a bit per weight before zstd)
    down = rows[-1]["download_payload_bytes"] / dense[-1]["download_payload_bytes"]
    assert down < 1 - rows[-1]["sparsity"] + 0.05


@pytest.mark.parametrize("extra", [
    {"dp": "local:clip=1.0,noise=0.5"},
    {"download-history": 1.0, "download-compression": "q:8"},
    {"strategy": "fedavgm:lr=1.0,momentum=0.9"},
])
def test_pruning_composes_with_dp_history_download_and_strategies(extra: dict[str, Any]
                                                                 ) -> None:
    # Prepare
    config = validate({**RUN, "clients-per-round": 3, "rounds": 2, "round-timeout": 5.0,
                       "prune": PRUNE, **extra})
    grid = InProcessGrid(sim_client_app, 4, run_config=config)
    # Execute
    with server_identity():
        result = serve(grid, config)
    # Assert: every reply accepted, the model pruned as scheduled
    rows = result["rounds"]
    assert all(r["rejected"] == 0 and r["clients"] == 3 for r in rows)
    assert result["summary"]["sparsity"] == rows[-1]["sparsity"] > 0.45
    assert ("dp" not in extra) or rows[-1]["epsilon"] > 0


@pytest.mark.parametrize("compression", ["q:8+zstd", "topk:0.2+ef"])
def test_pruning_composes_with_codecs(compression: str) -> None:
    # Prepare / Execute: the mask grows every round (EF residuals move onto it)
    _, dense = _run(prune="none", compression=compression, rounds=1)
    _, rows = _run(prune="magnitude:sparsity=0.5,start=1,end=3", compression=compression,
                   rounds=3)
    # Assert
    assert all(r["rejected"] == 0 for r in rows)
    assert rows[-1]["upload_payload_bytes"] < dense[-1]["upload_payload_bytes"] * 0.65
    assert rows[-1]["accuracy"] > rows[0]["accuracy"]


def test_a_reply_of_the_model_shape_is_rejected_under_pruning() -> None:
    # Prepare: node 1 sends its whole model, as if there were no mask
    def full_model(reply: Message) -> Message:
        initial, _ = _setup()
        reply.content["arrays"] = ArrayRecord(initial)
        return reply

    # Execute
    _, rows = _run(rounds=1, tamper={n: full_model for n in (1, 2, 3, 4)})
    # Assert: shapes come from the server's mask, not from the reply
    assert rows[0]["rejected"] == 3 and rows[0]["clients"] == 0


def test_resume_keeps_the_mask_and_continues_the_schedule(tmp_path: Path) -> None:
    # Prepare: two rounds of a schedule ending at round 4, checkpointed
    spec = "magnitude:sparsity=0.8,start=1,end=4"
    states: list[LoopState] = []
    _run(prune=spec, rounds=2, states=states)
    save_checkpoint(tmp_path, states[-1], {"prune": spec})
    saved_ck = load_checkpoint(tmp_path)
    assert saved_ck is not None
    saved = saved_ck.state
    pruner = Pruner(parse_prune(spec))  # type: ignore[arg-type]
    pruner.load_state_dict(saved.prune or {}, saved.weights)
    # Execute
    weights, rows = _run(prune=spec, rounds=4, resume=saved)
    # Assert: the old mask holds, the schedule went on to its end
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert pruner.mask is not None
    assert all((w[~m] == 0).all() for w, m in zip(weights, pruner.mask, strict=True))
    assert rows[1]["sparsity"] < rows[3]["sparsity"]
    assert rows[3]["sparsity"] == pytest.approx(0.8, abs=0.02)


def test_a_device_refuses_a_mask_that_does_not_fit_its_model() -> None:
    # Prepare: a train message whose mask has other shapes than the model it carries
    from flwr.app import ConfigRecord, MessageType, RecordDict

    from flowerpress import protocol

    weights = [np.ones((4, 3), np.float32), np.ones(3, np.float32)]
    other = pack_mask([np.ones((3, 4), np.bool_), np.ones(3, np.bool_)])
    with server_identity():
        msg = Message(RecordDict({"arrays": ArrayRecord(weights),
                                  "config": ConfigRecord({protocol.PRUNE_MASK: other})}),
                      dst_node_id=1, message_type=MessageType.TRAIN)
    # Execute / Assert
    with pytest.raises(ValueError, match="shapes"):
        protocol.prune_mask_of(msg, weights)
    with pytest.raises(ValueError):
        protocol.prune_mask_of(msg, weights[:1])
