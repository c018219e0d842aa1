"""examples/own_task on a real SuperLink: two devices, each with its own data file.

The same user task and apps the simulation test runs, here as an operator
deploys them: a TLS SuperLink with SuperNode authentication, two SuperNodes
whose node config names a ``.npz`` of sensor windows, ``flwr run`` of the
example's directory. Every process is stopped by the fixture.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from flowerpress.deploy.local import LocalDeployment

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "own_task"
DEVICES = 2


@pytest.mark.timeout(600, method="signal")
def test_own_task_runs_on_a_superlink_with_device_data(tmp_path: Path) -> None:
    # Prepare: each device's windows in a file, as an operator would copy them there
    sys.path.insert(0, str(EXAMPLE))
    try:
        from sensor_task.task import sensor_windows
    finally:
        sys.path.remove(str(EXAMPLE))
        for name in [m for m in sys.modules if m.startswith("sensor_task")]:
            del sys.modules[name]
    files = []
    for i in range(DEVICES):
        x, y = sensor_windows(64, seed=2000 + i)
        files.append(tmp_path / f"device-{i}.npz")
        np.savez(files[-1], x=x, y=y)
    out = tmp_path / "results"
    # Execute
    with LocalDeployment(tmp_path / "deploy", nodes=DEVICES, startup_timeout=90.0) as dep:
        dep.start_superlink()
        for i in range(DEVICES):
            dep.register(i)
            dep.start_supernode(i, {"data-path": str(files[i])})
        dep.wait_nodes_online(DEVICES)
        run_id = dep.run_app(EXAMPLE, {"rounds": 1, "num-clients": DEVICES,
                                       "clients-per-round": DEVICES, "out-dir": str(out)})
        status = dep.wait_run(run_id, timeout=480, done_file=out / "report.png")
        # The run log (a `flwr log` process) only when it explains a failure
        assert status["status"] == "finished:completed", dep.run_log(run_id)
        log = f"run {run_id}; results in {out}"
    # Assert: compression, distributed DP, FedAdam and federated evaluation on the devices
    results = json.loads((out / "results.json").read_text())
    row = results["rounds"][0]
    assert row["clients"] == DEVICES and row["rejected"] == 0, log
    assert row["evaluated_by"] == DEVICES and row["epsilon"] is not None
    summary = results["summary"]
    assert summary["total_upload_payload_bytes"] * 3 < summary["fp32_upload_bytes"]
