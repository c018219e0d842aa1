"""Federated pruning against dense FedAvg: accuracy, bytes and the int8 artifact, per seed.

Issue 23's goal: 90% of the weights pruned (``prune=magnitude:sparsity=0.9,start=5,
end=20``, the cubic schedule of Zhu and Gupta 2018) with test accuracy at round 30
within 1 point of dense FedAvg (median over seeds), and the exported int8 sparse
artifact at least 10x smaller than the float32 state.

The federation of accuracy_vs_bytes.py (``--dataset`` mnist: the 5,000 bundled
digits, ``dirichlet:0.5`` over 50 clients, 10 sampled per round, the default
model and local training); both runs of a seed share everything but ``prune``.
Runs use the ServerApp's loop (:func:`flowerpress.server.app.serve`) and the real
ClientApp with its mods on :class:`flowerpress.testing.InProcessGrid` (Flower
Messages, no simulation engine: cheap on a loaded machine). Each run's model is
exported with ``flowerpress export --quantize int8`` (onnxruntime); the table
gives the artifact's size and its zstd-compressed size (the sidecar's
``compressed_artifact_bytes``) against the float32 state.

Usage::

    python benchmarks/pruning.py [--dataset mnist|digits] [--rounds 30] [--seeds 0,1,2]
        [--prune magnitude:sparsity=0.9,start=5,end=20] [--out runs/pruning] [--reuse]

Prints markdown tables (per seed, then median and worst over seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

BASE_CONFIG: dict[str, Any] = {
    "partition": "dirichlet:0.5",
    "num-clients": 50,
    "clients-per-round": 10,
    "overwrite": True,
}


def run(config: Mapping[str, Any], out_dir: Path) -> dict[str, Any]:
    """One run through ``serve`` on the in-process grid; its results.json document."""
    from flowerpress.config import validate
    from flowerpress.server.app import serve
    from flowerpress.simulations.app import app as client_app
    from flowerpress.testing import InProcessGrid, server_identity

    checked = validate(dict(config))

    def progress(row: Mapping[str, Any]) -> None:
        print(f"    round {row['round']:>3} acc {row['accuracy']:.4f} "
              f"sparsity {row.get('sparsity', 0.0):.3f} "
              f"upload {row['upload_payload_bytes']:>9} B", flush=True)

    with server_identity():
        return serve(InProcessGrid(client_app, int(checked["num-clients"]),
                                   run_config=checked), checked, out_dir=out_dir,
                     on_round=progress)


def export(out_dir: Path) -> dict[str, Any]:
    """The int8 ONNX artifact of a run's model; its sidecar."""
    from flowerpress.export import ExportRequest, export_run

    return export_run(ExportRequest(out_dir, out_dir / "model.int8.onnx", quantize="int8",
                                    latency_examples=50))


def measure(label: str, config: Mapping[str, Any], out_dir: Path, *, reuse: bool
            ) -> dict[str, Any]:
    """Run (or reuse) and export one configuration; the numbers of one table row."""
    saved = out_dir / "measure.json"
    if reuse and saved.exists():
        print(f"== {label}: reused {saved}", flush=True)
        loaded: dict[str, Any] = json.loads(saved.read_text())
        return loaded
    print(f"== {label}", flush=True)
    start = time.monotonic()
    doc = run(config, out_dir)
    seconds = time.monotonic() - start
    sidecar = export(out_dir)
    rows = doc["rounds"]
    out = {
        "label": label, "seed": int(config["seed"]),
        "accuracy": rows[-1]["accuracy"], "f1_macro": rows[-1]["f1_macro"],
        "sparsity": doc["summary"].get("sparsity", 0.0),
        "upload_payload_bytes": doc["summary"]["total_upload_payload_bytes"],
        "download_payload_bytes": doc["summary"]["total_download_payload_bytes"],
        "upload_bytes": doc["summary"]["total_upload_bytes"],
        "download_bytes": doc["summary"]["total_download_bytes"],
        "float32_state_bytes": sidecar["float32_state_bytes"],
        "int8_bytes": sidecar["artifact_bytes"],
        "int8_zstd_bytes": sidecar["compressed_artifact_bytes"],
        "int8_accuracy": sidecar["accuracy"]["artifact"],
        "seconds": round(seconds, 1),
    }
    saved.write_text(json.dumps(out, indent=1))
    return out


def _fmt_bytes(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def tables(pairs: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]], rounds: int) -> str:
    """Per-seed rows, then median and worst over seeds."""
    lines = [f"| seed | dense acc @{rounds} | pruned acc @{rounds} | diff (points) | sparsity "
             "| upload x dense | download x dense | int8 artifact | int8 + zstd | "
             "float32 / (int8 + zstd) | pruned int8 acc |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    diffs, ratios, ups, downs = [], [], [], []
    for dense, pruned in pairs:
        diff = 100 * (pruned["accuracy"] - dense["accuracy"])
        ratio = pruned["float32_state_bytes"] / pruned["int8_zstd_bytes"]
        up = pruned["upload_bytes"] / dense["upload_bytes"]
        down = pruned["download_bytes"] / dense["download_bytes"]
        diffs.append(diff)
        ratios.append(ratio)
        ups.append(up)
        downs.append(down)
        lines.append(
            f"| {dense['seed']} | {dense['accuracy']:.4f} | {pruned['accuracy']:.4f} | "
            f"{diff:+.2f} | {pruned['sparsity']:.3f} | {up:.3f} | {down:.3f} | "
            f"{_fmt_bytes(pruned['int8_bytes'])} (dense {_fmt_bytes(dense['int8_bytes'])}) | "
            f"{_fmt_bytes(pruned['int8_zstd_bytes'])} (dense "
            f"{_fmt_bytes(dense['int8_zstd_bytes'])}) | {ratio:.1f}x | "
            f"{pruned['int8_accuracy']:.4f} |")
    lines += ["", "| over seeds | accuracy diff (points) | float32 / (int8 + zstd) | "
              "upload x dense | download x dense |", "|---|---|---|---|---|",
              f"| median | {statistics.median(diffs):+.2f} | {statistics.median(ratios):.1f}x | "
              f"{statistics.median(ups):.3f} | {statistics.median(downs):.3f} |",
              f"| worst | {min(diffs):+.2f} | {min(ratios):.1f}x | {max(ups):.3f} | "
              f"{max(downs):.3f} |"]
    return "\n".join(lines)


def machine() -> str:
    """One line on the machine and its load."""
    load = os.getloadavg()
    return (f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
            f"{platform.python_version()}; load average {load[0]:.1f}, {load[1]:.1f}, "
            f"{load[2]:.1f} (shared with other jobs)")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dataset", default="mnist", choices=("mnist", "digits"))
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--prune", default="magnitude:sparsity=0.9,start=5,end=20")
    parser.add_argument("--out", type=Path, default=Path("runs/pruning"))
    parser.add_argument("--reuse", action="store_true")
    args = parser.parse_args(argv)
    print(machine(), flush=True)
    pairs = []
    for seed in (int(s) for s in args.seeds.split(",")):
        base = {**BASE_CONFIG, "dataset": args.dataset, "rounds": args.rounds, "seed": seed}
        dense = measure(f"dense seed {seed}", base, args.out / f"dense-{seed}",
                        reuse=args.reuse)
        pruned = measure(f"{args.prune} seed {seed}", {**base, "prune": args.prune},
                         args.out / f"pruned-{seed}", reuse=args.reuse)
        pairs.append((dense, pruned))
    print()
    print(f"{args.dataset}, {args.rounds} rounds, prune={args.prune}")
    print(tables(pairs, args.rounds))
    print()
    print(machine())


if __name__ == "__main__":
    main()
