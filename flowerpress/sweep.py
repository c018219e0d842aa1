"""Sweeps and comparisons: many runs of ``flowerpress simulate``, one table over seeds.

``flowerpress sweep GRID.toml --out DIR`` expands a grid file into
configurations and runs each at every seed as its own ``flowerpress simulate``
process, several at a time; ``flowerpress compare RUN_DIR... --out DIR``
builds the same table from runs that already exist. Both write
``DIR/summary.csv``, ``DIR/summary.json``, ``DIR/summary.md`` and
``DIR/pareto.png``. This module is a user of the public API, like ``cli.py``:
it starts ``flowerpress simulate`` and reads the ``results.json`` files it
leaves, nothing else.

A grid file::

    seeds = [0, 1, 2]
    baseline = "compression=none, dp=off"  # a configuration's label; default: the first

    [base]                # run-config keys every configuration shares
    dataset = "digits"
    rounds = 10

    [grid]                # lists of values: their product is the set of configurations
    compression = ["none", "q:8"]
    dp = ["off", "local:clip=1.0,noise=0.5"]

    [[config]]            # optional: explicit configurations, base + these keys
    name = "topk"         # optional label
    compression = "topk:0.05+q:8+ef"

The layout of ``DIR``: ``runs/<config-id>/seed-<s>/`` is each run's out dir
exactly as ``flowerpress simulate --out`` writes it; ``runs/<config-id>/config.toml``
the configuration's run config without the seed; ``logs/<config-id>-seed-<s>.log``
the output of the simulate processes; ``failures.json`` the one-line reason of
every failed run.

With ``--track tensorboard|mlflow`` every run is tracked by its own simulate
process (:mod:`flowerpress.tracking`): one tracked run per configuration and
seed, named ``<config-id>/seed-<s>`` (TensorBoard: ``DIR/tb/<config-id>/seed-<s>``),
in the MLflow experiment named after the sweep's directory, tagged
``flowerpress.config`` (the configuration's label), ``flowerpress.config_id`` and
``flowerpress.seed`` to group by. With ``--ray-address`` every run's ClientApps
run on that Ray cluster (each run its own Ray job; ``--jobs`` sets how many at a
time, their SuperLinks and ServerApps stay on this machine).

A sweep is resumable: a run whose ``results.json`` has all its rounds (or a
``stopped`` line) and no ``summary.failed`` is finished and skipped; a run
with a checkpoint but not finished is continued with ``simulate --resume``; a
failed run is recorded in the table and not run again unless
``--retry-failed`` (its directory is then kept aside as ``seed-<s>.failed-<k>``).
"""

from __future__ import annotations

import csv
import ctypes
import hashlib
import itertools
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from flowerpress.config import SCHEMA, Config, ConfigError, Scalar, read_toml, validate

#: Keys a grid file may hold at its top level.
GRID_FILE_KEYS = ("base", "grid", "seeds", "config", "baseline")
#: Run-config keys the sweep sets itself: the seed comes from ``seeds``, the rest per run.
RESERVED_KEYS = ("seed", "out-dir", "resume", "overwrite")
#: Memory one simulate run takes at most on Flower's simulation engine (SuperLink,
#: the ServerApp, Ray with its workers). Measured: 2.4 GB summed RSS for the
#: digits task with 4 clients, which overcounts pages Ray's processes share.
RUN_MEMORY_BYTES = 2_500_000_000
#: A named command line for one run: ``(run, resume) -> argv``.
RunCommand = Callable[["Run", bool], list[str]]

# --- the grid -----------------------------------------------------------------------


@dataclass(frozen=True)
class Configuration:
    """One point of the grid: a full run config without its seed."""

    label: str  # its name in the table: the grid values, or the [[config]] name
    id: str  # its directory under runs/: the label made path-safe and a hash of the config
    overrides: Mapping[str, Scalar]  # its own keys: grid values or [[config]] keys
    config: Config  # validated; ``seed`` at its default, set per run


@dataclass(frozen=True)
class Grid:
    """The configurations and seeds of a sweep, and the baseline of its ratios."""

    configurations: tuple[Configuration, ...]
    seeds: tuple[int, ...]
    baseline: str  # the label of the configuration the byte ratios are taken against


@dataclass(frozen=True)
class Run:
    """One configuration at one seed, and the out dir of its simulate run."""

    configuration: Configuration
    seed: int
    out: Path

    @property
    def name(self) -> str:
        """``<config-id>/seed-<s>``: where it sits under runs/ and how the log names it."""
        return f"{self.configuration.id}/seed-{self.seed}"


def _text(value: Scalar) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return repr(value)
    return str(value)


def _label(overrides: Mapping[str, Scalar]) -> str:
    """``key=value, key=value`` in the schema's order; ``base`` when there are none."""
    keys = [k for k in SCHEMA if k in overrides]
    return ", ".join(f"{k}={_text(overrides[k])}" for k in keys) or "base"


def config_digest(config: Mapping[str, object]) -> str:
    """A short hash of a run config without its seed, out dir and resume flag."""
    kept = {k: v for k, v in sorted(config.items()) if k not in RESERVED_KEYS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:8]


def _config_id(label: str, config: Mapping[str, object]) -> str:
    slug = re.sub(r"[^A-Za-z0-9.=-]+", "_", label).strip("_")[:60] or "config"
    return f"{slug}-{config_digest(config)}"


def load_grid(path: Path) -> Grid:
    """Read and validate a grid file (see the module docstring).

    Raises
    ------
    ConfigError
        One line naming the file, the configuration, the key and the value.
    """
    data = read_toml(path, what="grid file")
    return parse_grid(data, source=str(path))


def _table(data: Mapping[str, object], name: str, source: str) -> dict[str, object]:
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: [{name}] must be a table of run-config keys")
    for key in value:
        if key in RESERVED_KEYS:
            raise ConfigError(f"{source}: [{name}] sets {key!r}; the sweep sets it "
                              "(list the seeds in `seeds = [...]`)")
    return dict(value)


def parse_grid(data: Mapping[str, object], *, source: str = "grid") -> Grid:
    """The :class:`Grid` of a parsed grid file; every run config is validated first.

    The configurations are the product of ``[grid]``'s lists (in the file's
    key order, the last key varying fastest) followed by the ``[[config]]``
    tables, each over ``[base]``.

    Raises
    ------
    ConfigError
        One line: an unknown top-level key, a grid key without a list of
        values, a value :func:`flowerpress.config.validate` refuses (naming the
        key and the value), two configurations that are the same run config, no
        seeds, or a baseline that names no configuration.
    """
    unknown = [k for k in data if k not in GRID_FILE_KEYS]
    if unknown:
        raise ConfigError(f"{source}: unknown key {unknown[0]!r}; a grid file holds "
                          f"{', '.join(GRID_FILE_KEYS)}")
    base = _table(data, "base", source)
    grid = _table(data, "grid", source)
    try:
        validate(base)
    except ConfigError as exc:
        raise ConfigError(f"{source}: [base] {exc}") from None
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{source}: [grid] {key} must be a non-empty list of values, "
                              f"e.g. {key} = [...]")
        for value in values:
            try:
                validate({**base, key: value})
            except ConfigError as exc:
                raise ConfigError(f"{source}: [grid] {exc}") from None
    points: list[tuple[str | None, dict[str, object]]] = []
    if grid:
        keys = list(grid)
        lists = [list(v) for v in grid.values() if isinstance(v, list)]
        points += [(None, dict(zip(keys, combo, strict=True)))
                   for combo in itertools.product(*lists)]
    explicit = data.get("config", [])
    if not isinstance(explicit, list) or not all(isinstance(c, dict) for c in explicit):
        raise ConfigError(f"{source}: config must be [[config]] tables of run-config keys")
    for index, table in enumerate(explicit):
        table = dict(table)
        name = table.pop("name", None)
        if name is not None and not isinstance(name, str):
            raise ConfigError(f"{source}: [[config]] {index + 1}: name must be a string")
        for key in table:
            if key in RESERVED_KEYS:
                raise ConfigError(f"{source}: [[config]] {index + 1} sets {key!r}; the sweep "
                                  "sets it")
        points.append((name, table))
    if not points:
        points.append((None, {}))
    configurations: list[Configuration] = []
    for name, raw in points:
        raw_label = name or _label({k: v for k, v in raw.items()
                                    if isinstance(v, bool | int | float | str)})
        try:
            config = validate({**base, **raw})
        except ConfigError as exc:
            raise ConfigError(f"{source}: configuration {raw_label!r}: {exc}") from None
        overrides = {k: config[k] for k in raw}
        label = name or _label(overrides)
        for other in configurations:
            if other.config == config:
                raise ConfigError(f"{source}: configurations {other.label!r} and {label!r} "
                                  "are the same run config")
            if other.label == label:
                raise ConfigError(f"{source}: two configurations are named {label!r}")
        configurations.append(Configuration(label=label, id=_config_id(label, config),
                                            overrides=overrides, config=config))
    seeds = _seeds(data.get("seeds"), source)
    baseline = data.get("baseline", configurations[0].label)
    labels = [c.label for c in configurations]
    if not isinstance(baseline, str) or baseline not in labels + [c.id for c in configurations]:
        raise ConfigError(f"{source}: baseline={baseline!r} names no configuration; "
                          f"expected one of {', '.join(repr(x) for x in labels)}")
    baseline = next(c.label for c in configurations if baseline in (c.label, c.id))
    return Grid(configurations=tuple(configurations), seeds=seeds, baseline=baseline)


def _seeds(raw: object, source: str) -> tuple[int, ...]:
    if (not isinstance(raw, list) or not raw
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in raw)):
        raise ConfigError(f"{source}: seeds must be a non-empty list of integers, "
                          "e.g. seeds = [0, 1, 2]")
    for seed in raw:
        try:
            validate({"seed": seed})
        except ConfigError as exc:
            raise ConfigError(f"{source}: seeds: {exc}") from None
    if len(set(raw)) != len(raw):
        raise ConfigError(f"{source}: seeds {raw} repeat a seed")
    return tuple(raw)


def plan_runs(grid: Grid, out: Path) -> list[Run]:
    """Every configuration at every seed, seed-major: the first seed of every
    configuration runs before any second seed, so a partial table covers them all."""
    return [Run(configuration=c, seed=s, out=out / "runs" / c.id / f"seed-{s}")
            for s in grid.seeds for c in grid.configurations]


# --- one run's state on disk ----------------------------------------------------------


def _read_results(out: Path) -> dict[str, Any] | None:
    try:
        document = json.loads((out / "results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def is_finished(document: Mapping[str, Any]) -> bool:
    """Whether a results document is a finished run: every round (or a ``stopped``
    line, e.g. max-epsilon) and no ``summary.failed``."""
    summary = document.get("summary") or {}
    if summary.get("failed"):
        return False
    rounds = (document.get("config") or {}).get("rounds")
    done = summary.get("rounds_completed")
    return done is not None and (done == rounds or bool(summary.get("stopped"))) \
        and len(document.get("rounds") or []) == done


def run_status(out: Path) -> str:
    """``finished``, ``failed`` (``summary.failed``), ``interrupted`` (a checkpoint
    to resume from) or ``new``."""
    document = _read_results(out)
    if document is not None and (document.get("summary") or {}).get("failed"):
        return "failed"
    if document is not None and is_finished(document):
        return "finished"
    if (out / "checkpoint.npz").exists():
        return "interrupted"
    return "new"


def _toml_value(value: Scalar) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def _toml_lines(values: Mapping[str, Scalar]) -> str:
    """``key = value`` lines of a flat TOML table."""
    return "".join(f"{k} = {_toml_value(v)}\n" for k, v in values.items())


def config_file(run: Run) -> Path:
    """``runs/<config-id>/config.toml``: the configuration's run config, seed apart."""
    return run.out.parent / "config.toml"


def simulate_command(run: Run, resume: bool) -> list[str]:
    """``flowerpress simulate`` for ``run``: fresh into its (empty) out dir, or ``--resume``.

    The child is this interpreter running :mod:`flowerpress.cli`, so it imports
    the same flowerpress (``PYTHONPATH`` and the environment are inherited).
    """
    head = [sys.executable, "-m", "flowerpress.cli", "simulate", "--quiet"]
    if resume:
        return [*head, "--resume", str(run.out)]
    return [*head, "--out", str(run.out), "--config", str(config_file(run)),
            "--set", f"seed={run.seed}"]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Ask Linux to SIGINT this child when the sweep dies, even by SIGKILL.

    ``flowerpress simulate`` turns SIGINT into a KeyboardInterrupt that stops
    the SuperLink and ``flwr run`` it started (they run in their own sessions
    and would otherwise outlive a killed sweep and keep writing the run dir).
    """
    # A sweep started in the background of a script inherits SIGINT ignored, and so
    # would its children: Python then installs no KeyboardInterrupt handler.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGINT), 0, 0, 0)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _set_aside(directory: Path, tag: str) -> Path:
    """Rename ``directory`` to ``<name>.<tag>-<k>`` (the first free k); return the new path."""
    for k in itertools.count(1):
        target = directory.with_name(f"{directory.name}.{tag}-{k}")
        if not target.exists():
            directory.rename(target)
            return target
    raise AssertionError("unreachable")


# --- the sweep ------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepTracking:
    """How the sweep's runs are tracked (``--track``); no backends: not at all."""

    backends: tuple[str, ...] = ()
    directory: Path | None = None  # default: the sweep's directory
    experiment: str | None = None  # default: the sweep directory's name


def run_options(run: Run, out: Path, track: SweepTracking,
                ray_address: str | None) -> list[str]:
    """The options the sweep adds to ``run``'s simulate command: its tracked run's
    name and tags, the cluster."""
    argv: list[str] = []
    if track.backends:
        for backend in track.backends:
            argv += ["--track", backend]
        argv += ["--track-dir", str(track.directory or out),
                 "--track-experiment", track.experiment or out.name,
                 "--track-name", run.name,
                 "--track-tag", f"flowerpress.config={run.configuration.label}",
                 "--track-tag", f"flowerpress.config_id={run.configuration.id}",
                 "--track-tag", f"flowerpress.seed={run.seed}",
                 "--track-tag", f"flowerpress.sweep={out}"]
    if ray_address:
        argv += ["--ray-address", ray_address]
    return argv


def _prepare_tracking(track: SweepTracking, out: Path, stream: TextIO) -> SweepTracking:
    """Create the MLflow experiment once, before runs start side by side (two runs
    creating the store at once would race); a failure is one line and the sweep
    goes on without MLflow."""
    if "mlflow" not in track.backends:
        return track
    from flowerpress.tracking import prepare_mlflow

    directory, experiment = track.directory or out, track.experiment or out.name
    try:
        prepare_mlflow(directory, experiment)
    except Exception as exc:
        print(f"flowerpress: tracking with mlflow failed (experiment {experiment!r}): "
              f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}; the sweep goes on "
              "without it", file=stream, flush=True)
        return SweepTracking(backends=tuple(b for b in track.backends if b != "mlflow"),
                             directory=track.directory, experiment=track.experiment)
    return track


@dataclass
class _Child:
    run: Run
    popen: subprocess.Popen[bytes]
    log: Path
    started: float


@dataclass
class SweepOutcome:
    """What one invocation of :func:`run_sweep` did, and the table it wrote."""

    finished: list[str] = field(default_factory=list)  # runs finished by this invocation
    skipped: list[str] = field(default_factory=list)  # finished before it
    resumed: list[str] = field(default_factory=list)  # continued from a checkpoint
    failed: dict[str, str] = field(default_factory=dict)  # run name -> one line
    table: list[dict[str, Any]] = field(default_factory=list)


def default_jobs() -> int:
    """Runs at a time: the cores this process may use, fewer if memory is short
    (:data:`RUN_MEMORY_BYTES` per run of ``MemAvailable``)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    available = _available_memory()
    by_memory = cores if available is None else available // RUN_MEMORY_BYTES
    return max(1, min(cores, by_memory))


def _available_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _lock(out: Path) -> Path:
    """Refuse a second sweep in ``out`` while one runs there; return the lock file."""
    lock = out / ".sweep.pid"
    try:
        pid = int(lock.read_text().strip())
    except (OSError, ValueError):
        pid = 0
    if pid and pid != os.getpid() and "sweep" in _cmdline(pid):
        raise ConfigError(f"another sweep (pid {pid}) is running in {out}")
    lock.write_text(f"{os.getpid()}\n")
    return lock


def _cmdline(pid: int) -> str:
    """The command line of ``pid``; empty when it is gone (or not on Linux)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return ""


def _failure_line(run: Run, log: Path, code: int) -> str:
    document = _read_results(run.out)
    failed = None if document is None else (document.get("summary") or {}).get("failed")
    if failed:
        return str(failed)
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        lines = []
    for line in reversed(lines):
        if line.startswith("flowerpress:"):
            return line.removeprefix("flowerpress: ")[:500]
    if code == 0:  # simulate said it finished but the results are incomplete
        return "flowerpress simulate exited 0 without a finished results.json"
    return f"flowerpress simulate exited with status {code}" + (
        f": {lines[-1][:300]}" if lines else "")


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


class _Progress:
    """The sweep's progress line, printed whenever a run starts or ends."""

    def __init__(self, total: int, jobs: int, stream: TextIO) -> None:
        self.total, self.jobs, self.stream = total, jobs, stream
        self.done = self.failed = 0
        self.started = time.monotonic()
        self.durations: list[float] = []

    def line(self, event: str, running: int, queued: int) -> None:
        elapsed = time.monotonic() - self.started
        left = ""
        if self.durations and (running or queued):
            per_run = statistics.median(self.durations)
            left = f", ~{_duration(per_run * (running / 2 + queued) / self.jobs)} left"
        print(f"sweep {self.done + self.failed}/{self.total}: {event} | {self.done} done, "
              f"{self.failed} failed, {running} running, {queued} queued | "
              f"{_duration(elapsed)}{left}", file=self.stream, flush=True)


def run_sweep(grid: Grid, out: Path, *, jobs: int | None = None, target: float | None = None,
              retry_failed: bool = False, stream: TextIO | None = None,
              command: RunCommand = simulate_command, poll_seconds: float = 0.5,
              track: SweepTracking | None = None,
              ray_address: str | None = None) -> SweepOutcome:
    """Run every configuration of ``grid`` at every seed, then write the table and plot.

    Parameters
    ----------
    grid
        From :func:`load_grid` (validated).
    out
        The sweep's directory (layout in the module docstring). Running the
        same grid into it again skips finished runs and resumes interrupted ones.
    jobs
        Runs at a time; default :func:`default_jobs`.
    target
        Accuracy for the "to target" columns; None: the whole run.
    retry_failed
        Run again the runs that failed before (their directory set aside).
    stream
        Where the progress lines go; default standard output.
    command
        The command line of one run; :func:`simulate_command` (tests substitute it).
    track
        Track every run (:class:`SweepTracking`); the sweep adds the options
        of :func:`run_options` to every command.
    ray_address
        Run every run's ClientApps on this Ray cluster (``--ray-address``).

    Returns
    -------
    SweepOutcome
        What this invocation ran, skipped, resumed and what failed; the table.
        A KeyboardInterrupt (Ctrl-C, SIGTERM) stops the runs in progress, which
        the next invocation resumes, writes the table so far and is re-raised.
    """
    jobs = default_jobs() if jobs is None else jobs
    stream = sys.stdout if stream is None else stream
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs} is not allowed; must be >= 1")
    out.mkdir(parents=True, exist_ok=True)
    lock = _lock(out)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    out = out.resolve()
    track = _prepare_tracking(track or SweepTracking(), out, stream)

    def with_options(run: Run, resume: bool) -> list[str]:
        return command(run, resume) + run_options(run, out, track, ray_address)

    try:
        return _sweep(grid, out, jobs, target, retry_failed, stream, with_options,
                      poll_seconds)
    finally:
        signal.signal(signal.SIGTERM, previous)
        lock.unlink(missing_ok=True)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _sweep(grid: Grid, out: Path, jobs: int, target: float | None, retry_failed: bool,
           stream: TextIO, command: RunCommand, poll_seconds: float) -> SweepOutcome:
    runs = plan_runs(grid, out)
    outcome = SweepOutcome()
    failures = _load_failures(out)
    queue: list[tuple[Run, bool]] = []
    for configuration in grid.configurations:
        path = out / "runs" / configuration.id / "config.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_toml_lines({k: v for k, v in configuration.config.items()
                                     if k not in RESERVED_KEYS}), encoding="utf-8")
    for run in runs:
        status = run_status(run.out)
        if status == "finished":
            outcome.skipped.append(run.name)
            failures.pop(run.name, None)
        elif status == "failed" and not retry_failed:
            document = _read_results(run.out) or {}
            outcome.failed[run.name] = failures[run.name] = str(
                (document.get("summary") or {}).get("failed"))
        elif status == "interrupted":
            queue.append((run, True))
        else:  # new, or failed to be retried: a fresh run in an empty directory
            if run.out.exists() and any(run.out.iterdir()):
                _set_aside(run.out, "failed" if status == "failed" else "old")
            failures.pop(run.name, None)
            queue.append((run, False))
    _save_failures(out, failures)
    progress = _Progress(len(runs), jobs, stream)
    progress.done, progress.failed = len(outcome.skipped), len(outcome.failed)
    progress.line(f"{len(outcome.skipped)} finished before, {len(outcome.failed)} failed before, "
                  f"{sum(r for _, r in queue)} to resume, jobs {jobs}", 0, len(queue))
    running: list[_Child] = []
    (out / "logs").mkdir(exist_ok=True)
    try:
        while queue or running:
            while queue and len(running) < jobs:
                run, resume = queue.pop(0)
                log = out / "logs" / f"{run.configuration.id}-seed-{run.seed}.log"
                argv = command(run, resume)
                with log.open("ab") as fh:
                    fh.write(f"$ {' '.join(argv)}\n".encode())
                    fh.flush()
                    # Its own process group: a terminal's Ctrl-C reaches the sweep alone,
                    # which forwards one SIGINT (a second one would cut short the
                    # child's own clean-up of its SuperLink).
                    popen = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, process_group=0,
                                             preexec_fn=_die_with_parent)
                running.append(_Child(run, popen, log, time.monotonic()))
                if resume:
                    outcome.resumed.append(run.name)
                progress.line(f"{'resumed' if resume else 'started'} {run.configuration.label} "
                              f"seed {run.seed}", len(running), len(queue))
            time.sleep(poll_seconds)
            for child in [c for c in running if c.popen.poll() is not None]:
                running.remove(child)
                code = child.popen.returncode
                seconds = time.monotonic() - child.started
                name, label = child.run.name, child.run.configuration.label
                if code == 0 and run_status(child.run.out) == "finished":
                    outcome.finished.append(name)
                    progress.done += 1
                    progress.durations.append(seconds)
                    document = _read_results(child.run.out) or {}
                    acc = (document.get("summary") or {}).get("final_accuracy")
                    event = (f"finished {label} seed {child.run.seed} "
                             f"(accuracy {'-' if acc is None else format(acc, '.4f')}, "
                             f"{seconds:.0f} s)")
                else:
                    line = _failure_line(child.run, child.log, code)
                    outcome.failed[name] = failures[name] = line
                    _save_failures(out, failures)
                    progress.failed += 1
                    event = f"FAILED {label} seed {child.run.seed}: {line}"
                progress.line(event, len(running), len(queue))
    except KeyboardInterrupt:
        _stop_all(running)
        print(f"sweep interrupted: {len(running)} run(s) stopped at their last checkpoint; "
              "run the same command to resume", file=stream, flush=True)
        outcome.table = write_summary(_records(grid, runs, failures, target), out,
                                      target=target, baseline=grid.baseline)
        raise
    outcome.table = write_summary(_records(grid, runs, failures, target), out, target=target,
                                  baseline=grid.baseline)
    return outcome


def _stop_all(children: Iterable[_Child], timeout: float = 60.0) -> None:
    """SIGINT each simulate process (it stops its SuperLink itself); kill what is left."""
    children = list(children)
    for child in children:
        if child.popen.poll() is None:
            child.popen.send_signal(signal.SIGINT)
    deadline = time.monotonic() + timeout
    for child in children:
        try:
            child.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.popen.kill()
            child.popen.wait()


def _load_failures(out: Path) -> dict[str, str]:
    try:
        data = json.loads((out / "failures.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _save_failures(out: Path, failures: Mapping[str, str]) -> None:
    _write_atomic(out / "failures.json", json.dumps(dict(sorted(failures.items())), indent=2)
                  + "\n")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# --- the table ------------------------------------------------------------------------


@dataclass(frozen=True)
class SeedResult:
    """One run's numbers for the table.

    The "to target" numbers sum the rounds up to and including the first one
    whose accuracy reached the target (the whole run when there is no target);
    they are ``inf`` when the run never reached it.
    """

    seed: int
    path: str
    accuracy: float | None  # final
    f1_macro: float | None  # final
    reached: bool
    rounds_to_target: float
    upload_bytes: float
    download_bytes: float
    total_bytes: float
    link_seconds: float | None  # estimated, None when the run had link=none
    epsilon: float | None  # final; None without DP (or with rng=seeded: no guarantee)
    compute_seconds: float | None  # devices' CPU seconds (rows' ``device_seconds``)
    run_total_bytes: int  # the whole run's, for the plot
    run_compute_seconds: float | None
    device_flops: float | None = None  # devices' FLOPs (rows' ``device_flops``)


@dataclass(frozen=True)
class RunRecord:
    """A planned or found run: its result if it finished, its failure if it failed."""

    seed: int
    path: Path
    status: str  # finished | failed | missing
    result: SeedResult | None = None
    failure: str | None = None


def seed_result(document: Mapping[str, Any], *, seed: int, path: str,
                target: float | None) -> SeedResult:
    """The table's numbers of one finished run's results document."""
    rows = list(document.get("rounds") or [])
    cut: int | None = len(rows)
    if target is not None:
        cut = next((i + 1 for i, r in enumerate(rows)
                    if r.get("accuracy") is not None and r["accuracy"] >= target), None)
    head = rows if cut is None else rows[:cut]
    inf = math.inf

    def total(key: str) -> float:
        return inf if cut is None else float(sum(int(r.get(key) or 0) for r in head))

    def seconds(key: str, selected: Sequence[Mapping[str, Any]]) -> float | None:
        """The sum of ``key`` over ``selected``; None when a row lacks it."""
        if not rows or any(r.get(key) is None for r in rows):
            return None
        return inf if cut is None and selected is head else float(
            sum(float(r[key]) for r in selected))

    last = rows[-1] if rows else {}
    link = seconds("link_seconds", rows)
    compute = seconds("device_seconds", rows)
    flops = seconds("device_flops", rows)
    return SeedResult(
        seed=seed, path=path,
        accuracy=_opt(last.get("accuracy")), f1_macro=_opt(last.get("f1_macro")),
        reached=cut is not None,
        rounds_to_target=inf if cut is None else float(cut),
        upload_bytes=total("upload_bytes"), download_bytes=total("download_bytes"),
        total_bytes=total("upload_bytes") + total("download_bytes"),
        link_seconds=None if link is None else seconds("link_seconds", head),
        epsilon=_opt(last.get("epsilon")),
        compute_seconds=None if compute is None else seconds("device_seconds", head),
        run_total_bytes=sum(int(r.get("upload_bytes") or 0) + int(r.get("download_bytes") or 0)
                            for r in rows),
        run_compute_seconds=compute,
        device_flops=None if flops is None else seconds("device_flops", head))


def _opt(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def median_worst(values: Iterable[float | None], *,
                 higher_is_better: bool) -> tuple[float | None, float | None]:
    """The median and the worst of ``values`` over seeds (None values left out).

    ``inf`` (a target never reached) counts as the largest value, so the median
    is ``inf`` once half the seeds or more did not reach the target. Returns
    ``(None, None)`` without values.
    """
    kept = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not kept:
        return None, None
    return statistics.median(kept), (min(kept) if higher_is_better else max(kept))


#: The columns of summary.csv, in order (summary.json rows hold the same keys).
COLUMNS = (
    "config", "id", "seeds", "seeds_failed", "seeds_missing", "seeds_reached", "target",
    "accuracy_median", "accuracy_worst", "f1_median", "f1_worst",
    "rounds_to_target_median", "rounds_to_target_worst",
    "upload_bytes_median", "upload_bytes_worst", "download_bytes_median",
    "download_bytes_worst", "total_bytes_median", "total_bytes_worst",
    "upload_reduction_median", "upload_reduction_worst", "download_reduction_median",
    "download_reduction_worst", "total_reduction_median", "total_reduction_worst",
    "link_seconds_median", "link_seconds_worst", "epsilon_median", "epsilon_worst",
    "compute_seconds_median", "compute_seconds_worst", "device_flops_median",
    "device_flops_worst",
)

#: What the columns mean (summary.json ``columns``).
DEFINITIONS = {
    "seeds": "seeds that finished (the statistics are over these)",
    "seeds_failed": "seeds whose run failed (summary.failed or a simulate error)",
    "seeds_missing": "seeds not run yet or interrupted",
    "seeds_reached": "finished seeds whose accuracy reached the target",
    "*_median, *_worst": "median and worst over the finished seeds; worst is the lowest "
                         "accuracy/F1/reduction and the highest rounds/bytes/seconds/epsilon",
    "accuracy, f1": "after the last round",
    "*_to_target, *_bytes, link_seconds, compute_seconds, device_flops": "summed up to and "
        "including the "
        "first round whose accuracy reached the target (the whole run without a target); "
        "null when the median or worst seed did not reach it",
    "*_bytes": "messages as Flower serializes them, every message of the rounds",
    "*_reduction": "the baseline's bytes / this configuration's bytes at the same seed "
                   "(10: 10x fewer); 0 when this seed did not reach the target",
    "link_seconds": "estimated time on the run's link profile (results.json link_seconds)",
    "epsilon": "after the last round; null without DP",
    "compute_seconds": "devices' CPU seconds of local training (rows' device_seconds); null "
                       "where devices report none (DP, secure aggregation)",
    "device_flops": "devices' FLOPs of local training (rows' device_flops, PyTorch's FLOP "
                    "counter); null where devices report none",
}


def build_table(groups: Sequence[tuple[str, str, Sequence[RunRecord]]], *, baseline: str,
                target: float | None) -> list[dict[str, Any]]:
    """One row per configuration ``(label, id, records)``: median and worst over seeds."""
    base_runs = next((recs for label, _, recs in groups if label == baseline), [])
    base = {r.seed: r.result for r in base_runs if r.result is not None}
    table = []
    for label, config_id, records in groups:
        results = [r.result for r in records if r.result is not None]
        row: dict[str, Any] = {
            "config": label, "id": config_id, "seeds": len(results),
            "seeds_failed": sum(r.status == "failed" for r in records),
            "seeds_missing": sum(r.status == "missing" for r in records),
            "seeds_reached": sum(r.reached for r in results), "target": target,
        }
        columns: dict[str, tuple[list[float | None], bool]] = {
            "accuracy": ([r.accuracy for r in results], True),
            "f1": ([r.f1_macro for r in results], True),
            "rounds_to_target": ([r.rounds_to_target for r in results], False),
            "upload_bytes": ([r.upload_bytes for r in results], False),
            "download_bytes": ([r.download_bytes for r in results], False),
            "total_bytes": ([r.total_bytes for r in results], False),
            "link_seconds": ([r.link_seconds for r in results], False),
            "epsilon": ([r.epsilon for r in results], False),
            "compute_seconds": ([r.compute_seconds for r in results], False),
            "device_flops": ([r.device_flops for r in results], False),
        }
        for kind in ("upload", "download", "total"):
            ratios: list[float | None] = []
            for r in results:
                b = base.get(r.seed)
                mine: float = getattr(r, f"{kind}_bytes")
                theirs = None if b is None else float(getattr(b, f"{kind}_bytes"))
                if theirs is not None and math.isfinite(theirs) and mine > 0:
                    ratios.append(theirs / mine)
            columns[f"{kind}_reduction"] = (ratios, True)
        for name, (values, higher) in columns.items():
            median, worst = median_worst(values, higher_is_better=higher)
            row[f"{name}_median"], row[f"{name}_worst"] = _finite(median), _finite(worst)
        table.append(row)
    return table


def _finite(value: float | None) -> float | int | None:
    if value is None or not math.isfinite(value):
        return None
    return int(value) if value.is_integer() and abs(value) < 2**53 else value


def _records(grid: Grid, runs: Sequence[Run], failures: Mapping[str, str],
             target: float | None) -> list[tuple[str, str, list[RunRecord]]]:
    groups: list[tuple[str, str, list[RunRecord]]] = []
    for configuration in grid.configurations:
        records = []
        for run in (r for r in runs if r.configuration is configuration):
            records.append(_record(run.out, run.seed, failures.get(run.name), target))
        groups.append((configuration.label, configuration.id, records))
    return groups


def _record(path: Path, seed: int, failure: str | None, target: float | None) -> RunRecord:
    document = _read_results(path)
    if document is not None and is_finished(document):
        return RunRecord(seed=seed, path=path, status="finished",
                         result=seed_result(document, seed=seed, path=str(path), target=target))
    failed = None if document is None else (document.get("summary") or {}).get("failed")
    if failed or failure:
        return RunRecord(seed=seed, path=path, status="failed", failure=str(failed or failure))
    return RunRecord(seed=seed, path=path, status="missing")


def write_summary(groups: Sequence[tuple[str, str, Sequence[RunRecord]]], out: Path, *,
                  target: float | None, baseline: str) -> list[dict[str, Any]]:
    """Write summary.csv, summary.json, summary.md and pareto.png into ``out``; return the rows."""
    table = build_table(groups, baseline=baseline, target=target)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "summary.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(COLUMNS))
        writer.writeheader()
        for row in table:
            writer.writerow({k: "" if row[k] is None else row[k] for k in COLUMNS})
    runs = [{"config": label, "seed": r.seed, "path": str(r.path), "status": r.status,
             "failure": r.failure,
             "result": None if r.result is None else {
                 k: _finite(v) if isinstance(v, float) else v
                 for k, v in r.result.__dict__.items()}}
            for label, _, records in groups for r in records]
    document = {"target": target, "baseline": baseline, "columns": DEFINITIONS,
                "rows": table, "runs": runs}
    _write_atomic(out / "summary.json", json.dumps(document, indent=2, allow_nan=False) + "\n")
    _write_atomic(out / "summary.md", markdown_table(table, target=target) + "\n")
    plot_pareto(groups, out / "pareto.png", target=target)
    return table


def _fmt(value: object, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(table: Sequence[Mapping[str, Any]], *, target: float | None) -> str:
    """The table's main columns in Markdown: median (worst) over seeds."""
    span = "to target" if target is not None else "whole run"
    header = ["config", "seeds", "accuracy", "macro-F1"]
    if target is not None:
        header.append(f"rounds to {target:g}")
    header += [f"total MB ({span})", "upload: x fewer than baseline",
               "total: x fewer than baseline", f"link s ({span})",
               f"device TFLOPs ({span})", "epsilon"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table:
        seeds = str(row["seeds"])
        if row["seeds_failed"]:
            seeds += f", {row['seeds_failed']} failed"
        if target is not None:
            seeds += f", {row['seeds_reached']} reached"
        cells = [f"`{row['config']}`", seeds, _pair(row, "accuracy", ".4f"),
                 _pair(row, "f1", ".4f")]
        if target is not None:
            cells.append(_pair(row, "rounds_to_target", ".0f"))
        cells += [_pair(row, "total_bytes", ".3f", 1e6), _pair(row, "upload_reduction", ".2f"),
                  _pair(row, "total_reduction", ".2f"),
                  _pair(row, "link_seconds", ".1f"), _pair(row, "device_flops", ".3f", 1e12),
                  _pair(row, "epsilon", ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pair(row: Mapping[str, Any], name: str, spec: str, scale: float = 1.0) -> str:
    """``median (worst)`` of a column, ``-`` for none."""
    median, worst = row[f"{name}_median"], row[f"{name}_worst"]
    return (f"{_fmt(None if median is None else median / scale, spec)} "
            f"({_fmt(None if worst is None else worst / scale, spec)})")


def plot_pareto(groups: Sequence[tuple[str, str, Sequence[RunRecord]]], path: Path, *,
                target: float | None) -> None:
    """Final accuracy against total bytes, epsilon (where DP ran) and device compute
    (where rows carry it): each configuration's median with its spread over seeds
    (bars from the worst to the best seed); the Pareto front of the medians on bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: list[tuple[str, Callable[[SeedResult], float | None], bool]] = [
        ("total message MB (whole run, both directions)",
         lambda r: r.run_total_bytes / 1e6, True)]
    results = [r.result for _, _, recs in groups for r in recs if r.result is not None]
    if any(r.epsilon is not None for r in results):
        panels.append(("final epsilon (runs with DP)", lambda r: r.epsilon, False))
    if any(r.run_compute_seconds is not None for r in results):
        panels.append(("device compute seconds (whole run)", lambda r: r.run_compute_seconds,
                       False))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    for ax, (xlabel, xof, logx) in zip(axes[0], panels, strict=True):
        front: list[tuple[float, float]] = []
        for index, (label, _, records) in enumerate(groups):
            pts: list[tuple[float, float]] = []
            for record in records:
                result = record.result
                x = None if result is None else xof(result)
                if result is not None and x is not None and result.accuracy is not None:
                    pts.append((x, result.accuracy))
            if not pts:
                continue
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            mx, my = statistics.median(xs), statistics.median(ys)
            front.append((mx, my))
            ax.errorbar([mx], [my], xerr=[[mx - min(xs)], [max(xs) - mx]],
                        yerr=[[my - min(ys)], [max(ys) - my]], fmt="o", capsize=3,
                        color=f"C{index % 10}", label=f"{label} ({len(pts)} seeds)")
            ax.scatter(xs, ys, s=8, alpha=0.4, color=f"C{index % 10}")
        optimal = _pareto_front(front)
        if len(optimal) > 1:
            ax.step([p[0] for p in optimal], [p[1] for p in optimal], where="post",
                    color="grey", linestyle=":", linewidth=1, label="Pareto front (medians)")
        if logx and front:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("final accuracy")
        if target is not None:
            ax.axhline(target, color="grey", linewidth=0.8, linestyle="--")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", fontsize=7,
               ncol=max(1, min(3, len(labels))), frameon=False)
    fig.suptitle("median and spread (worst..best seed) over seeds", fontsize=9)
    fig.tight_layout(rect=(0, 0.06 + 0.03 * ((len(labels) - 1) // 3), 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _pareto_front(points: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both less x and more y, by increasing x."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


# --- compare --------------------------------------------------------------------------


def _find_results(paths: Sequence[Path]) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        if (path / "results.json").is_file():
            found.append(path)
            continue
        below = sorted(p.parent for p in path.rglob("results.json"))
        if not below:
            raise ConfigError(f"{path}: no results.json there or below")
        found += below
    unique: list[Path] = []
    for p in found:
        if p.resolve() not in [u.resolve() for u in unique]:
            unique.append(p)
    return unique


def group_runs(run_dirs: Sequence[Path], *, target: float | None
               ) -> list[tuple[str, str, list[RunRecord]]]:
    """Group existing runs whose configs differ only in seed (and out dir).

    A group's label names the keys whose values differ between the groups
    (``all`` when there is one group).

    Raises
    ------
    ConfigError
        A directory without ``results.json`` (there or below), a results file
        without its config, or two runs of the same config and seed.
    """
    configs: list[tuple[Path, dict[str, Any], dict[str, Any]]] = []
    for path in _find_results(run_dirs):
        document = _read_results(path)
        if document is None or not isinstance(document.get("config"), dict):
            raise ConfigError(f"{path}/results.json is not a results document with a config")
        configs.append((path, document, dict(document["config"])))
    keyed: dict[str, list[tuple[Path, dict[str, Any], dict[str, Any]]]] = {}
    for item in configs:
        keyed.setdefault(config_digest(item[2]), []).append(item)
    varying = [k for k in SCHEMA if k not in RESERVED_KEYS
               and len({json.dumps(items[0][2].get(k)) for items in keyed.values()}) > 1]
    groups = []
    for items in keyed.values():
        config = items[0][2]
        label = _label({k: config[k] for k in varying if k in config}) if varying else "all"
        records: list[RunRecord] = []
        for path, _, cfg in items:
            seed = int(cfg.get("seed", 0))
            if any(r.seed == seed for r in records):
                other = next(r.path for r in records if r.seed == seed)
                raise ConfigError(f"{other} and {path} are the same config at the same seed "
                                  f"{seed}; compare one of them")
            records.append(_record(path, seed, None, target))
        records.sort(key=lambda r: r.seed)
        groups.append((label, _config_id(label, config), records))
    return groups


def compare(run_dirs: Sequence[Path], out: Path, *, target: float | None = None,
            baseline: str | None = None) -> list[dict[str, Any]]:
    """The sweep's table and plot from runs that already exist.

    ``baseline`` is a group's label or one of its run directories; default the
    group of the first run given.
    """
    groups = group_runs(run_dirs, target=target)
    chosen = groups[0][0]
    if baseline is not None:
        matches = [label for label, config_id, recs in groups
                   if baseline in (label, config_id)
                   or any(Path(baseline).resolve() == r.path.resolve() for r in recs)]
        if not matches:
            raise ConfigError(f"--baseline {baseline!r} names no group; expected one of "
                              f"{', '.join(repr(g[0]) for g in groups)} or a run directory")
        chosen = matches[0]
    return write_summary(groups, out, target=target, baseline=chosen)
