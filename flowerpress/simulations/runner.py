"""Run a simulated federation on Flower's simulation engine, the way ``flwr run`` does.

:func:`simulate` starts a private SuperLink in simulation mode on a free
loopback port (its own ``FLWR_HOME`` in a temporary directory, so the user's
``~/.flwr`` is untouched), submits flowerpress's Flower App to it with
``flwr run --run-config FILE --federation-config num-supernodes=N``, follows
progress through the ``results.json`` the ServerApp rewrites after every
round, and stops every process it started. The ClientApps run in Ray actors
(Flower's simulation backend); nothing here replaces a Flower component.

Ray: Flower's ``RayBackend`` calls ``ray.init()`` without an address in the
``flwr-simulation`` process the SuperLink starts, so Ray reads its own
``RAY_ADDRESS`` variable: with ``ray_address`` (or ``RAY_ADDRESS`` set) the
ClientApps run on that existing cluster, otherwise on a private single-node
Ray instance kept on loopback (:func:`ray_environment`). Flower's federation
config has no address key (Flower 1.41).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, TextIO

from flowerpress.config import SCHEMA, Config, ConfigError
from flowerpress.deploy.local import (
    DeploymentError,
    ManagedProcess,
    flower_environment,
    free_port,
)

#: How long a simulation may take at most before it is stopped (seconds).
DEFAULT_RUN_TIMEOUT = 6 * 3600.0
#: Files in the out dir that a failed run leaves: the ServerApp's traceback,
#: the ``flwr run`` log (the ServerApp's log as Flower streams it), the SuperLink's.
ERROR_LOG = "error.log"
RUN_LOG = "flwr-run.log"
SUPERLINK_LOG = "superlink.log"


#: Seconds ``flwr run`` may go on after the ServerApp wrote its error.log.
FAILED_GRACE_S = 3.0
#: Ray's own variable naming the cluster ``ray.init()`` connects to.
RAY_ADDRESS_ENV = "RAY_ADDRESS"
#: Ray's address for "start a private instance", whatever else runs on the machine.
PRIVATE_RAY = "local"
#: Ray's single-node switch: "0" makes Ray's node address loopback (Ray otherwise
#: replaces 127.0.0.1 by the machine's outward address and binds every interface).
RAY_SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
#: A callable that sees every finished round row.
RowCallback = Callable[[Mapping[str, Any]], None]


class SimulationError(RuntimeError):
    """The simulated federation could not be started or did not finish."""


class RunObserver(Protocol):
    """Sees a simulation from outside: its start, every finished round, its end.

    :func:`simulate` calls it in this process, from the rows of the
    ``results.json`` the ServerApp writes; it never slows or ends a round. An
    observer must not raise (``flowerpress.tracking.Tracking`` logs its own
    errors in one line and goes on).
    """

    def started(self, out_dir: Path, config: Mapping[str, Any], *, resume: bool) -> None:
        """The run is about to start in ``out_dir`` (it was not refused)."""

    def row(self, row: Mapping[str, Any]) -> None:
        """A finished round's row, as results.json holds it."""

    def finished(self, out_dir: Path, *, failure: str | None) -> None:
        """The run ended: ``failure`` is its one-line reason, None if it finished."""


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of ``HOST:PORT`` or ``ray://HOST:PORT``; None if it is neither."""
    match = re.fullmatch(r"(?:ray://)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})", address)
    if match is None or not 0 < int(match.group(2)) < 65536:
        return None
    return match.group(1), int(match.group(2))


def check_ray_address(address: str, *, timeout: float = 3.0, what: str = "--ray-address") -> str:
    """``address`` if a Ray cluster may be there: ``HOST:PORT`` (the head's GCS, as
    ``ray start --head`` prints it), ``ray://HOST:PORT`` (Ray Client) or ``auto``.

    Raises
    ------
    ConfigError
        One line naming ``what`` (the option or variable): a malformed address,
        or nothing accepting connections there (checked with one TCP
        connection of at most ``timeout`` seconds).
    """
    address = address.strip()
    if address == "auto":  # Ray finds the cluster this machine runs
        return address
    parsed = _host_port(address)
    if parsed is None:
        raise ConfigError(f"{what} {address!r} is not allowed; expected HOST:PORT of a "
                          "Ray head (as `ray start --head` prints it), ray://HOST:PORT or auto")
    host, port = parsed
    try:
        with socket.create_connection((host.strip("[]"), port), timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"{what} {address}: no Ray cluster answers there ({reason}); "
                          "start one with `ray start --head --port PORT` or give the address "
                          "it printed") from None
    return address


def cluster_address(option: str | None, environ: Mapping[str, str]) -> str | None:
    """The Ray cluster a run uses: ``option`` (``--ray-address``), else ``RAY_ADDRESS``
    from ``environ``, each checked by :func:`check_ray_address`; None: a private one."""
    if option:
        return None if option.strip() == PRIVATE_RAY else check_ray_address(option)
    if environ.get(RAY_ADDRESS_ENV) and environ[RAY_ADDRESS_ENV].strip() != PRIVATE_RAY:
        return check_ray_address(environ[RAY_ADDRESS_ENV], what=RAY_ADDRESS_ENV)
    return None


def ray_environment(address: str | None, environ: Mapping[str, str]) -> dict[str, str]:
    """The environment of the processes a simulation starts, for Ray.

    ``address`` (or else ``RAY_ADDRESS`` in ``environ``): the ClientApps run on
    that cluster (``RAY_ADDRESS``, which ``ray.init()`` in Flower's
    ``RayBackend`` reads). Without one (or with ``local``), Ray starts a
    private single-node instance (``RAY_ADDRESS=local``: else ``ray.init()``
    joins the last cluster ``ray start`` left running on the machine);
    :data:`RAY_SINGLE_NODE_ENV` = "0" keeps its services on
    loopback, on ports the OS picks. A loopback address gets the same switch
    (a cluster on this machine; Ray would otherwise dial the machine's outward
    address instead). A value the user set for the switch is kept.
    """
    env = flower_environment(environ)  # Flower's telemetry off unless the user set it
    address = address or env.get(RAY_ADDRESS_ENV) or None
    if address is not None and address.strip() == PRIVATE_RAY:
        address = None
    # No address: "local", so that ray.init() starts a private instance instead of
    # joining the last cluster `ray start` left on this machine (its default).
    env[RAY_ADDRESS_ENV] = PRIVATE_RAY if address is None else address
    parsed = None if address is None else _host_port(address)
    if address is None or (parsed is not None and _is_loopback(parsed[0].strip("[]"))):
        env.setdefault(RAY_SINGLE_NODE_ENV, "0")
    return env


class LocalRayHead:
    """A Ray head on loopback with private ports, for many simulations to share.

    Every simulation that connects to it (``ray_address=head.address``) skips
    starting and stopping a Ray instance of its own (seconds of a 2-core
    machine each); the ClientApp actors of runs that overlap queue for its
    CPUs. Use as a context manager: ``ray start --head --block`` runs as a
    managed process, and exit stops it and every process it started.
    """

    def __init__(self, workdir: Path, *, num_cpus: int | None = None,
                 worker_ports: tuple[int, int] | None = None, timeout: float = 120.0) -> None:
        self.workdir = workdir
        # Ray hands its workers (and the drivers that join) ports from one range,
        # 10002-19999 unless told: heads on one machine at once need ranges of their own.
        self.worker_ports = worker_ports
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.num_cpus = num_cpus or os.cpu_count() or 2
        self.timeout = timeout
        self._proc: ManagedProcess | None = None

    def __enter__(self) -> LocalRayHead:
        self.workdir.mkdir(parents=True, exist_ok=True)
        ray = str(Path(sys.executable).parent / "ray")
        args = [ray, "start", "--head", "--block", "--port", str(self.port),
                "--node-ip-address", "127.0.0.1",
                "--ray-client-server-port", str(free_port()),
                "--dashboard-port", str(free_port()),
                "--dashboard-agent-listen-port", str(free_port()),
                "--include-dashboard=false", "--disable-usage-stats",
                "--num-cpus", str(self.num_cpus)]
        if self.worker_ports is not None:
            args += ["--min-worker-port", str(self.worker_ports[0]),
                     "--max-worker-port", str(self.worker_ports[1])]
        env = ray_environment(None, os.environ)
        env.pop(RAY_ADDRESS_ENV)  # the head is the cluster, it joins none
        self._proc = ManagedProcess.start("ray head", args, self.workdir / "ray-head.log", env)
        try:
            self._proc.wait_for_output("Ray runtime started", timeout=self.timeout)
        except Exception:
            self._proc.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.stop(timeout=20.0)


class ProgressPrinter:
    """Prints one line per finished round: accuracy, bytes, epsilon, time."""

    def __init__(self, total_rounds: int, stream: TextIO = sys.stdout) -> None:
        self.total_rounds = total_rounds
        self.stream = stream
        self.upload = 0
        self.total = 0
        self.link = 0.0

    def header(self) -> None:
        print(f"{'round':>7} {'acc':>7} {'f1':>6} {'loss':>7} {'clients':>7} {'rej':>4}"
              f" {'up MB':>8} {'down MB':>8} {'cum up':>8} {'cum total':>9} {'link s':>8}"
              f" {'eps':>7} {'sec':>6}", file=self.stream, flush=True)

    def __call__(self, row: Mapping[str, Any]) -> None:
        """Message bytes as Flower sends them; ``link s``: cumulative estimated time.

        A column a row lacks (results.json of an older version) prints as ``-``.
        """
        up, down = int(row.get("upload_bytes") or 0), int(row.get("download_bytes") or 0)
        self.upload += up
        self.total += up + down
        self.link += float(row.get("link_seconds") or 0.0)
        eps = row.get("epsilon")
        print(f"{row.get('round', '?'):>3}/{self.total_rounds:<3} "
              f"{_num(row.get('accuracy'), 7, 4)} {_num(row.get('f1_macro'), 6, 3)} "
              f"{_num(row.get('loss'), 7, 4)} {row.get('clients', '-'):>7} "
              f"{row.get('rejected', '-'):>4} {up / 1e6:8.4f} {down / 1e6:8.4f} "
              f"{self.upload / 1e6:8.3f} {self.total / 1e6:9.3f} {self.link:8.1f} "
              f"{_num(eps, 7, 3)} {_num(row.get('seconds'), 6, 2)}",
              file=self.stream, flush=True)


def _num(value: float | None, width: int, digits: int) -> str:
    """A number for the progress table; ``-`` for None (a NaN the results turned into null)."""
    return f"{'-':>{width}}" if value is None else f"{value:{width}.{digits}f}"


def _toml_value(value: bool | int | float | str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def write_app_dir(path: Path) -> Path:
    """Write a minimal Flower App directory whose components are flowerpress's apps.

    The app's ``[tool.flwr.app.config]`` lists every flowerpress key with its
    default, so ``--run-config`` may set any of them. The code itself is
    imported from the installed flowerpress package.
    """
    path.mkdir(parents=True, exist_ok=True)
    lines = [
        "[build-system]", 'requires = ["setuptools"]', 'build-backend = "setuptools.build_meta"',
        "", "[project]", 'name = "flowerpress-simulation"', 'version = "0.1.0"',
        'dependencies = ["flowerpress"]', "",
        "[tool.flwr.app]", 'publisher = "flowerpress"', "",
        "[tool.flwr.app.components]", 'serverapp = "flowerpress.server.app:app"',
        'clientapp = "flowerpress.simulations.app:app"', "", "[tool.flwr.app.config]",
    ]
    lines += [f"{name} = {_toml_value(key.default)}" for name, key in SCHEMA.items()]
    (path / "pyproject.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _follow(results: Path, seen: int, printer: RowCallback | None,
            on_row: RowCallback | None = None) -> int:
    """Hand the rows of ``results`` past the first ``seen`` to ``printer`` and
    ``on_row``; return how many rows it has."""
    try:
        rows = json.loads(results.read_text(encoding="utf-8"))["rounds"]
    except (OSError, ValueError, KeyError, TypeError):
        return seen
    for row in rows[seen:]:
        if printer is not None:
            printer(row)
        if on_row is not None:
            on_row(row)
    return max(seen, len(rows))


class SimulationLink:
    """A private Flower SuperLink in simulation mode on a free loopback port.

    Use as a context manager; :meth:`run` submits a Flower App with ``flwr run``
    and returns the ``flwr run`` process. Everything started is stopped on exit.
    """

    def __init__(self, workdir: Path, *, ray_address: str | None = None) -> None:
        self.workdir = workdir
        home = workdir / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        port = free_port()
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "sim"\n\n[superlink.sim]\naddress = "127.0.0.1:{port}"\n'
            "insecure = true\n", encoding="utf-8")
        self.bindir = str(Path(sys.executable).parent)
        # The SuperLink's environment reaches flwr-simulation, where Flower's
        # RayBackend calls ray.init(): Ray's variables select the cluster.
        self.env = {**ray_environment(ray_address, os.environ), "FLWR_HOME": str(home),
                    "FLWR_DISABLE_UPDATE_CHECK": "1",
                    "PATH": self.bindir + os.pathsep + os.environ.get("PATH", ""),
                    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0", "PYTHONWARNINGS": "ignore"}
        # Loopback only, no TLS: the SuperLink serves this process alone.
        self.superlink = ManagedProcess.start(
            "flower-superlink",
            [f"{self.bindir}/flower-superlink", "--insecure", "--simulation", "--isolation",
             "subprocess", "--host", "127.0.0.1", "--port", str(port),
             "--disable-runtime-dependency-installation"],
            workdir / "superlink.log", self.env)
        self._runs: list[ManagedProcess] = []

    def __enter__(self) -> SimulationLink:
        try:
            self.superlink.wait_for_output("Application startup complete", timeout=60.0)
        except Exception:
            self.superlink.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self._runs:
            proc.stop()
        self.superlink.stop()

    def run(self, app_dir: Path, run_config: Mapping[str, bool | int | float | str],
            num_supernodes: int) -> ManagedProcess:
        """Submit ``app_dir`` with ``run_config``; return the running ``flwr run`` process."""
        index = len(self._runs)
        cfg_file = self.workdir / f"run-config-{index}.toml"
        cfg_file.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in run_config.items()),
                            encoding="utf-8")
        proc = ManagedProcess.start(
            "flwr run",
            [f"{self.bindir}/flwr", "run", str(app_dir), "sim", "--stream",
             "--run-config", str(cfg_file),
             "--federation-config", f"num-supernodes={num_supernodes}"],
            self.workdir / f"flwr-run-{index}.log", self.env)
        self._runs.append(proc)
        return proc


def simulate(config: Config, out_dir: Path, *, progress: bool = True,
             stream: TextIO = sys.stdout, timeout: float = DEFAULT_RUN_TIMEOUT,
             resume: bool = False, overwrite: bool = False, ray_address: str | None = None,
             observer: RunObserver | None = None) -> dict[str, Any]:
    """Run ``config`` on Flower's simulation engine and return the results document.

    Parameters
    ----------
    config
        A validated run config (:func:`flowerpress.config.validate`).
    out_dir
        Where ``results.json``, ``report.png``, ``model.npz`` and the
        checkpoint go.
    progress
        Print a line per round to ``stream`` as rounds finish.
    timeout
        Upper bound on the whole run in seconds.
    resume
        Continue from the checkpoint in ``out_dir`` (run-config ``resume``).
    overwrite
        Start a new run even if ``out_dir`` holds another run's results or
        checkpoint; they are removed (run-config ``overwrite``).
    ray_address
        Run the ClientApps on the existing Ray cluster at this address (the CLI
        checks it first with :func:`cluster_address`); None: ``RAY_ADDRESS`` if
        set, else a private Ray instance on loopback (:func:`ray_environment`).
    observer
        Told when the run starts (after the checks below), of every finished
        round's row and of the end (experiment tracking: ``flowerpress.tracking``).

    Raises
    ------
    SimulationError
        If the SuperLink does not start or the run fails: one line with the
        cause and the path of the file in ``out_dir`` that holds the full log
        (``error.log``, the ServerApp's traceback, or ``flwr-run.log``).
        Before anything starts: without ``resume`` or ``overwrite``, if
        ``out_dir`` holds another run; with ``resume``, if its checkpoint is
        damaged or past the planned rounds (one line naming the file). A
        refused run writes nothing in ``out_dir``.
    """
    from flowerpress.server.checkpoint import (
        CheckpointError,
        Expected,
        existing_run,
        load_checkpoint,
        verify_checkpoint,
    )

    out_dir = out_dir.resolve()
    results = out_dir / "results.json"
    resume = resume or bool(config.get("resume"))
    overwrite = overwrite or bool(config.get("overwrite"))
    if resume and overwrite:
        raise SimulationError("resume and overwrite exclude each other: continue the run in "
                              f"{out_dir}, or discard it")
    try:
        if resume:
            # What can be checked without the task; the ServerApp checks the rest.
            saved = load_checkpoint(out_dir)
            if saved is not None:
                verify_checkpoint(saved, Expected(rounds=int(config["rounds"])))
        elif not overwrite:
            reason = existing_run(out_dir)
            if reason is not None:
                raise SimulationError(reason)
    except CheckpointError as exc:
        raise SimulationError(str(exc)) from None
    out_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        results.unlink(missing_ok=True)  # so progress never shows another run's rows
    for stale in (ERROR_LOG, RUN_LOG, SUPERLINK_LOG):
        (out_dir / stale).unlink(missing_ok=True)
    before = _stat(results)
    run_config = {**config, "out-dir": str(out_dir), "resume": resume, "overwrite": overwrite}
    printer = ProgressPrinter(int(config["rounds"]), stream) if progress else None
    if observer is not None:
        observer.started(out_dir, run_config, resume=resume)
    failure: str | None = "interrupted"
    try:
        document = _run(run_config, out_dir, results, printer, timeout, before, ray_address,
                        None if observer is None else observer.row)
        failure = None
        return document
    except SimulationError as exc:
        failure = str(exc)
        raise
    finally:
        if observer is not None:
            observer.finished(out_dir, failure=failure)


def _run(run_config: Mapping[str, bool | int | float | str], out_dir: Path, results: Path,
         printer: ProgressPrinter | None, timeout: float, before: tuple[int, int] | None,
         ray_address: str | None, on_row: RowCallback | None) -> dict[str, Any]:
    """Start the SuperLink, submit the run, follow it to its results document."""
    with tempfile.TemporaryDirectory(prefix="flowerpress-sim-") as tmp_name:
        tmp = Path(tmp_name)
        app_dir = write_app_dir(tmp / "app")
        try:
            with SimulationLink(tmp, ray_address=ray_address) as link:
                runner = link.run(app_dir, run_config, int(run_config["num-clients"]))
                try:
                    return _wait_for_results(runner, results, printer, int(run_config["rounds"]),
                                             timeout, before=before, on_row=on_row)
                except SimulationError:
                    shutil.copyfile(runner.log_path, out_dir / RUN_LOG)
                    raise
        except DeploymentError as exc:
            log_file = out_dir / SUPERLINK_LOG
            shutil.copyfile(tmp / "superlink.log", log_file)
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "no reason"
            raise SimulationError(f"the simulation SuperLink did not start ({reason}); "
                                  f"full log: {log_file}") from None


def _stat(path: Path) -> tuple[int, int] | None:
    """``path``'s modification time and size, or None if it does not exist."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def _wait_for_results(runner: ManagedProcess, results: Path, printer: ProgressPrinter | None,
                      rounds: int, timeout: float, before: tuple[int, int] | None = None,
                      on_row: RowCallback | None = None) -> dict[str, Any]:
    """Follow ``results`` while ``runner`` lives; return the final document.

    ``before`` is ``results``' :func:`_stat` before the run: a results.json the
    run did not rewrite (a resumed run refused before its rounds) is not its
    outcome, the ServerApp's ``error.log`` is. ``on_row`` sees every row, as
    ``printer`` does (a resumed run's earlier rows included).
    """
    if printer is not None:
        printer.header()
    error_log = results.parent / ERROR_LOG
    seen, deadline = 0, time.monotonic() + timeout
    failed_at: float | None = None
    while runner.alive() and time.monotonic() < deadline:
        seen = _follow(results, seen, printer, on_row)
        if failed_at is None and error_log.exists():
            # The ServerApp failed and said why: Flower's engine can take most of a
            # minute to wind down, so give ``flwr run`` a moment to log it, no more.
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > FAILED_GRACE_S:
            break
        time.sleep(0.5)
    run_log = results.parent / RUN_LOG
    if runner.alive() and failed_at is None:
        raise SimulationError(f"the simulation did not finish within {timeout:.0f} s; "
                              f"full log: {run_log}")
    _follow(results, seen, printer, on_row)
    rewritten = before is None or _stat(results) != before
    failed = _failure(results) if rewritten else None
    if failed is None and error_log.exists():
        failed = _error_log_line(error_log)
    if failed is not None:
        where = error_log if error_log.exists() else run_log
        raise SimulationError(f"{failed}; full log: {where}")
    if not rewritten:
        raise SimulationError(f"the simulated federation did not finish "
                              f"({_last_error_line(runner.output())}); full log: {run_log}")
    document = _read_final(results, rounds)
    if document is None:
        cause = _last_error_line(runner.output())
        raise SimulationError(f"the simulated federation did not finish ({cause}); "
                              f"full log: {run_log}")
    return document


def _failure(results: Path) -> str | None:
    """The one-line ``summary.failed`` the ServerApp wrote, if the run failed."""
    try:
        failed = json.loads(results.read_text(encoding="utf-8"))["summary"].get("failed")
    except (OSError, ValueError, KeyError, AttributeError):
        return None
    return str(failed) if failed else None


def _error_log_line(error_log: Path) -> str | None:
    """The exception line that ends a traceback in ``error_log``, without its module path."""
    try:
        lines = [ln.strip() for ln in error_log.read_text(encoding="utf-8").splitlines()]
    except OSError:
        return None
    lines = [ln for ln in lines if ln]
    if not lines:
        return None
    # "flowerpress.server.checkpoint.CheckpointError: ..." -> "CheckpointError: ..."
    return re.sub(r"^(?:[A-Za-z_]\w*\.)+(?=\w+(?::|$))", "", lines[-1])[:500]


def _last_error_line(output: str) -> str:
    """The last line of a log that looks like an error, else its last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line or "error" in line or "Exception" in line:
            return line[:300]
    return lines[-1][:300] if lines else "no output"


def _read_final(results: Path, rounds: int) -> dict[str, Any] | None:
    """The final results document, or None if the run did not get to write it."""
    try:
        document: dict[str, Any] = json.loads(results.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    summary = document.get("summary", {})
    if summary.get("rounds_completed") == rounds or summary.get("stopped"):
        return document if (results.parent / "report.png").exists() else None
    return None
