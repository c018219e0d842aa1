"""Checkpoint and resume in process: a run that crashes and resumes is the same run."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Message

from flowerpress.config import validate
from flowerpress.server import checkpoint as ckpt
from flowerpress.server.app import serve
from flowerpress.server.checkpoint import CheckpointError, LoopState, load_checkpoint
from flowerpress.simulations.app import app as client_app
from flowerpress.testing import InProcessGrid, server_identity

BASE = {"dataset": "digits", "partition": "iid", "model": "logreg", "num-clients": 4,
        "clients-per-round": 3, "rounds": 4, "local-epochs": 1, "round-timeout": 5.0}


class CrashError(RuntimeError):
    """The server process dies (raised from inside a round)."""


@dataclass
class CrashingGrid(InProcessGrid):
    """Raises when the train messages of round ``crash_round`` are pushed."""

    crash_round: int = 0

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        msgs = list(messages)
        for msg in msgs:
            if msg.metadata.message_type == "train":
                rnd = msg.content.config_records["config"]["server-round"]
                assert isinstance(rnd, int)
                if rnd == self.crash_round:
                    raise CrashError(f"killed in round {rnd}")
        return super().push_messages(msgs)


def _serve(out: Path, *, crash_round: int = 0, **overrides: Any) -> dict[str, Any]:
    # Under DP, cohorts come from the OS CSPRNG unless the schedule is predictable
    # (seeded, accounted without amplification): comparable runs need the latter.
    config = validate({**BASE, "out-dir": str(out), "dp-sampling": "predictable", **overrides})
    grid = CrashingGrid(client_app, 4, run_config=config, crash_round=crash_round)
    with server_identity():
        return serve(grid, config, out_dir=out)


def _without_time(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    timed = ("seconds", "link_seconds", "device_seconds", "cum_device_seconds")
    return [{k: v for k, v in r.items() if k not in timed} for r in rows]


# flowerpress's own rules fold replies in float64, so an in-process run is
# bit-identical to itself; Flower's aggregate in float32 in arrival order, which
# the in-process grid does not fix, so a run differs from itself in the last bits.
@pytest.mark.parametrize(("strategy", "dp", "exact"), [
    ("fedavgm", "off", True),
    ("fedadam:lr=0.05", "distributed:clip=1.0,noise=1.0,rng=seeded", True),
    ("flwr:FedAdam:eta=0.05", "off", False),
])
def test_a_run_resumed_twice_is_the_uninterrupted_run(tmp_path: Path, strategy: str,
                                                      dp: str, exact: bool) -> None:
    # Prepare: the uninterrupted run
    whole = _serve(tmp_path / "whole", strategy=strategy, dp=dp)
    out = tmp_path / "crashed"
    # Execute: crash in round 2, resume and crash in round 4, resume to the end
    with pytest.raises(CrashError):
        _serve(out, crash_round=2, strategy=strategy, dp=dp)
    assert [r["round"] for r in json.loads((out / "results.json").read_text())["rounds"]] == [1]
    with pytest.raises(CrashError):
        _serve(out, crash_round=4, strategy=strategy, dp=dp, resume=True)
    resumed = _serve(out, strategy=strategy, dp=dp, resume=True)
    # Assert: one consistent results.json, the same rows, epsilon and model as without crashes
    on_disk = json.loads((out / "results.json").read_text())
    assert [r["round"] for r in on_disk["rounds"]] == [1, 2, 3, 4]
    assert _without_time(on_disk["rounds"]) == _without_time(resumed["rounds"])
    assert resumed["summary"]["resumed_after_rounds"] == [1, 3]
    assert resumed["privacy"] == whole["privacy"]
    if exact:
        assert _without_time(resumed["rounds"]) == _without_time(whole["rounds"])
    else:
        for mine, theirs in zip(resumed["rounds"], whole["rounds"], strict=True):
            assert mine["accuracy"] == pytest.approx(theirs["accuracy"], abs=0.005)
    with np.load(out / "model.npz") as a, np.load(tmp_path / "whole" / "model.npz") as b:
        for key in a.files:
            np.testing.assert_allclose(a[key], b[key], rtol=0, atol=0 if exact else 1e-5)


def test_epsilon_continues_and_a_finished_run_resumes_to_itself(tmp_path: Path) -> None:
    # Prepare
    dp = "distributed:clip=1.0,noise=1.0"
    with pytest.raises(CrashError):
        _serve(tmp_path, crash_round=3, dp=dp)
    saved = load_checkpoint(tmp_path)
    assert saved is not None and saved.state.privacy is not None
    spent = saved.state.privacy["epsilon"]
    # Execute
    resumed = _serve(tmp_path, dp=dp, resume=True)
    again = _serve(tmp_path, dp=dp, resume=True)
    # Assert: epsilon never restarts; resuming a finished run changes nothing
    eps = [r["epsilon"] for r in resumed["rounds"]]
    assert eps[1] == spent and eps[2] > spent and eps == sorted(eps)
    assert _without_time(again["rounds"]) == _without_time(resumed["rounds"])
    assert again["summary"]["resumed_after_rounds"] == [2, 4]
    assert again["privacy"] == resumed["privacy"] and again["privacy"]["epsilon"] == eps[-1]
    # one server.log for the out-dir: the crashed run, then both resumes added to it
    log = (tmp_path / "server.log").read_text()
    assert "round 1: accuracy" in log and "run failed: CrashError" in log
    assert log.count("flowerpress: resuming from") == 2 and "round 4: accuracy" in log


def test_resume_refuses_a_checkpoint_of_another_configuration(tmp_path: Path) -> None:
    # Prepare
    with pytest.raises(CrashError):
        _serve(tmp_path, crash_round=2)
    # Execute / Assert: another seed is another run; more rounds are allowed
    with pytest.raises(CheckpointError, match="seed: 0 -> 7"):
        _serve(tmp_path, seed=7, resume=True)
    result = _serve(tmp_path, rounds=5, resume=True)
    assert [r["round"] for r in result["rounds"]] == [1, 2, 3, 4, 5]


def test_a_new_run_does_not_overwrite_an_unfinished_checkpoint(tmp_path: Path) -> None:
    # Prepare
    with pytest.raises(CrashError):
        _serve(tmp_path, crash_round=2)
    # Execute / Assert
    with pytest.raises(CheckpointError, match=r"unfinished run \(round 1 of 4\).*resume=true"):
        _serve(tmp_path)


def test_resume_without_a_checkpoint_starts_a_new_run(tmp_path: Path) -> None:
    result = _serve(tmp_path, rounds=1, resume=True)
    assert [r["round"] for r in result["rounds"]] == [1]
    assert "resumed_after_rounds" not in result["summary"]


def _state(**arrays: Any) -> LoopState:
    return LoopState(server_round=2, weights=[np.arange(6, dtype=np.float32).reshape(2, 3)],
                     rows=[{"round": 1, "accuracy": None}, {"round": 2, "accuracy": 0.5}],
                     rng=dict(np.random.default_rng(3).bit_generator.state),
                     membership={"max_missed": 3, "nodes": []},
                     strategy=dict(arrays), privacy=None, resumed_at=[1])


def test_checkpoint_round_trips_arrays_with_their_dtype(tmp_path: Path) -> None:
    # Prepare
    moments: dict[str, Any] = {"m": [np.full(3, 1 / 3, dtype=np.float64)], "v": None,
               "named": {"w": np.ones((2, 2), dtype=np.float32)}}
    state = _state(**moments)
    # Execute
    ckpt.save_checkpoint(tmp_path, state, {"seed": 0})
    loaded = load_checkpoint(tmp_path)
    # Assert
    assert loaded is not None and loaded.config == {"seed": 0}
    assert loaded.state.strategy["m"][0].dtype == np.float64
    np.testing.assert_array_equal(loaded.state.strategy["m"][0], moments["m"][0])
    assert loaded.state.strategy["v"] is None
    assert loaded.state.rows == state.rows and loaded.state.resumed_at == [1]
    rng = np.random.default_rng(0)
    rng.bit_generator.state = loaded.state.rng
    assert rng.random() == np.random.default_rng(3).random()


def test_a_crash_while_writing_leaves_the_previous_checkpoint(tmp_path: Path,
                                                              monkeypatch: Any) -> None:
    # Prepare
    ckpt.save_checkpoint(tmp_path, _state(), {"round": 2})

    def dies(*args: Any, **kwargs: Any) -> None:
        raise CrashError("killed while writing")

    monkeypatch.setattr(np, "savez", dies)
    # Execute
    with pytest.raises(CrashError):
        ckpt.save_checkpoint(tmp_path, _state(), {"round": 3})
    # Assert
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None and loaded.config == {"round": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.npz"]


# --- a bad checkpoint ends the run in one line and changes nothing (issue 20, item 4) ------

DP = "distributed:clip=1.0,noise=1.0"
#: The files a refused resume must leave byte for byte.
KEPT = ("results.json", "model.npz", "checkpoint.npz")


@pytest.fixture(scope="module")
def crashed_dp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DP run with server momentum, killed in round 3: checkpointed after round 2 of 4."""
    out = tmp_path_factory.mktemp("crashed")
    with pytest.raises(CrashError):
        _serve(out, crash_round=3, strategy="fedavgm", dp=DP)
    return out


def _copy(source: Path, target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        (target / item.name).write_bytes(item.read_bytes())
    return target


def _rewritten(**changes: Any) -> Callable[[Path], None]:
    """Rewrite the checkpoint with ``changes`` to its state (a valid digest: content checks)."""
    def rewrite(out: Path) -> None:
        saved = load_checkpoint(out)
        assert saved is not None
        ckpt.save_checkpoint(out, replace(saved.state, **changes), saved.config)
    return rewrite


def _raw(damage: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def write(out: Path) -> None:
        path = out / "checkpoint.npz"
        path.write_bytes(damage(path.read_bytes()))
    return write


def _flip(data: bytes) -> bytes:
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x01
    return bytes(flipped)


BAD_CHECKPOINTS = {
    "truncated": (_raw(lambda b: b[: len(b) // 2]), "not a readable checkpoint"),
    "empty": (_raw(lambda b: b""), "not a readable checkpoint"),
    "bit-flipped": (_raw(_flip), ""),
    "nan-weights": (_rewritten(weights=[np.full((10, 64), np.nan, np.float32),
                                        np.zeros(10, np.float32)]),
                    "NaN or infinite weights"),
    "inf-weights": (_rewritten(weights=[np.full((10, 64), np.inf, np.float32),
                                        np.zeros(10, np.float32)]),
                    "NaN or infinite weights"),
    "negative-round": (_rewritten(server_round=-4, rows=[]), "the round -4 is negative"),
    "round-beyond-plan": (_rewritten(server_round=9, rows=[{"round": r} for r in range(1, 10)]),
                          "round 9 is beyond the run's planned rounds (4)"),
    "wrong-shapes": (_rewritten(weights=[np.zeros((64, 10), np.float32),
                                         np.zeros(10, np.float32)]),
                     "the model's shapes [(64, 10), (10,)] are not the task's [(10, 64), (10,)]"),
    "strategy-schema": (_rewritten(strategy={"m": None, "v": None}),
                        "the strategy state does not fit this run's strategy"),
    "membership-schema": (_rewritten(membership={"max_missed": 3, "nodes": [{"node_id": "x"}]}),
                          "bad or repeated node id 'x'"),
    "ledger-schema": (_rewritten(privacy={"version": 999}),
                      "the privacy ledger state does not fit this run"),
    "no-ledger": (_rewritten(privacy=None), "no privacy ledger state, but this run uses DP"),
}


def _bytes(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in KEPT}


@pytest.mark.parametrize("case", sorted(BAD_CHECKPOINTS))
def test_a_bad_checkpoint_is_one_line_and_nothing_is_overwritten(
        crashed_dp_run: Path, tmp_path: Path, case: str) -> None:
    # Prepare
    damage, words = BAD_CHECKPOINTS[case]
    out = _copy(crashed_dp_run, tmp_path / "run")
    damage(out)
    before = _bytes(out)
    # Execute
    with pytest.raises(CheckpointError) as info:
        _serve(out, strategy="fedavgm", dp=DP, resume=True)
    # Assert
    text = str(info.value)
    assert "\n" not in text and text.startswith(f"{out / 'checkpoint.npz'}: ")
    assert words in text
    assert _bytes(out) == before
    assert not (out / "report.png").exists()


def test_the_serverapp_with_resume_fails_in_one_line_and_keeps_the_files(
        crashed_dp_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Prepare: the app `flwr run` loads, given resume=true in the run config
    from flwr.app import Context, RecordDict

    from flowerpress.server.app import server_app

    out = _copy(crashed_dp_run, tmp_path / "run")
    BAD_CHECKPOINTS["wrong-shapes"][0](out)
    before = _bytes(out)
    run_config = validate({**BASE, "out-dir": str(out), "dp-sampling": "predictable",
                           "strategy": "fedavgm", "dp": DP, "resume": True})
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config=dict(run_config))
    grid = CrashingGrid(client_app, 4, run_config=run_config)
    # Execute
    with server_identity(), pytest.raises(CheckpointError):
        server_app()(grid, context)
    # Assert: one error line naming the file; the traceback in error.log; nothing else
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0]
    assert f"{out / 'checkpoint.npz'}: the model's shapes" in errors[0]
    assert _bytes(out) == before
    assert "CheckpointError" in (out / "error.log").read_text()


# --- one run per out-dir (issue 20, item 8) ----------------------------------------------------

@pytest.fixture(scope="module")
def finished_dp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-round DP run."""
    out = tmp_path_factory.mktemp("finished")
    _serve(out, dp=DP, rounds=2)
    return out


def test_a_new_run_refuses_a_dir_holding_a_finished_dp_run(finished_dp_run: Path,
                                                          tmp_path: Path) -> None:
    # Prepare
    out = _copy(finished_dp_run, tmp_path / "run")
    before = _bytes(out)
    # Execute
    with pytest.raises(CheckpointError) as info:
        _serve(out, dp=DP, rounds=2)
    # Assert: its epsilon is not restarted, its results are not overwritten
    assert str(info.value).startswith(
        f"{out} holds the checkpoint of a finished run (round 2 of 2); ")
    assert _bytes(out) == before


def test_the_serverapp_refuses_a_dir_holding_another_run_without_writing(
        finished_dp_run: Path, tmp_path: Path) -> None:
    # Prepare: `flwr run` with the same out-dir and no resume; the checkpoint was deleted
    from flwr.app import Context, RecordDict

    from flowerpress.server.app import server_app

    out = _copy(finished_dp_run, tmp_path / "run")
    (out / "checkpoint.npz").unlink()
    results = (out / "results.json").read_bytes()
    run_config = validate({**BASE, "out-dir": str(out), "dp": DP, "rounds": 2})
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config=dict(run_config))
    # Execute
    with server_identity(), pytest.raises(CheckpointError, match=r"results\.json of another run"):
        server_app()(CrashingGrid(client_app, 4, run_config=run_config), context)
    # Assert
    assert (out / "results.json").read_bytes() == results


def test_overwrite_starts_a_new_run_in_place_of_the_old(finished_dp_run: Path,
                                                        tmp_path: Path) -> None:
    # Prepare
    out = _copy(finished_dp_run, tmp_path / "run")
    (out / "error.log").write_text("an old traceback")
    # Execute
    result = _serve(out, rounds=1, overwrite=True)
    # Assert: the old run's files are gone, not mixed with the new run's
    on_disk = json.loads((out / "results.json").read_text())
    assert [r["round"] for r in on_disk["rounds"]] == [1]
    assert on_disk["config"]["dp"] == "off" and result["privacy"] is None
    assert not (out / "error.log").exists()
    saved = load_checkpoint(out)
    assert saved is not None and saved.state.server_round == 1 and saved.state.privacy is None


def test_resume_refuses_results_without_a_checkpoint(finished_dp_run: Path,
                                                     tmp_path: Path) -> None:
    # Prepare: the results of a DP run whose checkpoint was deleted
    out = _copy(finished_dp_run, tmp_path / "run")
    (out / "checkpoint.npz").unlink()
    # Execute / Assert: resuming would start its epsilon from zero again
    with pytest.raises(CheckpointError, match=r"checkpoint\.npz: resume=true but there is no "
                                              r"checkpoint, while results\.json holds another"):
        _serve(out, dp=DP, rounds=2, resume=True)


def test_resume_and_overwrite_exclude_each_other(tmp_path: Path) -> None:
    from flowerpress.config import ConfigError

    with pytest.raises(ConfigError, match="exclude each other"):
        _serve(tmp_path, resume=True, overwrite=True)


def test_a_dir_whose_run_released_nothing_takes_a_new_run(tmp_path: Path) -> None:
    # Prepare: a run that failed before its first round
    (tmp_path / "results.json").write_text(json.dumps({"rounds": [], "summary": {"failed": "x"}}))
    # Execute
    result = _serve(tmp_path, rounds=1)
    # Assert
    assert [r["round"] for r in result["rounds"]] == [1]
