"""Scale: flowerpress's ServerApp against vanilla Flower FedAvg, many simulated clients.

Both runs use Flower's simulation engine (Ray backend) through flowerpress's own
runner, the same ClientApp (flowerpress's simulation ClientApp,
``flowerpress.simulations.app:app``, upload and download compression ``none``), the
same task (``digits``, ``logreg``, IID, 1 local epoch), N clients, M per round and R
rounds; only the ServerApp differs:

``flowerpress``
    :func:`flowerpress.simulations.runner.simulate`, the call ``flowerpress simulate``
    makes: a private simulation SuperLink, ``flwr run`` of flowerpress's App, results
    (and a checkpoint) written after every round.
``vanilla``
    the same runner's :class:`~flowerpress.simulations.runner.SimulationLink` with
    ``flwr run`` of an App whose ServerApp is Flower's ``FedAvg.start``
    (``benchmarks/scale_app/vanilla_server.py``) and whose ClientApp is flowerpress's.

Runs alternate (flowerpress, vanilla, flowerpress, vanilla, ...) so the machine's
load, shared with others, weighs on both alike; every pair gives one ratio.

What is measured
----------------
Seconds per round
    The time between the ends of consecutive rounds, read in wall-clock time:
    flowerpress: the modification time of ``results.json``, rewritten after every
    round (after the round's central evaluation and checkpoint); vanilla: the end of
    Flower's ``evaluate_fn`` (central evaluation) after every round. So rounds 2..R
    are full cycles of either server (sample, send, wait for the replies, aggregate,
    evaluate, and for flowerpress checkpoint). Round 1 carries the warm-up (Ray
    actors load the data; each one computes the partition table once) and is
    reported apart: ``round 1`` is flowerpress's in-loop ``seconds`` of its first row
    and vanilla's time from the evaluation of the initial model to the end of round
    1; ``to round 1`` is the wall time from submitting the run (starting the
    SuperLink) to the end of round 1, which includes flowerpress's start-up query
    of every node.
Server peak memory
    ``VmHWM`` (the kernel's resident-set high-water mark) of the ``flwr-simulation``
    process, polled in ``/proc/PID/status`` every 0.2 s while the run lives (the
    last value read before it exits). In Flower 1.41's simulation that process runs
    the ServerApp in a thread, Flower's in-memory LinkState (every message and
    reply passes through it), the InMemoryGrid and the simulation engine's Ray
    driver; the ClientApps run in Ray worker processes, not counted. So the
    figure holds the ServerApp plus Flower's fixed machinery, the same for both.
Load
    ``os.getloadavg()`` before and after every run (the machine is shared).

Usage::

    python benchmarks/scale.py [--clients 1000] [--per-round 100] [--rounds 3]
                               [--pairs 2] [--json OUT.json] [--dataset digits]

``--dataset synthetic:0,0`` for more clients than the digits' 1,438 training rows
(FedProx's Synthetic(0, 0): naturally federated, one generated device per client,
whatever the ``partition`` key says).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flowerpress.config import SCHEMA, validate
from flowerpress.simulations.runner import SimulationLink, simulate

HERE = Path(__file__).resolve().parent
#: How often the monitor reads /proc and results.json (seconds).
POLL_S = 0.2


@dataclass
class Run:
    """One run's measurements."""

    server: str  # "flowerpress" or "vanilla"
    submitted: float  # wall clock when the run was submitted
    round_ends: list[float] = field(default_factory=list)  # wall clock, one per round
    round1_seconds: float | None = None
    peak_rss_mib: float | None = None  # VmHWM of flwr-simulation
    rss_samples: int = 0
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    wall_seconds: float = 0.0
    accuracy: float | None = None

    @property
    def per_round(self) -> list[float]:
        """Seconds of rounds 2..R (consecutive round ends)."""
        return [b - a for a, b in zip(self.round_ends, self.round_ends[1:], strict=False)]

    @property
    def to_round1(self) -> float | None:
        return self.round_ends[0] - self.submitted if self.round_ends else None


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids of every process /proc shows."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after its ")".
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def find_descendant(root: int, needle: str) -> int | None:
    """The pid of a descendant of ``root`` whose command line contains ``needle``."""
    tree, todo = _children(), list(_children().get(root, []))
    while todo:
        pid = todo.pop()
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if needle.encode() in cmdline:
            return pid
        todo.extend(tree.get(pid, []))
    return None


def status_kib(pid: int, field_name: str) -> int | None:
    """A ``/proc/PID/status`` field in KiB (``VmHWM``, ``VmRSS``); None if gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


class Monitor(threading.Thread):
    """Polls the run's ``flwr-simulation`` process (VmHWM) and flowerpress's results.json."""

    def __init__(self, run: Run, results: Path | None) -> None:
        super().__init__(daemon=True)
        self.run_ = run
        self.results = results
        self.done = threading.Event()
        self.pid: int | None = None

    def run(self) -> None:
        rows = 0
        while not self.done.is_set():
            if self.pid is None or status_kib(self.pid, "VmHWM") is None:
                self.pid = find_descendant(os.getpid(), "flwr-simulation")
            if self.pid is not None:
                hwm = status_kib(self.pid, "VmHWM")
                if hwm is not None:
                    self.run_.peak_rss_mib = max(self.run_.peak_rss_mib or 0.0, hwm / 1024)
                    self.run_.rss_samples += 1
            if self.results is not None:
                rows = self._rows(rows)
            time.sleep(POLL_S)

    def _rows(self, seen: int) -> int:
        assert self.results is not None
        try:
            mtime = self.results.stat().st_mtime
            document = json.loads(self.results.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return seen
        rows = document.get("rounds", [])
        if len(rows) > seen:
            # Several rows at once (a missed poll) would share one time: say so.
            if len(rows) - seen > 1:
                print(f"  warning: {len(rows) - seen} rows in one poll", file=sys.stderr)
            self.run_.round_ends.extend([mtime] * (len(rows) - seen))
        return len(rows)


def vanilla_app_dir(path: Path) -> Path:
    """A Flower App: Flower's FedAvg ServerApp, flowerpress's simulation ClientApp."""
    path.mkdir(parents=True)
    shutil.copy(HERE / "scale_app" / "vanilla_server.py", path / "vanilla_server.py")
    config = "\n".join(f"{name} = {json.dumps(key.default)}" for name, key in SCHEMA.items())
    (path / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n\n'
        '[project]\nname = "vanilla-fedavg-scale"\nversion = "0.1.0"\n\n'
        '[tool.flwr.app]\npublisher = "flowerpress"\n\n'
        '[tool.flwr.app.components]\nserverapp = "vanilla_server:server"\n'
        'clientapp = "flowerpress.simulations.app:app"\n\n'
        "[tool.flwr.app.config]\n" + config + "\n", encoding="utf-8")
    return path


def run_flowerpress(config: Mapping[str, Any], tmp: Path, timeout: float) -> Run:
    out = tmp / "out"
    run = Run("flowerpress", time.time(), load_before=os.getloadavg())
    monitor = Monitor(run, out / "results.json")
    monitor.start()
    try:
        document = simulate(dict(config), out, progress=False, timeout=timeout)
    finally:
        monitor.done.set()
        monitor.join()
    run.wall_seconds = time.time() - run.submitted
    run.load_after = os.getloadavg()
    rows = document["rounds"]
    run.round1_seconds = float(rows[0]["seconds"])
    run.accuracy = rows[-1]["accuracy"]
    if len(run.round_ends) != len(rows):
        raise SystemExit(f"flowerpress: saw {len(run.round_ends)} round ends of {len(rows)}")
    return run


def run_vanilla(config: Mapping[str, Any], tmp: Path, timeout: float) -> Run:
    out = tmp / "out"
    run = Run("vanilla", time.time(), load_before=os.getloadavg())
    monitor = Monitor(run, None)
    monitor.start()
    try:
        with SimulationLink(tmp / "link") as link:
            proc = link.run(vanilla_app_dir(tmp / "app"), {**config, "out-dir": str(out)},
                            int(config["num-clients"]))
            deadline = time.monotonic() + timeout
            while proc.alive() and time.monotonic() < deadline:
                time.sleep(POLL_S)
            if proc.alive():
                raise SystemExit(f"vanilla: not finished in {timeout:.0f} s:\n{proc.tail(30)}")
            tail = proc.tail(30)
    finally:
        monitor.done.set()
        monitor.join()
    run.wall_seconds = time.time() - run.submitted
    run.load_after = os.getloadavg()
    try:
        document = json.loads((out / "vanilla.json").read_text(encoding="utf-8"))
    except OSError:
        raise SystemExit(f"vanilla: no vanilla.json; flwr run said:\n{tail}") from None
    stamps = document["stamps"]  # [initial model, round 1, ..., round R]
    run.round_ends = stamps[1:]
    run.round1_seconds = stamps[1] - stamps[0]
    run.accuracy = document["accuracy"][-1]
    return run


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    parser.add_argument("--json", type=Path, default=None, help="write every number here")
    parser.add_argument("--dataset", default="digits",
                        help="digits (1,438 training rows: up to 1,438 clients) or, beyond, "
                             "synthetic:A,B (FedProx's generator, one device per client)")
    args = parser.parse_args()
    # Long round timeouts on both sides: a loaded 2-core machine must not cut a round.
    config = validate({"dataset": args.dataset, "model": "logreg", "partition": "iid",
                       "num-clients": args.clients, "clients-per-round": args.per_round,
                       "rounds": args.rounds, "local-epochs": 1, "compression": "none",
                       "download-compression": "none", "round-timeout": args.timeout,
                       "seed": 0})
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, "
          f"python {platform.python_version()}; {args.dataset}, {args.clients} clients, "
          f"{args.per_round} per round, {args.rounds} rounds", flush=True)
    runs: list[Run] = []
    for pair in range(args.pairs):
        for name, fn in (("flowerpress", run_flowerpress), ("vanilla", run_vanilla)):
            with tempfile.TemporaryDirectory(prefix=f"scale-{name}-") as tmp:
                run = fn(config, Path(tmp), args.timeout)
            runs.append(run)
            print(f"pair {pair + 1} {name:>11}: rounds 2..R {[round(s, 2) for s in run.per_round]}"
                  f" s, round 1 {run.round1_seconds:.1f} s, to round 1 {run.to_round1:.1f} s,"
                  f" wall {run.wall_seconds:.0f} s, peak RSS {run.peak_rss_mib:.0f} MiB"
                  f" ({run.rss_samples} reads), load {run.load_before[0]:.2f} -> "
                  f"{run.load_after[0]:.2f}, accuracy {run.accuracy}", flush=True)
            if args.json is not None:
                args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                                 "runs": [asdict(r) for r in runs]}, indent=1))
    print("\n| pair | flowerpress s/round | vanilla s/round | time ratio | flowerpress MiB "
          "| vanilla MiB | memory ratio |\n|---|---|---|---|---|---|---|")
    time_ratios, mem_ratios = [], []
    for pair in range(args.pairs):
        fp, va = runs[2 * pair], runs[2 * pair + 1]
        f_s, v_s = _median(fp.per_round), _median(va.per_round)
        time_ratios.append(f_s / v_s)
        mem_ratios.append((fp.peak_rss_mib or 0) / (va.peak_rss_mib or 1))
        print(f"| {pair + 1} | {f_s:.2f} | {v_s:.2f} | {time_ratios[-1]:.2f} | "
              f"{fp.peak_rss_mib:.0f} | {va.peak_rss_mib:.0f} | {mem_ratios[-1]:.2f} |")
    print(f"\nmedian time ratio {_median(time_ratios):.2f} (worst {max(time_ratios):.2f}), "
          f"median memory ratio {_median(mem_ratios):.2f} (worst {max(mem_ratios):.2f})")


if __name__ == "__main__":
    main()
