"""An existing Ray cluster (issue 22, item 5): ``--ray-address`` and ``RAY_ADDRESS``
reach the processes Flower's simulation engine starts; local runs keep Ray on loopback.

In process: the address's way from the command line to the SuperLink's
environment (where Flower's RayBackend calls ``ray.init()``, which reads
``RAY_ADDRESS``). A run on a real cluster takes a Ray head and a simulation,
more than a minute on the 2-core machine: ``benchmarks/ray_cluster.py``.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from flowerpress import cli
from flowerpress.config import ConfigError, validate
from flowerpress.deploy.local import TELEMETRY_ENV, DeploymentError, flower_environment, free_port
from flowerpress.simulations import runner

SINGLE = runner.RAY_SINGLE_NODE_ENV
TELEMETRY = TELEMETRY_ENV


@pytest.fixture
def listening() -> Iterator[str]:
    """``127.0.0.1:PORT`` of a socket that accepts connections (a stand-in head)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield f"127.0.0.1:{server.getsockname()[1]}"


def test_a_local_run_gets_a_private_ray_on_loopback() -> None:
    # RAY_ADDRESS=local: a private instance even where `ray start` left a cluster
    # (ray.init() would join the last one started on the machine)
    env = runner.ray_environment(None, {"PATH": "/bin"})
    assert env == {"PATH": "/bin", "RAY_ADDRESS": "local", SINGLE: "0", TELEMETRY: "0"}
    assert runner.ray_environment(None, {"RAY_ADDRESS": "local"})["RAY_ADDRESS"] == "local"
    assert runner.cluster_address("local", {}) is None
    assert runner.cluster_address(None, {"RAY_ADDRESS": "local"}) is None


def test_the_address_or_ray_address_selects_the_cluster() -> None:
    # the option wins over the variable; a cluster elsewhere keeps Ray's node address
    env = runner.ray_environment("10.1.2.3:6379", {"RAY_ADDRESS": "127.0.0.1:1"})
    assert env["RAY_ADDRESS"] == "10.1.2.3:6379" and SINGLE not in env
    env = runner.ray_environment(None, {"RAY_ADDRESS": "ray://head.lan:10001"})
    assert env["RAY_ADDRESS"] == "ray://head.lan:10001" and SINGLE not in env
    # a cluster on this machine: Ray must not dial the outward address instead
    env = runner.ray_environment("127.0.0.1:6390", {})
    assert env == {"RAY_ADDRESS": "127.0.0.1:6390", SINGLE: "0", TELEMETRY: "0"}
    assert runner.ray_environment("[::1]:6390", {})[SINGLE] == "0"
    # the user's own setting of Ray's switch stays
    assert runner.ray_environment(None, {SINGLE: "1"})[SINGLE] == "1"


def test_flowers_telemetry_is_off_in_what_a_run_starts_unless_the_user_set_it() -> None:
    # Flower posts each process's start and stop to telemetry.flower.ai by default
    assert runner.ray_environment(None, {})[TELEMETRY] == "0"
    assert runner.ray_environment(None, {TELEMETRY: "1"})[TELEMETRY] == "1"
    assert flower_environment({"A": "b"}) == {"A": "b", TELEMETRY: "0"}


def test_an_address_is_checked_before_anything_starts(listening: str) -> None:
    closed = f"127.0.0.1:{free_port()}"
    assert runner.check_ray_address(listening) == listening
    assert runner.check_ray_address("auto") == "auto"
    with pytest.raises(ConfigError, match=r"^--ray-address 'head' is not allowed; expected "):
        runner.check_ray_address("head")
    with pytest.raises(ConfigError) as info:
        runner.check_ray_address(closed)
    assert str(info.value).startswith(f"--ray-address {closed}: no Ray cluster answers there (")
    with pytest.raises(ConfigError, match=r"^RAY_ADDRESS 127\.0\.0\.1:"):
        runner.cluster_address(None, {"RAY_ADDRESS": closed})
    assert runner.cluster_address(None, {}) is None


def test_the_cli_refuses_an_unreachable_cluster_in_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    closed = f"127.0.0.1:{free_port()}"
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # Execute
    simulate = cli.main(["simulate", "--out", str(tmp_path / "a"), "--ray-address", closed])
    simulate_err = capsys.readouterr().err
    monkeypatch.setenv("RAY_ADDRESS", closed)
    sweep = cli.main(["sweep", str(tmp_path / "g.toml"), "--out", str(tmp_path / "b")])
    sweep_err = capsys.readouterr().err
    # Assert
    assert simulate == 2 and len(simulate_err.splitlines()) == 1
    assert simulate_err.startswith(f"flowerpress: error: --ray-address {closed}: no Ray cluster")
    assert sweep == 2 and sweep_err.startswith(f"flowerpress: error: RAY_ADDRESS {closed}: ")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_the_address_reaches_the_superlinks_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, listening: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: the SuperLink "starts" and records its environment, then fails
    seen: list[Mapping[str, str]] = []

    class _SuperLink:
        def __init__(self, log_path: Path) -> None:
            self.log_path = log_path

        def wait_for_output(self, needle: str, timeout: float) -> None:
            raise DeploymentError("stand-in")

        def stop(self) -> None:
            pass

    def start(name: str, args: list[str], log_path: Path, env: Mapping[str, str]) -> Any:
        seen.append(dict(env))
        log_path.write_text("stand-in\n")
        return _SuperLink(log_path)

    monkeypatch.setattr(runner.ManagedProcess, "start", staticmethod(start))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # Execute: from the command line, and a local run
    code = cli.main(["simulate", "--out", str(tmp_path / "a"), "--quiet",
                     "--ray-address", listening])
    with pytest.raises(runner.SimulationError, match="did not start"):
        runner.simulate(validate({}), tmp_path / "b", progress=False)
    # Assert
    assert code == 1 and "did not start" in capsys.readouterr().err
    assert seen[0]["RAY_ADDRESS"] == listening and seen[0][SINGLE] == "0"
    assert seen[1]["RAY_ADDRESS"] == "local" and seen[1][SINGLE] == "0"
