"""Peak server memory: streaming aggregation of compressed updates vs Flower's FedAvg.

N client updates of a model with about 5M float32 parameters arrive as flowerpress
payloads (``--codec``, default ``q:8``). Two ways to aggregate them, each measured in its
own fresh child process so that the peak resident set size (``VmHWM``, the kernel's
high-water mark, cross-checked with ``getrusage(RUSAGE_SELF).ru_maxrss``) belongs to one
path only:

``streaming``
    flowerpress's server path: each reply Message (payload ArrayRecord + ``num-examples``)
    goes through ``flowerpress.protocol.validate_train_reply`` as it arrives, is folded
    into ``flowerpress.strategies.FedAvg`` with ``add``, and dropped. Memory is
    O(model + one payload).
``flower``
    Flower's built-in ``flwr.serverapp.strategy.FedAvg().aggregate_train`` on N decoded
    replies, built the way ``flowerpress.strategies.flwr_adapter`` builds them (an
    ArrayRecord of ``global + delta`` and a MetricRecord ``{"num-examples": w}``). Each
    payload is decoded and turned into its reply as it arrives; Flower then needs all N
    replies at once. Memory is O(N x model).

To keep the run short, ``--distinct`` different client deltas are encoded once (seeded)
and the N arrivals cycle through their payloads; every arrival is decoded afresh. Both
children compute the same average; the parent checks that the two results agree.

Usage::

    python benchmarks/server_memory.py [--clients 200] [--codec q:8] [--distinct 8]

Prints a markdown table: peak RSS, the part above the child's RSS before the first
reply (imports + global model + payloads), wall time, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

F32 = NDArray[np.float32]

#: Layer shapes of the synthetic model: 5,003,000 parameters (two dense layers + biases).
SHAPES: tuple[tuple[int, ...], ...] = ((2000, 2000), (2000,), (1000, 1000), (1000,))


def rss_kib(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line")


def make_inputs(codec: str, distinct: int, seed: int) -> tuple[list[F32], list[bytes]]:
    """The global model and ``distinct`` encoded client deltas (deterministic)."""
    from flowerpress.compression import parse

    rng = np.random.default_rng(seed)
    global_weights = [rng.standard_normal(s, dtype=np.float32) * 0.05 for s in SHAPES]
    pipeline = parse(codec)
    payloads = []
    for _ in range(distinct):
        delta = [rng.standard_normal(s, dtype=np.float32) * 0.01 for s in SHAPES]
        payload, _ = pipeline.encode(delta, None, rng=rng)
        payloads.append(payload)
    return global_weights, payloads


def arrivals(payloads: Sequence[bytes], clients: int) -> Iterator[tuple[int, bytes, float]]:
    """(client id, payload, num-examples) in arrival order."""
    for k in range(clients):
        yield k + 1, payloads[k % len(payloads)], float(10 + k % 7)


def reply_message(content: Any, client_id: int) -> Any:
    """A train reply from ``client_id`` carrying ``content`` (as a Flower node sends it)."""
    from flwr.app import Message, MessageType, RecordDict

    instruction = Message(RecordDict(), dst_node_id=client_id, message_type=MessageType.TRAIN)
    return Message(content, reply_to=instruction)


def run_streaming(global_weights: list[F32], payloads: Sequence[bytes], clients: int) -> list[F32]:
    from flwr.app import MetricRecord, RecordDict

    from flowerpress.compression.envelope import payload_record
    from flowerpress.protocol import validate_train_reply
    from flowerpress.strategies import ClientUpdate, FedAvg

    strategy = FedAvg()
    strategy.begin_round(1, global_weights)
    for client_id, payload, weight in arrivals(payloads, clients):
        content = RecordDict({"arrays": payload_record(payload),
                              "metrics": MetricRecord({"num-examples": weight})})
        checked = validate_train_reply(reply_message(content, client_id), global_weights)
        strategy.add(ClientUpdate(delta=checked.delta, weight=checked.weight,
                                  node_id=client_id))
        del content, checked
    return [np.asarray(a, dtype=np.float32) for a in strategy.result()]


def run_flower(global_weights: list[F32], payloads: Sequence[bytes], clients: int) -> list[F32]:
    from flwr.app import ArrayRecord, MetricRecord, RecordDict
    from flwr.serverapp.strategy import FedAvg

    from flowerpress.compression import decode

    max_elements = sum(int(g.size) for g in global_weights)
    replies = []
    for client_id, payload, weight in arrivals(payloads, clients):
        delta = decode(payload, max_elements=max_elements, max_tensors=len(global_weights))
        local = [g + np.asarray(d, dtype=np.float32)
                 for g, d in zip(global_weights, delta, strict=True)]
        content = RecordDict({"arrays": ArrayRecord(local),
                              "metrics": MetricRecord({"num-examples": weight})})
        replies.append(reply_message(content, client_id))
        del delta, local
    arrays, _ = FedAvg().aggregate_train(1, replies)
    assert arrays is not None
    return [np.asarray(a, dtype=np.float32) for a in arrays.to_numpy_ndarrays()]


def child(path: str, codec: str, clients: int, distinct: int, seed: int, out: Path) -> None:
    """Run one path and write its measurements (JSON) and result (npz) next to ``out``."""
    from flowerpress.testing import server_identity

    global_weights, payloads = make_inputs(codec, distinct, seed)
    before = rss_kib("VmRSS")
    start = time.perf_counter()
    with server_identity():
        result = (run_streaming if path == "streaming" else run_flower)(
            global_weights, payloads, clients)
    seconds = time.perf_counter() - start
    np.savez(out.with_suffix(".npz"), *result)
    out.write_text(json.dumps({
        "path": path,
        "hwm_kib": rss_kib("VmHWM"),
        "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "before_kib": before,
        "seconds": seconds,
        "payload_bytes": len(payloads[0]),
    }))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--codec", default="q:8")
    parser.add_argument("--distinct", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", choices=("streaming", "flower"), help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        child(args.child, args.codec, args.clients, args.distinct, args.seed, args.child_out)
        return

    params = sum(int(np.prod(s)) for s in SHAPES)
    results: dict[str, dict[str, Any]] = {}
    arrays: dict[str, list[F32]] = {}
    with tempfile.TemporaryDirectory(prefix="server-memory-") as tmp:
        for path in ("streaming", "flower"):
            out = Path(tmp) / f"{path}.json"
            cmd = [sys.executable, __file__, "--child", path, "--child-out", str(out),
                   "--clients", str(args.clients), "--codec", args.codec,
                   "--distinct", str(args.distinct), "--seed", str(args.seed)]
            print(f"running {path} ...", flush=True)
            subprocess.run(cmd, check=True)
            results[path] = json.loads(out.read_text())
            with np.load(out.with_suffix(".npz")) as npz:
                arrays[path] = [npz[k] for k in npz.files]
    diff = max(float(np.max(np.abs(a - b)))
               for a, b in zip(arrays["streaming"], arrays["flower"], strict=True))

    mib = 1024.0
    print()
    print(f"{args.clients} updates of a {params:,}-parameter model "
          f"({params * 4 / 1e6:.1f} MB fp32), codec `{args.codec}` "
          f"({results['streaming']['payload_bytes'] / 1e6:.2f} MB per payload)")
    print()
    print("| path | peak RSS (MiB) | above pre-round RSS (MiB) | ru_maxrss (MiB) | seconds |")
    print("|---|---:|---:|---:|---:|")
    for path, label in (("streaming", "flowerpress streaming FedAvg (decode + add per reply)"),
                        ("flower", "Flower `FedAvg.aggregate_train` on decoded replies")):
        r = results[path]
        print(f"| {label} | {r['hwm_kib'] / mib:,.0f} | "
              f"{(r['hwm_kib'] - r['before_kib']) / mib:,.0f} | {r['maxrss_kib'] / mib:,.0f} | "
              f"{r['seconds']:.1f} |")
    s, f = results["streaming"], results["flower"]
    above_s = max(1, s["hwm_kib"] - s["before_kib"])
    above_f = f["hwm_kib"] - f["before_kib"]
    print()
    print(f"peak RSS ratio (Flower / streaming): {f['hwm_kib'] / s['hwm_kib']:.1f}x; "
          f"above pre-round RSS: {above_f / above_s:.1f}x")
    print(f"max |streaming - flower| over the aggregated weights: {diff:.2e}")


if __name__ == "__main__":
    main()
