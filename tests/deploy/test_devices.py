"""`flowerpress devices`: the SuperLink's nodes joined with the key files and a run's nodes.

In process: Flower's ``NodeInfo`` messages as the Control API returns them, key
files written by ``flowerpress certs``, a results.json ``nodes`` block. The
end-to-end check against a real SuperLink is in ``test_e2e_superlink.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flwr.cli.supernode.register import try_load_public_key
from flwr.proto.node_pb2 import NodeInfo

from flowerpress.cli import main as cli_main
from flowerpress.deploy import devices
from flowerpress.deploy.certs import add_node_keys, generate_credentials
from flowerpress.deploy.devices import (
    FlowerNode,
    join_devices,
    key_names,
    nodes_from_info,
    render_table,
    run_nodes,
)


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    creds = generate_credentials(tmp_path / "certs", [], 3)
    add_node_keys(creds.ca_cert.parent, 8)  # supernode-3 ... supernode-10
    return creds.ca_cert.parent


def _info(node_id: int, status: str, pub: Path | None) -> NodeInfo:
    # The bytes Flower stores: what `flwr supernode register` sends for the .pub file
    key = try_load_public_key(pub) if pub is not None else b""
    return NodeInfo(node_id=node_id, status=status, public_key=key,
                    registered_at="2026-12-07T10:00:00+00:00",
                    last_activated_at="2026-12-07T10:01:00+00:00")


def _results(tmp_path: Path, nodes: list[dict[str, Any]]) -> Path:
    path = tmp_path / "run" / "results.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"config": {}, "rounds": [], "summary": {}, "privacy": None,
                                "nodes": nodes}))
    return path.parent


def test_key_files_map_to_the_bytes_flower_registers(certs: Path) -> None:
    # Execute
    names = key_names(certs)
    # Assert: every supernode-<i>.pub, keyed as the SuperLink stores it; nothing else
    assert sorted(names.values(), key=lambda n: int(n.split("-")[1])) == [
        f"supernode-{i}" for i in range(11)]
    assert names[try_load_public_key(certs / "supernode-7.pub")] == "supernode-7"


def test_nodes_are_joined_with_their_key_and_the_run(certs: Path, tmp_path: Path) -> None:
    # Prepare: the SuperLink knows four keys (one unregistered, one never online); the
    # run knew node 11 (accepted), 12 (excluded: an old version) and 99 (gone since)
    infos = [_info(11, "online", certs / "supernode-10.pub"),
             _info(12, "online", certs / "supernode-2.pub"),
             _info(13, "registered", certs / "supernode-1.pub"),
             _info(14, "unregistered", certs / "supernode-0.pub"),
             _info(15, "offline", None)]
    run = _results(tmp_path, [
        {"node_id": 11, "partition": None, "version": "0.2.0", "excluded": None,
         "last_round": 5, "outcome": "accepted", "answered": 5},
        {"node_id": 12, "partition": None, "version": "0.1.9", "last_round": 0,
         "excluded": "start-up query: the node speaks message format 1 (flowerpress 0.1.9)",
         "outcome": None, "answered": 0},
        {"node_id": 99, "version": "0.2.0", "last_round": 2, "outcome": "timed out",
         "answered": 1}])
    # Execute
    rows = join_devices(nodes_from_info(infos), key_names(certs), run_nodes(run))
    # Assert: ordered by key (supernode-10 after supernode-2), unregistered left out
    assert [(r.node_id, r.key, r.status) for r in rows] == [
        (13, "supernode-1", "registered"), (12, "supernode-2", "online"),
        (11, "supernode-10", "online"), (15, None, "offline"), (99, None, "unknown")]
    by_id = {r.node_id: r for r in rows}
    assert (by_id[11].version, by_id[11].last_round, by_id[11].outcome,
            by_id[11].answered) == ("0.2.0", 5, "accepted", 5)
    assert by_id[12].excluded is not None and "message format 1" in by_id[12].excluded
    assert (by_id[99].last_round, by_id[99].outcome, by_id[99].answered) == (2, "timed out", 1)
    assert by_id[13].version is None and by_id[13].last_round is None
    table = render_table(rows).splitlines()
    assert table[0].split() == ["node", "id", "key", "status", "version", "partition", "last",
                                "round", "outcome", "answered"]
    assert "excluded: start-up query: the node speaks message format" in table[2]
    # --all shows the unregistered key too
    everything = join_devices(nodes_from_info(infos), key_names(certs), show_all=True)
    assert [r.key for r in everything if r.status == "unregistered"] == ["supernode-0"]


def test_devices_prints_a_table_or_json(certs: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: the SuperLink's answer (Flower's Control API) stands in for a real one
    pub = certs / "supernode-0.pub"
    monkeypatch.setattr(devices, "list_nodes", lambda connection: [
        FlowerNode(7, "online", try_load_public_key(pub))])
    run = _results(tmp_path, [{"node_id": 7, "version": "0.2.0", "last_round": 3,
                               "outcome": "rejected: num-examples 0 < 1", "answered": 3}])
    # Execute
    code = cli_main(["devices", "--certs", str(certs), "--run", str(run / "results.json")])
    table = capsys.readouterr().out
    json_code = cli_main(["devices", "--certs", str(certs), "--run", str(run), "--json"])
    document = json.loads(capsys.readouterr().out)
    # Assert
    assert code == json_code == 0
    assert table.splitlines()[1].split()[:6] == ["7", "supernode-0", "online", "0.2.0", "-",
                                                 "3"]
    assert document == {"devices": [{
        "node_id": 7, "key": "supernode-0", "status": "online", "version": "0.2.0",
        "partition": None, "last_round": 3, "outcome": "rejected: num-examples 0 < 1",
        "answered": 3, "excluded": None, "name": None}]}


def test_a_superlink_that_cannot_be_reached_is_one_line_and_exit_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: a connection to a closed loopback port
    creds = generate_credentials(tmp_path / "certs", [], 1)
    home = tmp_path / "flwr"
    home.mkdir()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "down"\n\n[superlink.down]\naddress = "127.0.0.1:1"\n'
        f'root-certificates = "{creds.ca_cert}"\n')
    monkeypatch.setenv("FLWR_HOME", str(home))
    # Execute
    code = cli_main(["devices"])
    out, err = capsys.readouterr()
    # Assert
    assert code == 1 and out == ""
    assert len(err.splitlines()) == 1 and "SuperLink is unavailable" in err


@pytest.mark.parametrize("make", ["missing", "no-nodes"])
def test_bad_run_or_certs_arguments_exit_two(make: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    run = tmp_path / "run"
    if make == "no-nodes":  # a results.json from before the nodes block
        run.mkdir()
        (run / "results.json").write_text('{"rounds": []}')
    # Execute
    code = cli_main(["devices", "--run", str(run)])
    certs_code = cli_main(["devices", "--certs", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err.splitlines()
    # Assert
    assert code == certs_code == 2 and len(err) == 2
    assert err[0].startswith("flowerpress devices: --run ") and "not a directory" in err[1]
