"""Cost of secure aggregation per round: message bytes and wall time, with and without dropouts.

For each cohort size (10, 50, 100 devices per round by default) one round runs
on :class:`flowerpress.testing.InProcessGrid` (the real ClientApp with its
mods; scikit-learn digits, IID, logistic regression: 650 parameters, padded to
1,024 rotated coordinates; ``--model mlp``: 4,810, padded to 8,192), four ways:

* ``plain``: flowerpress's ordinary round (``run_round``), float32 weights up;
* ``plain, 20% drop``: the same with a fifth of the cohort never answering;
* ``secagg``: ``run_round`` with ``secagg=on:threshold=0.7`` and
  ``bits`` (16 by default), no DP noise;
* ``secagg, 20% drop``: a fifth of the cohort vanishes after sharing keys and
  before sending its masked input (the costly case: the server recovers their
  mask keys and removes their pairwise masks).

Bytes are the serialized sizes (Flower's protobuf ``RecordDict``) of every
message in both directions, measured the same way for both modes, including
the global model broadcast. Wall time includes the in-process devices' local
training; with dropouts it also includes waiting ``--timeout`` seconds for the
replies that never come (once for ``plain``, once per stage that misses
replies for ``secagg``).

Usage::

    python benchmarks/secagg_cost.py [--sizes 10 50 100] [--bits 16] [--timeout 0.5]
        [--repeat 1] [--noise 0] [--model logreg|mlp]

Prints a markdown table.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Message
from flwr.common.serde import recorddict_to_proto

from flowerpress.client.app import client_app
from flowerpress.secagg import messages
from flowerpress.server.loop import LoopSettings, run_round
from flowerpress.strategies import build_strategy
from flowerpress.tasks.registry import build_task, task_spec
from flowerpress.testing import InProcessGrid, server_identity


@dataclass
class MeteredGrid(InProcessGrid):
    """Counts serialized bytes both ways; node ``n`` in ``vanish`` stops answering."""

    vanish: dict[int, str] = field(default_factory=dict)  # node -> first silent stage
    down: int = 0
    up: int = 0

    def push_messages(self, messages_: Iterable[Message]) -> Iterable[str]:
        pushed = list(messages_)
        self.down += sum(recorddict_to_proto(m.content).ByteSize() for m in pushed)
        ids = list(super().push_messages(pushed))
        for mid, msg in zip(ids, pushed, strict=True):
            cut = self.vanish.get(msg.metadata.dst_node_id)
            stage = messages.stage_of(msg) or "plain"
            if cut is not None and (cut == "plain" or (
                    stage in messages.STAGES and
                    messages.STAGES.index(stage) >= messages.STAGES.index(cut))):
                self._replies.pop(mid, None)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        out = list(super().pull_messages(message_ids))
        self.up += sum(recorddict_to_proto(m.content).ByteSize() for m in out
                       if not m.has_error())
        return out


def one_round(n: int, *, secagg: bool, drop: float, bits: int, timeout: float,
              noise: float, model: str = "logreg") -> dict[str, float]:
    """Bytes and seconds of one round with ``n`` devices."""
    run = {"dataset": "digits", "partition": "iid", "model": model, "local-epochs": 1,
           "batch-size": 32, "lr": 0.1, "seed": 0, "num-clients": n}
    task = build_task(task_spec(run), run)
    weights = [np.asarray(w, dtype=np.float32) for w in task.initial_weights()]
    nodes = list(range(1, n + 1))
    gone = nodes[:: max(1, round(1 / drop))][: int(drop * n)] if drop else []
    grid = MeteredGrid(client_app(task), num_nodes=n, run_config=run,
                       vanish={g: messages.MASK if secagg else "plain" for g in gone})
    spec = f"on:threshold=0.7,bits={bits},noise={noise}" if secagg else "off"
    settings = LoopSettings(rounds=1, clients_per_round=n, round_timeout=timeout,
                            min_replies=1, seed=0, node_wait_timeout=1.0, secagg=spec)
    play = run_round  # settings.secagg picks the secure sum
    with server_identity():
        started = time.perf_counter()
        outcome = play(grid, 1, nodes, weights, build_strategy("fedavg"), settings,
                       extra_config={}, rng=np.random.default_rng(0))
        seconds = time.perf_counter() - started
    return {"clients": outcome.valid, "timed_out": outcome.timed_out, "up": grid.up,
            "down": grid.down, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--bits", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=0.5)
    parser.add_argument("--repeat", type=int, default=1, help="rounds per cell (median time)")
    parser.add_argument("--noise", type=float, default=0.0, help="secagg noise multiplier")
    parser.add_argument("--model", default="logreg", help="logreg (650) or mlp (4,810)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    # Warm-up (imports, the dataset, torch's first step) is not measured.
    one_round(min(args.sizes), secagg=True, drop=0.0, bits=args.bits, timeout=args.timeout,
              noise=args.noise, model=args.model)
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print("| devices | mode | summed | up bytes/device | down bytes/device | total bytes | "
          "seconds |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for n in args.sizes:
        for secagg in (False, True):
            for drop in (0.0, 0.2):
                cells = [one_round(n, secagg=secagg, drop=drop, bits=args.bits,
                                   timeout=args.timeout, noise=args.noise, model=args.model)
                         for _ in range(args.repeat)]
                c = cells[0]
                secs = float(np.median([x["seconds"] for x in cells]))
                mode = ("secagg" if secagg else "plain") + (f", {drop:.0%} drop" if drop else "")
                print(f"| {n} | {mode} | {c['clients']:.0f} | {c['up'] / n:,.0f} | "
                      f"{c['down'] / n:,.0f} | {c['up'] + c['down']:,.0f} | {secs:.2f} |",
                      flush=True)
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
