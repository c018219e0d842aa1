"""A simulation on an existing Ray cluster: ``flowerpress simulate --ray-address``.

The real-cluster check of issue 22, item 5 (the test suite checks the address's
way to the SuperLink in process, ``tests/simulations/test_ray_address.py``; this
takes a minute or more on a 2-core machine):

1. starts a Ray head on loopback, as docs/ and the README tell a user to:
   ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 ray start --head --block --port P ...``
   with private ports for the GCS, the Ray Client server, the dashboard and its
   agent, and its own temporary directory;
2. runs a tiny ``flowerpress simulate --ray-address 127.0.0.1:P`` (digits,
   logistic regression, ``--clients`` clients, ``--rounds`` rounds);
3. asks the cluster (Ray's own job and actor tables, through ``ray.init``) what
   ran on it: the simulation's driver (``flwr-simulation``) as a job and its
   ``ClientAppActor`` actors, and prints them;
4. stops the head it started: SIGTERM to its process group, SIGKILL after 20 s.

Exit status 0 when the run finished and used the cluster.

Usage::

    .venv/bin/python benchmarks/ray_cluster.py [--clients 3] [--rounds 2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flowerpress.deploy.local import free_port
from flowerpress.simulations.runner import RAY_SINGLE_NODE_ENV

#: Asks the cluster at RAY_ADDRESS for its jobs and actors; prints them as JSON.
QUERY = """
import json, ray
from ray._private import state
ray.init(logging_level="ERROR")
# A driver's command line up to its options (flwr-simulation's carry a run token).
jobs = [{"entrypoint": " ".join(w for w in j["Entrypoint"].split()[:2]), "dead": j["IsDead"]}
        for j in state.jobs()]
actors = sorted({a["ActorClassName"] for a in state.actors().values()})
print(json.dumps({"jobs": jobs, "actors": actors}))
"""


def start_head(workdir: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str, float]:
    """A Ray head on loopback with private ports; its process, address, start-up seconds."""
    port = free_port()
    log = workdir / "ray-head.log"
    argv = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
            "--port", str(port), "--ray-client-server-port", str(free_port()),
            "--dashboard-port", str(free_port()),
            "--dashboard-agent-listen-port", str(free_port()),
            "--include-dashboard=false", "--disable-usage-stats",
            "--temp-dir", str(workdir / "ray"), "--num-cpus", str(os.cpu_count() or 2)]
    started = time.monotonic()
    with log.open("wb") as fh:
        head = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    deadline = started + 180
    while "Ray runtime started" not in log.read_text(errors="replace"):
        if head.poll() is not None or time.monotonic() > deadline:
            stop_head(head)
            raise SystemExit(f"the Ray head did not start; log: {log}")
        time.sleep(0.5)
    return head, f"127.0.0.1:{port}", time.monotonic() - started


def stop_head(head: subprocess.Popen[bytes], grace: float = 20.0) -> None:
    """SIGTERM the head's process group (``ray start --block`` stops its services);
    SIGKILL what is left after ``grace`` seconds."""
    try:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=grace)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGKILL)
    head.wait(timeout=grace)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    env = {**os.environ, RAY_SINGLE_NODE_ENV: "0"}
    env.pop("RAY_ADDRESS", None)
    with tempfile.TemporaryDirectory(prefix="fp-ray-") as tmp:
        workdir = Path(tmp)
        head, address, head_seconds = start_head(workdir, env)
        try:
            print(f"Ray head on {address}: started in {head_seconds:.1f} s")
            sets = {"dataset": "digits", "model": "logreg", "partition": "iid",
                    "num-clients": args.clients, "clients-per-round": args.clients,
                    "rounds": args.rounds, "local-epochs": 1}
            argv = [sys.executable, "-m", "flowerpress.cli", "simulate", "--quiet",
                    "--out", str(workdir / "run"), "--ray-address", address]
            for key, value in sets.items():
                argv += ["--set", f"{key}={value}"]
            started = time.monotonic()
            run = subprocess.run(argv, env={k: v for k, v in env.items()
                                            if k != RAY_SINGLE_NODE_ENV},
                                 capture_output=True, text=True, timeout=900)
            run_seconds = time.monotonic() - started
            print(f"flowerpress simulate --ray-address {address}: exit {run.returncode} "
                  f"in {run_seconds:.1f} s")
            print((run.stdout + run.stderr).strip().splitlines()[-1])
            query = subprocess.run([sys.executable, "-c", QUERY], capture_output=True,
                                   text=True, timeout=120,
                                   env={**env, "RAY_ADDRESS": address})
            if query.returncode != 0:
                print(query.stderr.strip()[-2000:], file=sys.stderr)
                return 1
            seen = json.loads(query.stdout.strip().splitlines()[-1])
            drivers = [j for j in seen["jobs"] if "flwr-simulation" in j["entrypoint"]]
            print(f"jobs of the cluster: {json.dumps(seen['jobs'])}")
            print(f"actor classes on the cluster: {seen['actors']}")
            results = json.loads((workdir / "run" / "results.json").read_text())
            print(f"final accuracy {results['summary']['final_accuracy']:.4f}, "
                  f"{results['summary']['rounds_completed']} rounds")
            used = (run.returncode == 0 and bool(drivers)
                    and "ClientAppActor" in seen["actors"])
            print("the run used the cluster" if used else "the run did NOT use the cluster")
            return 0 if used else 1
        finally:
            stopped = time.monotonic()
            stop_head(head)
            print(f"Ray head stopped in {time.monotonic() - stopped:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
