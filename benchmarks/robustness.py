"""Final accuracy of each built-in strategy, clean and under each simulated attack.

Every run is a real flowerpress federation (the ServerApp's ``serve`` with
the real ClientApp and Flower messages) on an in-process grid, so a sweep of
dozens of runs needs no Ray workers. Malicious clients are the first
``fraction x num-clients`` partitions (``flowerpress.simulations.attacks``);
they replace their update before compression, like a real attacker.

Robust rules get the arguments that match the threat: with 20 % malicious
clients and 10 sampled per round a round holds 2 attackers on average (up to
4), hence ``trimmed-mean:beta=0.3`` and ``krum:f=3``.

Usage::

    python benchmarks/robustness.py [--rounds 10] [--num-clients 20] [--clients-per-round 10]
        [--strategies fedavg,median] [--attacks 'none;signflip:...'] [--write-docs]
        [--table-only]

Prints a markdown table (and JSON to --out). With ``--write-docs`` the table
replaces the section between the robustness markers in
docs/benchmarks.md (text outside the markers is left alone).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path
from typing import Any

from flwr.supercore.task_identity import TaskIdentity

from flowerpress.config import validate
from flowerpress.server.app import serve
from flowerpress.simulations.app import app as client_app
from flowerpress.testing import InProcessGrid

STRATEGIES = [  # the robust rules first: a sweep cut short still answers the main question
    "fedavg",
    "median",
    "trimmed-mean:beta=0.3",
    "krum:f=3",
    "multikrum:f=3",
    "fedprox:mu=0.01",
    "fedavgm",
    "fedadagrad",
    "fedadam",
    "fedyogi",
]
ATTACKS = ["none", "signflip:fraction=0.2,scale=10", "noise:fraction=0.2,std=1.0"]
DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
START, END = "<!-- robustness:start -->", "<!-- robustness:end -->"


def run_one(strategy: str, attack: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one federation; return its final accuracy and wall time."""
    config = validate(
        {
            "dataset": args.dataset,
            "partition": args.partition,
            "num-clients": args.num_clients,
            "clients-per-round": args.clients_per_round,
            "rounds": args.rounds,
            "seed": args.seed,
            "strategy": strategy,
            "attack": attack,
            "compression": args.compression,
        }
    )
    start = time.perf_counter()
    grid = InProcessGrid(client_app=client_app, run_config=config, num_nodes=args.num_clients)
    results = serve(grid, config)
    accuracies = [r["accuracy"] for r in results["rounds"]]
    return {
        "strategy": strategy,
        "attack": attack,
        "final_accuracy": accuracies[-1],
        "best_accuracy": max(accuracies),
        "seconds": time.perf_counter() - start,
    }


def table(rows: list[dict[str, Any]], strategies: list[str], attacks: list[str]) -> str:
    """Markdown: one row per strategy, final accuracy per attack (drop vs clean)."""
    acc = {(r["strategy"], r["attack"]): r["final_accuracy"] for r in rows}
    lines = [
        "| strategy | " + " | ".join(attacks) + " |",
        "|---|" + "---:|" * len(attacks),
    ]
    for s in strategies:
        cells = []
        clean = acc.get((s, "none"))
        for a in attacks:
            value = acc.get((s, a))
            if value is None:
                cells.append("-")
            elif a == "none" or clean is None:
                cells.append(f"{value:.3f}")
            else:
                cells.append(f"{value:.3f} ({value - clean:+.3f})")
        lines.append(f"| `{s}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of an earlier (possibly partial) sweep, for --table-only."""
    rows: list[dict[str, Any]] = json.loads(path.read_text(encoding="utf-8"))
    return rows


def write_docs(text: str) -> None:
    """Replace the generated part of docs/benchmarks.md; text outside stays."""
    section = f"{START}\n{text}\n{END}"
    old = DOCS.read_text(encoding="utf-8") if DOCS.exists() else ""
    if START in old and END in old:
        head, rest = old.split(START, 1)
        new = head + section + rest.split(END, 1)[1]
    else:
        new = (old.rstrip("\n") + "\n\n" if old.strip() else "") + section + "\n"
    DOCS.write_text(new, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--partition", default="dirichlet:0.5")
    parser.add_argument("--num-clients", type=int, default=20)
    parser.add_argument("--clients-per-round", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compression", default="none")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--attacks", default=";".join(ATTACKS), help="';'-separated specs")
    parser.add_argument("--out", type=Path, default=Path("runs/robustness"))
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument(
        "--table-only", action="store_true", help="rebuild the table from --out/robustness.json"
    )
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)
    strategies = [s for s in args.strategies.split(",") if s]
    attacks = [a for a in args.attacks.split(";") if a]

    # The in-process grid has no SuperLink to set Flower's task identity.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    rows: list[dict[str, Any]] = []
    args.out.mkdir(parents=True, exist_ok=True)
    if args.table_only:
        rows = load_rows(args.out / "robustness.json")
        done = {r["strategy"] for r in rows}
        strategies = [s for s in strategies if s in done]
    for s in [] if args.table_only else strategies:
        for a in attacks:
            row = run_one(s, a, args)
            rows.append(row)
            print(
                f"{s:24s} {a:32s} acc={row['final_accuracy']:.3f} ({row['seconds']:.0f} s)",
                flush=True,
            )
            # Keep partial results: a long sweep can be cut short and still reported.
            (args.out / "robustness.json").write_text(json.dumps(rows, indent=2) + "\n", "utf-8")
    setup = (
        f"{args.dataset}, partition {args.partition}, {args.num_clients} clients, "
        f"{args.clients_per_round} per round, {args.rounds} rounds, seed {args.seed}, "
        f"upload compression {args.compression}; malicious clients are the first 20 % of "
        "partitions. Cells: final accuracy (change vs clean). "
        f"Machine: {platform.machine()}, Python {platform.python_version()}. "
        "Reproduce: `python benchmarks/robustness.py --write-docs`."
    )
    text = f"{setup}\n\n{table(rows, strategies, attacks)}"
    print()
    print(text)
    if args.write_docs:
        write_docs(text)


if __name__ == "__main__":
    main()
