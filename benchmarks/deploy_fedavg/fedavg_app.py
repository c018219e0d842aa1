"""Vanilla Flower FedAvg baseline (ServerApp + ClientApp) for deploy_latency.py.

With ``server-loop = "flwr"`` the server runs ``flwr.serverapp.strategy.FedAvg.start``
unchanged; each client adds a small deterministic step to the received weights, so a
round's seconds are Flower's own messaging (including ``Grid.send_and_receive``'s
fixed 3 s sleep between pulls) plus the ClientApp process start.

With ``server-loop = "flowerpress"`` the same clients and the same weighted mean are
driven by flowerpress's reply polling (``flowerpress.server.loop.poll_replies``), so
the difference between the two is the server loop's waiting alone.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

client_app = ClientApp()
server_app = ServerApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Return the received weights moved by a tiny step, weighted by 10 examples."""
    arrays = msg.content["arrays"].to_numpy_ndarrays()
    seed = int(str(context.node_config.get("partition-id", 0)))
    rng = np.random.default_rng(seed)
    updated = [a + 0.01 * rng.standard_normal(a.shape).astype(a.dtype) for a in arrays]
    content = RecordDict(
        {"arrays": ArrayRecord(updated), "metrics": MetricRecord({"num-examples": 10})}
    )
    return Message(content=content, reply_to=msg)


def _flowerpress_loop(grid: Grid, initial: ArrayRecord, rounds: int, min_nodes: int,
                      timeout: float) -> list[float]:
    """FedAvg rounds whose replies are collected by flowerpress's adaptive poll."""
    from flowerpress.server.loop import poll_replies

    deadline = time.monotonic() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < min_nodes:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} of {min_nodes} nodes connected")
        time.sleep(0.2)
    weights = initial.to_numpy_ndarrays()
    stamps: list[float] = []
    for _ in range(rounds):
        msgs = [
            Message(RecordDict({"arrays": ArrayRecord(weights)}), dst_node_id=node,
                    message_type=MessageType.TRAIN)
            for node in nodes
        ]  # fmt: skip
        ids = list(grid.push_messages(msgs))
        replies = [r for r in poll_replies(grid, ids, timeout=timeout) if not r.has_error()]
        if len(replies) < min_nodes:
            raise RuntimeError(f"round got {len(replies)} of {min_nodes} replies")
        counts = [float(str(r.content["metrics"]["num-examples"])) for r in replies]
        updates = [r.content["arrays"].to_numpy_ndarrays() for r in replies]
        weights = [
            sum(c * u[i] for c, u in zip(counts, updates, strict=True)) / sum(counts)
            for i in range(len(weights))
        ]
        stamps.append(time.monotonic())
    return stamps


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """Run FedAvg for ``rounds`` rounds and record each round's wall time."""
    cfg = context.run_config
    rounds = int(cfg["rounds"])
    min_nodes = int(cfg["min-nodes"])
    num_params = int(cfg["num-params"])
    initial = ArrayRecord([np.zeros(num_params, dtype=np.float32)])
    start = time.monotonic()
    if cfg["server-loop"] == "flowerpress":
        stamps = _flowerpress_loop(grid, initial, rounds, min_nodes, float(cfg["round-timeout"]))
    else:
        stamps = _flwr_fedavg(grid, initial, rounds, min_nodes, float(cfg["round-timeout"]))
    seconds = [b - a for a, b in zip([start, *stamps[:-1]], stamps, strict=True)]
    out_dir = cfg.get("out-dir")
    if isinstance(out_dir, str) and out_dir:
        os.makedirs(out_dir, exist_ok=True)
        rows = [{"round": i + 1, "seconds": s} for i, s in enumerate(seconds)]
        with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as fh:
            json.dump({"rounds": rows}, fh)


def _flwr_fedavg(grid: Grid, initial: ArrayRecord, rounds: int, min_nodes: int,
                 timeout: float) -> list[float]:
    """Flower's own FedAvg.start, with a time stamp after each aggregation."""
    stamps: list[float] = []

    class TimedFedAvg(FedAvg):
        """FedAvg that stamps the time each round's aggregation finishes."""

        def aggregate_train(self, server_round, replies):  # type: ignore[no-untyped-def]
            result = super().aggregate_train(server_round, replies)
            stamps.append(time.monotonic())
            return result

    strategy = TimedFedAvg(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=min_nodes,
        min_available_nodes=min_nodes,
    )
    strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds, timeout=timeout)
    return stamps
