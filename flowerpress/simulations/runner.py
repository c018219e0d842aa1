"""Run a simulated federation on Flower's simulation engine (Ray backend).

The ServerApp and ClientApp are the same objects ``flwr run`` uses; only the
transport differs: Flower's simulation runtime runs the ClientApps in Ray
actors on this machine.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from flowerpress.config import Config
from flowerpress.server.app import make_server_app

log = logging.getLogger(__name__)


class ProgressPrinter:
    """Prints one line per finished round: accuracy, bytes, epsilon, time."""

    def __init__(self, total_rounds: int, stream: TextIO = sys.stdout) -> None:
        self.total_rounds = total_rounds
        self.stream = stream
        self.upload = 0

    def header(self) -> None:
        print(f"{'round':>7} {'acc':>7} {'f1':>6} {'loss':>7} {'clients':>7} {'rej':>4}"
              f" {'upload MB':>10} {'total MB':>9} {'eps':>7} {'sec':>6}", file=self.stream)

    def __call__(self, row: Mapping[str, Any]) -> None:
        self.upload += int(row["upload_bytes"])
        eps = "-" if row["epsilon"] is None else f"{row['epsilon']:.3f}"
        print(f"{row['round']:>3}/{self.total_rounds:<3} {row['accuracy']:7.4f} "
              f"{row['f1_macro']:6.3f} {row['loss']:7.4f} {row['clients']:>7} "
              f"{row['rejected']:>4} {row['upload_bytes'] / 1e6:10.4f} {self.upload / 1e6:9.3f} "
              f"{eps:>7} {row['seconds']:6.2f}", file=self.stream, flush=True)


def simulate(config: Config, out_dir: Path | None, *, progress: bool = True,
             stream: TextIO = sys.stdout) -> dict[str, Any]:
    """Run ``config`` on Flower's simulation engine and return the results document.

    Parameters
    ----------
    config
        A validated run config (:func:`flowerpress.config.validate`).
    out_dir
        Where ``results.json`` and ``report.png`` go; ``None`` writes nothing.
    progress
        Print a line per round to ``stream``.
    """
    from flwr.simulation import run_simulation

    from flowerpress.client.app import app as client_app

    printer = ProgressPrinter(int(config["rounds"]), stream)
    sink: list[dict[str, Any]] = []
    server_app = make_server_app(config, out_dir=out_dir, on_round=printer if progress else None,
                                 sink=sink)
    cpus = max(1, os.cpu_count() or 1)
    backend_config: Any = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "num_gpus": 0, "logging_level": "ERROR",
                      "log_to_driver": False, "configure_logging": True},
    }
    if progress:
        printer.header()
    run_simulation(server_app=server_app, client_app=client_app,
                   num_supernodes=int(config["num-clients"]), backend_config=backend_config)
    if not sink:
        raise RuntimeError("the simulated federation did not finish; see the log above")
    return sink[0]
