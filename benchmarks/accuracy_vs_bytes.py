"""Accuracy against cumulative upload bytes for each compression pipeline.

The federation of issue 5: MNIST (the 5,000 digits bundled offline), ``dirichlet:0.5``
over 50 clients, 10 sampled per round, flowerpress's defaults for local training. Each
run is one compression spec (optionally with other run-config keys changed, e.g. a
server-momentum strategy); the upload bytes are the payload sizes the server actually
received, summed over rounds.

Per run the table gives the accuracy at the baseline's round count (``--baseline-rounds``),
the round at which test accuracy first reaches ``--target`` and the cumulative upload
bytes up to and including that round, and how many times fewer bytes that is than the
uncompressed run (the first run, ``none`` by default) needed to reach the same target.

Engines:

``flower`` (default)
    :func:`flowerpress.simulations.runner.simulate`: a private SuperLink in simulation
    mode and ``flwr run``; ClientApps run in Flower's simulation backend. Every run lasts
    ``--rounds`` rounds.
``inprocess``
    The same ServerApp loop (:func:`flowerpress.server.app.serve`) and the same ClientApp
    with its mods, exchanging real Flower Messages through
    :class:`flowerpress.testing.InProcessGrid`. Much cheaper on a small machine. A run
    stops once it has reached the target and the baseline's round count (``--rounds`` is
    then a cap); the rows up to that point are identical to a longer run's.

Usage::

    python benchmarks/accuracy_vs_bytes.py [--engine flower|inprocess] [--rounds 40]
        [--baseline-rounds 20] [--target 0.9] [--out runs/accuracy_vs_bytes]
        [--plot docs/img/pareto.png] [--reuse] [RUN ...]

A RUN is ``SPEC`` or ``SPEC|KEY=VALUE|KEY=VALUE``, e.g.
``"sign+ef|strategy=fedavgm:lr=1.0,momentum=0.9"``. Without RUNs the eight pipelines of
issue 5 run. ``--reuse`` loads a run's ``results.json`` from ``--out`` if it exists
(rerun only what is missing). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_RUNS = (
    "none",
    "fp16",
    "q:8",
    "q:4",
    "topk:0.01+q:8+ef+zstd",
    "topk:0.05+q:8+ef+zstd",
    "sign+ef",
    "lowrank:4+ef",
)

BASE_CONFIG: dict[str, Any] = {
    "dataset": "mnist",
    "partition": "dirichlet:0.5",
    "num-clients": 50,
    "clients-per-round": 10,
}


@dataclass(frozen=True)
class Run:
    """One benchmark run: a compression spec plus run-config overrides."""

    label: str
    overrides: dict[str, str] = field(default_factory=dict)

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "_", self.label).strip("_")


def parse_run(text: str) -> Run:
    """Parse ``SPEC|KEY=VALUE|...`` into a :class:`Run`."""
    spec, *rest = text.split("|")
    overrides = {"compression": spec.strip()}
    for item in rest:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"run {text!r}: expected KEY=VALUE after '|', got {item!r}")
        overrides[key.strip()] = value.strip()
    return Run(label=text, overrides=overrides)


class _Stop(Exception):  # noqa: N818 (control flow, not an error)
    """Raised from the round callback to end an in-process run early."""


def run_inprocess(config: Mapping[str, Any], *, target: float, min_rounds: int,
                  ) -> list[dict[str, Any]]:
    """Run ``config`` through ``serve`` on the in-process grid; return the round rows."""
    from flowerpress.server.app import serve
    from flowerpress.simulations.app import app as client_app
    from flowerpress.testing import InProcessGrid, server_identity

    rows: list[dict[str, Any]] = []

    def on_round(row: Mapping[str, Any]) -> None:
        rows.append(dict(row))
        print(f"    round {row['round']:>3} acc {row['accuracy']:.4f} "
              f"upload {row['upload_bytes']:>9} B rejected {row['rejected']}", flush=True)
        if row["round"] >= min_rounds and row["accuracy"] >= target:
            raise _Stop

    try:
        with server_identity():
            serve(InProcessGrid(client_app, int(config["num-clients"]), run_config=config),
                  dict(config),
                  on_round=on_round)
    except _Stop:
        pass
    return rows


def run_flower(config: Mapping[str, Any], out_dir: Path) -> dict[str, Any]:
    """Run ``config`` on Flower's simulation engine; return its results.json document."""
    from flowerpress.simulations.runner import simulate

    return simulate(dict(config), out_dir, progress=True)


@dataclass
class Summary:
    """What the table reports for one run."""

    run: Run
    rows: list[dict[str, Any]]
    seconds: float

    def cumulative_mb(self) -> list[float]:
        total, out = 0, []
        for row in self.rows:
            total += int(row["upload_bytes"])
            out.append(total / 1e6)
        return out

    def accuracy_at(self, rnd: int) -> float | None:
        for row in self.rows:
            if row["round"] == rnd:
                return float(row["accuracy"])
        return None

    def first_reach(self, target: float) -> tuple[int, int] | None:
        """(round, cumulative upload bytes) when accuracy first reaches ``target``."""
        total = 0
        for row in self.rows:
            total += int(row["upload_bytes"])
            if row["accuracy"] >= target:
                return int(row["round"]), total
        return None


def markdown_table(summaries: Sequence[Summary], *, target: float, baseline_rounds: int) -> str:
    base = summaries[0].first_reach(target) if summaries else None
    pct = f"{target:.0%}"
    base_label = summaries[0].run.label.replace("|", " \\| ") if summaries else ""
    lines = [
        f"| run | acc @ round {baseline_rounds} | best acc (rounds run) | rounds to {pct} "
        f"| upload MB to {pct} | x fewer bytes than `{base_label}` "
        f"| upload KB / round |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        acc = s.accuracy_at(baseline_rounds)
        best = max(float(r["accuracy"]) for r in s.rows)
        reach = s.first_reach(target)
        per_round = s.cumulative_mb()[-1] * 1e3 / len(s.rows)
        if reach is None:
            rnd, mb, ratio = f"not in {len(s.rows)}", "-", "-"
        else:
            rnd, mb = str(reach[0]), f"{reach[1] / 1e6:.3f}"
            ratio = "-" if base is None else f"{base[1] / reach[1]:.1f}x"
        acc_text = "-" if acc is None else f"{acc:.4f}"
        label = s.run.label.replace("|", " \\| ")
        lines.append(f"| `{label}` | {acc_text} | {best:.4f} ({len(s.rows)}) | {rnd} | {mb} "
                     f"| {ratio} | {per_round:.1f} |")
    return "\n".join(lines)


def pareto_plot(summaries: Sequence[Summary], path: Path, *, target: float) -> None:
    """Accuracy against cumulative upload MB (log x), one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 5.5))
    colors = plt.get_cmap("tab20").colors
    for i, s in enumerate(summaries):
        mb = s.cumulative_mb()
        acc = [float(r["accuracy"]) for r in s.rows]
        # Runs that change more than the codec (server momentum, lr, seed) are dashed.
        style = "--" if len(s.run.overrides) > 1 else "-"
        (line,) = ax.plot(mb, acc, style, marker=".", markersize=3, linewidth=1,
                          color=colors[(2 * i) % 20 + (2 * i) // 20], label=s.run.label)
        reach = s.first_reach(target)
        if reach is not None:
            ax.plot([reach[1] / 1e6], [target], marker="o", color=line.get_color())
    ax.axhline(target, color="grey", linestyle=":", linewidth=1)
    base = summaries[0].first_reach(target) if summaries else None
    if base is not None:
        ax.axvline(base[1] / 1e8, color="grey", linestyle="-.", linewidth=1,
                   label=f"1/100 of {summaries[0].run.label}'s bytes to {target:.0%}")
    ax.set_xscale("log")
    ax.set_xlabel("cumulative upload (MB, log scale)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0.5, 1.0)
    ax.set_title("MNIST, dirichlet:0.5, 50 clients, 10 per round")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("runs", nargs="*", default=list(DEFAULT_RUNS),
                        help="SPEC or SPEC|KEY=VALUE|...; the first is the baseline")
    parser.add_argument("--engine", choices=("flower", "inprocess"), default="flower")
    parser.add_argument("--rounds", type=int, default=40, help="rounds per run (cap)")
    parser.add_argument("--baseline-rounds", type=int, default=20,
                        help="round at which every run's accuracy is compared")
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/accuracy_vs_bytes"))
    parser.add_argument("--plot", type=Path, default=Path("docs/img/pareto.png"))
    parser.add_argument("--reuse", action="store_true",
                        help="load runs whose results.json already exists under --out")
    args = parser.parse_args(argv)

    from flowerpress.config import validate

    runs = [parse_run(text) for text in args.runs]
    summaries: list[Summary] = []
    for run in runs:
        out_dir = args.out / run.slug
        saved = out_dir / "results.json"
        if args.reuse and saved.exists():
            doc = json.loads(saved.read_text())
            summaries.append(Summary(run, list(doc["rounds"]), float(doc.get("seconds", 0.0))))
            print(f"== {run.label}: reused {saved}", flush=True)
            continue
        config = validate({**BASE_CONFIG, "rounds": args.rounds, "seed": args.seed,
                           **run.overrides})
        print(f"== {run.label} ({args.engine})", flush=True)
        start = time.monotonic()
        if args.engine == "flower":
            # Keep the ServerApp's whole results.json (summary, config), add ours.
            doc = run_flower(config, out_dir)
        else:
            doc = {"config": config, "rounds": run_inprocess(
                config, target=args.target, min_rounds=args.baseline_rounds)}
        seconds = time.monotonic() - start
        rows = list(doc["rounds"])
        out_dir.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps({**doc, "engine": args.engine, "seconds": seconds},
                                    indent=1))
        summaries.append(Summary(run, rows, seconds))

    print()
    print(markdown_table(summaries, target=args.target, baseline_rounds=args.baseline_rounds))
    print()
    for s in summaries:
        print(f"{s.run.label}: {len(s.rows)} rounds in {s.seconds:.0f} s")
    pareto_plot(summaries, args.plot, target=args.target)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
