"""On loopback with TLS and SuperNode auth: SIGKILL the ServerApp mid-run, resume with `flwr run`.

The SuperLink (``--isolation subprocess``, the default) starts the ServerApp as a
``flwr-serverapp`` process under its SuperExec; killing it is a server crash. The
same run config plus ``resume=true`` on a new ``flwr run`` continues from the
checkpoint in ``out-dir``: the run ends with the planned rounds, once each, and
epsilon continues from where it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import pytest

from flowerpress.deploy.local import (
    CONNECTION_NAME,
    DeploymentError,
    LocalDeployment,
    _descendants,
)
from flowerpress.server.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[2]
#: Two rounds are enough: the kill comes after round 1 is checkpointed (so mid-run),
#: and the resumed run must add round 2 with epsilon above round 1's. Each round
#: costs a fresh ClientApp process per node (~10-20 s on a loaded 2-core machine).
NODES, ROUNDS = 2, 2


def _serverapp_pids(superlink_pid: int) -> list[int]:
    found = []
    for pid in _descendants(superlink_pid):
        with contextlib.suppress(OSError):
            if b"flwr-serverapp" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
    return found


@pytest.mark.timeout(900, method="signal")
def test_serverapp_killed_mid_run_resumes_to_the_planned_rounds(tmp_path: Path) -> None:
    # Prepare
    out = tmp_path / "results"
    run_config: dict[str, str | int | float | bool] = {
        "rounds": ROUNDS, "dataset": "digits", "partition": "iid", "model": "logreg",
        "num-clients": NODES, "clients-per-round": NODES, "min-replies": NODES,
        "local-epochs": 1, "dp": "distributed:clip=1.0,noise=1.0", "out-dir": str(out),
    }
    with LocalDeployment(tmp_path / "deploy", nodes=NODES, startup_timeout=90.0) as dep:
        dep.start_superlink()
        for index in range(NODES):
            dep.register(index)
            dep.start_supernode(index, {"partition-id": index, "num-partitions": NODES})
        dep.wait_nodes_online(NODES)
        assert dep.superlink is not None
        # Execute: kill the ServerApp once round 1 is checkpointed
        first = dep.run_app(REPO, run_config)
        deadline = time.monotonic() + 420
        while time.monotonic() < deadline:
            saved = load_checkpoint(out) if (out / "checkpoint.npz").exists() else None
            if saved is not None and saved.state.server_round >= 1:
                break
            time.sleep(0.5)
        else:
            raise AssertionError("round 1 was not checkpointed:\n" + dep.run_log(first))
        pids = _serverapp_pids(dep.superlink.pid)
        assert len(pids) == 1, pids
        os.kill(pids[0], signal.SIGKILL)
        with contextlib.suppress(DeploymentError):  # the docs' advice; may be finished already
            dep.flwr("stop", str(first), CONNECTION_NAME)
        saved = load_checkpoint(out)
        assert saved is not None
        killed_after = saved.state.server_round
        assert killed_after < ROUNDS
        spent = [row["epsilon"] for row in saved.state.rows]
        second = dep.run_app(REPO, {**run_config, "resume": True})
        status = dep.wait_run(second, timeout=420, done_file=out / "report.png")
        # The run log (a `flwr log` process) only when it explains a failure
        assert status["status"] == "finished:completed", dep.run_log(second)
    # Assert
    results = json.loads((out / "results.json").read_text())
    rows = results["rounds"]
    assert [row["round"] for row in rows] == list(range(1, ROUNDS + 1))
    assert results["summary"]["resumed_after_rounds"] == [killed_after]
    eps = [row["epsilon"] for row in rows]
    assert eps[:killed_after] == spent and eps == sorted(eps) and eps[-1] > spent[-1]
    assert all(row["clients"] == NODES for row in rows[killed_after:]), rows
