"""What a device holds, runs and spends: training and inference footprint of the demo CNN.

Two measurements, each in a fresh child process so that its peak resident
memory (``VmHWM``; ``ru_maxrss`` would include the parent's) is its own:

* **Training**: one device's round of local training on the demo federation
  (MNIST, ``dirichlet:0.5`` over 50 clients, the CNN, batch 16, lr 0.1) at
  ``local-epochs`` 2 (float32 FedAvg's) and 6 (the recommended communication
  configuration's): peak RSS, RSS after imports and data, CPU seconds
  (``time.process_time``) of the first round in a fresh process (a SuperNode
  starts one per message: torch's lazy imports included) and of the next one
  (a reused process, as Flower's simulation actors), wall seconds and the FLOPs
  PyTorch's counter gives for the round (what the device reports).
* **Inference**: the trained global model as the dense float32 torch module,
  as float32 ONNX and as int8 ONNX in onnxruntime (``flowerpress export``):
  artifact size, peak RSS of a process that loads it and classifies the test
  set one example at a time, latency per example (median, one thread), and
  accuracy / macro-F1 on the 1,000 test digits (from the export's sidecar).
  The onnxruntime children import numpy and onnxruntime only, as a device
  running the artifact would; the torch child imports torch.

The global models come from in-process runs of the demo federation
(``serve`` on :class:`flowerpress.testing.InProcessGrid`, float32 FedAvg,
``--rounds`` rounds) at each seed of ``--seeds``, kept under ``--out`` and
reused.

Usage::

    python benchmarks/device_footprint.py [--seeds 0,1,2] [--rounds 10] [--repeats 3]
        [--out runs/device_footprint]

Prints markdown tables and the machine's load; writes ``--out/footprint.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEMO: dict[str, Any] = {"dataset": "mnist", "partition": "dirichlet:0.5", "num-clients": 50,
                        "clients-per-round": 10}

# A device's round of local training, in a fresh process (argv: seed, epochs, partition).
# Peak RSS of this process: VmHWM (ru_maxrss is inherited from the parent across fork+exec).
_PEAK = r"""
def peak_rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0
"""

_TRAIN_CHILD = _PEAK + r"""
import json, resource, sys, time
from flowerpress.config import validate
from flowerpress.tasks import TrainContext
from flowerpress.tasks.registry import build_task, task_spec
seed, epochs, pid = (int(a) for a in sys.argv[1:4])
config = validate({**json.loads(sys.argv[4]), "seed": seed, "local-epochs": epochs})
task = build_task(task_spec(config), config)
data = task.load_data({"partition-id": pid, "num-partitions": int(config["num-clients"])})
weights = task.initial_weights()
rss = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
out = {"examples": len(data), "rss_before_mb": rss / 1e6}
for name in ("cold", "warm"):  # a fresh process (a SuperNode's), then a reused one (Ray's)
    wall, cpu = time.perf_counter(), time.process_time()
    result = task.train(weights, data, TrainContext(server_round=1, seed=seed))
    out[f"{name}_cpu_seconds"] = time.process_time() - cpu
    out[f"{name}_wall_seconds"] = time.perf_counter() - wall
out["flops"] = result.flops
out["peak_rss_mb"] = peak_rss() / 1e6
print(json.dumps(out))
"""

# Inference one example at a time, in a fresh process (argv: kind, model path, data path).
_INFER_CHILD = _PEAK + r"""
import json, resource, statistics, sys, time
import numpy as np
kind, model_path, data_path = sys.argv[1:4]
data = np.load(data_path)
x = data["x"]
if kind == "torch":
    import torch
    from flowerpress.tasks.models import MnistCNN, set_weights
    torch.set_num_threads(1)
    with np.load(model_path) as saved:
        weights = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    rss = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
    model = MnistCNN()
    set_weights(model, weights)
    model.eval()
    def run(batch):
        with torch.no_grad():
            return model(torch.from_numpy(batch)).numpy()
else:
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    rss = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
    session = onnxruntime.InferenceSession(model_path, options,
                                           providers=["CPUExecutionProvider"])
    def run(batch):
        return session.run(None, {"input": batch})[0]
for i in range(20):
    run(x[i:i + 1])
times = []
for i in range(len(x)):
    start = time.perf_counter()
    run(x[i:i + 1])
    times.append(time.perf_counter() - start)
out = {"latency_ms": 1000 * statistics.median(times), "examples": len(x),
       "rss_after_import_mb": rss / 1e6,
       "peak_rss_mb": peak_rss() / 1e6}
print(json.dumps(out))
"""


def machine() -> str:
    """The machine and its load (others' jobs share it: the seconds depend on it)."""
    load = os.getloadavg()
    return (f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"torch and onnxruntime on CPU; load average {load[0]:.1f}, {load[1]:.1f}, "
            f"{load[2]:.1f}")


def _child(code: str, *args: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"child failed: {done.stderr.strip().splitlines()[-1:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def trained_run(seed: int, rounds: int, out: Path) -> Path:
    """A demo run directory (results.json, model.npz) at ``seed``: reused if it is there."""
    run = out / f"seed-{seed}"
    if (run / "model.npz").exists() and (run / "results.json").exists():
        return run
    from flowerpress.config import validate
    from flowerpress.server.app import serve
    from flowerpress.simulations.app import app as client_app
    from flowerpress.testing import InProcessGrid, server_identity

    config = validate({**DEMO, "seed": seed, "rounds": rounds, "overwrite": True})
    with server_identity():
        serve(InProcessGrid(client_app, int(config["num-clients"]), run_config=config), config,
              out_dir=run)
    return run


def median_partition(seed: int) -> int:
    """The partition of median size at ``seed`` (a typical device)."""
    from flowerpress.config import validate
    from flowerpress.tasks.registry import build_task, task_spec

    config = validate({**DEMO, "seed": seed})
    task = build_task(task_spec(config), config)
    sizes = sorted((len(task.load_data({"partition-id": p, "num-partitions": 50})), p)
                   for p in range(50))
    return sizes[len(sizes) // 2][1]


def _mw(values: Sequence[float], fmt: str, worst: Any = max) -> str:
    return f"{format(statistics.median(values), fmt)} / {format(worst(values), fmt)}"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=10,
                        help="rounds of the demo runs whose global models are exported")
    parser.add_argument("--repeats", type=int, default=3, help="training children per setting")
    parser.add_argument("--out", type=Path, default=Path("runs/device_footprint"))
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    print(f"machine: {machine()}", flush=True)
    report: dict[str, Any] = {"machine_start": machine(), "training": {}, "inference": {}}

    # --- training: one device's round, fresh process per measurement -------------------
    pid = median_partition(seeds[0])
    train_rows = []
    for epochs in (2, 6):
        runs = [_child(_TRAIN_CHILD, str(seeds[0]), str(epochs), str(pid), json.dumps(DEMO))
                for _ in range(args.repeats)]
        report["training"][epochs] = runs
        train_rows.append(
            f"| {epochs} | {runs[0]['examples']} | {runs[0]['flops'] / 1e9:.2f} "
            f"| {_mw([r['cold_cpu_seconds'] for r in runs], '.2f')} "
            f"| {_mw([r['warm_cpu_seconds'] for r in runs], '.2f')} "
            f"| {_mw([r['warm_wall_seconds'] for r in runs], '.2f')} "
            f"| {_mw([r['rss_before_mb'] for r in runs], '.0f')} "
            f"| {_mw([r['peak_rss_mb'] for r in runs], '.0f')} |")
        print(f"training, {epochs} local epochs: {runs}", flush=True)

    # --- inference: dense float32 torch, float32 ONNX, int8 ONNX ------------------------
    import numpy as np

    from flowerpress.export import ExportRequest, export_run

    per_seed: list[dict[str, Any]] = []
    for seed in seeds:
        run = trained_run(seed, args.rounds, args.out)
        accuracy = json.loads((run / "results.json").read_text())["summary"]["final_accuracy"]
        sidecars = {q: export_run(ExportRequest(run, args.out / f"seed-{seed}-{q}.onnx",
                                                quantize=q, latency_examples=300))
                    for q in ("none", "int8")}
        from flowerpress.config import validate
        from flowerpress.tasks.registry import build_task, task_spec

        config = validate({**DEMO, "seed": seed})
        test = build_task(task_spec(config), config).central_data()
        data = args.out / f"seed-{seed}-test.npz"
        np.savez(data, x=test.x)
        children = {
            "float32 torch": _child(_INFER_CHILD, "torch", str(run / "model.npz"), str(data)),
            "float32 ONNX": _child(_INFER_CHILD, "onnx", str(args.out / f"seed-{seed}-none.onnx"),
                                   str(data)),
            "int8 ONNX": _child(_INFER_CHILD, "onnx", str(args.out / f"seed-{seed}-int8.onnx"),
                                str(data))}
        per_seed.append({"seed": seed, "run_accuracy": accuracy, "sidecars": sidecars,
                         "children": children})
        print(f"seed {seed}: {json.dumps(children)}", flush=True)
    report["inference"] = per_seed
    report["machine_end"] = machine()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "footprint.json").write_text(json.dumps(report, indent=1))

    print()
    print("| local epochs | examples | GFLOPs per round (torch counter) | CPU s, first round "
          "in a fresh process (median / worst) | CPU s, next round (median / worst) "
          "| wall s, next round | RSS before training, MB | peak RSS, MB (median / worst) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(train_rows))
    print()
    print("| model | size, kB (median) | x smaller than float32 state (median / worst) "
          "| accuracy (median / worst) | macro-F1 (median / worst) "
          "| accuracy minus float32, points (median / worst) | latency ms/example (median / "
          "worst) | peak RSS, MB (median / worst) | RSS after import, MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in ("float32 torch", "float32 ONNX", "int8 ONNX"):
        children = [s["children"][name] for s in per_seed]
        if name == "float32 torch":
            size = [s["sidecars"]["none"]["float32_state_bytes"] / 1e3 for s in per_seed]
            ratio = [1.0 for _ in per_seed]
            acc = [s["sidecars"]["none"]["accuracy"]["float32_torch"] for s in per_seed]
            f1 = [s["sidecars"]["none"]["f1_macro"]["float32_torch"] for s in per_seed]
            drop = [0.0 for _ in per_seed]
        else:
            key = "none" if name == "float32 ONNX" else "int8"
            size = [s["sidecars"][key]["artifact_bytes"] / 1e3 for s in per_seed]
            ratio = [s["sidecars"][key]["size_ratio"] for s in per_seed]
            acc = [s["sidecars"][key]["accuracy"]["artifact"] for s in per_seed]
            f1 = [s["sidecars"][key]["f1_macro"]["artifact"] for s in per_seed]
            drop = [-s["sidecars"][key]["accuracy_drop_points"] for s in per_seed]
        print(f"| {name} | {statistics.median(size):.1f} | {_mw(ratio, '.2f', min)} "
              f"| {_mw(acc, '.4f', min)} | {_mw(f1, '.4f', min)} | {_mw(drop, '+.2f', min)} "
              f"| {_mw([c['latency_ms'] for c in children], '.3f')} "
              f"| {_mw([c['peak_rss_mb'] for c in children], '.0f')} "
              f"| {statistics.median(c['rss_after_import_mb'] for c in children):.0f} |")
    print()
    print(f"machine at the end: {machine()}")
    print(f"time: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


if __name__ == "__main__":
    main()
