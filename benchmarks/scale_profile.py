"""The servers' own work per round at scale, in process: flowerpress's loop vs Flower's FedAvg.

``benchmarks/scale.py`` times whole rounds on Flower's simulation engine, where the
clients' training and the engine's scheduling dominate on a small machine. This
script isolates the server side: both servers run against
:class:`flowerpress.testing.InProcessGrid` (flowerpress's simulation ClientApp,
called in this process), and the clock and the profiler are paused while a
ClientApp runs. What is left per round is the server's own work: sampling,
building and pushing messages, pulling, validating, decoding, aggregating,
central evaluation and, for flowerpress, membership, results and the checkpoint.

``flowerpress``
    :func:`flowerpress.server.app.serve` (the ServerApp's body), with an out dir
    (results.json and the checkpoint rewritten every round, as ``simulate`` does).
``vanilla``
    ``flwr.serverapp.strategy.FedAvg().start(...)`` with the same central evaluation.

Each client's partition is loaded by flwr-datasets when the client first
trains (``flowerpress.tasks.data.partition_rows``), not the whole table up front.

Usage::

    python benchmarks/scale_profile.py [--clients 10000] [--per-round 1000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import itertools
import pstats
import tempfile
import time
from pathlib import Path
from typing import Any

from flowerpress.config import validate


class TimedClient:
    """The ClientApp, with the profiler and a clock paused around every call."""

    def __init__(self, app: Any, profile: cProfile.Profile) -> None:
        self.app, self.profile, self.seconds = app, profile, 0.0

    def __call__(self, msg: Any, context: Any) -> Any:
        profile = self.profile
        profile.disable()
        started = time.perf_counter()
        try:
            return self.app(msg, context)
        finally:
            self.seconds += time.perf_counter() - started
            if profile is self.profile:
                profile.enable()

    def restart_profile(self) -> None:
        """Profile from now on only (after round 1: start-up and imports left out)."""
        self.profile.disable()
        self.profile = cProfile.Profile()
        self.profile.enable()


def profile_server(server: str, config: dict[str, Any], top: int) -> None:
    """Run ``server`` ("flowerpress" or "vanilla") in process; print its own seconds and costs."""
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
    from flwr.serverapp.strategy import FedAvg

    from flowerpress import protocol
    from flowerpress.server.app import serve
    from flowerpress.simulations.app import app as client_app
    from flowerpress.tasks.registry import build_task, task_spec
    from flowerpress.testing import InProcessGrid, server_identity

    n, m = int(config["num-clients"]), int(config["clients-per-round"])
    profile = cProfile.Profile()
    client = TimedClient(client_app, profile)
    grid = InProcessGrid(client, n, run_config=dict(config))  # type: ignore[arg-type]
    ends: list[tuple[float, float]] = []  # (clock, client seconds) at every round's end

    def mark(*_: Any) -> None:
        ends.append((time.perf_counter(), client.seconds))
        if len(ends) == (1 if server == "flowerpress" else 2):  # the end of round 1
            client.restart_profile()

    with server_identity(), tempfile.TemporaryDirectory() as tmp:
        started = (time.perf_counter(), 0.0)
        profile.enable()
        if server == "flowerpress":
            serve(grid, config, out_dir=Path(tmp), on_round=mark)
        else:
            task = build_task(task_spec(config), config)
            central = task.central_data()

            def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
                res = task.evaluate(arrays.to_numpy_ndarrays(), central)
                mark()
                return MetricRecord({"accuracy": float(res.accuracy or 0.0)})

            FedAvg(fraction_train=m / n, fraction_evaluate=0.0, min_available_nodes=n,
                   min_train_nodes=m).start(
                grid, ArrayRecord(task.initial_weights()), num_rounds=int(config["rounds"]),
                train_config=ConfigRecord({protocol.SEED: 0, protocol.COMPRESSION: "none"}),
                evaluate_fn=evaluate_fn)
            del ends[0]  # the first call evaluates the initial model
        client.profile.disable()
    own = [(b[0] - a[0]) - (b[1] - a[1]) for a, b in itertools.pairwise([started, *ends])]
    print(f"\n{server}: server seconds per round (ClientApps excluded; round 1 includes "
          f"start-up) {[round(s, 3) for s in own]}; the ClientApps took "
          f"{client.seconds:.1f} s in all", flush=True)
    out = io.StringIO()
    print(f"top costs of rounds 2..{len(own)} by own time:")
    pstats.Stats(client.profile, stream=out).sort_stats("tottime").print_stats(top)
    print("\n".join(out.getvalue().splitlines()[6:]), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10000)
    parser.add_argument("--per-round", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    config = validate({"dataset": "digits", "model": "logreg", "partition": "iid",
                       "num-clients": args.clients, "clients-per-round": args.per_round,
                       "rounds": args.rounds, "local-epochs": 1, "round-timeout": 3600.0})
    for server in ("flowerpress", "vanilla"):
        profile_server(server, dict(config), args.top)


if __name__ == "__main__":
    main()
