"""Vanilla Flower on flowerpress's workload: ``flwr.serverapp.strategy.FedAvg.start``.

The ClientApp is flowerpress's own (the task from the run config) without its mods, so
both apps do identical client work; only the server side differs (Flower's
``Strategy.start`` with ``Grid.send_and_receive`` vs flowerpress's loop).
"""

from __future__ import annotations

import json
import time
from itertools import pairwise
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from flowerpress.client.app import client_app
from flowerpress.tasks import data
from flowerpress.tasks.models import build_model, get_weights, set_weights
from flowerpress.tasks.training import evaluate

# flowerpress's task and train handler without its mods: the same client work.
client = client_app(mods=False)

server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    n, cpr, seed = int(cfg["num-clients"]), int(cfg["clients-per-round"]), int(cfg["seed"])
    dataset = str(cfg["dataset"])
    test = data.load_test(dataset, seed, n)
    classes = data.num_classes_of(dataset, seed, n)
    model = build_model(dataset, tuple(test.x.shape[1:]), classes, seed=seed)
    stamps: list[float] = []
    accuracy: list[float] = []

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        set_weights(model, arrays.to_numpy_ndarrays())
        res = evaluate(model, test.x, test.y)
        stamps.append(time.monotonic())
        accuracy.append(res.accuracy)
        return MetricRecord({"accuracy": res.accuracy})

    strategy = FedAvg(fraction_train=cpr / n, fraction_evaluate=0.0, min_available_nodes=n,
                      min_train_nodes=cpr)
    train_config = ConfigRecord({k: cfg[k] for k in ("dataset", "partition", "local-epochs",
                                                      "batch-size", "lr", "seed")})
    train_config["num-classes"] = classes
    strategy.start(grid, ArrayRecord(get_weights(model)), num_rounds=int(cfg["rounds"]),
                   train_config=train_config, evaluate_fn=evaluate_fn)
    seconds = [b - a for a, b in pairwise(stamps)]
    out = Path(str(cfg["out-dir"]))
    out.mkdir(parents=True, exist_ok=True)
    (out / "vanilla.json").write_text(json.dumps({"seconds": seconds, "accuracy": accuracy[1:]}))
