"""examples/own_task on a real SuperLink: two devices, each with its own data file.

The same user task and apps the simulation test runs, here as an operator
deploys them: a TLS SuperLink with SuperNode authentication, two SuperNodes
whose node config names a ``.npz`` of sensor windows, ``flwr run`` of the
example's directory. Every process is stopped by the fixture.

The same run checks the version refusal end to end (issue 24). The example's
app bundle carries only the user's code, so each machine runs the flowerpress
it has installed; a third device runs an older one: a copy of this flowerpress
whose ``MESSAGE_FORMAT`` is 1 and ``__version__`` 0.1.9, first on its
SuperNode's ``PYTHONPATH`` (what a device that was not upgraded has). The server
excludes it in one line, the device says why in one line of its log file, and
the run goes on with the other two.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from flowerpress.deploy.local import LocalDeployment

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "own_task"
DEVICES = 2
OLD_VERSION = "0.1.9"


def _older_flowerpress(where: Path) -> dict[str, str]:
    """A copy of this flowerpress speaking message format 1 as 0.1.9; its PYTHONPATH."""
    import flowerpress
    from flowerpress import protocol

    package = shutil.copytree(Path(flowerpress.__file__).parent, where / "flowerpress",
                              ignore=shutil.ignore_patterns("__pycache__"))
    for name, old, new in (
            ("protocol.py", f"MESSAGE_FORMAT = {protocol.MESSAGE_FORMAT}", "MESSAGE_FORMAT = 1"),
            ("__init__.py", f'__version__ = "{flowerpress.__version__}"',
             f'__version__ = "{OLD_VERSION}"')):
        text = (package / name).read_text()
        assert old in text, (name, old)
        (package / name).write_text(text.replace(old, new))
    return {"PYTHONPATH": os.pathsep.join([str(where), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.slow
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
    for i in range(DEVICES + 1):
        x, y = sensor_windows(64, seed=2000 + i)
        files.append(tmp_path / f"device-{i}.npz")
        np.savez(files[-1], x=x, y=y)
    out = tmp_path / "results"
    old_log = tmp_path / "old-device.log"
    # Execute: the two devices, and one that was not upgraded
    with LocalDeployment(tmp_path / "deploy", nodes=DEVICES + 1, startup_timeout=90.0) as dep:
        dep.start_superlink()
        for i in range(DEVICES + 1):
            dep.register(i)
            old = i == DEVICES
            dep.start_supernode(i, {"data-path": str(files[i]),
                                    **({"log-file": str(old_log)} if old else {})},
                                env=_older_flowerpress(tmp_path / "old") if old else None)
        dep.wait_nodes_online(DEVICES + 1)
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
    # The device of another version: excluded, one line on each side
    from flowerpress import __version__
    from flowerpress.protocol import MESSAGE_FORMAT

    assert row["excluded"] == 1, log
    (old_node,) = [n for n in results["nodes"] if n["version"] == OLD_VERSION]
    assert old_node["excluded"] is not None and old_node["last_round"] == 0
    server_lines = [line for line in (out / "server.log").read_text().splitlines()
                    if str(old_node["node_id"]) in line]
    assert len(server_lines) == 1, server_lines
    assert (f"node {old_node['node_id']} is excluded from the run: start-up query: the node "
            f"speaks message format 1 (flowerpress {OLD_VERSION}); this side speaks "
            f"{MESSAGE_FORMAT} (flowerpress {__version__})") in server_lines[0]
    device_lines = [line for line in old_log.read_text().splitlines() if "format" in line]
    assert len(device_lines) == 1, device_lines
    assert (f"the server speaks message format {MESSAGE_FORMAT} (flowerpress {__version__}); "
            f"this side speaks 1 (flowerpress {OLD_VERSION})") in device_lines[0]
