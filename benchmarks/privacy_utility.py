"""Accuracy vs epsilon for distributed DP-FedAvg, with and without compression.

A setting where client-level DP can work: many clients and a small model. The 5,000
bundled MNIST digits split IID over 1,000 clients (default; ``--dataset synthetic``:
FedProx's Synthetic(0,0) over 1,000 devices), multinomial logistic regression,
100 clients sampled per round without replacement. For each target epsilon at
delta = 1e-5 the noise multiplier is calibrated with
``flowerpress.privacy.noise_multiplier_for`` and the run is accounted by
``ServerPrivacy``; every client update goes through the real ``dp_mod`` (called on
constructed Flower messages), then optionally through a compression pipeline
(post-processing: the guarantee is unchanged).

The federation is simulated in process (numpy training) so the sweep takes minutes on
a laptop; the lead's ``flowerpress simulate`` runs the same mod through Flower.

Usage::

    python benchmarks/privacy_utility.py [--dataset mnist] [--rounds 30] [--epsilons 1,4,8]
        [--compression none,q:8+ef] [--out runs/privacy_utility]

Prints a markdown table; writes ``results.json`` and ``privacy_utility.png`` to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict
from numpy.typing import NDArray

from flowerpress.compression import CodecState, decode, fp32_nbytes, parse
from flowerpress.privacy import ServerPrivacy, dp_mod, noise_multiplier_for, parse_dp
from flowerpress.simulations.data import load_pooled, synthetic

F32 = NDArray[np.float32]
CLASSES = 10


Data = tuple[list[tuple[F32, NDArray[np.int64]]], tuple[F32, NDArray[np.int64]]]


def make_data(num_clients: int, seed: int, dataset: str = "synthetic") -> Data:
    """Per-client training sets and a pooled 20% hold-out test set.

    ``synthetic``: FedProx Synthetic(0,0), one device per client (non-IID).
    ``mnist``: the 5,000 bundled MNIST digits split IID (4 training images per client
    at 1,000 clients: user-level DP for users with little data each).
    """
    if dataset == "mnist":
        pooled = load_pooled("mnist", seed, num_clients)
        xtr = pooled.train.x.reshape(len(pooled.train), -1)
        parts = np.array_split(np.arange(len(pooled.train)), num_clients)
        clients = [(xtr[p], pooled.train.y[p]) for p in parts]
        return clients, (pooled.test.x.reshape(len(pooled.test), -1), pooled.test.y)
    x, y, dev = synthetic(0.0, 0.0, num_devices=num_clients, rng=np.random.default_rng(seed))
    x = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-6)
    test = np.random.default_rng(seed + 1).random(len(y)) < 0.2
    clients = [(x[(dev == k) & ~test], y[(dev == k) & ~test]) for k in range(num_clients)]
    return clients, (x[test], y[test])


def softmax_grad(w: F32, b: F32, x: F32, y: NDArray[np.int64]) -> tuple[F32, F32]:
    logits = x @ w + b
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    p /= len(y)
    return (x.T @ p).astype(np.float32), p.sum(axis=0).astype(np.float32)


def local_train(
    weights: list[F32], data: tuple[F32, NDArray[np.int64]], *, lr: float, epochs: int,
    batch: int, rng: np.random.Generator,
) -> list[F32]:
    w, b = (a.copy() for a in weights)
    x, y = data
    for _ in range(epochs):
        order = rng.permutation(len(y))
        for start in range(0, len(y), batch):
            idx = order[start:start + batch]
            gw, gb = softmax_grad(w, b, x[idx], y[idx])
            w -= lr * gw
            b -= lr * gb
    return [w, b]


def accuracy(weights: Sequence[F32], test: tuple[F32, NDArray[np.int64]]) -> float:
    x, y = test
    return float(np.mean(np.argmax(x @ weights[0] + weights[1], axis=1) == y))


def _message(weights: list[F32], config: dict[str, Any], node: int) -> Message:
    meta = Metadata(run_id=1, message_id=f"m{node}", src_node_id=0, dst_node_id=node,
                    reply_to_message_id="", group_id=str(config["server-round"]),
                    created_at=time.time(), ttl=3600.0, message_type="train")
    content = RecordDict({"arrays": ArrayRecord(weights), "config": ConfigRecord(config)})
    return Message(content=content, metadata=meta)


def run(
    *, epsilon: float | None, compression: str, rounds: int, num_clients: int,
    clients_per_round: int, clip: float, server_lr: float, seed: int,
    clients: list[tuple[F32, NDArray[np.int64]]], test: tuple[F32, NDArray[np.int64]],
) -> dict[str, Any]:
    """One federated run; returns its final numbers."""
    rng = np.random.default_rng([seed, 1])
    dim = clients[0][0].shape[1]
    weights: list[F32] = [np.zeros((dim, CLASSES), np.float32), np.zeros(CLASSES, np.float32)]
    size = sum(int(a.size) for a in weights)
    privacy = None
    z = 0.0
    if epsilon is not None:
        z = noise_multiplier_for(epsilon, delta=1e-5, rounds=rounds, num_clients=num_clients,
                                 clients_per_round=clients_per_round)
        settings = parse_dp(f"distributed:clip={clip},noise={z},rng=seeded")
        assert settings is not None
        privacy = ServerPrivacy(settings, num_clients=num_clients,
                                clients_per_round=clients_per_round, delta=1e-5,
                                max_epsilon=epsilon)
    pipe = None if compression == "none" else parse(compression)
    states: dict[int, CodecState] = {}
    upload = 0
    spent = 0.0
    started = time.perf_counter()
    for server_round in range(1, rounds + 1):
        if privacy is not None and not privacy.can_run_round()[0]:
            break
        sampled = sorted(rng.choice(num_clients, size=clients_per_round, replace=False).tolist())
        config: dict[str, Any] = {"server-round": server_round, "seed": seed,
                                  "clients-per-round": clients_per_round}
        if privacy is not None:
            config.update(privacy.train_config(server_round))
        total = [np.zeros_like(a, dtype=np.float64) for a in weights]
        metrics: list[dict[str, float | int]] = []
        for node in sampled:
            local_rng = np.random.default_rng([seed, node, server_round, 9])

            def train(msg: Message, ctx: Context, node: int = node,
                      local_rng: np.random.Generator = local_rng) -> Message:
                received = msg.content["arrays"].to_numpy_ndarrays()
                new = local_train(received, clients[node], lr=0.1, epochs=1, batch=32,
                                  rng=local_rng)
                return Message(RecordDict({"arrays": ArrayRecord(new), "metrics": MetricRecord(
                    {"num-examples": len(clients[node][1])})}), reply_to=msg)

            ctx = Context(run_id=1, node_id=node, state=RecordDict(), run_config={},
                          node_config={"partition-id": node, "num-partitions": num_clients})
            reply = dp_mod(_message(weights, config, node), ctx, train)
            out = reply.content["arrays"].to_numpy_ndarrays()
            delta = [o - g for o, g in zip(out, weights, strict=True)]
            if pipe is not None:
                payload, states[node] = pipe.encode(delta, states.get(node), rng=local_rng)
                upload += len(payload)
                delta = decode(payload, max_elements=size)
            else:
                upload += fp32_nbytes(delta)
            for t, d in zip(total, delta, strict=True):
                t += d
            metrics.append(dict(reply.content["metrics"]))
        # Uniform weights: the sensitivity analysis assumes an unweighted sum.
        weights = [(g + server_lr * t / clients_per_round).astype(np.float32)
                   for g, t in zip(weights, total, strict=True)]
        if privacy is not None:
            spent = privacy.end_round(sampled, metrics)
    return {
        "target_epsilon": epsilon, "compression": compression, "noise_multiplier": z,
        "epsilon": spent if privacy is not None else math.inf, "rounds": server_round,
        "accuracy": accuracy(weights, test), "upload_bytes": upload,
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=["synthetic", "mnist"], default="mnist")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--num-clients", type=int, default=1000)
    parser.add_argument("--clients-per-round", type=int, default=100)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--server-lr", type=float, default=1.0)
    parser.add_argument("--epsilons", default="1,4,8")
    parser.add_argument("--compression", default="none,q:8+ef")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/privacy_utility"))
    args = parser.parse_args()

    clients, test = make_data(args.num_clients, args.seed, args.dataset)
    targets: list[float | None] = [None, *(float(e) for e in args.epsilons.split(","))]
    rows = []
    print("| target eps | compression | z | eps spent | rounds | accuracy | upload MB | s |")
    print("|---|---|---|---|---|---|---|---|")
    for compression in args.compression.split(","):
        for target in targets:
            row = run(epsilon=target, compression=compression, rounds=args.rounds,
                      num_clients=args.num_clients, clients_per_round=args.clients_per_round,
                      clip=args.clip, server_lr=args.server_lr, seed=args.seed,
                      clients=clients, test=test)
            rows.append(row)
            print(f"| {'no DP' if target is None else target:} | {compression} | "
                  f"{row['noise_multiplier']:.3g} | {row['epsilon']:.3g} | {row['rounds']} | "
                  f"{row['accuracy']:.3f} | {row['upload_bytes'] / 1e6:.2f} | "
                  f"{row['seconds']} |", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    setup = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    (args.out / "results.json").write_text(json.dumps(
        {"setup": setup, "rows": rows}, indent=2, default=str))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for compression in args.compression.split(","):
        pts = [r for r in rows if r["compression"] == compression and r["target_epsilon"]]
        ax.plot([r["epsilon"] for r in pts], [r["accuracy"] for r in pts], "o-",
                label=compression)
        base = [r for r in rows if r["compression"] == compression and not r["target_epsilon"]]
        if base:
            ax.axhline(base[0]["accuracy"], ls="--", lw=0.8, color=ax.lines[-1].get_color())
    ax.set_xlabel("epsilon (delta = 1e-5)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"DP-FedAvg, {args.dataset}, {args.num_clients} clients")
    ax.legend(title="compression (dashed: no DP)")
    fig.tight_layout()
    fig.savefig(args.out / "privacy_utility.png", dpi=100)


if __name__ == "__main__":
    main()
