"""Round latency on a real (local) Flower deployment: vanilla FedAvg vs flowerpress.

Starts one TLS SuperLink with SuperNode authentication and ``--nodes`` SuperNodes on
loopback (``flowerpress.deploy.local.LocalDeployment``). Every SuperNode is a device
with its own data file (``data-path``: its partition of scikit-learn's digits, as
flowerpress's ``digits`` task splits them), and three runs are submitted with
``flwr run`` into that one federation:

1. ``benchmarks/deploy_fedavg`` with ``server-loop="flwr"`` -- Flower's own
   ``flwr.serverapp.strategy.FedAvg.start`` driving ``Grid.send_and_receive`` (which
   sleeps 3 s between pulls); its ClientApp trains the same torch MLP as flowerpress
   (4,810 parameters) on the node's ``data-path`` for one local epoch;
2. the same app and clients with ``server-loop="flowerpress"`` -- the same weighted
   mean, replies collected by flowerpress's adaptive poll
   (``flowerpress.server.loop.poll_replies``): the difference to 1 is the server
   loop's waiting alone;
3. the flowerpress app (this repository), ``dataset="digits"``: the same model, the
   same data files, one local epoch with the same batch size and learning rate, plus
   what flowerpress adds (reply validation, central evaluation, results.json).

Prints per-round wall seconds, the ratios to vanilla FedAvg, and the ClientApp
compute time Flower reports (``flwr ls``), which separates client work (a SuperNode
starts one ClientApp process per message) from the server's waiting.

Usage::

    .venv/bin/python benchmarks/deploy_latency.py [--nodes 3] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from flowerpress.deploy.local import LocalDeployment

REPO = Path(__file__).resolve().parents[1]
BASELINE_APP = REPO / "benchmarks" / "deploy_fedavg"


def _clientapp_launches(dep: LocalDeployment) -> int:
    """ClientApp processes started so far (a SuperNode starts one per message)."""
    return sum(
        proc.output().count("Start `flwr-clientapp` process") for proc in dep.supernodes.values()
    )


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.1f} / {five:.1f} / {fifteen:.1f} on {os.cpu_count()} CPUs"


def _run(
    dep: LocalDeployment, app: Path, config: dict[str, Any], timeout: float
) -> tuple[list[float], dict[str, Any]]:
    out_dir = Path(config["out-dir"])
    launches_before = _clientapp_launches(dep)
    started = time.monotonic()
    run_id = dep.run_app(app, config)
    status = dep.wait_run(run_id, timeout=timeout)
    if status["status"] != "finished:completed":
        raise SystemExit(f"run {run_id} of {app.name}: {status['status']}\n{dep.run_log(run_id)}")
    status["wall-seconds"] = time.monotonic() - started
    status["clientapp-launches"] = _clientapp_launches(dep) - launches_before
    rows = json.loads((out_dir / "results.json").read_text())["rounds"]
    # What flowerpress counted: whole serialized Flower messages, both directions
    # (only the flowerpress app writes these columns).
    status["counted-bytes"] = {
        key: sum(int(row.get(key) or 0) for row in rows)
        for key in ("upload_bytes", "download_bytes", "upload_payload_bytes",
                    "download_payload_bytes")
    }
    return [float(row["seconds"]) for row in rows], status


def _device_files(workdir: Path, nodes: int) -> list[Path]:
    """One data file per device: partition i of flowerpress's digits split (Dirichlet 0.5)."""
    from flowerpress.deploy.data import save_device_data
    from flowerpress.tasks.bundled import BundledTask

    task = BundledTask(dataset="digits", num_partitions=nodes)
    files = []
    for i in range(nodes):
        split = task.load_data({"partition-id": i, "num-partitions": nodes})
        files.append(save_device_data(workdir / f"device-{i}.npz", split.x, split.y))
    return files


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3, help="SuperNodes (default 3)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per run (default 5)")
    parser.add_argument("--timeout", type=float, default=900.0, help="bound per run, seconds")
    parser.add_argument("--workdir", type=Path, default=None, help="keep logs here")
    parser.add_argument("--compression", default="none",
                        help="the flowerpress app's compression spec (default none)")
    args = parser.parse_args(argv)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="deploy-latency-"))
    workdir.mkdir(parents=True, exist_ok=True)
    data_files = _device_files(workdir, args.nodes)
    params = 4810  # digits MLP: 64*64 + 64 + 64*10 + 10
    load_before = _load()
    t0 = time.monotonic()
    with LocalDeployment(workdir, nodes=args.nodes, startup_timeout=120.0) as dep:
        dep.start_superlink()
        for i in range(args.nodes):
            dep.register(i)
            dep.start_supernode(i, {"data-path": str(data_files[i])})
        dep.wait_nodes_online(args.nodes)
        setup_s = time.monotonic() - t0

        training = {"local-epochs": 1, "batch-size": 16, "lr": 0.1}
        base_config: dict[str, Any] = {
            "rounds": args.rounds,
            "min-nodes": args.nodes,
            "server-loop": "flwr",
            "out-dir": str(workdir / "out-fedavg"),
            **training,
        }
        base_rounds, base_status = _run(dep, BASELINE_APP, base_config, args.timeout)
        fp_config: dict[str, Any] = {
            "rounds": args.rounds,
            "dataset": "digits",
            "num-clients": args.nodes,
            "clients-per-round": args.nodes,
            "min-replies": args.nodes,
            "out-dir": str(workdir / "out-flowerpress"),
            "compression": args.compression,
            **training,
        }
        fp_rounds, fp_status = _run(dep, REPO, fp_config, args.timeout)
        poll_config = {**base_config, "server-loop": "flowerpress",
                       "out-dir": str(workdir / "out-fedavg-poll")}  # fmt: skip
        poll_rounds, poll_status = _run(dep, BASELINE_APP, poll_config, args.timeout)

    print(
        f"\nLocal deployment: TLS + SuperNode auth, {args.nodes} SuperNodes on loopback with "
        f"data-path files, {params} model parameters, setup {setup_s:.1f} s; before: "
        f"{load_before}; after: {_load()} (logs: {workdir})\n"
    )
    print(
        "| round | vanilla FedAvg (s) | same clients, flowerpress poll (s) "
        "| flowerpress app (s) | poll / vanilla | app / vanilla |"
    )
    print("|------:|----:|----:|----:|----:|----:|")
    columns = (base_rounds, poll_rounds, fp_rounds)
    for i, (base, poll, fp) in enumerate(zip(*columns, strict=True), start=1):
        print(f"| {i} | {base:.2f} | {poll:.2f} | {fp:.2f} | {poll / base:.2f} | {fp / base:.2f} |")
    base_med, poll_med, fp_med = (statistics.median(c) for c in columns)
    print(
        f"| median | {base_med:.2f} | {poll_med:.2f} | {fp_med:.2f} | "
        f"{poll_med / base_med:.2f} | {fp_med / base_med:.2f} |"
    )

    print(
        "\n| run | wall s (submit to finished) | ServerApp s | ClientApp s (sum) "
        "| ClientApp launches | ClientApp s per launch |"
    )
    print("|-----|----:|----:|----:|----:|----:|")
    runs = (
        ("vanilla FedAvg", base_status),
        ("same clients, flowerpress poll", poll_status),
        ("flowerpress app", fp_status),
    )
    for name, status in runs:
        compute = status.get("compute-time", {})
        client_s = float(compute.get("clientapp-seconds", float("nan")))
        launches = int(status["clientapp-launches"])
        per_launch = client_s / launches if launches else float("nan")
        print(
            f"| {name} | {status['wall-seconds']:.1f} | "
            f"{float(compute.get('serverapp-seconds', float('nan'))):.1f} | {client_s:.1f} | "
            f"{launches} | {per_launch:.2f} |"
        )

    # Cross-check of the byte counts: Flower's own count of the run's traffic on the
    # Fleet API (SuperLink <-> SuperNodes: every pull and push request and response,
    # and the pushed and pulled objects, as protobuf sizes; TLS and HTTP/2 framing
    # not included) against the serialized messages flowerpress counts.
    print("\n| run | Flower: SuperLink inbound B | Flower: SuperLink outbound B | Flower: total B "
          "| flowerpress: upload B | flowerpress: download B | flowerpress: total B "
          "| Flower / flowerpress |")
    print("|-----|----:|----:|----:|----:|----:|----:|----:|")
    for name, status in runs:
        traffic = status.get("network-traffic", {})
        inbound = int(traffic.get("inbound-bytes", 0))
        outbound = int(traffic.get("outbound-bytes", 0))
        counted = status.get("counted-bytes", {})
        up, down = int(counted.get("upload_bytes", 0)), int(counted.get("download_bytes", 0))
        ratio = f"{(inbound + outbound) / (up + down):.3f}" if up + down else "n/a"
        print(f"| {name} | {inbound:,} | {outbound:,} | {inbound + outbound:,} | {up:,} | "
              f"{down:,} | {up + down:,} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
