"""The flowerpress command: validation and one small end-to-end simulation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from flowerpress.cli import main
from flowerpress.server.results import ROUND_FIELDS
from tests.tracked import read_back


@pytest.mark.parametrize("setting", ["rounds=abc", "nosuchkey=1", "compression=zip",
                                     "partition=dirichlet:0"])
def test_bad_set_exits_2_with_one_line(setting: str, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    # Execute
    code = main(["simulate", "--out", str(tmp_path), "--set", setting])
    # Assert
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert setting.split("=")[0] in err
    assert not (tmp_path / "results.json").exists()


@pytest.mark.slow  # make test runs the console script through tests/test_sweep.py
@pytest.mark.timeout(420)
def test_simulation_end_to_end_on_flowers_engine(tmp_path: Path) -> None:
    # Execute: the console script, as a user runs it, tracked in TensorBoard and MLflow
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "flowerpress.cli", "simulate", "--out", str(out),
         "--set", "dataset=digits", "--set", "num-clients=4", "--set", "clients-per-round=4",
         "--set", "rounds=2", "--set", "partition=iid", "--set", "lr=0.1",
         "--set", "local-epochs=2", "--track", "tensorboard", "--track", "mlflow",
         "--track-tag", "purpose=test"],
        capture_output=True, text=True, timeout=400, check=False)
    # Assert
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2/2" in proc.stdout  # live progress lines
    results = json.loads((out / "results.json").read_text())
    assert (out / "report.png").stat().st_size > 1000
    assert set(results) == {"config", "rounds", "summary", "privacy", "nodes"}
    assert len(results["rounds"]) == 2
    assert [n["last_round"] for n in results["nodes"]] == [2, 2, 2, 2]
    assert "round 2: accuracy" in (out / "server.log").read_text()
    for row in results["rounds"]:
        assert set(ROUND_FIELDS) <= set(row)
        assert row["clients"] == 4 and row["upload_bytes"] > 0
    summary = results["summary"]
    assert summary["final_accuracy"] > summary["initial_accuracy"] + 0.2
    assert summary["total_upload_bytes"] == sum(r["upload_bytes"] for r in results["rounds"])
    assert summary["fp32_upload_bytes"] == 8 * summary["model_parameters"] * 4
    assert results["config"]["dataset"] == "digits"
    _check_tracked(out, results["rounds"])


def _check_tracked(out: Path, rows: list[dict[str, Any]]) -> None:
    """The rows of results.json, read back by TensorBoard's and MLflow's own readers."""
    run = read_back(out / "tb" / "run", out, rows)
    assert run.data.tags["purpose"] == "test"
    assert run.data.params["num-clients"] == "4" and run.data.params["dataset"] == "digits"


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    # Execute
    import flowerpress

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    # Assert: one line an operator compares between the server and its devices
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"flowerpress {flowerpress.__version__}"


def test_sigterm_stops_simulate_like_ctrl_c_in_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: a run that gets SIGTERM while it waits (a service manager stopping it)
    import os
    import signal
    import time

    from flowerpress.simulations import runner

    def terminated(*args: object, **kwargs: object) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # interrupted: the handler raises here
        raise AssertionError("SIGTERM did not interrupt the run")

    monkeypatch.setattr(runner, "simulate", terminated)
    before = signal.getsignal(signal.SIGTERM)
    # Execute
    code = main(["simulate", "--out", str(tmp_path / "run"), "--set", "dataset=digits"])
    # Assert: exit 130, one line that says how to resume, the handler restored
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 130
    assert len(err) == 1 and "--resume" in err[0]
    assert signal.getsignal(signal.SIGTERM) == before
