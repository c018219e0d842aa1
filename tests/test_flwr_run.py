"""`flwr run .` from the checkout, the way the README's "Running with `flwr run`" says.

Flower (>= 1.41) starts a managed local SuperLink on the first `flwr run` with
the default ``:local:`` connection (``flwr/cli/local_superlink.py``). The test
gives it its own ``FLWR_HOME`` and free loopback ports (``FLWR_LOCAL_*_PORT``),
keeps it from installing the app's dependencies into a fresh environment
(``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``: nothing is downloaded) and
sets the federation size with ``--federation-config num-supernodes=N``. That
SuperLink is detached and outlives `flwr run`; the test stops it by the process
id it finds (processes carrying this test's ``FLWR_HOME``) and checks that
nothing it started is left.

The same run shows that plug-ins travel (issue 21): ``plugins = "tiny_plugin"``
makes the server and every node import ``tests/plugins/tiny_plugin.py`` first
(Flower loads the ClientApp once and ships it to Ray actors, where no user
module has run), so its codec, strategy and task are found by their short names.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowerpress.deploy.local import free_port

REPO = Path(__file__).resolve().parents[1]
PLUGINS = Path(__file__).resolve().parent / "plugins"
NUM_CLIENTS, CLIENTS_PER_ROUND = 4, 2

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="finds processes in /proc")


def _started_by(home: Path) -> dict[int, str]:
    """Processes whose environment carries ``FLWR_HOME=home``: everything this test started."""
    needle = f"FLWR_HOME={home}".encode()
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:  # gone meanwhile, or not ours
            continue
        if needle in environ:
            found[int(entry.name)] = cmdline.decode(errors="replace").strip()
    return found


def _wait_until_gone(home: Path, timeout: float) -> dict[int, str]:
    deadline = time.monotonic() + timeout
    left = _started_by(home)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = _started_by(home)
    return left


def _stop_local_superlink(home: Path) -> None:
    """SIGTERM the managed SuperLink (it stops its SuperExec itself)."""
    for pid, cmdline in _started_by(home).items():
        if "flower-superlink" in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


@pytest.fixture
def flwr_home(tmp_path: Path) -> Iterator[Path]:
    home = tmp_path / "flwr-home"
    home.mkdir()
    yield home
    # Safety net on failure or timeout: whatever is still running is ours; kill it by id.
    _stop_local_superlink(home)
    for pid in _wait_until_gone(home, timeout=15.0):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _env(home: Path) -> dict[str, str]:
    bindir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "FLWR_HOME": str(home),
        # The managed SuperLink listens on 127.0.0.1 only; free ports, not 39091/39093.
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        # Use the installed environment: no `uv sync` into $FLWR_HOME/runtime-envs.
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        # Loopback only: no update check against PyPI, no telemetry.
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        # `flwr` starts `flower-superlink` by name: the one of this environment.
        "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
        # The plug-in importable in every process Flower starts (not in this one).
        "PYTHONPATH": os.pathsep.join(
            [str(PLUGINS), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
        # Ray's switch for multi-node clusters: off, its processes bind 127.0.0.1 only.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        # A private Ray instance: a bare ray.init() would join the last `ray start`
        # head on the machine (the matrix's, on the other worker) and queue there.
        "RAY_ADDRESS": "local",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        "PYTHONWARNINGS": "ignore",
    }


def test_pyproject_declares_no_legacy_federations() -> None:
    # `flwr run .` migrates a `[tool.flwr.federations]` table into $FLWR_HOME/config.toml
    # and comments it out in pyproject.toml (flwr/cli/config_migration.py): the
    # federation size goes on the command line instead.
    with (REPO / "pyproject.toml").open("rb") as handle:
        flwr = tomllib.load(handle)["tool"]["flwr"]

    assert "federations" not in flwr


@pytest.mark.timeout(420, method="signal")
def test_flwr_run_uses_installed_env_and_run_config_size(flwr_home: Path,
                                                         tmp_path: Path) -> None:
    # Prepare
    out = tmp_path / "out"
    run_config = (f"plugins='tiny_plugin' task='blobs' strategy='plain-mean' "
                  f"compression='half+zstd' download-compression='half' lr=0.2 "
                  f"num-clients={NUM_CLIENTS} clients-per-round={CLIENTS_PER_ROUND} "
                  f"rounds=2 out-dir='{out}'")
    env = _env(flwr_home)
    flwr = str(Path(sys.executable).parent / "flwr")

    # Execute: the README's command, tiny, with a user's plug-in module
    proc = subprocess.run(
        [flwr, "run", ".", "--stream", "--federation-config", f"num-supernodes={NUM_CLIENTS}",
         "--run-config", run_config],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=360)
    log = proc.stdout + proc.stderr
    started = _started_by(flwr_home)
    _stop_local_superlink(flwr_home)
    left = _wait_until_gone(flwr_home, timeout=20.0)

    # Assert: the run finished on a federation of num-clients nodes...
    assert proc.returncode == 0, log[-3000:]
    assert f"({NUM_CLIENTS} simulated SuperNodes)" in log, log[-3000:]
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["config"]["num-clients"] == NUM_CLIENTS
    rows = results["rounds"]
    # ...every round, every node's reply decoded with the plug-in's codec...
    assert [(r["clients"], r["rejected"]) for r in rows] == [(CLIENTS_PER_ROUND, 0)] * 2, log
    assert rows[-1]["accuracy"] > 0.8
    # ...results.json records what ran: lr went to the task, batch-size did not...
    assert results["config"]["strategy"] == "plain-mean"
    assert results["config"]["lr"] == 0.2 and "batch-size" not in results["config"]
    assert results["summary"]["task"] == {"name": "blobs", "run_config_keys": ["lr"],
                               "hyperparameters": {"local-epochs": 1, "batch-size": 32,
                                                   "lr": 0.2, "seed": 0}}
    # ...in the installed environment: the SuperLink's SuperExec was not told to install
    # (flwr/superlink/cli/flower_superlink.py) and no $FLWR_HOME/runtime-envs/<run> exists.
    superexec = [cmd for cmd in started.values() if "flower-superexec" in cmd]
    assert superexec, started
    assert all("--allow-runtime-dependency-installation" not in cmd for cmd in superexec)
    assert not (flwr_home / "runtime-envs").exists()
    # ...and what `flwr run` left running was the local SuperLink, now stopped.
    assert any("flower-superlink" in cmd for cmd in started.values()), started
    assert not left, f"still running after SIGTERM to the local SuperLink: {left}"
