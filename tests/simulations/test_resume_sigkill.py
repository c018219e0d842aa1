"""SIGKILL the ServerApp on Flower's simulation engine mid-run, resume, finish the same run.

On ``flower-superlink --simulation --isolation subprocess`` the ServerApp runs
in the ``flwr-simulation`` process the SuperLink's SuperExec starts (the
ClientApps run in its Ray actors); killing it is a crash of the server. The
run is then resumed with ``flowerpress.simulations.runner.simulate(...,
resume=True)`` on a new SuperLink (new node ids: membership matches the nodes
by partition) and compared with an uninterrupted run of the same config.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from flowerpress.config import validate
from flowerpress.deploy.local import _descendants, _running
from flowerpress.server.app import serve
from flowerpress.server.checkpoint import load_checkpoint
from flowerpress.simulations.app import app as client_app
from flowerpress.simulations.runner import SimulationLink, simulate, write_app_dir
from flowerpress.testing import InProcessGrid, server_identity

ROUNDS = 10  # rounds after the first take ~0.25 s: 8 of them left after the kill point
CONFIG = {"dataset": "digits", "partition": "iid", "model": "logreg", "num-clients": 4,
          "clients-per-round": 4, "rounds": ROUNDS, "local-epochs": 1, "round-timeout": 60.0,
          "dp": "distributed:clip=1.0,noise=1.0,rng=seeded"}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _kill_serverapp_after_round(link: SimulationLink, out: Path, after: int,
                                timeout: float) -> tuple[int, list[int]]:
    """SIGKILL the process running the ServerApp once round ``after`` is checkpointed.

    Returns the killed pid and every descendant of the SuperLink seen at that moment.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        saved = load_checkpoint(out) if (out / "checkpoint.npz").exists() else None
        if saved is not None and saved.state.server_round >= after:
            break
        # Rounds after the first take ~0.25 s here: poll often (ROUNDS leaves ~2 s after round 2)
        time.sleep(0.05)
    else:
        raise AssertionError(f"round {after} was not checkpointed within {timeout:.0f} s")
    family = _descendants(link.superlink.pid)
    serverapps = [p for p in family if "flwr-simulation" in _cmdline(p)
                  or "flwr-serverapp" in _cmdline(p)]
    assert len(serverapps) == 1, [_cmdline(p) for p in family]
    os.kill(serverapps[0], signal.SIGKILL)
    return serverapps[0], family


def _uninterrupted() -> dict[str, Any]:
    config = validate(CONFIG)
    with server_identity():
        return serve(InProcessGrid(client_app, 4, run_config=config), config)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigkill_of_the_serverapp_then_resume_finishes_the_same_run(tmp_path: Path) -> None:
    # Prepare
    config = validate(CONFIG)
    out = tmp_path / "run"
    family: list[int] = []
    # Execute: start, kill the ServerApp process after round 2 is checkpointed
    with tempfile.TemporaryDirectory(prefix="flowerpress-kill-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            with SimulationLink(tmp) as link:
                link.run(write_app_dir(tmp / "app"), {**config, "out-dir": str(out)}, 4)
                killed, family = _kill_serverapp_after_round(link, out, 2, timeout=400)
                deadline = time.monotonic() + 10
                while _running(killed) and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert not _running(killed)
        finally:  # Ray's processes outlive a SIGKILLed driver: stop what we started
            for pid in family:
                if _running(pid):
                    os.kill(pid, signal.SIGKILL)
    saved = load_checkpoint(out)
    assert saved is not None
    killed_after = saved.state.server_round
    assert 2 <= killed_after < ROUNDS
    # rng=seeded keeps the runs comparable: epsilon is reported as not private
    # (null) with the nominal value the accounting gives, which must continue.
    spent = [r["nominal_epsilon"] for r in saved.state.rows]
    resumed = simulate(config, out, progress=False, timeout=600, resume=True)
    reference = _uninterrupted()
    # Assert: the planned rounds, once each; epsilon continues; accuracy as uninterrupted
    rows = resumed["rounds"]
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
    assert resumed["summary"]["resumed_after_rounds"] == [killed_after]
    assert all(r["epsilon"] is None for r in rows)
    eps = [r["nominal_epsilon"] for r in rows]
    assert eps[:killed_after] == spent
    assert eps == sorted(eps) and eps[killed_after] > spent[-1]
    assert eps == pytest.approx([r["nominal_epsilon"] for r in reference["rounds"]])
    assert all(r["clients"] == 4 for r in rows)
    final, expected = resumed["summary"]["final_accuracy"], reference["summary"]["final_accuracy"]
    assert abs(final - expected) <= 0.005, (final, expected)
