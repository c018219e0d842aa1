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

Breakdown per message (medians over ``--messages`` launches, after one warm-up
message per app that installs the FAB, writes bytecode and fills flowerpress's
device cache, as the first message of a run does on a device):

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
def _probe(target: str, name: str, spent: dict[str, float]) -> None:
    """Wrap ``module:Qual.name`` so that the seconds spent in it add up in ``spent[name]``."""
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
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - start

    setattr(owner, attr, timed)


def child(spec_path: Path) -> None:
    """One ClientApp message, as ``flwr-clientapp`` runs it; print the stage times."""
    marks = {"first-line": _T_FIRST_LINE}
    clock = time.perf_counter
    t = clock()
    import flwr.supernode.cli  # noqa: F401 (what the flwr-clientapp console script imports)

    marks["flwr runtime"] = clock() - t

    from flwr.cli.install import install_from_fab
    from flwr.clientapp.utils import get_load_client_app_fn
    from flwr.common.serde import context_from_proto, context_to_proto, message_to_proto
    from flwr.proto.message_pb2 import Context as ProtoContext  # noqa: N811
    from flwr.proto.message_pb2 import ObjectTree
    from flwr.supercore.inflatable.inflatable_object import (
        get_all_nested_objects,
        get_object_tree,
        no_object_id_recompute,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree

    from flwr.app import Message
    from flwr.app.message import remove_content_from_message

    from flwr.supercore.task_identity import TaskIdentity

    spec = json.loads(spec_path.read_text())
    inputs = Path(spec["inputs"])
    # What pull_task_input sets from the Runtime API's answer.
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, RUN_ID, NODE_ID

    t = clock()
    install_from_fab((inputs / "app.fab").read_bytes(), skip_prompt=True)
    marks["FAB install"] = clock() - t

    t = clock()
    app = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)(
        spec["fab_id"], spec["fab_version"], spec["fab_hash"])
    marks["app import"] = clock() - t

    spent: dict[str, float] = {}
    for name, target in spec["probes"].items():
        _probe(target, name, spent)

    t = clock()
    objects = json.loads((inputs / "message-objects.json").read_text())
    contents = {k: bytes.fromhex(v) for k, v in objects.items()}
    tree = ObjectTree.FromString((inputs / "message-tree.bin").read_bytes())
    message = pull_and_inflate_object_from_tree(tree, contents.__getitem__, lambda _: None,
                                                return_type=Message)
    message.metadata.__dict__["_message_id"] = tree.object_id
    context = context_from_proto(ProtoContext.FromString(
        (inputs / "context.bin").read_bytes()))
    marks["message in"] = clock() - t

    t = clock()
    reply = app(message=message, context=context)
    call = clock() - t
    if reply.has_error():
        raise SystemExit(f"the ClientApp replied with an error: {reply.error.reason}")
    marks["data"] = spent.get("data", 0.0)
    marks["training"] = spent.get("training", 0.0)
    marks["handler rest"] = call - marks["data"] - marks["training"]

    t = clock()
    reply.metadata.__dict__["_message_id"] = reply.object_id
    proto = message_to_proto(remove_content_from_message(reply))
    with no_object_id_recompute():
        reply_tree = get_object_tree(reply)
        pushed = sum(len(obj.deflate()) for obj in get_all_nested_objects(reply).values())
    pushed += len(proto.SerializeToString()) + len(reply_tree.SerializeToString())
    pushed += len(context_to_proto(context).SerializeToString())
    marks["reply"] = clock() - t
    marks["reply-bytes"] = pushed
    marks["last-line"] = time.time()
    print(json.dumps(marks), flush=True)


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


def _launch(spec: Path, flwr_home: Path) -> dict[str, float]:
    env = {**os.environ, "FLWR_HOME": str(flwr_home), "FLWR_TELEMETRY_ENABLED": "0"}
    start = time.time()
    done = subprocess.run([sys.executable, __file__, "--child", str(spec)], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    end = time.time()
    if done.returncode != 0:
        raise SystemExit(f"child failed ({done.returncode}):\n{done.stderr[-3000:]}")
    marks = json.loads(done.stdout.strip().splitlines()[-1])
    marks["interpreter"] = marks.pop("first-line") - start
    marks["exit"] = end - marks.pop("last-line")
    marks["total"] = end - start
    return marks


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

    import numpy as np
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
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in cases}
    for _ in range(args.messages):
        for name, spec in cases.items():
            samples[name].append(_launch(spec, homes[name]))
    load_after = _cpu_load()

    def med(name: str, stage: str) -> float:
        return statistics.median(s[stage] for s in samples[name])

    base = med("vanilla Flower", "total")
    print(f"\nOne train message in a fresh process, as a SuperNode runs it "
          f"({args.messages} launches per app, medians, seconds).")
    print(f"Machine: {os.cpu_count()} CPUs; before: {load_before}; after: {load_after}.\n")
    names = list(cases)
    print("| stage | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for stage in STAGES:
        print(f"| {stage} | " + " | ".join(f"{med(n, stage):.3f}" for n in names) + " |")
    print("| **total** | " + " | ".join(f"**{med(n, 'total'):.3f}**" for n in names) + " |")
    print("| ratio to vanilla | " + " | ".join(f"{med(n, 'total') / base:.2f}x"
                                             for n in names) + " |")
    print("| reply bytes | " + " | ".join(f"{int(med(n, 'reply-bytes')):,}"
                                        for n in names) + " |")
    print("\nFirst message (FAB install, bytecode, device cache filled), seconds: "
          + "; ".join(f"{n} {cold[n]['total']:.2f} (data {cold[n]['data']:.2f})"
                      for n in names))
    (workdir / "clientapp_cost.json").write_text(json.dumps(
        {"cold": cold, "samples": samples, "load": [load_before, load_after]}, indent=1))
    print(f"Raw samples: {workdir / 'clientapp_cost.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
