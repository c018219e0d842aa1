"""Accuracy against epsilon for distributed DP-FedAvg, with and without compression.

A setting where client-level DP can work: many clients and a small model. The 5,000
bundled MNIST digits (4,000 train rows, 1,000 held out) split ``iid`` over 1,000 clients
(4 images each), multinomial logistic regression (run-config ``model="logreg"``), 100
clients sampled per round without replacement, FedAvg with server learning rate 1.

Every run is the product path: flowerpress's ServerApp loop
(:func:`flowerpress.server.app.serve`: sampling, decoding, aggregation, the privacy
ledger ``ServerPrivacy`` and the round rows of results.json) and flowerpress's ClientApp
with its mods ``[compression_mod, dp_mod]`` (clip, noise, then compress). For each target
epsilon at delta = 1e-5 the noise multiplier is calibrated with
:func:`flowerpress.privacy.noise_multiplier_for` for the planned rounds, and
``max-epsilon`` is set to the target, so the server stops before it could overspend. With
DP on, clients report ``num-examples = 1`` (the mean is unweighted, as the sensitivity
analysis assumes).

Engines:

``inprocess`` (default)
    ``serve`` on :class:`flowerpress.testing.InProcessGrid`, a transport double that calls
    the real ClientApp (mods included) in this process with real Flower Messages.
``flower``
    :func:`flowerpress.simulations.runner.simulate`: a private simulation SuperLink and
    ``flwr run``; the ClientApps run in Flower's simulation engine. Much slower with
    1,000 nodes on a small machine.

Usage::

    python benchmarks/privacy_utility.py [--engine inprocess|flower] [--rounds 50]
        [--epsilons 1,4,8] [--compression none,q:8+ef,topk:0.1+q:8+ef+zstd] [--clip 0.3]
        [--lr 0.1] [--local-epochs 5] [--batch-size 4] [--out runs/privacy_utility]
        [--plot docs/img/privacy_utility.png] [--reuse]

Prints a markdown table; writes ``summary.json`` (and one ``results.json`` per run) to
``--out`` and the plot to ``--plot``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

DELTA = 1e-5

BASE_CONFIG: dict[str, Any] = {
    "dataset": "mnist",
    "model": "logreg",
    "partition": "iid",
    "num-clients": 1000,
    "clients-per-round": 100,
    "dp-delta": DELTA,
    "round-timeout": 600.0,
}


@dataclass(frozen=True)
class Row:
    """One run's line of the table."""

    target_epsilon: float | None  # None: no DP
    compression: str
    noise_multiplier: float  # 0 without DP
    epsilon: float | None  # spent after the last round, from results.json
    rounds: int  # rounds completed
    accuracy: float  # final test accuracy
    accuracy_last5: float  # mean test accuracy over the last 5 rounds (DP noise makes
    # the final round jumpy)
    sampling: str  # how the cohorts were drawn ("-" without DP)
    accountant: str  # which accountant produced the epsilon
    upload_mb: float  # payload bytes the server received, all rounds
    seconds: float


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def run_inprocess(config: Mapping[str, Any]) -> dict[str, Any]:
    """Run ``config`` through ``serve`` on the in-process grid; return results.json's content."""
    from flowerpress.client.app import app as client_app
    from flowerpress.server.app import serve
    from flowerpress.testing import InProcessGrid, server_identity

    def on_round(row: Mapping[str, Any]) -> None:
        eps = row["epsilon"]
        print(f"    round {row['round']:>3} acc {row['accuracy']:.4f} "
              f"eps {'-' if eps is None else f'{eps:.3f}'} "
              f"upload {row['upload_bytes']:>9} B {row['seconds']:.1f} s", flush=True)

    with server_identity():
        return serve(InProcessGrid(client_app, int(config["num-clients"]), run_config=config),
                     dict(config),
                     on_round=on_round)


def run_flower(config: Mapping[str, Any], out_dir: Path) -> dict[str, Any]:
    """Run ``config`` on Flower's simulation engine; return results.json's content."""
    from flowerpress.simulations.runner import simulate

    return simulate(dict(config), out_dir, progress=True, overwrite=True)  # a re-measurement


def markdown_table(rows: Sequence[Row]) -> str:
    lines = [
        "| target eps | achieved eps | noise multiplier z | sampling | accountant "
        "| compression | rounds | final accuracy | mean acc, last 5 rounds | upload MB "
        "| seconds |",
        "|---:|---:|---:|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        target = "no DP" if r.target_epsilon is None else f"{r.target_epsilon:g}"
        eps = "-" if r.epsilon is None else f"{r.epsilon:.3f}"
        z = "-" if r.target_epsilon is None else f"{r.noise_multiplier:.3f}"
        lines.append(f"| {target} | {eps} | {z} | {r.sampling} | {r.accountant} "
                     f"| `{r.compression}` | {r.rounds} "
                     f"| {r.accuracy:.4f} | {r.accuracy_last5:.4f} | {r.upload_mb:.2f} "
                     f"| {r.seconds:.0f} |")
    return "\n".join(lines)


def plot(rows: Sequence[Row], path: Path, *, title: str) -> None:
    """Final accuracy against achieved epsilon, one line per compression spec."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for spec in dict.fromkeys(r.compression for r in rows):
        dp = sorted((r for r in rows if r.compression == spec and r.epsilon is not None),
                    key=lambda r: r.epsilon or 0.0)
        (line,) = ax.plot([r.epsilon for r in dp], [r.accuracy for r in dp], "o-",
                          label=f"{spec}")
        for r in rows:
            if r.compression == spec and r.target_epsilon is None:
                ax.axhline(r.accuracy, ls="--", lw=0.9, color=line.get_color())
    ax.set_xlabel(f"epsilon spent (delta = {DELTA:g})")
    ax.set_ylabel("final test accuracy")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(title="upload compression (dashed: no DP)", fontsize=8, title_fontsize=8,
              loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--engine", choices=("inprocess", "flower"), default="inprocess")
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--epsilons", default="1,4,8",
                        help="target epsilons; 'none' in the list adds the no-DP baseline")
    parser.add_argument("--no-baseline", action="store_true", help="skip the no-DP runs")
    parser.add_argument("--compression", default="none,q:8+ef,topk:0.1+q:8+ef+zstd",
                        help="comma-separated upload specs (a spec has no commas)")
    parser.add_argument("--clip", type=float, default=0.3, help="L2 clip C of an update")
    parser.add_argument("--lr", type=float, default=0.1, help="client SGD learning rate")
    parser.add_argument("--local-epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--num-clients", type=int, default=1000)
    parser.add_argument("--clients-per-round", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/privacy_utility"))
    parser.add_argument("--plot", type=Path, default=Path("docs/img/privacy_utility.png"))
    parser.add_argument("--reuse", action="store_true",
                        help="load runs whose results.json already exists under --out")
    args = parser.parse_args(argv)

    from flowerpress.config import validate
    from flowerpress.privacy import noise_multiplier_for

    logging.getLogger("flowerpress").setLevel(logging.ERROR)
    n, m = args.num_clients, args.clients_per_round
    targets: list[float | None] = [] if args.no_baseline else [None]
    targets += [float(e) for e in args.epsilons.split(",") if e.strip()]
    specs = [s.strip() for s in args.compression.split(",") if s.strip()]
    common = {**BASE_CONFIG, "num-clients": n, "clients-per-round": m, "rounds": args.rounds,
              "lr": args.lr, "local-epochs": args.local_epochs, "batch-size": args.batch_size,
              "seed": args.seed}
    rows: list[Row] = []
    started = time.monotonic()
    for spec in specs:
        for target in targets:
            z = 0.0
            overrides: dict[str, Any] = {"compression": spec}
            if target is not None:
                z = noise_multiplier_for(target, delta=DELTA, rounds=args.rounds,
                                         num_clients=n, clients_per_round=m)
                # Secret noise (the devices' CSPRNG) and cohorts from the OS CSPRNG
                # (dp-sampling=fixed): the accounting's amplification holds. The
                # budget is checked against the worst case of min-replies replies,
                # so min-replies is the whole cohort (no dropouts in-process).
                overrides["dp"] = f"distributed:clip={args.clip},noise={z:.6f}"
                overrides["max-epsilon"] = target
                overrides["min-replies"] = m
            config = validate({**common, **overrides})
            label = f"{'nodp' if target is None else f'eps{target:g}'}-{slug(spec)}"
            out_dir = args.out / label
            saved = out_dir / "results.json"
            if args.reuse and saved.exists():
                doc = json.loads(saved.read_text())
                print(f"== {label}: reused {saved}", flush=True)
            else:
                print(f"== {label} ({args.engine}): {config.get('dp')}", flush=True)
                t0 = time.monotonic()
                if args.engine == "flower":
                    doc = run_flower(config, out_dir)
                else:
                    doc = run_inprocess(config)
                doc = {**doc, "engine": args.engine, "seconds": time.monotonic() - t0}
                out_dir.mkdir(parents=True, exist_ok=True)
                saved.write_text(json.dumps(doc, indent=1, default=str))
            last = doc["rounds"][-1]
            privacy = doc.get("privacy") or {}
            rows.append(Row(
                sampling=str(privacy.get("sampling", "-")),
                accountant=str(privacy.get("accountant", "-")),
                target_epsilon=target, compression=spec, noise_multiplier=z,
                epsilon=None if last["epsilon"] is None else float(last["epsilon"]),
                rounds=len(doc["rounds"]), accuracy=float(doc["summary"]["final_accuracy"]),
                accuracy_last5=sum(float(r["accuracy"]) for r in doc["rounds"][-5:])
                / len(doc["rounds"][-5:]),
                upload_mb=float(doc["summary"]["total_upload_bytes"]) / 1e6,
                seconds=float(doc.get("seconds", 0.0)),
            ))
            if doc["summary"].get("stopped"):
                print(f"    {doc['summary']['stopped']}", flush=True)
    total = time.monotonic() - started
    print()
    print(markdown_table(rows))
    print()
    print(f"{len(rows)} runs, {args.engine} engine, {total:.0f} s in total")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(
        {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
         "seconds": total, "rows": [asdict(r) for r in rows]},
        indent=1, default=lambda v: None if isinstance(v, float) and math.isinf(v) else str(v)))
    title = (f"DP-FedAvg (distributed, clip {args.clip:g}), MNIST logreg, iid, "
             f"{n} clients, {m}/round, {args.rounds} rounds")
    plot(rows, args.plot, title=title)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
