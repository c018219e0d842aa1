"""flowerpress's ClientApp: train on local data, reply with the new weights.

The app itself only trains and evaluates; what happens to the reply on its
way out (privacy noise, compression) is done by Flower mods, so the same mods
work on any user ClientApp that replies with an ArrayRecord of weights.

Where the data comes from, in order:

1. ``data-path`` in the SuperNode's node config: a ``.npz`` file on the device.
2. ``dataset`` + ``partition-id`` + ``num-partitions`` in the node config
   (a demo device holding one partition of a bundled dataset).
3. ``partition-id`` + ``num-partitions`` in the node config (set by Flower's
   simulation engine) and ``dataset`` / ``partition`` / ``seed`` from the
   server's train config.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flowerpress.client.mods import compression_mod
from flowerpress.client.training import TrainSettings, evaluate, train
from flowerpress.privacy import dp_mod
from flowerpress.simulations import data as datasets
from flowerpress.simulations.models import build_model, get_weights, set_weights

log = logging.getLogger(__name__)

Scalar = bool | int | float | str


def partition_of(context: Context) -> tuple[int, int]:
    """This node's ``(partition-id, num-partitions)``, or ``(-1, 0)`` if unset."""
    pid = context.node_config.get("partition-id")
    n = context.node_config.get("num-partitions")
    if isinstance(pid, int) and isinstance(n, int):
        return pid, n
    return -1, 0


def load_local_data(context: Context, config: Mapping[str, Scalar]) -> datasets.Split:
    """The training data this node holds (see the module docstring for the order)."""
    node = context.node_config
    path = node.get("data-path")
    if isinstance(path, str) and path:
        from flowerpress.deploy.data import load_device_data

        x, y = load_device_data(node)
        return datasets.Split(np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.int64))
    pid, n = partition_of(context)
    if n == 0:
        raise datasets.DataError(
            "node config has neither data-path nor partition-id/num-partitions; "
            "expected data-path=FILE.npz or partition-id=I num-partitions=N"
        )
    dataset = str(node.get("dataset", config["dataset"]))
    return datasets.load_partition(
        dataset, str(node.get("partition", config["partition"])), pid, n, int(config["seed"])
    )


def _model_for(config: Mapping[str, Scalar], context: Context,
               x_shape: tuple[int, ...]) -> torch.nn.Module:
    _, n = partition_of(context)
    dataset = str(context.node_config.get("dataset", config["dataset"]))
    classes = int(config.get("num-classes", 0)) or datasets.num_classes_of(
        dataset, int(config["seed"]), max(n, 1))
    return build_model(dataset, x_shape, classes, seed=int(config["seed"]),
                       kind=str(config.get("model", "auto")))


def train_config(msg: Message) -> dict[str, Scalar]:
    """The scalar entries of the message's ``config`` ConfigRecord."""
    record = msg.content.config_records.get("config")
    if record is None:
        raise ValueError("message has no ConfigRecord 'config'; expected the server's settings")
    return {k: v for k, v in record.items() if isinstance(v, bool | int | float | str)}


def received_weights(msg: Message) -> list[np.ndarray]:
    """The global weights the message carries (ArrayRecord ``arrays``), as float32."""
    record = msg.content.array_records.get("arrays")
    if record is None:
        raise ValueError("message has no ArrayRecord 'arrays'; expected the global model")
    return [np.asarray(a, dtype=np.float32) for a in record.to_numpy_ndarrays()]


def _generator(*parts: int) -> torch.Generator:
    """A torch generator seeded from a tuple of integers (seed, partition, round)."""
    state = np.random.SeedSequence([abs(p) for p in parts]).generate_state(2, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


# Outer to inner: the compression mod decodes the broadcast first and encodes
# last, so the update is clipped and noised before it is compressed.
app = ClientApp(mods=[compression_mod, dp_mod])


@app.query()
def hello(msg: Message, context: Context) -> Message:
    """Tell the server which partition this node holds (for reproducible sampling)."""
    pid, n = partition_of(context)
    return Message(RecordDict({"info": ConfigRecord({"partition-id": pid, "num-partitions": n})}),
                   reply_to=msg)


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    """Train the received global model on local data for one round."""
    torch.set_num_threads(1)  # simulated clients share the machine's cores
    config = train_config(msg)
    split = load_local_data(context, config)
    received = received_weights(msg)
    model = _model_for(config, context, tuple(split.x.shape[1:]))
    set_weights(model, received)
    settings = TrainSettings(
        local_epochs=int(config["local-epochs"]),
        batch_size=int(config["batch-size"]),
        lr=float(config["lr"]),
        proximal_mu=float(config.get("proximal-mu", 0.0)),
    )
    pid, n = partition_of(context)
    round_ = int(config.get("server-round", 0))
    loss = train(model, split.x, split.y, settings,
                 generator=_generator(int(config["seed"]), pid, round_))
    weights = get_weights(model)
    attack_spec = str(config.get("attack", "none"))
    if attack_spec != "none" and n > 0:
        from flowerpress.simulations.attacks import parse_attack

        attack = parse_attack(attack_spec)
        if attack is not None and attack.is_malicious(pid, n):
            rng = np.random.default_rng([int(config["seed"]), pid, round_, 7])
            delta = [w - g for w, g in zip(weights, received, strict=True)]
            delta = attack.apply(delta, rng=rng)
            weights = [(g + d).astype(np.float32) for g, d in zip(received, delta, strict=True)]
    content = RecordDict({
        "arrays": ArrayRecord(weights),
        "metrics": MetricRecord({"num-examples": len(split), "train-loss": loss}),
    })
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on local data."""
    torch.set_num_threads(1)
    config = train_config(msg)
    split = load_local_data(context, config)
    model = _model_for(config, context, tuple(split.x.shape[1:]))
    set_weights(model, received_weights(msg))
    res = evaluate(model, split.x, split.y)
    metrics = MetricRecord({"num-examples": res.num_examples, "eval-loss": res.loss,
                            "eval-acc": res.accuracy})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
