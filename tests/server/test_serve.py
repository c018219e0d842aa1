"""The ServerApp's `serve` on an in-process grid: compression, download codecs, privacy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flowerpress.config import validate
from flowerpress.server.app import serve
from flowerpress.server.checkpoint import load_checkpoint
from flowerpress.simulations.app import app as client_app
from flowerpress.testing import InProcessGrid, modules_loaded, server_identity

BASE = {"dataset": "digits", "partition": "iid", "num-clients": 4, "clients-per-round": 4,
        "rounds": 2, "local-epochs": 1, "round-timeout": 5.0}


def _serve(out: Path | None = None, **overrides: Any) -> dict[str, Any]:
    config = validate({**BASE, **overrides})
    with server_identity():
        return serve(InProcessGrid(client_app, 4, run_config=config), config, out_dir=out)


def test_compressed_uploads_shrink_and_results_are_written(tmp_path: Path) -> None:
    # Execute
    plain = _serve()
    packed = _serve(tmp_path, compression="topk:0.05+q:8+ef+zstd")
    # Assert
    ratio = plain["summary"]["total_upload_bytes"] / packed["summary"]["total_upload_bytes"]
    assert ratio > 20
    assert packed["summary"]["final_accuracy"] > packed["summary"]["initial_accuracy"]
    assert (tmp_path / "results.json").exists() and (tmp_path / "report.png").exists()
    assert all(r["rejected"] == 0 and r["clients"] == 4 for r in packed["rounds"])


def test_rows_carry_the_devices_compute_counted_by_torch() -> None:
    # Prepare: what the four devices' training costs, counted by the task itself
    from flowerpress.tasks.registry import build_task, task_spec

    config = validate(BASE)
    task = build_task(task_spec(config), config)
    per_round = sum(task.train_flops(len(task.load_data({"partition-id": p,
                                                          "num-partitions": 4})))
                    or 0.0 for p in range(4))
    # Execute
    result = _serve(compression="q:8")
    # Assert: the FLOPs of the local epochs actually run, per round and running totals
    rows = result["rounds"]
    assert per_round > 0
    assert [r["device_flops"] for r in rows] == [pytest.approx(per_round, rel=1e-6)] * 2
    assert rows[-1]["cum_device_flops"] == pytest.approx(2 * per_round, rel=1e-6)
    assert all(r["device_seconds"] > 0 for r in rows)
    assert rows[1]["cum_device_seconds"] == pytest.approx(
        rows[0]["device_seconds"] + rows[1]["device_seconds"])
    assert result["summary"]["total_device_flops"] == rows[-1]["cum_device_flops"]
    assert result["summary"]["total_device_seconds"] == rows[-1]["cum_device_seconds"]


def test_download_compression_halves_the_broadcast() -> None:
    # Execute
    plain = _serve(rounds=1)
    half = _serve(rounds=1, **{"download-compression": "fp16"})
    # Assert
    ratio = plain["summary"]["total_download_bytes"] / half["summary"]["total_download_bytes"]
    assert 1.9 < ratio < 2.2  # float32 .npy arrays (with headers) vs packed fp16
    assert half["summary"]["final_accuracy"] > half["summary"]["initial_accuracy"]


def test_privacy_is_accounted_every_round(tmp_path: Path) -> None:
    # Execute
    result = _serve(tmp_path, dp="distributed:clip=1.0,noise=1.0", rounds=3)
    # Assert
    eps = [r["epsilon"] for r in result["rounds"]]
    assert all(e is not None and e > 0 for e in eps)
    assert eps == sorted(eps) and eps[0] < eps[-1]
    # devices report no compute under DP (it grows with the examples DP hides)
    assert all(r["device_flops"] is None and r["cum_device_seconds"] is None
               for r in result["rounds"])
    assert result["summary"]["total_device_flops"] is None
    assert result["privacy"]["mode"] == "distributed"
    assert result["privacy"]["clients_per_round"] == 4
    saved = load_checkpoint(tmp_path)
    assert saved is not None and saved.state.server_round == 3
    assert saved.state.privacy is not None and saved.state.privacy["epsilon"] == eps[-1]
    assert np.load(tmp_path / "model.npz")["arr_0"].dtype == np.float32


def test_max_epsilon_stops_before_the_round_that_would_exceed_it() -> None:
    # Prepare: epsilon after two and after three rounds
    dp = "local:clip=1.0,noise=2.0"
    eps = [r["epsilon"] for r in _serve(dp=dp, rounds=3)["rounds"]]
    budget = (eps[1] + eps[2]) / 2
    # Execute: a budget that allows two rounds but not three
    result = _serve(dp=dp, rounds=5, **{"max-epsilon": budget})
    # Assert
    assert len(result["rounds"]) == 2
    assert result["rounds"][-1]["epsilon"] <= budget
    assert "privacy budget" in result["summary"]["stopped"]


@pytest.mark.parametrize("spec", ["median", "fedadam:lr=0.01", "flwr:FedAvg"])
def test_other_strategies_run_through_serve(spec: str) -> None:
    result = _serve(strategy=spec, compression="q:8")
    assert result["summary"]["rounds_completed"] == 2
    assert all(r["clients"] == 4 for r in result["rounds"])


def test_a_run_without_dp_loads_no_accountant_scikit_learn_or_torch_dynamo(
        tmp_path: Path) -> None:
    # Prepare: a whole run (server and devices) in a fresh interpreter, DP off
    code = (
        "from flowerpress.config import validate\n"
        "from flowerpress.server.app import serve\n"
        "from flowerpress.simulations.app import app\n"
        "from flowerpress.testing import InProcessGrid, server_identity\n"
        f"config = validate({dict(BASE, rounds=1, compression='q:8')!r})\n"
        "with server_identity():\n"
        "    serve(InProcessGrid(app, 4, run_config=config), config, out_dir=None)\n")
    # Execute
    _, loaded = modules_loaded(code, ["dp_accounting", "sklearn", "torch._dynamo"],
                               cwd=tmp_path)
    # Assert: dp_accounting (with SciPy), scikit-learn and TorchDynamo would cost every
    # simulated server and device 1.6-2.2 CPU s and tens of MiB
    assert loaded == []


def test_the_servers_task_work_loads_neither_torch_dynamo_nor_scipy(tmp_path: Path) -> None:
    # Prepare: what the ServerApp does with the task (devices train, which loads SciPy)
    code = (
        "from flowerpress.config import validate\n"
        "from flowerpress.tasks.registry import build_task, task_spec\n"
        f"config = validate({dict(BASE)!r})\n"
        "task = build_task(task_spec(config), config)\n"
        "weights, central = task.initial_weights(), task.central_data()\n"
        "assert task.train_flops(1000) > 0 and task.evaluate(weights, central).accuracy >= 0\n")
    # Execute
    _, loaded = modules_loaded(code, ["torch._dynamo", "scipy"], cwd=tmp_path)
    # Assert: TorchDynamo alone is 75-80 MiB of the server's peak (docs/benchmarks.md, scale)
    assert loaded == []
