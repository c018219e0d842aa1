"""The cost of one train message on a device: flowerpress vs a vanilla Flower ClientApp.

A Flower 1.41 SuperNode runs every message in a fresh process: its SuperExec starts
``flwr-clientapp --runtime-api-address ... --token ...`` (``SubprocessExecutor``; the
default ``--isolation subprocess``), and that process (``run_clientapp``) pulls the
message, the Context and the FAB from the SuperNode's Runtime API, installs the FAB
(extract, verify hashes; reused when the same FAB is installed under ``$FLWR_HOME``),
loads the ClientApp with ``get_load_client_app_fn`` (the app directory first on
``sys.path``), calls it, pushes the reply's objects and the Context, and exits.

This benchmark runs exactly that in a fresh interpreter per message, with the
Runtime API's network calls replaced by files: the message is inflated from its
object tree by Flower's ``pull_and_inflate_object_from_tree``, the Context by
``context_from_proto``, and the reply is deflated as ``push_message`` does. Both apps
get the same model (flowerpress's digits MLP, 4,810 parameters), the same weights
and the same data (a device ``.npz`` file named by ``data-path``), and train one
local epoch of SGD with batch size 16.

Breakdown per message, in CPU seconds of the ClientApp process (user + system:
what a device pays, and robust to other jobs on a shared machine) and in wall
seconds; medians over ``--messages`` launches per app, the apps interleaved, after
one warm-up message per app that installs the FAB, writes bytecode and fills
flowerpress's device cache, as the first message of a run does on a device:

* interpreter: process spawn to the first line of the child (Python start-up);
* flwr runtime: importing ``flwr.supernode.cli`` (what ``flwr-clientapp`` imports);
* FAB install: ``install_from_fab`` of the app's FAB;
* app import: ``load_app`` of the ClientApp (torch, the app's modules);
* message in: inflating the message and the Context;
* data: the node's data (flowerpress: its device cache; vanilla: ``np.load``);
* training: the task's ``train`` (model build, SGD);
* handler rest: everything else inside ``ClientApp.__call__`` (mods, validation);
* reply: deflating the reply's objects and the Context for the push;
* exit: interpreter shutdown, to the parent seeing the process end.

Usage::

    .venv/bin/python benchmarks/clientapp_cost.py [--messages 7] [--workdir DIR]
"""

from __future__ import annotations

import time

_T_FIRST_LINE = time.time()  # the child's first statement: everything before is start-up
_CPU_FIRST_LINE = time.process_time()  # CPU seconds the interpreter's start-up took

import argparse  # noqa: E402 (the clock above must come first)
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VANILLA_APP = REPO / "benchmarks" / "deploy_fedavg"
STAGES = ("interpreter", "flwr runtime", "FAB install", "app import", "message in", "data",
          "training", "handler rest", "reply", "exit")
NODE_ID = 4242
RUN_ID = 7


# ----------------------------------------------------------------------- the child
def _probe(target: str, name: str, spent: dict[str, list[float]]) -> None:
    """Wrap ``module:Qual.name`` so that its wall and CPU seconds add up in ``spent[name]``."""
    import functools
    import importlib

    module_name, qualname = target.split(":")
    owner: Any = importlib.import_module(module_name)
    *path, attr = qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    original = getattr(owner, attr)

    @functools.wraps(original)
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = (time.perf_counter(), time.process_time())
        try:
            return original(*args, **kwargs)
        finally:
            total = spent.setdefault(name, [0.0, 0.0])
            total[0] += time.perf_counter() - start[0]
            total[1] += time.process_time() - start[1]

    setattr(owner, attr, timed)


class _Stages:
    """Wall and CPU seconds per stage of the child."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._start = (time.perf_counter(), time.process_time())

    def lap(self, name: str) -> None:
        now = (time.perf_counter(), time.process_time())
        self.wall[name] = self.wall.get(name, 0.0) + now[0] - self._start[0]
        self.cpu[name] = self.cpu.get(name, 0.0) + now[1] - self._start[1]
        self._start = now


def child(spec_path: Path) -> None:
    """One ClientApp message, as ``flwr-clientapp`` runs it; print the stage times."""
    stages = _Stages()
    import flwr.supernode.cli  # noqa: F401 (what the flwr-clientapp console script imports)

    stages.lap("flwr runtime")
    from flwr.app import Message
    from flwr.app.message import remove_content_from_message
    from flwr.cli.install import install_from_fab
    from flwr.clientapp.utils import get_load_client_app_fn
    from flwr.common.serde import context_from_proto, context_to_proto, message_to_proto
    from flwr.proto.message_pb2 import Context as ProtoContext
    from flwr.proto.message_pb2 import ObjectTree
    from flwr.supercore.inflatable.inflatable_object import (
        get_all_nested_objects,
        get_object_tree,
        no_object_id_recompute,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity

    spec = json.loads(spec_path.read_text())
    inputs = Path(spec["inputs"])
    # What pull_task_input sets from the Runtime API's answer.
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, RUN_ID, NODE_ID
    stages.lap("flwr runtime")  # still Flower's own modules

    install_from_fab((inputs / "app.fab").read_bytes(), skip_prompt=True)
    stages.lap("FAB install")

    app = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)(
        spec["fab_id"], spec["fab_version"], spec["fab_hash"])
    stages.lap("app import")

    spent: dict[str, list[float]] = {}
    for name, target in spec["probes"].items():
        _probe(target, name, spent)
    objects = json.loads((inputs / "message-objects.json").read_text())
    contents = {k: bytes.fromhex(v) for k, v in objects.items()}
    tree = ObjectTree.FromString((inputs / "message-tree.bin").read_bytes())
    message = pull_and_inflate_object_from_tree(tree, contents.__getitem__, lambda _: None,
                                                return_type=Message)
    message.metadata.__dict__["_message_id"] = tree.object_id
    context = context_from_proto(ProtoContext.FromString(
        (inputs / "context.bin").read_bytes()))
    stages.lap("message in")

    reply = app(message=message, context=context)
    stages.lap("handler")
    if reply.has_error():
        raise SystemExit(f"the ClientApp replied with an error: {reply.error.reason}")
    for name in ("data", "training"):
        wall, cpu = spent.get(name, [0.0, 0.0])
        stages.wall[name], stages.cpu[name] = wall, cpu
        stages.wall["handler"] -= wall
        stages.cpu["handler"] -= cpu
    stages.wall["handler rest"] = stages.wall.pop("handler")
    stages.cpu["handler rest"] = stages.cpu.pop("handler")

    reply.metadata.__dict__["_message_id"] = reply.object_id
    proto = message_to_proto(remove_content_from_message(reply))
    with no_object_id_recompute():
        reply_tree = get_object_tree(reply)
        pushed = sum(len(obj.deflate()) for obj in get_all_nested_objects(reply).values())
    pushed += len(proto.SerializeToString()) + len(reply_tree.SerializeToString())
    pushed += len(context_to_proto(context).SerializeToString())
    stages.lap("reply")
    print(json.dumps({"wall": stages.wall, "cpu": stages.cpu, "reply-bytes": pushed,
                      "first-line": _T_FIRST_LINE, "startup-cpu": _CPU_FIRST_LINE,
                      "last-line": time.time(), "cpu-at-exit": time.process_time()}),
          flush=True)


# ---------------------------------------------------------------------- the parent
def _fab(app_dir: Path) -> tuple[bytes, str, str, str]:
    import hashlib

    from flwr.cli.build import build_fab_from_disk
    from flwr.common.config import get_metadata_from_config, get_project_config

    fab = build_fab_from_disk(app_dir)
    fab_id, version = get_metadata_from_config(get_project_config(app_dir))
    return fab, fab_id, version, hashlib.sha256(fab).hexdigest()


def _prepare(workdir: Path, name: str, app_dir: Path, run_config_overrides: dict[str, Any],
             node_config: dict[str, Any], content: Any, probes: dict[str, str]) -> Path:
    """Write the FAB, the message's objects, the Context and the child's spec."""
    from flwr.app import Context, Message, MessageType, RecordDict
    from flwr.common.config import get_fused_config_from_dir
    from flwr.common.serde import context_to_proto
    from flwr.supercore.inflatable.inflatable_object import (
        get_all_nested_objects,
        get_object_tree,
    )

    inputs = workdir / name
    inputs.mkdir(parents=True, exist_ok=True)
    fab, fab_id, version, fab_hash = _fab(app_dir)
    (inputs / "app.fab").write_bytes(fab)
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    # What the ServerApp process knows when its Grid creates the message.
    TaskIdentity.task_id, TaskIdentity.run_id = 1, RUN_ID
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    message = Message(content, dst_node_id=NODE_ID, message_type=MessageType.TRAIN,
                      group_id="1")
    objects = {k: v.deflate().hex() for k, v in get_all_nested_objects(message).items()}
    (inputs / "message-objects.json").write_text(json.dumps(objects))
    (inputs / "message-tree.bin").write_bytes(get_object_tree(message).SerializeToString())
    run_config = get_fused_config_from_dir(app_dir, run_config_overrides)
    context = Context(run_id=RUN_ID, node_id=NODE_ID, node_config=node_config,
                      state=RecordDict(), run_config=run_config)
    (inputs / "context.bin").write_bytes(context_to_proto(context).SerializeToString())
    spec = inputs / "spec.json"
    spec.write_text(json.dumps({"inputs": str(inputs), "fab_id": fab_id,
                                "fab_version": version, "fab_hash": fab_hash,
                                "probes": probes}))
    return spec


def _launch(spec: Path, flwr_home: Path) -> dict[str, Any]:
    import resource

    env = {**os.environ, "FLWR_HOME": str(flwr_home), "FLWR_TELEMETRY_ENABLED": "0"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.time()
    done = subprocess.run([sys.executable, __file__, "--child", str(spec)], env=env,
                          capture_output=True, text=True, timeout=900, check=False)
    end = time.time()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"child failed ({done.returncode}):\n{done.stderr[-3000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    cpu_total = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    wall, cpu = out["wall"], out["cpu"]
    wall["interpreter"] = out["first-line"] - start
    cpu["interpreter"] = out["startup-cpu"]
    wall["exit"] = end - out["last-line"]
    cpu["exit"] = max(cpu_total - out["cpu-at-exit"], 0.0)
    wall["total"], cpu["total"] = end - start, cpu_total
    return {"wall": wall, "cpu": cpu, "reply-bytes": out["reply-bytes"]}


def _cpu_load() -> str:
    load = os.getloadavg()
    return f"load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} on {os.cpu_count()} CPUs"


def main(argv: list[str] | None = None) -> int:
    """Build the inputs, launch the messages alternately, print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=7, help="timed launches per app")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the inputs here")
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        child(args.child)
        return 0

    from flwr.app import ArrayRecord, RecordDict
    from sklearn.datasets import load_digits

    from flowerpress.deploy.data import save_device_data
    from flowerpress.protocol import CONFIG, TrainInstruction
    from flowerpress.tasks.registry import build_task

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="clientapp-cost-"))
    workdir.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    rows = slice(0, 480)  # about a third of the 80 % training split: one of 3 devices
    data_file = save_device_data(workdir / "device.npz", digits.data[rows] / 16.0,
                                 digits.target[rows])
    run_config = {"dataset": "digits", "local-epochs": 1, "batch-size": 16, "lr": 0.1,
                  "num-clients": 3, "clients-per-round": 3}
    weights = build_task("bundled", run_config).initial_weights()

    fp_content = RecordDict({"arrays": ArrayRecord(weights)})
    fp_content[CONFIG] = TrainInstruction(server_round=1, seed=0, compression="none",
                                          cohort_size=3).to_record()
    keys = ("net.1.weight", "net.1.bias", "net.3.weight", "net.3.bias")
    import torch

    vanilla_content = RecordDict({"arrays": ArrayRecord(
        dict(zip(keys, (torch.from_numpy(w) for w in weights), strict=True)))})
    cache_dir = workdir / "device-cache"
    cases = {
        "vanilla Flower": _prepare(
            workdir, "vanilla", VANILLA_APP,
            {"local-epochs": 1, "batch-size": 16, "lr": 0.1},
            {"data-path": str(data_file)}, vanilla_content,
            {"data": "fedavg_app:load_data", "training": "fedavg_app:train_fn"}),
        "flowerpress, data-path": _prepare(
            workdir, "flowerpress", REPO, run_config,
            {"data-path": str(data_file), "cache-dir": str(cache_dir)}, fp_content,
            {"data": "flowerpress.client.app:node_data",
             "training": "flowerpress.tasks.classifier:TorchClassifierTask.train"}),
        "flowerpress, partition": _prepare(
            workdir, "flowerpress-partition", REPO, run_config,
            {"partition-id": 0, "num-partitions": 3, "cache-dir": str(cache_dir)}, fp_content,
            {"data": "flowerpress.client.app:node_data",
             "training": "flowerpress.tasks.classifier:TorchClassifierTask.train"}),
    }
    homes = {name: workdir / f"flwr-home-{i}" for i, name in enumerate(cases)}
    load_before = _cpu_load()
    cold = {name: _launch(spec, homes[name]) for name, spec in cases.items()}  # warm-up
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in cases}
    for _ in range(args.messages):
        for name, spec in cases.items():
            samples[name].append(_launch(spec, homes[name]))
    load_after = _cpu_load()

    def med(name: str, kind: str, stage: str) -> float:
        return statistics.median(sample[kind][stage] for sample in samples[name])

    names = list(cases)
    print(f"\nOne train message in a fresh process, as a SuperNode runs it "
          f"({args.messages} launches per app, interleaved; medians).")
    print(f"Machine: {os.cpu_count()} CPUs; before: {load_before}; after: {load_after}.")
    for kind, title in (("cpu", "CPU seconds (user + system) of the ClientApp process"),
                        ("wall", "wall seconds")):
        base = med("vanilla Flower", kind, "total")
        print(f"\n{title}\n")
        print("| stage | " + " | ".join(names) + " |")
        print("|---|" + "---:|" * len(names))
        for stage in STAGES:
            print(f"| {stage} | " + " | ".join(f"{med(n, kind, stage):.3f}" for n in names)
                  + " |")
        print("| **total** | " + " | ".join(f"**{med(n, kind, 'total'):.3f}**" for n in names)
              + " |")
        print("| ratio to vanilla | " + " | ".join(
            f"{med(n, kind, 'total') / base:.2f}x" for n in names) + " |")
    print("\nreply bytes: " + ", ".join(
        f"{n} {int(statistics.median(s['reply-bytes'] for s in samples[n])):,}" for n in names))
    print("First message (FAB installed, bytecode written, device cache filled): "
          + "; ".join(f"{n} {cold[n]['wall']['total']:.2f} s wall, "
                      f"{cold[n]['cpu']['total']:.2f} s CPU (data {cold[n]['cpu']['data']:.2f})"
                      for n in names))
    (workdir / "clientapp_cost.json").write_text(json.dumps(
        {"cold": cold, "samples": samples, "load": [load_before, load_after]}, indent=1))
    print(f"Raw samples: {workdir / 'clientapp_cost.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
