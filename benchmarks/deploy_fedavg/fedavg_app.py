"""Vanilla Flower FedAvg (ServerApp + ClientApp) on the same model and data as flowerpress.

The baseline of ``benchmarks/deploy_latency.py`` and ``benchmarks/clientapp_cost.py``,
written the way Flower's ``quickstart-pytorch`` example is: the ClientApp builds the
torch model, loads the received ``state_dict``, loads the node's data, trains and
replies with the new ``state_dict`` and ``num-examples``. Model, data and training are
flowerpress's bundled ``digits`` task's, so the two apps do the same work:

* model: the MLP ``Flatten -> Linear(in_features, 64) -> ReLU -> Linear(64, classes)``
  (flowerpress's ``model=auto`` for 64 features, the same ``state_dict`` keys);
* data: the node config's ``data-path`` (an ``.npz`` with ``x`` and ``y``, the device
  data format of ``flowerpress.deploy.data``), read with ``np.load`` on every message,
  as a vanilla app does;
* training: ``local-epochs`` passes of mini-batch SGD (``batch-size``, ``lr``) with
  cross-entropy, batches shuffled by a seeded ``torch.randperm`` -- flowerpress's loop.

With ``server-loop = "flwr"`` the server runs ``flwr.serverapp.strategy.FedAvg.start``
unchanged. With ``server-loop = "flowerpress"`` the same weighted mean is driven by
flowerpress's reply polling (``flowerpress.server.loop.poll_replies``), so the
difference between the two is the server loop's waiting alone.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from torch import nn

client_app = ClientApp()
server_app = ServerApp()


class Net(nn.Module):
    """flowerpress's MLP for flat features (``flowerpress.tasks.models.MLP``)."""

    def __init__(self, in_features: int = 64, num_classes: int = 10, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(),
                                 nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


def load_data(node_config: dict[str, object]) -> tuple[torch.Tensor, torch.Tensor]:
    """The node's ``data-path`` arrays as tensors (float32 features, int64 labels)."""
    with np.load(str(node_config["data-path"]), allow_pickle=False) as archive:
        x = np.asarray(archive["x"], dtype=np.float32)
        y = np.asarray(archive["y"], dtype=np.int64)
    return torch.from_numpy(x), torch.from_numpy(y)


def train_fn(net: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int,
             batch_size: int, lr: float, seed: int) -> float:
    """Mini-batch SGD with cross-entropy; return the mean training loss."""
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    net.train()
    total, batches = 0.0, 0
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), batch_size):
            idx = order[start : start + batch_size]
            opt.zero_grad()
            loss = loss_fn(net(x[idx]), y[idx])
            loss.backward()
            opt.step()
            total += float(loss.detach())
            batches += 1
    return total / max(batches, 1)


def _net(cfg: dict[str, object]) -> Net:
    return Net(int(str(cfg.get("in-features", 64))), int(str(cfg.get("num-classes", 10))))


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received model on the node's data for ``local-epochs``."""
    torch.set_num_threads(1)  # as flowerpress's task: devices share their cores
    cfg = dict(context.run_config)
    net = _net(cfg)
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = load_data(dict(context.node_config))
    loss = train_fn(net, x, y, epochs=int(str(cfg.get("local-epochs", 1))),
                    batch_size=int(str(cfg.get("batch-size", 16))),
                    lr=float(str(cfg.get("lr", 0.1))),
                    seed=int(context.node_id) % (2**31) + int(str(msg.metadata.group_id or 0)))
    content = RecordDict({
        "arrays": ArrayRecord(net.state_dict()),
        "metrics": MetricRecord({"train_loss": loss, "num-examples": len(y)}),
    })  # fmt: skip
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
    keys = list(initial.keys())
    stamps: list[float] = []
    for server_round in range(1, rounds + 1):
        record = ArrayRecord(dict(zip(keys, (torch.from_numpy(w) for w in weights),
                                      strict=True)))
        msgs = [
            Message(RecordDict({"arrays": record}), dst_node_id=node,
                    message_type=MessageType.TRAIN, group_id=str(server_round))
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
    cfg = dict(context.run_config)
    rounds = int(str(cfg["rounds"]))
    min_nodes = int(str(cfg["min-nodes"]))
    torch.manual_seed(int(str(cfg.get("seed", 0))))
    initial = ArrayRecord(_net(cfg).state_dict())
    start = time.monotonic()
    timeout = float(str(cfg["round-timeout"]))
    if cfg["server-loop"] == "flowerpress":
        stamps = _flowerpress_loop(grid, initial, rounds, min_nodes, timeout)
    else:
        stamps = _flwr_fedavg(grid, initial, rounds, min_nodes, timeout)
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
