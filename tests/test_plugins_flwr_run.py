"""Plug-ins travel: short names from a plug-in module on Flower's simulation engine.

``flwr run`` of this project (the device ClientApp, ``flowerpress.client.app:app``)
on a private simulation SuperLink: Flower loads the ClientApp once and ships it
to Ray actors, where no user module has run. With ``plugins = "tiny_plugin"``
the server and every node import ``tests/plugins/tiny_plugin.py`` first, so its
codec (upload and download), strategy and task are found by their short names.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from flowerpress.simulations.runner import SimulationLink

REPO = Path(__file__).resolve().parents[1]
PLUGINS = Path(__file__).resolve().parent / "plugins"


@pytest.mark.timeout(300, method="signal")
def test_plugin_names_work_under_flwr_run(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: the plug-in importable in every process Flower starts (not in this one)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(PLUGINS), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    out = tmp_path / "out"
    run_config: dict[str, bool | int | float | str] = {
        "plugins": "tiny_plugin", "task": "blobs", "strategy": "plain-mean",
        "compression": "half+zstd", "download-compression": "half", "lr": 0.2,
        "num-clients": 3, "clients-per-round": 3, "rounds": 2, "round-timeout": 60.0,
        "out-dir": str(out)}
    # Execute
    with SimulationLink(tmp_path) as link:
        run = link.run(REPO, run_config, num_supernodes=3)
        deadline = time.monotonic() + 240
        while run.alive() and time.monotonic() < deadline:
            time.sleep(0.5)
        log = run.tail(40)
    # Assert: both rounds, every node's reply decoded with the plug-in's codec
    assert (out / "results.json").exists(), log
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["summary"]["rounds_completed"] == 2, log
    rows = results["rounds"]
    assert [(r["clients"], r["rejected"]) for r in rows] == [(3, 0), (3, 0)], log
    assert rows[-1]["accuracy"] > 0.8
    # ...and results.json records what ran: lr went to the task, batch-size did not
    assert results["config"]["strategy"] == "plain-mean"
    assert results["config"]["lr"] == 0.2 and "batch-size" not in results["config"]
    assert results["summary"]["task"] == {"name": "blobs", "run_config_keys": ["lr"],
                               "hyperparameters": {"local-epochs": 1, "batch-size": 32,
                                                   "lr": 0.2, "seed": 0}}
