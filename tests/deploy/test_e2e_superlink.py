"""End to end on loopback: TLS + SuperNode authentication, 3 SuperNodes, `flwr run`.

One SuperLink (``--enable-supernode-auth``, certificates from ``flowerpress certs``)
serves the whole module; every process is stopped by the fixture, also on failure
or timeout (pytest-timeout's signal method raises in the test, so teardown runs).
Under pytest-xdist the module stays on one worker (``make test`` distributes
by file, ``--dist loadfile``), so the deployment starts once.

The last test SIGKILLs the ServerApp mid-run and resumes with ``flwr run``: the
SuperLink (``--isolation subprocess``, the default) starts the ServerApp as a
``flwr-serverapp`` process under its SuperExec; killing it is a server crash. The
same run config plus ``resume=true`` on a new ``flwr run`` continues from the
checkpoint in ``out-dir``: the run ends with the planned rounds, once each, and
epsilon continues from where it was. (It ran on a deployment of its own before;
this one serves it as well and saves a SuperLink and two SuperNodes' start-up.)
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

from flowerpress.deploy.data import save_device_data
from flowerpress.deploy.local import (
    CONNECTION_NAME,
    DeploymentError,
    LocalDeployment,
    _descendants,
)
from flowerpress.server.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[2]
ROUNDS = 2
#: Key index -> role. 0..2 registered and online; 3 never registered; 4 registered,
#: started without the CA certificate.
NODES, UNREGISTERED, NO_CA = 3, 3, 4
#: The resumed run: two rounds are enough, the kill comes after round 1 is
#: checkpointed (so mid-run), and the resumed run must add round 2 with epsilon
#: above round 1's.
RESUME_ROUNDS = 2


def _app_config_keys() -> set[str]:
    with (REPO / "pyproject.toml").open("rb") as handle:
        return set(tomllib.load(handle)["tool"]["flwr"]["app"]["config"])


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalDeployment]:
    workdir = tmp_path_factory.mktemp("deploy")
    # Node 0 takes a partition of the built-in dataset (demo path); nodes 1 and 2 hold
    # their data as devices do: an .npz file named by data-path. (The data-path path
    # also skips the partitioner's imports in every ClientApp process, which keeps
    # this test's CPU time down on small CI machines.)
    digits = load_digits()
    device_files = [
        save_device_data(
            workdir / f"device-{i}.npz",
            digits.data[300 * i : 300 * (i + 1)] / 16.0,
            digits.target[300 * i : 300 * (i + 1)],
        )
        for i in (1, 2)
    ]
    # Node 1 also keeps a device log (the node config's log-file), as the systemd unit does.
    node_configs: list[dict[str, str | int | float | bool]] = [
        {"partition-id": 0, "num-partitions": 3},
        {"data-path": str(device_files[0]), "log-file": str(workdir / "device-1.log")},
        {"data-path": str(device_files[1])},
    ]
    with LocalDeployment(workdir, nodes=NO_CA + 1, startup_timeout=90.0) as dep:
        dep.start_superlink()
        # Each SuperNode starts right after its key is registered: its start-up
        # overlaps the next `flwr supernode register` process.
        for index, node_config in enumerate(node_configs):
            dep.register(index)
            dep.start_supernode(index, node_config)
        dep.register(NO_CA)
        dep.wait_nodes_online(NODES)
        yield dep


# Bounds are generous because a round on a loaded 2-core machine is dominated by
# ClientApp process start-up (a fresh Python + torch per message); typical: ~3-4 min.
@pytest.mark.timeout(300, method="signal")
def test_unregistered_supernode_is_refused(deployment: LocalDeployment) -> None:
    # Execute
    node = deployment.start_supernode(UNREGISTERED, name="unregistered", max_wait_time=15)
    code = node.wait_exit(timeout=90)

    # Assert
    assert code != 0
    assert "Failed to activate SuperNode" in node.output()
    assert deployment.superlink is not None
    assert "No SuperNode found with the given public key" in deployment.superlink.output()
    assert sum(s == "online" for s in deployment.node_statuses().values()) == NODES


@pytest.mark.timeout(120, method="signal")
def test_supernode_without_ca_certificate_cannot_connect(deployment: LocalDeployment) -> None:
    # Execute: a registered key, but the SuperLink's certificate cannot be verified
    node = deployment.start_supernode(
        NO_CA, name="no-ca", root_certificates=False, max_wait_time=15
    )
    code = node.wait_exit(timeout=90)

    # Assert
    assert code != 0
    assert "CERTIFICATE_VERIFY_FAILED" in node.output()
    statuses = deployment.node_statuses()
    assert sorted(statuses.values()).count("online") == NODES
    assert "registered" in statuses.values()  # key 4 never came online


@pytest.mark.slow
@pytest.mark.timeout(480, method="signal")
def test_flwr_run_completes_rounds_with_compression(
    deployment: LocalDeployment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Prepare
    out_dir = tmp_path / "results"
    run_config: dict[str, str | int | float | bool] = {
        "rounds": ROUNDS,
        "dataset": "digits",
        "num-clients": NODES,
        "clients-per-round": NODES,
        "min-replies": NODES,
        "compression": "q:8",
        "local-epochs": 1,
    }
    writes_results = "out-dir" in _app_config_keys()
    if writes_results:
        run_config["out-dir"] = str(out_dir)

    # Execute
    run_id = deployment.run_app(REPO, run_config)
    status = deployment.wait_run(run_id, timeout=420,
                                 done_file=out_dir / "report.png" if writes_results else None)

    # Assert
    assert status["status"] == "finished:completed", deployment.run_log(run_id)
    if not writes_results:  # the app has no out-dir key: the ServerApp log is the record
        log = deployment.run_log(run_id)
        for round_number in range(1, ROUNDS + 1):
            assert f"round {round_number}: accuracy" in log, log
        assert f"{NODES} clients, 0 rejected" in log, log
    else:
        results = json.loads((out_dir / "results.json").read_text())
        rows = results["rounds"]
        assert [row["round"] for row in rows] == list(range(1, ROUNDS + 1))
        assert all(row["clients"] == NODES and row["rejected"] == 0 for row in rows)
        assert results["config"]["compression"] == "q:8"
        # 8-bit payloads: well under the fp32 size of the same updates
        summary = results["summary"]
        assert 0 < summary["total_upload_bytes"] < 0.5 * summary["fp32_upload_bytes"]
        assert np.isfinite([row["accuracy"] for row in rows]).all()
        _assert_the_operator_sees_the_fleet(deployment, out_dir, monkeypatch, capsys)


def _assert_the_operator_sees_the_fleet(deployment: LocalDeployment, out_dir: Path,
                                        monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """`flowerpress devices` against this SuperLink and run; the run's and a device's logs."""
    from flowerpress import __version__
    from flowerpress.cli import main as cli_main

    # Execute: as an operator would, with the flwr CLI's FLWR_HOME
    monkeypatch.setenv("FLWR_HOME", str(deployment.cli_home))
    capsys.readouterr()
    code = cli_main(["devices", "--certs", str(deployment.workdir / "certs"),
                     "--run", str(out_dir), "--json"])
    listing = json.loads(capsys.readouterr().out)
    table_code = cli_main(["devices", CONNECTION_NAME, "--certs",
                           str(deployment.workdir / "certs"), "--run", str(out_dir)])
    table = capsys.readouterr().out.splitlines()
    # Assert: the three devices by key name, online, this version, both rounds accepted;
    # key 4 registered but never online; key 3 (never registered) not listed
    assert code == table_code == 0
    rows = {row["key"]: row for row in listing["devices"]}
    assert sorted(rows) == ["supernode-0", "supernode-1", "supernode-2", "supernode-4"]
    for key in ("supernode-0", "supernode-1", "supernode-2"):
        assert (rows[key]["status"], rows[key]["version"], rows[key]["last_round"],
                rows[key]["outcome"], rows[key]["answered"]) == (
            "online", __version__, ROUNDS, "accepted", ROUNDS), rows[key]
    assert rows["supernode-0"]["partition"] == 0
    assert (rows["supernode-4"]["status"], rows["supernode-4"]["version"]) == ("registered",
                                                                              None)
    assert len(table) == 5 and table[0].startswith("node id")
    # The ServerApp's log beside results.json; the device log the node config names
    server_log = (out_dir / "server.log").read_text()
    assert f"round {ROUNDS}: accuracy" in server_log
    device_log = (deployment.workdir / "device-1.log").read_text()
    for round_number in range(1, ROUNDS + 1):
        assert f"train message (round {round_number}): replied in" in device_log


def _serverapp_pids(superlink_pid: int) -> list[int]:
    found = []
    for pid in _descendants(superlink_pid):
        with contextlib.suppress(OSError):
            if b"flwr-serverapp" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
    return found


# Before the test that adds (and stops) a node, which the SuperLink may still list for a
# while: this run samples every online node. It kills this deployment's ServerApp only.
@pytest.mark.slow
@pytest.mark.timeout(900, method="signal")
def test_serverapp_killed_mid_run_resumes_to_the_planned_rounds(
    deployment: LocalDeployment, tmp_path: Path
) -> None:
    # Prepare
    out = tmp_path / "results"
    run_config: dict[str, str | int | float | bool] = {
        "rounds": RESUME_ROUNDS, "dataset": "digits", "partition": "iid", "model": "logreg",
        "num-clients": NODES, "clients-per-round": NODES, "min-replies": NODES,
        "local-epochs": 1, "dp": "distributed:clip=1.0,noise=1.0", "out-dir": str(out),
    }
    assert deployment.superlink is not None
    # Execute: kill the ServerApp once round 1 is checkpointed
    first = deployment.run_app(REPO, run_config)
    deadline = time.monotonic() + 420
    while time.monotonic() < deadline:
        saved = load_checkpoint(out) if (out / "checkpoint.npz").exists() else None
        if saved is not None and saved.state.server_round >= 1:
            break
        time.sleep(0.5)
    else:
        raise AssertionError("round 1 was not checkpointed:\n" + deployment.run_log(first))
    pids = _serverapp_pids(deployment.superlink.pid)
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGKILL)
    with contextlib.suppress(DeploymentError):  # the docs' advice; may be finished already
        deployment.flwr("stop", str(first), CONNECTION_NAME)
    saved = load_checkpoint(out)
    assert saved is not None
    killed_after = saved.state.server_round
    assert killed_after < RESUME_ROUNDS
    spent = [row["epsilon"] for row in saved.state.rows]
    second = deployment.run_app(REPO, {**run_config, "resume": True})
    status = deployment.wait_run(second, timeout=420, done_file=out / "report.png")
    # The run log (a `flwr log` process) only when it explains a failure
    assert status["status"] == "finished:completed", deployment.run_log(second)
    # Assert
    results = json.loads((out / "results.json").read_text())
    rows = results["rounds"]
    assert [row["round"] for row in rows] == list(range(1, RESUME_ROUNDS + 1))
    assert results["summary"]["resumed_after_rounds"] == [killed_after]
    eps = [row["epsilon"] for row in rows]
    assert eps[:killed_after] == spent and eps == sorted(eps) and eps[-1] > spent[-1]
    assert all(row["clients"] == NODES for row in rows[killed_after:]), rows


@pytest.mark.timeout(240, method="signal")
def test_key_from_certs_add_node_is_accepted(deployment: LocalDeployment) -> None:
    # Prepare: a new device's key added to the running deployment's credentials
    certs = deployment.workdir / "certs"
    before = {p.name: p.read_bytes() for p in certs.iterdir()}
    index = deployment.add_node()

    # Execute: register it and start a SuperNode with it
    deployment.register(index)
    node = deployment.start_supernode(index, {"partition-id": 0, "num-partitions": 3},
                                      name="added-node")
    try:
        deployment.wait_nodes_online(NODES + 1, timeout=150)

        # Assert: online next to the others; no earlier file changed
        assert node.alive()
        assert {name: (certs / name).read_bytes() for name in before} == before
    finally:
        node.stop()
