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
