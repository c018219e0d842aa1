"""Experiment tracking (issue 22, item 4): rows, config and files in TensorBoard and MLflow,
read back with their own readers; a tracking error never fails a run."""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from flowerpress import cli, sweep, tracking
from flowerpress.config import validate
from flowerpress.simulations import runner
from tests.test_sweep import BASE, _calls, _fake

ROWS = [{"round": r, "accuracy": 0.5 + 0.1 * r, "loss": 1.0 / r, "f1_macro": None,
         "clients": 3, "upload_bytes": 100 * r, "epsilon": None,
         "download": {"full_models": r, "kept_bytes": 0.5}} for r in (1, 2, 3)]


def _png(width: int, height: int) -> bytes:
    """A valid grey PNG of ``width`` x ``height``."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    raw = b"".join(b"\x00" + b"\x80" * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0,
                                                               0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _run_dir(path: Path, rows: list[dict[str, Any]]) -> Path:
    """What a run leaves: results.json with ``rows``, report.png."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "results.json").write_text(json.dumps({
        "config": {"rounds": 3}, "rounds": rows,
        "summary": {"rounds_completed": len(rows)}, "privacy": None}))
    (path / "report.png").write_bytes(_png(4, 3))
    return path


def _scalars(logdir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0}).Reload()
    return [(e.step, round(e.value, 6)) for e in acc.Scalars(tag)]


def test_a_row_becomes_scalars_with_blocks_flattened_and_nulls_left_out() -> None:
    scalars = tracking.row_scalars({**ROWS[1], "note": "text", "flag": True,
                                    "bad name!": 1, "nan": float("nan")})
    assert scalars == {"accuracy": 0.7, "loss": 0.5, "clients": 3.0, "upload_bytes": 200.0,
                       "download/full_models": 2.0, "download/kept_bytes": 0.5, "flag": 1.0,
                       "bad name_": 1.0}


def test_both_trackers_read_back_with_their_own_readers_and_a_resume_continues_the_run(
        tmp_path: Path) -> None:
    # Prepare: a run interrupted after round 2, then resumed to round 3
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = _run_dir(tmp_path / "q8", ROWS[:2])
    config = validate({"rounds": 3, "compression": "q:8"})
    settings = tracking.TrackSettings(backends=("tensorboard", "mlflow"),
                                      tags={"flowerpress.config": "q8"})
    stream = io.StringIO()
    # Execute
    first = tracking.Tracking(settings, stream=stream)
    first.started(out, config, resume=False)
    for row in ROWS[:2]:
        first.row(row)
    first.finished(out, failure="interrupted")
    _run_dir(out, ROWS)
    again = tracking.Tracking(settings, stream=stream)
    again.started(out, {**config, "rounds": 4}, resume=True)
    for row in ROWS:  # the runner hands over every row again; 1 and 2 are skipped
        again.row(row)
    again.finished(out, failure=None)
    # Assert: TensorBoard
    assert stream.getvalue() == ""
    logdir = out / "tb" / "q8"
    assert _scalars(logdir, "accuracy") == [(1, 0.6), (2, 0.7), (3, 0.8)]
    assert _scalars(logdir, "download/full_models") == [(1, 1.0), (2, 2.0), (3, 3.0)]
    acc = EventAccumulator(str(logdir), size_guidance={"images": 0, "tensors": 0}).Reload()
    assert "f1_macro" not in acc.Tags()["scalars"]
    assert acc.Images("report")[-1].width == 4 and acc.Images("report")[-1].height == 3
    assert {"config", "results.json"} <= set(acc.Tags()["tensors"])
    assert "_hparams_/session_start_info" in acc.PluginTagToContent("hparams")
    # Assert: MLflow, the same run continued
    state = json.loads((out / tracking.STATE_FILE).read_text())
    assert state["mlflow"]["round"] == state["tensorboard"]["round"] == 3
    assert state["errors"] == {}
    assert state["mlflow"]["tracking_uri"] == f"sqlite:///{out / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=state["mlflow"]["tracking_uri"])
    run = client.get_run(state["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "q8"
    assert [(m.step, round(m.value, 6)) for m in client.get_metric_history(
        run.info.run_id, "accuracy")] == [(1, 0.6), (2, 0.7), (3, 0.8)]
    assert run.data.params["compression"] == "q:8" and run.data.params["rounds"] == "3"
    assert run.data.tags["resumed.rounds"] == "4"
    assert run.data.tags["flowerpress.config"] == "q8"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {
        "results.json", "report.png"}
    assert (out / "mlartifacts").is_dir()
    experiment = client.get_experiment_by_name(tracking.DEFAULT_EXPERIMENT)
    assert experiment is not None and run.info.experiment_id == experiment.experiment_id
    assert tracking.prepare_mlflow(out, tracking.DEFAULT_EXPERIMENT) == run.info.experiment_id


def test_a_run_first_tracked_when_it_is_resumed_gets_every_row(tmp_path: Path) -> None:
    # Prepare: a run checkpointed after round 2 without tracking
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = _run_dir(tmp_path / "late", ROWS)
    tracker = tracking.Tracking(tracking.TrackSettings(backends=("tensorboard",)))
    # Execute
    tracker.started(out, validate({}), resume=True)
    for row in ROWS:
        tracker.row(row)
    tracker.finished(out, failure=None)
    # Assert
    assert _scalars(out / "tb" / "late", "accuracy") == [(1, 0.6), (2, 0.7), (3, 0.8)]
    hparams = EventAccumulator(str(out / "tb" / "late")).Reload().PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in hparams


def test_a_tracking_error_is_one_line_and_the_rest_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: MLflow's store refuses the run
    def locked(*args: object, **kwargs: object) -> None:
        raise RuntimeError("database is locked\n(details)")

    monkeypatch.setattr(tracking._MLflow, "start", locked)
    out = _run_dir(tmp_path / "run", ROWS[:2])
    stream = io.StringIO()
    tracker = tracking.Tracking(tracking.TrackSettings(backends=("mlflow", "tensorboard")),
                                stream=stream)
    # Execute
    tracker.started(out, validate({}), resume=False)
    for row in ROWS[:2]:
        tracker.row(row)
    tracker.finished(out, failure=None)
    # Assert: one line naming the backend and the error; TensorBoard has every round
    assert stream.getvalue().splitlines() == [
        "flowerpress: tracking with mlflow failed (start): RuntimeError: database is locked "
        f"(details); the run goes on, its results are in {out}"]
    assert json.loads((out / tracking.STATE_FILE).read_text())["errors"]["mlflow"]
    assert _scalars(out / "tb" / "run", "accuracy") == [(1, 0.6), (2, 0.7)]
    assert json.loads((out / "results.json").read_text())["rounds"] == ROWS[:2]


def test_a_missing_extra_or_unknown_backend_is_one_line_and_exit_2(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: MLflow is "not installed"
    monkeypatch.setattr(tracking, "BACKENDS", {"tensorboard": "tensorboard",
                                               "mlflow": "flowerpress_no_such_module"})
    # Execute
    missing = cli.main(["simulate", "--out", str(tmp_path / "a"), "--track", "mlflow"])
    missing_err = capsys.readouterr().err
    unknown = cli.main(["sweep", str(tmp_path / "g.toml"), "--out", str(tmp_path / "b"),
                        "--track", "wandb"])
    unknown_err = capsys.readouterr().err
    # Assert
    assert missing == 2 and missing_err.splitlines() == [
        "flowerpress: error: --track mlflow needs the optional tracking packages: "
        "pip install 'flowerpress[track]'"]
    assert unknown == 2 and len(unknown_err.splitlines()) == 1 and "'wandb'" in unknown_err
    assert not (tmp_path / "a").exists()


class _Recorder:
    """A RunObserver that records what it is told."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def started(self, out_dir: Path, config: Mapping[str, Any], *, resume: bool) -> None:
        self.events.append(("started", resume))

    def row(self, row: Mapping[str, Any]) -> None:
        self.events.append(("row", row["round"]))

    def finished(self, out_dir: Path, *, failure: str | None) -> None:
        self.events.append(("finished", failure))


def test_simulate_tells_the_observer_every_row_and_the_end_unless_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: the engine stands in: it writes two rows, or fails
    def engine(run_config: Mapping[str, Any], out_dir: Path, results: Path, printer: Any,
               timeout: float, before: Any, ray_address: str | None,
               on_row: runner.RowCallback) -> dict[str, Any]:
        _run_dir(out_dir, ROWS[:2])
        runner._follow(results, 0, printer, on_row)
        if run_config["rounds"] == 3:
            raise runner.SimulationError("strategy X returned NaN")
        return {"rounds": ROWS[:2]}

    monkeypatch.setattr(runner, "_run", engine)
    ok, failed, refused = _Recorder(), _Recorder(), _Recorder()
    # Execute
    runner.simulate(validate({"rounds": 2}), tmp_path / "ok", progress=False, observer=ok)
    with pytest.raises(runner.SimulationError):
        runner.simulate(validate({"rounds": 3}), tmp_path / "bad", progress=False,
                        observer=failed)
    with pytest.raises(runner.SimulationError):  # ok holds another run
        runner.simulate(validate({"rounds": 2}), tmp_path / "ok", progress=False,
                        observer=refused)
    # Assert
    assert ok.events == [("started", False), ("row", 1), ("row", 2), ("finished", None)]
    assert failed.events == [("started", False), ("row", 1), ("row", 2),
                             ("finished", "strategy X returned NaN")]
    assert refused.events == []


def test_a_sweep_tracks_each_run_by_configuration_and_seed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    command, calls = _fake(tmp_path)
    monkeypatch.setenv("FAKE_CALLS", str(calls))
    grid = sweep.parse_grid({"base": dict(BASE), "grid": {"compression": ["none", "q:8"]},
                             "seeds": [0]})
    out = tmp_path / "sw"
    # Execute
    outcome = sweep.run_sweep(grid, out, jobs=1, stream=io.StringIO(), command=command,
                              poll_seconds=0.05, ray_address="127.0.0.1:6390",
                              track=sweep.SweepTracking(backends=("tensorboard",)))
    # Assert: every run's command names its tracked run, its tags and the cluster
    assert len(outcome.finished) == 2
    def option(argv: list[str], name: str) -> str:
        return argv[argv.index(name) + 1]

    by_name = {option(argv, "--track-name"): argv for argv in _calls(calls)}
    for config in grid.configurations:
        argv = by_name[f"{config.id}/seed-0"]
        assert option(argv, "--track") == "tensorboard"
        assert option(argv, "--track-dir") == str(out.resolve())
        assert option(argv, "--track-experiment") == "sw"
        assert option(argv, "--ray-address") == "127.0.0.1:6390"
        assert f"flowerpress.config={config.label}" in argv
        assert "flowerpress.seed=0" in argv


# The real thing, a tracked simulate on Flower's engine read back with TensorBoard's and
# MLflow's own readers, is tests/test_cli.py's end-to-end run (one engine start for both).
