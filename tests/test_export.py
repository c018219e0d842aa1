"""``flowerpress export``: a run's model round-trips in onnxruntime, float32 and int8."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flowerpress.cli import main
from flowerpress.config import validate
from flowerpress.export import ExportRequest, export_run
from flowerpress.tasks import TrainContext
from flowerpress.tasks.registry import build_task, task_spec

pytest.importorskip("onnxruntime")

CONFIG = {"dataset": "digits", "partition": "iid", "num-clients": 4, "clients-per-round": 4,
          "local-epochs": 3}


def _run_dir(path: Path) -> Path:
    """A run directory as a run leaves it: its config and a (briefly) trained model."""
    config = validate(CONFIG)
    task = build_task(task_spec(config), config)
    data = task.load_data({"partition-id": 0, "num-partitions": 4})
    weights = task.train(task.initial_weights(), data, TrainContext(1, 0)).weights
    path.mkdir()
    np.savez(path / "model.npz", *weights)
    (path / "results.json").write_text(json.dumps({"config": dict(config), "rounds": [{}],
                                                   "summary": {}}))
    return path


def test_an_export_round_trips_in_onnxruntime_float32_and_int8(tmp_path: Path) -> None:
    # Prepare
    import onnxruntime

    run = _run_dir(tmp_path / "run")
    # Execute
    plain = export_run(ExportRequest(run, tmp_path / "f32.onnx", quantize="none",
                                     latency_examples=20))
    small = export_run(ExportRequest(run, tmp_path / "i8.onnx", quantize="int8",
                                     calibration_examples=128, latency_examples=20))
    # Assert: both load in onnxruntime; float32 gives torch's accuracy, int8 is close
    for sidecar, path in ((plain, tmp_path / "f32.onnx"), (small, tmp_path / "i8.onnx")):
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        out = session.run(None, {"input": np.zeros((3, 64), np.float32)})[0]
        assert out.shape == (3, 10)
        assert sidecar == json.loads(Path(f"{path}.json").read_text())
        assert sidecar["artifact_bytes"] == path.stat().st_size
        assert sidecar["float32_state_bytes"] == 4 * sidecar["parameters"]
        assert sidecar["test_examples"] > 0
        assert all(v is not None and v > 0 for v in sidecar["latency_ms_per_example"].values()
                   if isinstance(v, float))
    assert plain["accuracy"]["artifact"] == pytest.approx(plain["accuracy"]["float32_torch"])
    assert plain["accuracy"]["float32_torch"] > 0.5
    assert abs(small["accuracy_drop_points"]) <= 5.0
    assert small["calibration"]["source"].startswith("training partitions")
    assert small["artifact_bytes"] < plain["artifact_bytes"]
    assert small["compressed_artifact_bytes"] < small["artifact_bytes"]
    assert 0.0 <= small["weight_sparsity"] < 0.05  # a dense model


def test_a_pruned_models_compressed_int8_artifact_is_far_smaller(tmp_path: Path) -> None:
    # Prepare: the run's model with 90% of its weight matrices set to zero, as `prune` leaves it
    from flowerpress.compression.mask import magnitude_mask

    run = _run_dir(tmp_path / "run")
    weights = [np.asarray(w) for w in np.load(run / "model.npz").values()]
    mask = magnitude_mask(weights, 0.9)
    np.savez(run / "model.npz", *[np.where(m, w, 0) for w, m in zip(weights, mask, strict=True)])
    # Execute
    sidecar = export_run(ExportRequest(run, tmp_path / "i8.onnx", quantize="int8",
                                       calibration_examples=64, latency_examples=5))
    # Assert: zeros survive int8; zstd of the file is where the sparsity pays
    assert sidecar["weight_sparsity"] > 0.85
    assert sidecar["compressed_size_ratio"] > 2 * sidecar["size_ratio"]


@pytest.mark.parametrize(("args", "words"), [
    (["--format", "executorch"], "executorch is not supported"),
    (["--format", "tflite"], "--format 'tflite' is not allowed"),
    (["--quantize", "int4"], "--quantize 'int4' is not allowed"),
    ([], "has no model.npz"),
])
def test_bad_requests_are_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              args: list[str], words: str) -> None:
    # Prepare: a run directory without a model
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"config": CONFIG, "rounds": []}))
    # Execute
    code = main(["export", str(run), "--out", str(tmp_path / "m.onnx"), *args])
    # Assert
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and words in err
    assert not (tmp_path / "m.onnx").exists()
