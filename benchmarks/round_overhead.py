"""Per-round seconds of vanilla Flower FedAvg vs flowerpress on the same tiny workload.

Both apps run in one process tree on one private simulation SuperLink
(Flower's simulation engine, Ray backend), one after the other, with the same
clients, data, model and local training; only the server loop differs.
Prints per-round seconds of each and their ratio. Asserts nothing.

Usage::

    .venv/bin/python benchmarks/round_overhead.py [--rounds 6] [--clients 6]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from flowerpress.config import SCHEMA, validate
from flowerpress.simulations.runner import SimulationLink, write_app_dir

HERE = Path(__file__).resolve().parent


def _vanilla_app(path: Path) -> Path:
    path.mkdir(parents=True)
    shutil.copy(HERE / "round_overhead_app" / "vanilla_app.py", path / "vanilla_app.py")
    config = "\n".join(f"{k} = {json.dumps(v)}" for k, v in
                       {name: key.default for name, key in SCHEMA.items()}.items())
    (path / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n\n'
        '[project]\nname = "vanilla-fedavg"\nversion = "0.1.0"\n\n'
        '[tool.flwr.app]\npublisher = "flowerpress"\n\n'
        '[tool.flwr.app.components]\nserverapp = "vanilla_app:server"\n'
        'clientapp = "vanilla_app:client"\n\n[tool.flwr.app.config]\n' + config + "\n")
    return path


def _wait(proc: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while proc.alive() and time.monotonic() < deadline:  # type: ignore[attr-defined]
        time.sleep(0.2)
    if proc.alive():  # type: ignore[attr-defined]
        raise SystemExit("run did not finish in time:\n" + proc.tail(30))  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--per-round", type=int, default=3)
    args = parser.parse_args()
    config = validate({"dataset": "digits", "partition": "iid", "num-clients": args.clients,
                       "clients-per-round": args.per_round, "rounds": args.rounds,
                       "local-epochs": 1})
    with tempfile.TemporaryDirectory(prefix="round-overhead-") as tmp_name:
        tmp = Path(tmp_name)
        with SimulationLink(tmp) as link:
            out_v, out_f = tmp / "out-vanilla", tmp / "out-flowerpress"
            proc = link.run(_vanilla_app(tmp / "vanilla"), {**config, "out-dir": str(out_v)},
                            args.clients)
            _wait(proc, 1800)
            proc = link.run(write_app_dir(tmp / "fp"), {**config, "out-dir": str(out_f)},
                            args.clients)
            _wait(proc, 1800)
        vanilla = json.loads((out_v / "vanilla.json").read_text())["seconds"]
        ours = [r["seconds"] for r in json.loads((out_f / "results.json").read_text())["rounds"]]
    # Round 1 includes the Ray actors' start-up: report it apart.
    print(f"machine: {platform.machine()} {platform.processor() or ''}, "
          f"python {platform.python_version()}")
    print(f"workload: digits, {args.clients} clients, {args.per_round} per round, "
          f"{args.rounds} rounds, 1 local epoch")
    print(f"{'round':>5} {'vanilla s':>10} {'flowerpress s':>14} {'ratio':>6}")
    for i, (v, f) in enumerate(zip(vanilla, ours, strict=False), start=1):
        print(f"{i:>5} {v:10.3f} {f:14.3f} {f / v:6.2f}")
    v_med, f_med = statistics.median(vanilla[1:]), statistics.median(ours[1:])
    print(f"median of rounds 2..{args.rounds}: vanilla {v_med:.3f} s, flowerpress {f_med:.3f} s,"
          f" ratio {f_med / v_med:.2f}")


if __name__ == "__main__":
    main()
