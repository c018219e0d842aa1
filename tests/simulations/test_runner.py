"""A failed simulation ends in one line naming the cause and the log file (issue 12)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flowerpress import cli
from flowerpress.simulations import runner


class _Exited:
    """A ``flwr run`` process that has already exited, with its log on disk."""

    def __init__(self, log_path: Path, text: str) -> None:
        self.log_path = log_path
        log_path.write_text(text, encoding="utf-8")

    def alive(self) -> bool:
        return False

    def output(self) -> str:
        return self.log_path.read_text(encoding="utf-8")


def test_a_failed_serverapp_gives_one_line_naming_error_log(tmp_path: Path) -> None:
    # Prepare: what the ServerApp leaves when its strategy fails in round 2
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text(json.dumps(
        {"rounds": [{"round": 1}], "summary": {"failed": "strategy X returned NaN"}}))
    (out / "error.log").write_text("Traceback (most recent call last):\n ...\n")
    proc = _Exited(tmp_path / "flwr-run-0.log", "INFO starting\nERROR ServerApp raised\n")
    # Execute
    with pytest.raises(runner.SimulationError) as info:
        runner._wait_for_results(proc, out / "results.json", None, 3, 5.0)  # type: ignore[arg-type]
    # Assert
    text = str(info.value)
    assert "\n" not in text
    assert text == f"strategy X returned NaN; full log: {out / 'error.log'}"


def test_a_run_that_wrote_nothing_names_the_flwr_run_log(tmp_path: Path) -> None:
    # Prepare: the app failed to start; the flwr run log has the error
    out = tmp_path / "out"
    out.mkdir()
    proc = _Exited(tmp_path / "flwr-run-0.log",
                   "INFO submitted\nModuleNotFoundError: No module named 'mytask'\nbye\n")
    # Execute
    with pytest.raises(runner.SimulationError) as info:
        runner._wait_for_results(proc, out / "results.json", None, 3, 5.0)  # type: ignore[arg-type]
    # Assert
    text = str(info.value)
    assert "\n" not in text and "No module named 'mytask'" in text
    assert text.endswith(f"full log: {out / 'flwr-run.log'}")


def test_the_cli_prints_the_line_and_exits_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    def fail(*args: object, **kwargs: object) -> None:
        raise runner.SimulationError("strategy X returned NaN; full log: out/error.log")

    monkeypatch.setattr(runner, "simulate", fail)
    # Execute
    code = cli.main(["simulate", "--out", str(tmp_path), "--set", "dataset=digits"])
    # Assert
    err = capsys.readouterr().err
    assert code == 1
    assert err.strip() == ("flowerpress: simulation failed: strategy X returned NaN; "
                           "full log: out/error.log")


def test_progress_lines_show_a_dash_for_a_null_accuracy() -> None:
    # Prepare
    import io

    stream = io.StringIO()
    printer = runner.ProgressPrinter(2, stream)
    # Execute
    printer({"round": 1, "accuracy": None, "f1_macro": None, "loss": None, "clients": 3,
             "rejected": 1, "upload_bytes": 10, "download_bytes": 20, "link_seconds": None,
             "epsilon": None, "seconds": 0.1})
    # Assert
    assert " - " in stream.getvalue()


def test_a_resume_the_serverapp_refused_is_its_error_not_the_old_results(
        tmp_path: Path) -> None:
    # Prepare: a finished run's results (untouched by the refused resume) and the
    # traceback the ServerApp wrote when it refused the checkpoint
    out = tmp_path / "out"
    out.mkdir()
    results = out / "results.json"
    results.write_text(json.dumps({"rounds": [{"round": 1}], "summary": {
        "rounds_completed": 1, "failed": "an older failure"}}))
    (out / "report.png").write_bytes(b"png")
    before = runner._stat(results)
    (out / "error.log").write_text(
        "Traceback (most recent call last):\n  File ...\n"
        f"flowerpress.server.checkpoint.CheckpointError: {out}/checkpoint.npz: the model's "
        "shapes [(3,)] are not the task's [(4,)]\n")
    proc = _Exited(tmp_path / "flwr-run-0.log", "ERROR ServerApp raised\n")
    # Execute
    with pytest.raises(runner.SimulationError) as info:
        runner._wait_for_results(proc, results, None, 1, 5.0,  # type: ignore[arg-type]
                                 before=before)
    # Assert
    assert str(info.value) == (
        f"CheckpointError: {out}/checkpoint.npz: the model's shapes [(3,)] are not the "
        f"task's [(4,)]; full log: {out / 'error.log'}")
