"""``flowerpress simulate --resume DIR``: the checkpoint's config, what may change, refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flowerpress.cli import main
from flowerpress.config import validate
from flowerpress.server.checkpoint import LoopState, save_checkpoint
from flowerpress.simulations import runner

SAVED = {"dataset": "digits", "num-clients": 4, "clients-per-round": 2, "rounds": 4, "seed": 3}


def _checkpoint(directory: Path, server_round: int = 2) -> None:
    config = {**validate(SAVED), "out-dir": str(directory)}
    state = LoopState(server_round=server_round, weights=[np.zeros(3, dtype=np.float32)],
                      rows=[{"round": r + 1} for r in range(server_round)],
                      rng=dict(np.random.default_rng(0).bit_generator.state),
                      membership={"max_missed": 3, "nodes": []}, strategy={})
    save_checkpoint(directory, state, config)


def test_resume_runs_the_checkpoints_config_with_allowed_changes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    _checkpoint(tmp_path)
    calls: list[dict[str, Any]] = []

    def fake_simulate(config: dict[str, Any], out: Path, **kwargs: Any) -> dict[str, Any]:
        calls.append({"config": config, "out": out, **kwargs})
        return {"summary": {"final_accuracy": 0.5, "total_upload_bytes": 1,
                            "fp32_upload_bytes": 4}}

    monkeypatch.setattr(runner, "simulate", fake_simulate)
    # Execute
    code = main(["simulate", "--resume", str(tmp_path), "--set", "rounds=6", "--quiet"])
    # Assert
    assert code == 0
    (call,) = calls
    assert call["out"] == tmp_path and call["resume"] is True
    assert call["config"]["seed"] == 3 and call["config"]["dataset"] == "digits"
    assert call["config"]["rounds"] == 6


@pytest.mark.parametrize(("args", "needle"), [
    (["--set", "seed=5"], "seed: 3 -> 5"),
    (["--out", "elsewhere"], "differ"),
])
def test_resume_refusals_exit_2_with_one_line(tmp_path: Path, args: list[str], needle: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    _checkpoint(tmp_path)
    # Execute
    code = main(["simulate", "--resume", str(tmp_path), *args])
    # Assert
    err = capsys.readouterr().err
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1


def test_resume_without_a_checkpoint_exits_2(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["simulate", "--resume", str(tmp_path)])
    assert code == 2 and "no checkpoint" in capsys.readouterr().err


def test_a_new_simulation_refuses_an_unfinished_runs_directory(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    _checkpoint(tmp_path)
    # Execute: no Flower process is started
    code = main(["simulate", "--out", str(tmp_path), "--set", "dataset=digits"])
    # Assert
    err = capsys.readouterr().err
    assert code == 1 and "round 2 of 4" in err and "--resume" in err


def _no_flower(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a SuperLink would be started."""
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a Flower process was started")

    monkeypatch.setattr(runner, "SimulationLink", refuse)


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize(("damage", "needle"), [
    (lambda p: p.write_bytes(p.read_bytes()[:200]), "not a readable checkpoint"),
    (lambda p: p.write_bytes(b""), "not a readable checkpoint"),
])
def test_resume_from_a_damaged_checkpoint_is_one_line_naming_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        damage: Any, needle: str) -> None:
    # Prepare
    _checkpoint(tmp_path)
    (tmp_path / "results.json").write_text('{"rounds": [{"round": 1}, {"round": 2}]}')
    damage(tmp_path / "checkpoint.npz")
    before = _files(tmp_path)
    _no_flower(monkeypatch)
    # Execute
    code = main(["simulate", "--resume", str(tmp_path)])
    # Assert
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert f"{tmp_path / 'checkpoint.npz'}: {needle}" in err
    assert _files(tmp_path) == before


def test_resume_beyond_the_planned_rounds_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: checkpointed after round 2; the resumed run would plan 1 round
    _checkpoint(tmp_path)
    before = _files(tmp_path)
    _no_flower(monkeypatch)
    # Execute
    code = main(["simulate", "--resume", str(tmp_path), "--set", "rounds=1"])
    # Assert
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "round 2 is beyond the run's planned rounds (1)" in err
    assert _files(tmp_path) == before


def test_a_new_simulation_refuses_a_finished_runs_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: a finished run (round 4 of 4) and its results
    _checkpoint(tmp_path, server_round=4)
    (tmp_path / "results.json").write_text('{"rounds": [{"round": 1}]}')
    before = _files(tmp_path)
    _no_flower(monkeypatch)
    # Execute
    code = main(["simulate", "--out", str(tmp_path), "--set", "dataset=digits"])
    # Assert: one line, the way out named, nothing touched
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1
    assert "finished run (round 4 of 4)" in err and "--overwrite" in err
    assert "a privacy budget belongs to the data, not to a directory" in err
    assert _files(tmp_path) == before


def test_overwrite_passes_the_key_to_the_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    _checkpoint(tmp_path, server_round=4)
    calls: list[dict[str, Any]] = []

    def fake_simulate(config: dict[str, Any], out: Path, **kwargs: Any) -> dict[str, Any]:
        calls.append(config)
        return {"summary": {"final_accuracy": 0.5, "total_upload_bytes": 1,
                            "fp32_upload_bytes": 4}}

    monkeypatch.setattr(runner, "simulate", fake_simulate)
    # Execute
    code = main(["simulate", "--out", str(tmp_path), "--overwrite", "--quiet"])
    # Assert
    assert code == 0 and calls[0]["overwrite"] is True


def test_overwrite_and_resume_cannot_be_combined(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # Execute
    with pytest.raises(SystemExit) as info:
        main(["simulate", "--resume", str(tmp_path), "--overwrite"])
    # Assert
    assert info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_the_runner_refuses_before_starting_flower_and_writes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    _checkpoint(tmp_path, server_round=4)
    before = _files(tmp_path)
    _no_flower(monkeypatch)
    config = validate(SAVED)
    # Execute / Assert
    with pytest.raises(runner.SimulationError, match="finished run"):
        runner.simulate(config, tmp_path, progress=False)
    with pytest.raises(runner.SimulationError, match="exclude each other"):
        runner.simulate(config, tmp_path, progress=False, resume=True, overwrite=True)
    with pytest.raises(runner.SimulationError, match="beyond the run's planned rounds"):
        runner.simulate(validate({**SAVED, "rounds": 3}), tmp_path, progress=False, resume=True)
    assert _files(tmp_path) == before


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_checkpoint_of_another_model_fails_the_resumed_simulation_in_one_line(
        tmp_path: Path) -> None:
    # Prepare: a checkpoint the CLI can read (config, round) but whose model is not
    # the task's: only the ServerApp, which builds the task, can tell
    import json
    import subprocess
    import sys

    _checkpoint(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps(
        {"rounds": [{"round": 1}, {"round": 2}], "summary": {"rounds_completed": 2}}))
    kept = {name: (tmp_path / name).read_bytes() for name in ("checkpoint.npz", "results.json")}
    # Execute: the console script on Flower's simulation engine, as a user runs it
    proc = subprocess.run(
        [sys.executable, "-m", "flowerpress.cli", "simulate", "--resume", str(tmp_path),
         "--quiet"], capture_output=True, text=True, timeout=400, check=False)
    # Assert: exit 1, one line naming the file and the fault, the run's files untouched
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert len(err) == 1, proc.stderr[-3000:]
    assert f"CheckpointError: {tmp_path / 'checkpoint.npz'}: the model's shapes [(3,)]" in err[0]
    assert {name: (tmp_path / name).read_bytes() for name in kept} == kept
    assert not (tmp_path / "model.npz").exists()
