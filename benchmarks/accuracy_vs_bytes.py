"""Accuracy against total message bytes (both directions) per configuration and seed.

The federation of issue 5: MNIST (the 5,000 digits bundled offline), ``dirichlet:0.5``
over 50 clients, 10 sampled per round, flowerpress's defaults for local training. Each
run is a compression spec plus other run-config keys (download codec, history download,
strategy, warm-up), run at every seed of ``--seeds``. Bytes are whole Flower messages as
Flower serializes them (``flowerpress.protocol.message_bytes``), upload and download,
summed over rounds; the payload bytes are kept apart.

Per run and seed the tables give the round at which test accuracy first reaches
``--target``, the upload, download and total message bytes up to and including it,
their ratios to the first run (float32 FedAvg, ``none``) at the same seed, the accuracy
at ``--baseline-rounds`` and the estimated time to the target under the run's ``link``
profile (results.json ``link_seconds``) and the devices' compute to the target (the
rows' ``device_flops``, PyTorch's FLOP counter, and ``device_seconds``, CPU seconds;
"compute x baseline" is a run's FLOPs to the target over the baseline's at the same
seed); the summary table gives the median and the worst over seeds. ``--dataset``
switches every run to another bundled dataset (``digits``: cheap).

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

    python benchmarks/accuracy_vs_bytes.py [--engine flower|inprocess] [--rounds 30]
        [--baseline-rounds 30] [--target 0.9] [--seeds 0,1,2] [--out runs/accuracy_vs_bytes]
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
import textwrap
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
              f"upload {row['upload_bytes']:>9} B download {row['download_bytes']:>9} B "
              f"rejected {row['rejected']}", flush=True)
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

    return simulate(dict(config), out_dir, progress=True, overwrite=True)  # a re-measurement


@dataclass
class Summary:
    """What the tables report for one run at one seed."""

    run: Run
    seed: int
    rows: list[dict[str, Any]]
    seconds: float

    def cumulative(self, *keys: str) -> list[int]:
        """Running sum of the given row columns (message bytes by default)."""
        total, out = 0, []
        for row in self.rows:
            total += sum(int(row.get(k) or 0) for k in keys)
            out.append(total)
        return out

    def cumulative_mb(self) -> list[float]:
        """Cumulative total message MB (upload + download)."""
        return [b / 1e6 for b in self.cumulative("upload_bytes", "download_bytes")]

    def accuracy_at(self, rnd: int) -> float | None:
        for row in self.rows:
            if row["round"] == rnd:
                return float(row["accuracy"])
        return None

    def reach_index(self, target: float) -> int | None:
        for i, row in enumerate(self.rows):
            if row["accuracy"] >= target:
                return i
        return None

    def first_reach(self, target: float) -> dict[str, float] | None:
        """Round, message bytes (up, down, total), payload bytes and link time to ``target``."""
        i = self.reach_index(target)
        if i is None:
            return None
        up = self.cumulative("upload_bytes")[i]
        down = self.cumulative("download_bytes")[i]
        link = [r.get("link_seconds") for r in self.rows[: i + 1]]
        flops = [r.get("device_flops") for r in self.rows[: i + 1]]
        cpu = [r.get("device_seconds") for r in self.rows[: i + 1]]
        return {"round": float(self.rows[i]["round"]), "up": float(up), "down": float(down),
                "flops": (float(sum(float(x) for x in flops))
                          if all(x is not None for x in flops) else float("nan")),
                "cpu_seconds": (float(sum(float(x) for x in cpu))
                                if all(x is not None for x in cpu) else float("nan")),
                "total": float(up + down),
                "up_payload": float(self.cumulative("upload_payload_bytes")[i]),
                "down_payload": float(self.cumulative("download_payload_bytes")[i]),
                "link_seconds": (float(sum(float(x) for x in link))
                                 if all(x is not None for x in link) else float("nan"))}


def _flops_per_round(summary: Summary) -> float | None:
    """Mean device FLOPs of a round over the run (None where devices reported none)."""
    spent = [float(r["device_flops"]) for r in summary.rows if r.get("device_flops") is not None]
    return sum(spent) / len(spent) if spent else None


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def per_seed_table(summaries: Sequence[Summary], *, target: float, at_round: int) -> str:
    """One line per run and seed: bytes to ``target``, ratios to the baseline of that seed."""
    base = {s.seed: s.first_reach(target) for s in summaries if s.run == summaries[0].run}
    pct = f"{target:.0%}"
    lines = [
        f"| run | seed | rounds to {pct} | upload MB | download MB | total MB "
        f"| total x | upload x | upload payload x | acc @ {at_round} | est. time to {pct} (s) "
        f"| device GFLOPs to {pct} | device CPU s to {pct} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        reach, b = s.first_reach(target), base.get(s.seed)
        acc = s.accuracy_at(at_round)
        acc_text = "-" if acc is None else f"{acc:.4f}"
        label = s.run.label.replace("|", " \\| ")
        if reach is None:
            lines.append(f"| `{label}` | {s.seed} | not in {len(s.rows)} | - | - | - | - | - | - "
                         f"| {acc_text} | - | - | - |")
            continue
        ratios = {k: "-" if b is None else f"{b[k] / reach[k]:.1f}x"
                  for k in ("total", "up", "up_payload")}
        lines.append(
            f"| `{label}` | {s.seed} | {reach['round']:.0f} | {reach['up'] / 1e6:.3f} "
            f"| {reach['down'] / 1e6:.3f} | {reach['total'] / 1e6:.3f} | {ratios['total']} "
            f"| {ratios['up']} | {ratios['up_payload']} | {acc_text} "
            f"| {reach['link_seconds']:.0f} | {reach['flops'] / 1e9:.1f} "
            f"| {reach['cpu_seconds']:.1f} |")
    return "\n".join(lines)


def summary_table(summaries: Sequence[Summary], *, target: float, at_round: int) -> str:
    """Per run over seeds: median and worst of the ratios, rounds and accuracy gap.

    A seed that never reaches ``target`` counts as rounds, MB and time ``inf``
    and ratio ``0.0x``.
    """
    base_run = summaries[0].run
    base = {s.seed: s for s in summaries if s.run == base_run}
    pct = f"{target:.0%}"
    lines = [
        f"| run | seeds | rounds to {pct} (median / worst) | total MB (median / worst) "
        f"| total x (median / worst) | upload x (median / worst) "
        f"| acc @ {at_round} minus baseline (median / worst) "
        f"| est. time to {pct}, s (median / worst) "
        f"| device GFLOPs to {pct} (median / worst) | compute to {pct} x baseline "
        f"(median / worst) | device GFLOPs per round (median) | per round x baseline "
        f"(median) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    runs: list[Run] = []
    for s in summaries:
        if s.run not in runs:
            runs.append(s.run)
    for run in runs:
        mine = [s for s in summaries if s.run == run]
        seeds = ",".join(str(s.seed) for s in mine)
        rounds, total, rt, ru, gap, mins = [], [], [], [], [], []
        tflops, price, per_round, round_price = [], [], [], []
        for s in mine:
            reach = s.first_reach(target)
            b = base.get(s.seed)
            breach = None if b is None else b.first_reach(target)
            acc, bacc = s.accuracy_at(at_round), None if b is None else b.accuracy_at(at_round)
            if acc is not None and bacc is not None:
                gap.append(100 * (acc - bacc))
            spent = _flops_per_round(s)
            if spent is not None:
                per_round.append(spent / 1e9)
                theirs = None if b is None else _flops_per_round(b)
                if theirs:
                    round_price.append(spent / theirs)
            if reach is None:
                rounds.append(float("inf"))
                total.append(float("inf"))
                rt.append(0.0)
                ru.append(0.0)
                mins.append(float("inf"))
                tflops.append(float("inf"))
                price.append(float("inf"))
                continue
            tflops.append(reach["flops"] / 1e9)
            if breach is not None and breach["flops"] > 0:
                price.append(reach["flops"] / breach["flops"])
            rounds.append(reach["round"])
            total.append(reach["total"] / 1e6)
            mins.append(reach["link_seconds"])
            if breach is not None:
                rt.append(breach["total"] / reach["total"])
                ru.append(breach["up"] / reach["up"])

        def mw(values: list[float], fmt: str, worst: Any = max) -> str:
            if not values:
                return "-"
            return f"{format(_median(values), fmt)} / {format(worst(values), fmt)}"

        label = run.label.replace("|", " \\| ")
        lines.append(f"| `{label}` | {seeds} | {mw(rounds, '.0f')} | {mw(total, '.2f')} "
                     f"| {mw(rt, '.1f', min)}x | {mw(ru, '.0f', min)}x "
                     f"| {mw(gap, '+.2f', min)} | {mw(mins, '.0f')} "
                     f"| {mw(tflops, '.1f')} | {mw(price, '.2f')}x "
                     f"| {format(_median(per_round), '.2f') if per_round else '-'} "
                     f"| {format(_median(round_price), '.2f') + 'x' if round_price else '-'} |")
    return "\n".join(lines)


def pareto_plot(summaries: Sequence[Summary], path: Path, *, target: float) -> None:
    """Accuracy against cumulative total message MB (log x): one colour per run, per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(15, 5.5))
    colors = plt.get_cmap("tab10").colors
    runs: list[Run] = []
    for s in summaries:
        if s.run not in runs:
            runs.append(s.run)
    for s in summaries:
        color = colors[runs.index(s.run) % 10]
        acc = [float(r["accuracy"]) for r in s.rows]
        first = s is next(x for x in summaries if x.run == s.run)
        # Long specs wrap onto several lines, so the legend never stretches the figure.
        label = "\n".join(textwrap.wrap(s.run.label, 70)) if first else None
        ax.plot(s.cumulative_mb(), acc, "-", linewidth=1, color=color, label=label)
        minutes = []
        total = 0.0
        for r in s.rows:
            total += float(r.get("link_seconds") or 0.0)
            minutes.append(total / 60)
        ax2.plot(minutes, acc, "-", linewidth=1, color=color)
        reach = s.first_reach(target)
        if reach is not None:
            ax.plot([reach["total"] / 1e6], [target], marker="o", color=color)
    for axis in (ax, ax2):
        axis.axhline(target, color="grey", linestyle=":", linewidth=1)
        axis.set_ylabel("test accuracy")
        axis.set_ylim(0.5, 1.0)
        axis.grid(True, which="both", alpha=0.3)
    ax.set_xscale("log")
    ax.set_xlabel("cumulative upload + download message MB (as Flower serializes them, log)")
    ax2.set_xscale("log")
    ax2.set_xlabel("estimated time (min, log) under the link profile (default up:1mbit,"
                   "down:10mbit,rtt:50ms)")
    ax.set_title("MNIST, dirichlet:0.5, 50 clients, 10 per round; one line per seed")
    fig.legend(fontsize=7, loc="lower center", ncol=min(3, len(runs)), frameon=False)
    fig.tight_layout(rect=(0.0, 0.06 + 0.035 * max(1, (len(runs) + 2) // 3) * 2, 1.0, 1.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine() -> str:
    """One line on the machine and its load (the numbers of the tables do not depend on it)."""
    import os
    import platform

    load = os.getloadavg()
    return (f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or ''}"
            f" Python {platform.python_version()}; load average {load[0]:.1f}, {load[1]:.1f}, "
            f"{load[2]:.1f}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("runs", nargs="*", default=list(DEFAULT_RUNS),
                        help="SPEC or SPEC|KEY=VALUE|...; the first is the baseline")
    parser.add_argument("--engine", choices=("flower", "inprocess"), default="flower")
    parser.add_argument("--rounds", type=int, default=30, help="rounds per run (cap)")
    parser.add_argument("--baseline-rounds", type=int, default=30,
                        help="round at which every run's accuracy is compared")
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--dataset", default=BASE_CONFIG["dataset"],
                        help="the bundled dataset of every run (mnist, digits, ...)")
    parser.add_argument("--out", type=Path, default=Path("runs/accuracy_vs_bytes"))
    parser.add_argument("--plot", type=Path, default=Path("docs/img/pareto.png"))
    parser.add_argument("--reuse", action="store_true",
                        help="load runs whose results.json already exists under --out")
    args = parser.parse_args(argv)

    from flowerpress.config import validate

    runs = [parse_run(text) for text in args.runs]
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    print(machine(), flush=True)
    summaries: list[Summary] = []
    for run in runs:
        for seed in seeds:
            out_dir = args.out / run.slug / f"seed-{seed}"
            saved = out_dir / "results.json"
            if args.reuse and saved.exists():
                doc = json.loads(saved.read_text())
                summaries.append(Summary(run, seed, list(doc["rounds"]),
                                         float(doc.get("seconds", 0.0))))
                print(f"== {run.label} seed {seed}: reused {saved}", flush=True)
                continue
            config = validate({**BASE_CONFIG, "dataset": args.dataset,
                               "rounds": args.rounds, "seed": seed,
                               **run.overrides})
            print(f"== {run.label} seed {seed} ({args.engine})", flush=True)
            start = time.monotonic()
            if args.engine == "flower":
                doc = run_flower(config, out_dir)
            else:
                doc = {"config": config, "rounds": run_inprocess(
                    config, target=args.target, min_rounds=args.baseline_rounds)}
            seconds = time.monotonic() - start
            out_dir.mkdir(parents=True, exist_ok=True)
            saved.write_text(json.dumps({**doc, "engine": args.engine, "seconds": seconds},
                                        indent=1))
            summaries.append(Summary(run, seed, list(doc["rounds"]), seconds))

    print()
    print(summary_table(summaries, target=args.target, at_round=args.baseline_rounds))
    print()
    print(per_seed_table(summaries, target=args.target, at_round=args.baseline_rounds))
    print()
    for s in summaries:
        print(f"{s.run.label} seed {s.seed}: {len(s.rows)} rounds in {s.seconds:.0f} s")
    print(machine())
    pareto_plot(summaries, args.plot, target=args.target)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
