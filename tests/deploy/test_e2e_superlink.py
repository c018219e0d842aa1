"""End to end on loopback: TLS + SuperNode authentication, 3 SuperNodes, `flwr run`.

One SuperLink (``--enable-supernode-auth``, certificates from ``flowerpress certs``)
serves the whole module; every process is stopped by the fixture, also on failure
or timeout (pytest-timeout's signal method raises in the test, so teardown runs).
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

from flowerpress.deploy.data import save_device_data
from flowerpress.deploy.local import LocalDeployment

REPO = Path(__file__).resolve().parents[2]
ROUNDS = 2
#: Key index -> role. 0..2 registered and online; 3 never registered; 4 registered,
#: started without the CA certificate.
NODES, UNREGISTERED, NO_CA = 3, 3, 4


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
    node_configs: list[dict[str, str | int | float | bool]] = [
        {"partition-id": 0, "num-partitions": 3},
        *({"data-path": str(path)} for path in device_files),
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


@pytest.mark.timeout(480, method="signal")
def test_flwr_run_completes_rounds_with_compression(
    deployment: LocalDeployment, tmp_path: Path
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
