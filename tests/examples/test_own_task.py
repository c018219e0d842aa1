"""examples/own_task: a user's model and data through the public API only."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "own_task"


@pytest.fixture()
def sensor_task() -> Iterator[type]:
    sys.path.insert(0, str(EXAMPLE))
    try:
        from sensor_task.task import SensorTask

        yield SensorTask
    finally:
        sys.path.remove(str(EXAMPLE))
        for name in [m for m in sys.modules if m.startswith("sensor_task")]:
            del sys.modules[name]


def test_own_task_learns_with_federated_evaluation(sensor_task: type) -> None:
    # Prepare: the user's task, no central test set, compression on
    from flowerpress import client_app, serve, validate_config
    from flowerpress.testing import InProcessGrid, server_identity

    task = sensor_task()
    config = validate_config({"num-clients": 6, "clients-per-round": 4, "rounds": 4,
                              "compression": "q:8+ef", "strategy": "fedadam:lr=0.1"})
    # Execute
    with server_identity():
        result = serve(InProcessGrid(client_app(task), 6, run_config=config), config, task=task)
    # Assert: every round evaluated on the nodes; accuracy well above chance (0.25)
    rows = result["rounds"]
    assert all(r["evaluated_by"] == 4 and r["clients"] == 4 for r in rows)
    assert rows[-1]["accuracy"] > 0.5
    summary = result["summary"]
    assert summary["total_upload_payload_bytes"] * 3 < summary["fp32_upload_bytes"]


@pytest.mark.slow
def test_own_task_runs_with_flwr_on_the_simulation_engine(tmp_path: Path) -> None:
    # Prepare: Flower's simulation SuperLink; the example app as a user would submit it
    from flowerpress.simulations.runner import SimulationLink

    out = tmp_path / "out"
    # Execute
    with SimulationLink(tmp_path) as link:
        run = link.run(EXAMPLE, {"out-dir": str(out), "rounds": 2}, num_supernodes=6)
        deadline = time.monotonic() + 400
        while run.alive() and time.monotonic() < deadline:
            time.sleep(0.5)
        log = run.tail(30)
    # Assert: compression, distributed DP and FedAdam all ran for both rounds
    results = json.loads((out / "results.json").read_text())
    assert results["summary"]["rounds_completed"] == 2, log
    rows = results["rounds"]
    assert all(r["clients"] == 4 and r["rejected"] == 0 for r in rows), log
    assert all(r["epsilon"] is not None and r["evaluated_by"] > 0 for r in rows)
    assert results["config"]["strategy"] == "fedadam:lr=0.1"
    assert results["privacy"]["mode"] == "distributed"
    summary = results["summary"]
    assert summary["total_upload_payload_bytes"] * 3 < summary["fp32_upload_bytes"]
