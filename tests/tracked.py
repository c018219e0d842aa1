"""A run's tracked rows, read back by TensorBoard's and MLflow's own readers (shared by
the CLI's and the sweep's engine runs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_back(tb_run: Path, run_dir: Path, rows: list[dict[str, Any]]) -> Any:
    """Assert that TensorBoard's log in ``tb_run`` and the MLflow run named in
    ``run_dir``'s tracking state hold ``rows``; return the MLflow run."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from flowerpress import tracking

    acc = EventAccumulator(str(tb_run), size_guidance={"scalars": 0}).Reload()
    accuracy = [(r["round"], round(r["accuracy"], 5)) for r in rows]
    assert [(e.step, round(e.value, 5)) for e in acc.Scalars("accuracy")] == accuracy
    assert [e.step for e in acc.Scalars("upload_bytes")] == [r["round"] for r in rows]
    state = json.loads((run_dir / tracking.STATE_FILE).read_text())
    client = MlflowClient(tracking_uri=state["mlflow"]["tracking_uri"])
    run = client.get_run(state["mlflow"]["run_id"])
    assert [(m.step, round(m.value, 5)) for m in client.get_metric_history(
        run.info.run_id, "accuracy")] == accuracy
    assert run.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {
        "results.json", "report.png"}
    return run
