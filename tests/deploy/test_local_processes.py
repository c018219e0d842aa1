"""Tests for flowerpress.deploy.local helpers that need no Flower processes."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

from flowerpress.deploy.local import (
    DeploymentError,
    LocalDeployment,
    ManagedProcess,
    format_config,
    free_port,
)

# A parent that starts a detached grandchild (new session, like flower-superexec)
# and prints the grandchild's pid, then both sleep.
_SPAWNER = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                         start_new_session=True)
print(child.pid, flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split()[0] != "Z"


def test_format_config_round_trips_through_flower_parser() -> None:
    # Prepare
    config = {"rounds": 2, "lr": 0.05, "compression": "topk:0.01+q:8+ef", "dp": "off",
              "flag": True, "data-path": "/data/my device.npz"}  # fmt: skip

    # Execute
    parsed = parse_config_args([format_config(config)])

    # Assert
    assert parsed == config


def test_format_config_refuses_quotes() -> None:
    with pytest.raises(ValueError, match="'name'"):
        format_config({"name": "it's"})


def test_free_port_is_bindable() -> None:
    import socket

    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
    assert 0 < port < 65536


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="descendant tracking uses /proc")
@pytest.mark.timeout(60, method="signal")
def test_stop_kills_detached_descendants(tmp_path: Path) -> None:
    # Prepare
    proc = ManagedProcess.start(
        "spawner", [sys.executable, "-c", _SPAWNER], tmp_path / "spawner.log", dict(os.environ)
    )
    deadline = time.monotonic() + 30
    while not proc.output().strip() and time.monotonic() < deadline:
        time.sleep(0.05)
    grandchild = int(proc.output().split()[0])
    assert _alive(grandchild)

    # Execute
    proc.stop(timeout=5)

    # Assert
    assert not proc.alive()
    assert not _alive(grandchild)


def test_wait_for_output_reports_early_exit(tmp_path: Path) -> None:
    # Prepare
    proc = ManagedProcess.start(
        "failing", [sys.executable, "-c", "print('boom'); raise SystemExit(3)"],
        tmp_path / "failing.log", dict(os.environ),
    )  # fmt: skip

    # Execute / Assert
    try:
        with pytest.raises(DeploymentError, match=r"(?s)failing exited \(code 3\).*boom"):
            proc.wait_for_output("never printed", timeout=30)
    finally:
        proc.stop()


def test_cli_connection_is_what_flwr_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: no process is started by the constructor
    from flwr.cli.flower_config import read_superlink_connection

    from flowerpress.deploy.local import CONNECTION_NAME, LocalDeployment

    dep = LocalDeployment(tmp_path, nodes=1)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home" / "cli"))

    # Execute
    default = read_superlink_connection(None)

    # Assert
    assert default.name == CONNECTION_NAME
    assert default.address == dep.address == f"127.0.0.1:{dep.port}"
    assert default.root_certificates == str(dep.credentials.ca_cert)
    assert not default.insecure
    assert list(dep.processes()) == []


def test_wait_run_checks_status_once_the_done_file_appears(tmp_path: Path) -> None:
    # Prepare: a deployment whose `flwr ls` is counted, not run
    dep = LocalDeployment.__new__(LocalDeployment)
    dep.superlink = None
    done = tmp_path / "report.png"
    calls: list[bool] = []

    def run_status(run_id: int) -> dict[str, str]:
        calls.append(done.exists())
        return {"status": "finished:completed" if done.exists() else "running"}

    dep.run_status = run_status  # type: ignore[method-assign]
    def write_later() -> None:
        time.sleep(1.0)
        done.write_bytes(b"png")

    writer = threading.Thread(target=write_later)
    writer.start()
    # Execute
    status = dep.wait_run(7, timeout=30, max_interval=600.0, done_file=done)
    writer.join()

    # Assert: one check at the start, the next as soon as the file exists
    assert status["status"] == "finished:completed"
    assert calls == [False, True]


def test_wait_run_without_the_done_file_still_sees_a_failed_run(tmp_path: Path) -> None:
    # Prepare: the run fails and never writes its done file
    dep = LocalDeployment.__new__(LocalDeployment)
    dep.superlink = None
    answers = iter(["running", "finished:failed"])
    dep.run_status = lambda run_id: {"status": next(answers)}  # type: ignore[method-assign]

    # Execute
    status = dep.wait_run(7, timeout=30, max_interval=0.5, done_file=tmp_path / "never")

    # Assert
    assert status["status"] == "finished:failed"
