"""Vanilla Flower's ServerApp for ``benchmarks/scale.py``: ``flwr.serverapp.strategy.FedAvg``.

Flower's own FedAvg through ``Strategy.start`` (Message API, ``Grid.send_and_receive``,
Flower's sampling and aggregation), with flowerpress's task as the user's code: the
initial model and the central evaluation after every round, as flowerpress's ServerApp
does. The App's ClientApp is flowerpress's simulation ClientApp
(``flowerpress.simulations.app:app``) with ``compression = "none"``: its reply carries
the local weights in ArrayRecord ``arrays`` and ``num-examples`` in MetricRecord
``metrics``, which Flower's FedAvg aggregates as it is. Both apps thus give every
client the same work; only the server side differs.

Writes ``OUT/vanilla.json``: wall-clock stamps (``time.time()``) of the ServerApp's
start and of the end of every round's central evaluation, and the accuracies.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from flowerpress import protocol
from flowerpress.config import SCHEMA, validate
from flowerpress.tasks.registry import build_task, task_spec

server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    """Run Flower's FedAvg for the run config's rounds; write the stamps."""
    started = time.time()
    config = validate({k: v for k, v in context.run_config.items() if k in SCHEMA},
                      strict=False)
    n, cpr = int(config["num-clients"]), int(config["clients-per-round"])
    task = build_task(task_spec(config), config)
    central = task.central_data()
    stamps: list[float] = []
    accuracy: list[float | None] = []

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        res = task.evaluate(arrays.to_numpy_ndarrays(), central)
        stamps.append(time.time())
        accuracy.append(res.accuracy)
        return MetricRecord({"accuracy": float(res.accuracy or 0.0)})

    # Wait for the whole federation, as flowerpress's ServerApp does before round 1.
    strategy = FedAvg(fraction_train=cpr / n, fraction_evaluate=0.0, min_available_nodes=n,
                      min_train_nodes=cpr)
    # What flowerpress's loop tells a client besides the round Flower adds: the
    # root seed (per-client training streams) and the upload codec.
    train_config = ConfigRecord({protocol.SEED: int(config["seed"]),
                                 protocol.COMPRESSION: "none"})
    strategy.start(grid, ArrayRecord(task.initial_weights()), num_rounds=int(config["rounds"]),
                   timeout=float(config["round-timeout"]), train_config=train_config,
                   evaluate_fn=evaluate_fn)
    out = Path(str(config["out-dir"]))
    out.mkdir(parents=True, exist_ok=True)
    (out / "vanilla.json").write_text(json.dumps(
        {"started": started, "stamps": stamps, "accuracy": accuracy}), encoding="utf-8")
