"""flowerpress's ServerApp: build the federation from the run config and run it.

``flwr run`` (and ``flowerpress simulate``, which drives ``flwr run`` on a
local simulation SuperLink) loads :data:`app`; tests call :func:`serve` on an
in-process grid.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from numpy.typing import NDArray

from flowerpress.client.training import evaluate
from flowerpress.config import Config, validate
from flowerpress.server.loop import LoopSettings, RoundCallback, run_federation
from flowerpress.server.results import build_results, write_json_atomic, write_report
from flowerpress.simulations import data as datasets
from flowerpress.simulations.models import build_model, get_weights, set_weights

log = logging.getLogger(__name__)

#: Run-config keys the ClientApp needs in every train message.
CLIENT_KEYS = ("dataset", "partition", "model", "local-epochs", "batch-size", "lr", "seed",
               "compression", "clients-per-round", "attack")


def serve(grid: Grid, config: Config, *, out_dir: Path | None = None,
          on_round: RoundCallback | None = None) -> dict[str, Any]:
    """Run the federation described by ``config`` on ``grid``; return results.json's content."""
    from flowerpress.compression import parse as parse_codec
    from flowerpress.privacy import ServerPrivacy, parse_dp
    from flowerpress.strategies import MeanStrategy, build_strategy

    dataset, seed, n = str(config["dataset"]), int(config["seed"]), int(config["num-clients"])
    test = datasets.load_test(dataset, seed, n)
    classes = datasets.num_classes_of(dataset, seed, n)
    model = build_model(dataset, tuple(test.x.shape[1:]), classes, seed=seed,
                        kind=str(config["model"]))
    initial = get_weights(model)
    elements = sum(int(w.size) for w in initial)

    def evaluate_fn(weights: Sequence[NDArray[np.float32]]) -> Mapping[str, float]:
        set_weights(model, list(weights))
        res = evaluate(model, test.x, test.y)
        return {"accuracy": res.accuracy, "loss": res.loss, "f1_macro": res.f1_macro}

    strategy = build_strategy(str(config["strategy"]))
    dp = parse_dp(str(config["dp"]))
    max_eps = float(config["max-epsilon"])
    ledgers: list[ServerPrivacy] = []

    def make_ledger(population: int) -> ServerPrivacy:
        # The sampling rate is clients-per-round over the nodes actually there.
        assert dp is not None
        ledgers.append(ServerPrivacy(
            dp, num_clients=population,
            clients_per_round=min(int(config["clients-per-round"]), population),
            delta=float(config["dp-delta"]), max_epsilon=max_eps if max_eps > 0 else None))
        return ledgers[-1]

    if dp is not None and not isinstance(strategy, MeanStrategy):
        # The accounting bounds the sensitivity of a mean of clipped updates.
        log.warning("strategy %s is not a mean of the updates: the reported epsilon "
                    "assumes one and does not hold for it", config["strategy"])
    download = parse_codec(str(config["download-compression"]))
    client_config = {k: config[k] for k in CLIENT_KEYS}
    client_config["num-classes"] = classes
    settings = LoopSettings(
        rounds=int(config["rounds"]),
        clients_per_round=int(config["clients-per-round"]),
        round_timeout=float(config["round-timeout"]),
        min_replies=int(config["min-replies"]),
        seed=seed,
        client_config=client_config,
        node_wait_timeout=max(60.0, float(config["round-timeout"])),
    )
    start = evaluate_fn(initial)
    log.info("initial accuracy %.4f over %s test rows", start["accuracy"], len(test))
    rows_so_far: list[dict[str, Any]] = []

    def after_round(row: Mapping[str, Any]) -> None:
        rows_so_far.append(dict(row))
        if out_dir is not None:  # keep results current, so a long run can be watched
            write_json_atomic(out_dir / "results.json", build_results(
                config, rows_so_far, model_elements=elements, initial=start,
                privacy=ledgers[-1].privacy_block() if ledgers else None))
            # The server state a resumed run needs besides the model: the
            # privacy spent so far (accountant and adaptive clip).
            write_json_atomic(out_dir / "server_state.json", {
                "round": int(row["round"]),
                "privacy": ledgers[-1].state_dict() if ledgers else None})
        if on_round is not None:
            on_round(row)

    final, rows, stopped = run_federation(
        grid, initial, strategy, settings, evaluate_fn=evaluate_fn,
        privacy=None if dp is None else make_ledger, download=download, on_round=after_round)
    results = build_results(config, rows, model_elements=elements, initial=start,
                            privacy=ledgers[-1].privacy_block() if ledgers else None,
                            stopped=stopped)
    if out_dir is not None:
        np.savez(out_dir / "model.npz", *final)
        write_json_atomic(out_dir / "results.json", results)
        write_report(out_dir / "report.png", results)
    return results


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run``: the run config comes from Flower."""
    config = validate(dict(context.run_config), strict=False)
    out = str(config["out-dir"])
    serve(grid, config, out_dir=Path(out) if out else None, on_round=_log_row)


def _log_row(row: Mapping[str, Any]) -> None:
    # Flower's logger is the one `flwr run --stream` and `flwr log` show.
    logging.getLogger("flwr").info(
        "round %s: accuracy %.4f, %s clients, %s rejected, upload %.3f MB, epsilon %s",
        row["round"], row["accuracy"], row["clients"], row["rejected"],
        row["upload_bytes"] / 1e6, row["epsilon"])
