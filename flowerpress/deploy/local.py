"""A Flower deployment (SuperLink + SuperNodes) as local child processes.

Used by the end-to-end test and ``benchmarks/deploy_latency.py``; it runs exactly
the commands ``docs/deploy.md`` tells an operator to type (Flower 1.41):

* ``flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile superlink.crt
  --ssl-keyfile superlink.key --enable-supernode-auth --host H --port P``
  (one HTTPS port serves the Fleet, Control and Runtime APIs);
* ``flwr supernode register supernode-i.pub <connection>``;
* ``flower-supernode --superlink H:P --root-certificates ca.crt
  --auth-supernode-private-key supernode-i.key --node-config "..." --port Q``;
* ``flwr run <app> <connection> --run-config "..."`` and ``flwr ls``/``flwr log``.

The ``flwr`` CLI reads its SuperLink connection from ``$FLWR_HOME/config.toml``;
every process gets ``FLWR_HOME`` inside the deployment's work directory so the
user's ``~/.flwr`` is never read or written. Every process is started in its own
session and :meth:`LocalDeployment.close` stops it together with its descendants
(SuperExec, ServerApp and ClientApp processes), also when a caller fails midway.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from flowerpress.deploy.certs import (
    DeploymentCredentials,
    add_node_keys,
    generate_credentials,
)

__all__ = [
    "CONNECTION_NAME",
    "DeploymentError",
    "LocalDeployment",
    "ManagedProcess",
    "format_config",
    "free_port",
]

logger = logging.getLogger(__name__)

#: Name of the SuperLink connection written to ``$FLWR_HOME/config.toml``.
CONNECTION_NAME = "flowerpress-local"

ConfigScalar = str | int | float | bool


#: Flower's usage telemetry (flwr/supercore/telemetry.py) posts an event to
#: telemetry.flower.ai when each of its processes starts and stops. The processes
#: flowerpress starts have it off unless the user's environment sets the variable:
#: a federation's machines may reach nothing but the package index, and each post
#: costs an SSL context and a connection attempt (about 0.35 CPU s per process).
TELEMETRY_ENV = "FLWR_TELEMETRY_ENABLED"


def flower_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` for a Flower process flowerpress starts: telemetry off unless set."""
    env = dict(environ)
    env.setdefault(TELEMETRY_ENV, "0")
    return env


class DeploymentError(RuntimeError):
    """A deployment process failed to start, or a bounded wait ran out."""


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def format_config(config: Mapping[str, ConfigScalar]) -> str:
    """Format a mapping as Flower's ``key=value`` list (``--run-config``/``--node-config``).

    Strings are single-quoted TOML literals, so values may contain ``:`` or ``+``
    (compression specs such as ``'topk:0.01+q:8'``).
    """
    parts = []
    for key, value in config.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = repr(value)
        else:
            if "'" in value or "\n" in value:
                raise ValueError(f"config value for {key!r} may not contain quotes: {value!r}")
            text = f"'{value}'"
        parts.append(f"{key}={text}")
    return " ".join(parts)


def _bin_dir() -> Path:
    """The directory holding this interpreter's Flower executables."""
    return Path(sys.executable).parent


def _descendants(pid: int) -> list[int]:
    """PIDs of all descendants of ``pid`` (Linux ``/proc``; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Field 4 (ppid) follows the parenthesised command name, which may hold spaces.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (Linux ``/proc``)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split()[:1] != ["Z"]


def _signal_quietly(pid: int, sig: signal.Signals, *, group: bool = False) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


@dataclass
class ManagedProcess:
    """A child process in its own session, its output in ``log_path``."""

    name: str
    args: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes]
    _log_file: IO[bytes] = field(repr=False)

    @classmethod
    def start(
        cls, name: str, args: Sequence[str], log_path: Path, env: Mapping[str, str]
    ) -> ManagedProcess:
        """Start ``args`` with stdout+stderr to ``log_path``, in a new session."""
        log_file = log_path.open("wb")
        try:
            popen = subprocess.Popen(
                list(args),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=dict(env),
                start_new_session=True,
            )
        except OSError:
            log_file.close()
            raise
        logger.info("started %s (pid %s): %s", name, popen.pid, " ".join(args))
        return cls(name=name, args=list(args), log_path=log_path, popen=popen, _log_file=log_file)

    @property
    def pid(self) -> int:
        """Process id."""
        return self.popen.pid

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.popen.poll() is None

    def output(self) -> str:
        """Everything the process has written so far."""
        self._log_file.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def tail(self, lines: int = 25) -> str:
        """The last ``lines`` lines of output, for error messages."""
        return "\n".join(self.output().splitlines()[-lines:])

    def wait_exit(self, timeout: float) -> int:
        """Wait for the process to exit on its own; return its exit code."""
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise DeploymentError(
                f"{self.name} still running after {timeout:.0f} s; last output:\n{self.tail()}"
            ) from exc

    def wait_for_output(self, needle: str, timeout: float) -> None:
        """Wait until ``needle`` appears in the output; fail if the process exits first."""
        _wait_until(
            lambda: needle in self.output(),
            timeout,
            f"{needle!r} in the output of {self.name}",
            alive=self,
        )

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process, its group and its descendants; SIGKILL what remains."""
        family = _descendants(self.pid)
        if self.alive():
            _signal_quietly(self.pid, signal.SIGTERM, group=True)
        for pid in family:
            _signal_quietly(pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop within %.0f s; killing", self.name, timeout)
        _signal_quietly(self.pid, signal.SIGKILL, group=True)
        for pid in family:
            _signal_quietly(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5.0)
        # Descendants are not our children: wait (bounded) until the kernel drops them.
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and any(_running(pid) for pid in family):
            time.sleep(0.05)
        self._log_file.close()


def _wait_until(
    condition: Callable[[], bool],
    timeout: float,
    what: str,
    *,
    alive: ManagedProcess | None = None,
    interval: float = 0.2,
    max_interval: float | None = None,
) -> None:
    """Poll ``condition`` every ``interval`` s, growing 1.5x per miss up to ``max_interval``."""
    deadline = time.monotonic() + timeout
    ceiling = max(interval, max_interval or interval)
    while True:
        if condition():
            return
        if alive is not None and not alive.alive():
            raise DeploymentError(
                f"{alive.name} exited (code {alive.popen.returncode}) while waiting for "
                f"{what}; last output:\n{alive.tail()}"
            )
        if time.monotonic() >= deadline:
            tail = f"; last output of {alive.name}:\n{alive.tail()}" if alive else ""
            raise DeploymentError(f"timed out after {timeout:.0f} s waiting for {what}{tail}")
        time.sleep(min(interval, max(deadline - time.monotonic(), 0.0)))
        interval = min(interval * 1.5, ceiling)


def _parse_json_output(text: str, command: str) -> Any:
    start = text.find("{")
    if start < 0:
        raise DeploymentError(f"`{command}` printed no JSON: {text.strip()[:500]}")
    try:
        return json.loads(text[start:])
    except json.JSONDecodeError as exc:
        raise DeploymentError(f"`{command}` printed invalid JSON: {text.strip()[:500]}") from exc


class LocalDeployment:
    """A TLS SuperLink (optionally with SuperNode authentication) and SuperNodes.

    Parameters
    ----------
    workdir : Path
        Scratch directory: credentials, logs and one ``FLWR_HOME`` per process.
    nodes : int
        Number of SuperNode key pairs to generate (``supernode-0`` ...).
    auth : bool
        Start the SuperLink with ``--enable-supernode-auth``.
    host : str
        Loopback address to bind and connect to.
    startup_timeout : float
        Bound, in seconds, on each wait for a process to come up.
    cli_timeout : float
        Bound, in seconds, on each ``flwr`` CLI call.

    Examples
    --------
    >>> with LocalDeployment(tmp, nodes=3) as dep:            # doctest: +SKIP
    ...     dep.start_superlink()
    ...     for i in range(3):
    ...         dep.register(i)
    ...         dep.start_supernode(i, {"partition-id": i, "num-partitions": 3})
    ...     dep.wait_nodes_online(3)
    ...     run_id = dep.run_app(app_dir, {"rounds": 2})
    ...     status = dep.wait_run(run_id, timeout=180)
    """

    def __init__(
        self,
        workdir: Path | str,
        *,
        nodes: int,
        auth: bool = True,
        host: str = "127.0.0.1",
        startup_timeout: float = 60.0,
        cli_timeout: float = 60.0,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.auth = auth
        self.startup_timeout = startup_timeout
        self.cli_timeout = cli_timeout
        self.credentials: DeploymentCredentials = generate_credentials(
            self.workdir / "certs", [host], nodes, force=True
        )
        self.port = free_port(host)
        self.superlink: ManagedProcess | None = None
        self.supernodes: dict[str, ManagedProcess] = {}
        self._bin = _bin_dir()
        self._cli_home = self._home("cli")
        self._write_cli_config()

    # ------------------------------------------------------------------ helpers
    @property
    def cli_home(self) -> Path:
        """The ``FLWR_HOME`` of the ``flwr`` CLI: its ``config.toml`` names this SuperLink
        as the default connection (``CONNECTION_NAME``)."""
        return self._cli_home

    @property
    def address(self) -> str:
        """``host:port`` of the SuperLink (Fleet, Control and Runtime APIs)."""
        return f"{self.host}:{self.port}"

    def _home(self, name: str) -> Path:
        home = self.workdir / "flwr-home" / name
        home.mkdir(parents=True, exist_ok=True)
        return home

    def _env(self, flwr_home: Path) -> dict[str, str]:
        env = flower_environment(os.environ)
        env["FLWR_HOME"] = str(flwr_home)
        # flower-superlink launches `flower-superexec` by name.
        env["PATH"] = f"{self._bin}{os.pathsep}{env.get('PATH', '')}"
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def _exe(self, name: str) -> str:
        path = self._bin / name
        if not path.exists():
            raise DeploymentError(f"{path} not found: is flwr installed in this environment?")
        return str(path)

    def _write_cli_config(self) -> None:
        # Flower 1.41 reads SuperLink connections from $FLWR_HOME/config.toml.
        (self._cli_home / "config.toml").write_text(
            "[superlink]\n"
            f'default = "{CONNECTION_NAME}"\n\n'
            f"[superlink.{CONNECTION_NAME}]\n"
            f'address = "{self.address}"\n'
            f'root-certificates = "{self.credentials.ca_cert}"\n',
            encoding="utf-8",
        )

    def flwr(self, *args: str, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        """Run the ``flwr`` CLI against this deployment; raise on a non-zero exit."""
        command = [self._exe("flwr"), *args]
        try:
            done = subprocess.run(
                command,
                capture_output=True,
                text=True,
                env=self._env(self._cli_home),
                timeout=timeout or self.cli_timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise DeploymentError(f"`flwr {' '.join(args)}` timed out") from exc
        if done.returncode != 0:
            raise DeploymentError(
                f"`flwr {' '.join(args)}` failed (exit {done.returncode}): "
                f"{(done.stdout + done.stderr).strip()[-1500:]}"
            )
        return done

    # ---------------------------------------------------------------- processes
    def start_superlink(self, *extra_args: str) -> ManagedProcess:
        """Start ``flower-superlink`` with TLS (and auth) and wait until it listens."""
        creds = self.credentials
        args = [
            self._exe("flower-superlink"),
            "--ssl-ca-certfile", str(creds.ca_cert),
            "--ssl-certfile", str(creds.superlink_cert),
            "--ssl-keyfile", str(creds.superlink_key),
            "--host", self.host,
            "--port", str(self.port),
            # Offline: the app's dependencies are already installed here.
            "--disable-runtime-dependency-installation",
        ]  # fmt: skip
        if self.auth:
            args.append("--enable-supernode-auth")
        args.extend(extra_args)
        self.superlink = ManagedProcess.start(
            "superlink", args, self.workdir / "superlink.log", self._env(self._home("superlink"))
        )
        self.superlink.wait_for_output("Uvicorn running on", self.startup_timeout)
        return self.superlink

    def register(self, index: int) -> int:
        """``flwr supernode register`` the public key of SuperNode ``index``; return its id."""
        pub = self.credentials.node_public_keys[index]
        done = self.flwr("supernode", "register", str(pub), CONNECTION_NAME, "--format", "json")
        payload = _parse_json_output(done.stdout, "flwr supernode register")
        return int(payload["node-id"])

    def start_supernode(
        self,
        index: int,
        node_config: Mapping[str, ConfigScalar] | None = None,
        *,
        name: str | None = None,
        root_certificates: bool = True,
        max_wait_time: float | None = None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> ManagedProcess:
        """Start ``flower-supernode`` with key ``supernode-<index>`` (does not wait).

        ``root_certificates=False`` omits ``--root-certificates`` (the SuperNode then
        trusts only the system store and must fail the TLS handshake);
        ``max_wait_time`` bounds its reconnect attempts so a refused node exits;
        ``env`` adds to (or replaces in) the SuperNode's environment, which its
        SuperExec and ClientApp processes inherit (e.g. a ``PYTHONPATH`` with
        another flowerpress: a device running another version).
        """
        label = name or f"supernode-{index}"
        args = [
            self._exe("flower-supernode"),
            "--superlink", self.address,
            "--port", str(free_port(self.host)),
            "--host", self.host,
        ]  # fmt: skip
        if root_certificates:
            args += ["--root-certificates", str(self.credentials.ca_cert)]
        if self.auth:
            args += ["--auth-supernode-private-key", str(self.credentials.node_private_keys[index])]
        if node_config:
            args += ["--node-config", format_config(node_config)]
        if max_wait_time is not None:
            args += ["--max-wait-time", str(max_wait_time), "--max-retries", "3"]
        args.extend(extra_args)
        proc = ManagedProcess.start(
            label, args, self.workdir / f"{label}.log",
            {**self._env(self._home(label)), **(env or {})},
        )
        self.supernodes[label] = proc
        return proc

    def add_node(self) -> int:
        """``flowerpress certs add-node`` on this deployment's credentials; the new index."""
        ((private, public),) = add_node_keys(self.workdir / "certs", 1)
        self.credentials = dataclasses.replace(
            self.credentials,
            node_private_keys=(*self.credentials.node_private_keys, private),
            node_public_keys=(*self.credentials.node_public_keys, public),
        )
        return len(self.credentials.node_private_keys) - 1

    def node_statuses(self) -> dict[int, str]:
        """``flwr supernode ls``: node id -> status (``registered``, ``online``, ...)."""
        done = self.flwr("supernode", "ls", CONNECTION_NAME, "--format", "json")
        payload = _parse_json_output(done.stdout, "flwr supernode ls")
        return {int(n["node-id"]): str(n["status"]) for n in payload.get("nodes", [])}

    def wait_nodes_online(self, count: int, timeout: float | None = None) -> None:
        """Wait until ``count`` SuperNodes are online at the SuperLink."""
        _wait_until(
            lambda: sum(s == "online" for s in self.node_statuses().values()) >= count,
            timeout or self.startup_timeout,
            f"{count} SuperNodes online",
            alive=self.superlink,
            interval=1.0,
        )

    # --------------------------------------------------------------------- runs
    def run_app(self, app_dir: Path | str, run_config: Mapping[str, ConfigScalar]) -> int:
        """``flwr run APP <connection> --run-config ...``; return the run id."""
        args = ["run", str(app_dir), CONNECTION_NAME, "--format", "json"]
        if run_config:
            args += ["--run-config", format_config(run_config)]
        done = self.flwr(*args, timeout=max(self.cli_timeout, 120.0))
        payload = _parse_json_output(done.stdout, "flwr run")
        if not payload.get("success") or payload.get("run-id") is None:
            raise DeploymentError(f"`flwr run` did not start a run: {payload}")
        return int(payload["run-id"])

    def run_status(self, run_id: int) -> dict[str, Any]:
        """The ``flwr ls --run-id`` entry of a run (``status``, ``elapsed``, ...)."""
        done = self.flwr("ls", CONNECTION_NAME, "--run-id", str(run_id), "--format", "json")
        payload = _parse_json_output(done.stdout, "flwr ls")
        runs = payload.get("runs", [])
        if not runs:
            raise DeploymentError(f"`flwr ls` does not know run {run_id}: {payload}")
        return dict(runs[0])

    def wait_run(
        self, run_id: int, timeout: float, interval: float = 2.0, max_interval: float = 8.0,
        *, done_file: Path | None = None,
    ) -> dict[str, Any]:
        """Wait until the run's status starts with ``finished``; return its ``flwr ls`` entry.

        Each check is a ``flwr ls`` process (about a CPU-second), so the interval grows
        from ``interval`` to ``max_interval`` to leave the CPU to the run itself.
        ``done_file``, a file the run writes as it ends (``report.png`` in its
        ``out-dir``), is watched every 0.25 s at no cost: once it exists the status is
        checked at once, so the wait ends within a second of the run instead of up to
        ``max_interval`` later. ``flwr ls`` still runs every ``max_interval`` seconds,
        so a run that fails without writing the file is seen as soon as without it.
        """
        latest: dict[str, Any] = {}
        last_check = -math.inf

        def finished() -> bool:
            nonlocal latest, last_check
            now = time.monotonic()
            if (done_file is not None and not done_file.exists()
                    and now - last_check < max_interval):
                return False
            last_check = now
            latest = self.run_status(run_id)
            return str(latest.get("status", "")).startswith("finished")

        poll = (0.25, 0.25) if done_file is not None else (interval, max_interval)
        try:
            _wait_until(finished, timeout, f"run {run_id} to finish", alive=self.superlink,
                        interval=poll[0], max_interval=poll[1])  # fmt: skip
        except DeploymentError as exc:
            raise DeploymentError(
                f"{exc}\nlast status: {latest.get('status')}\nrun log:\n{self.run_log(run_id)}"
            ) from exc
        return latest

    def run_log(self, run_id: int) -> str:
        """The ServerApp log of a run (``flwr log RUN_ID <connection> --show``)."""
        try:
            return self.flwr("log", str(run_id), CONNECTION_NAME, "--show").stdout
        except DeploymentError as exc:
            return f"(no log: {exc})"

    # ------------------------------------------------------------------ cleanup
    def processes(self) -> Iterator[ManagedProcess]:
        """Every process started, SuperNodes first."""
        yield from self.supernodes.values()
        if self.superlink is not None:
            yield self.superlink

    def close(self) -> None:
        """Stop every SuperNode, then the SuperLink, with their descendants."""
        for proc in self.processes():
            try:
                proc.stop()
            except Exception:  # keep stopping the others
                logger.exception("failed to stop %s", proc.name)

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
