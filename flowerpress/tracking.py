"""Experiment tracking: a simulated run's rounds, config and files in TensorBoard and MLflow.

``flowerpress simulate --track tensorboard --track mlflow`` (and ``flowerpress
sweep --track ...``, one tracked run per configuration and seed) writes, with
TensorBoard's and MLflow's own libraries:

* every round's row as scalars, step = the round (``accuracy``, ``loss``,
  ``upload_bytes``, ..., nested blocks as ``download/full_models``);
* the run config as parameters (MLflow params; TensorBoard's HParams plugin and
  a ``config`` text);
* ``results.json`` and ``report.png`` as artifacts (MLflow), as the text
  ``results.json`` and the image ``report`` (TensorBoard), with ``error.log``
  when the run failed.

Where: TensorBoard event files in ``DIR/tb/NAME``; MLflow in the tracking
store of ``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///DIR/mlflow.db`` with
artifacts in ``DIR/mlartifacts`` (MLflow 3 refuses the old ``./mlruns`` file
store). ``DIR`` is ``--track-dir`` (default: the run's out dir), ``NAME``
``--track-name`` (default: the out dir's name). ``OUT/tracking.json`` records
where the run went, the last round tracked and any tracking error, so a
resumed run (``--resume``) continues the same MLflow run and TensorBoard run.

The tracker follows the ``results.json`` the ServerApp writes after each round
(:class:`flowerpress.simulations.runner.RunObserver`): it runs in the process
that started the simulation, never in the ServerApp, so it cannot slow a round,
change a result or end a run. A tracking error is one line on standard error
(and in ``tracking.json``); that backend stops, the run and its files go on.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import queue
import re
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

from flowerpress.config import ConfigError

#: The backends ``--track`` accepts, and the module each needs.
BACKENDS: Mapping[str, str] = {"tensorboard": "tensorboard", "mlflow": "mlflow"}
#: The command that installs them.
INSTALL_HINT = "pip install 'flowerpress[track]'"
#: The file in the run's out dir that says where the run was tracked.
STATE_FILE = "tracking.json"
#: MLflow experiment of a run that names none.
DEFAULT_EXPERIMENT = "flowerpress"
#: Under the track dir: TensorBoard's log dir, MLflow's local store and artifacts.
TB_DIR = "tb"
MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS = "mlartifacts"
#: The row metrics TensorBoard's HParams dashboard shows next to the parameters.
HPARAM_METRICS = ("accuracy", "loss", "f1_macro", "epsilon", "upload_bytes", "download_bytes")
#: MLflow's limit on a parameter's value (characters).
MAX_PARAM_CHARS = 6000


@dataclass(frozen=True)
class TrackSettings:
    """Where and under which names a run is tracked."""

    backends: tuple[str, ...]  # "tensorboard", "mlflow"
    directory: Path | None = None  # TensorBoard's and the local MLflow store's; None: out dir
    name: str | None = None  # the run's name (a TensorBoard subdirectory); None: out dir name
    experiment: str = DEFAULT_EXPERIMENT  # MLflow experiment
    tags: Mapping[str, str] = field(default_factory=dict)  # MLflow tags, e.g. the sweep's


def parse_backends(values: Sequence[str]) -> tuple[str, ...]:
    """The backends named by ``--track`` options, each once, in order.

    Raises
    ------
    ConfigError
        A name that is not a backend, or a backend whose packages are not
        installed (one line naming ``pip install 'flowerpress[track]'``).
    """
    chosen: list[str] = []
    for value in values:
        for name in (v.strip() for v in value.split(",")):
            if name not in BACKENDS:
                raise ConfigError(f"--track {name!r} is not allowed; expected one of "
                                  f"{', '.join(BACKENDS)}")
            if name not in chosen:
                chosen.append(name)
    for name in chosen:
        if importlib.util.find_spec(BACKENDS[name]) is None:
            raise ConfigError(f"--track {name} needs the optional tracking packages: "
                              f"{INSTALL_HINT}")
    return tuple(chosen)


def parse_tags(values: Sequence[str]) -> dict[str, str]:
    """``KEY=VALUE`` options as a mapping (ConfigError naming a malformed one)."""
    tags: dict[str, str] = {}
    for value in values:
        key, sep, text = value.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--track-tag {value!r} is not allowed; expected KEY=VALUE")
        tags[key.strip()] = text
    return tags


def mlflow_uri(directory: Path) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the SQLite store in ``directory``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(directory / MLFLOW_DB).resolve()}"


def _key(name: str) -> str:
    """A metric or parameter name MLflow and TensorBoard both accept."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name)[:250] or "_"


def row_scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """A round row's numbers, nested blocks as ``block/key``; ``round`` (the step),
    None, NaN, text and lists left out; booleans as 0/1."""
    out: dict[str, float] = {}

    def add(name: str, value: object) -> None:
        if isinstance(value, bool):
            out[_key(name)] = float(value)
        elif isinstance(value, int | float):
            if math.isfinite(float(value)):
                out[_key(name)] = float(value)
        elif isinstance(value, Mapping):
            for key, inner in value.items():
                add(f"{name}/{key}", inner)

    for key, value in row.items():
        if key != "round":
            add(str(key), value)
    return out


def _params(config: Mapping[str, Any]) -> dict[str, str]:
    """The run config as text parameters (booleans lower-case, as in the TOML)."""
    out: dict[str, str] = {}
    for key, value in sorted(config.items()):
        text = ("true" if value else "false") if isinstance(value, bool) else str(value)
        out[_key(str(key))] = text[:MAX_PARAM_CHARS]
    return out


class _Backend(Protocol):
    """One tracking library behind :class:`Tracking` (which guards every call)."""

    name: str

    def start(self, config: Mapping[str, Any], before: Mapping[str, Any]) -> dict[str, Any]:
        """Open the tracked run, or continue the one ``before`` (its state in a resumed
        run's tracking.json) names; return its state, ``round``: the last round it holds."""

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        """One round's scalars."""

    def finish(self, out_dir: Path, failure: str | None) -> None:
        """The run's files; close the tracked run (failed if ``failure``)."""


@contextlib.contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    """MLflow and Alembic log every database migration at INFO: keep the CLI's output."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.level, logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


class _MLflow:
    """A run in an MLflow tracking store, through ``MlflowClient``."""

    name = "mlflow"

    def __init__(self, directory: Path, run_name: str, experiment: str,
                 tags: Mapping[str, str], out_dir: Path) -> None:
        self.directory, self.run_name, self.experiment = directory, run_name, experiment
        self.out_dir = out_dir
        self.tags = dict(tags)
        self.run_id = ""
        self.client: Any = None

    def start(self, config: Mapping[str, Any], before: Mapping[str, Any]) -> dict[str, Any]:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = mlflow_uri(self.directory)
        with _quiet_loggers("mlflow", "alembic"):
            self.client = MlflowClient(tracking_uri=uri)
            previous = before.get("run_id") if before.get("tracking_uri") == uri else None
            params = _params(config)
            if previous:
                self.run_id = str(previous)
                logged = self.client.get_run(self.run_id).data.params
                self.client.update_run(self.run_id, status="RUNNING")
                # MLflow parameters never change; a resume may change rounds or timeouts.
                for key, value in params.items():
                    if key in logged and logged[key] != value:
                        self.client.set_tag(self.run_id, f"resumed.{key}", value)
                params = {k: v for k, v in params.items() if k not in logged}
            else:
                experiment_id = experiment_id_for(self.client, self.experiment, self.directory)
                run = self.client.create_run(experiment_id, run_name=self.run_name,
                                             tags={"flowerpress.out_dir": str(self.out_dir),
                                                   **self.tags})
                self.run_id = run.info.run_id
            items = [Param(k, v) for k, v in params.items()]
            for start in range(0, len(items), 100):  # MLflow's batch limit
                self.client.log_batch(self.run_id, params=items[start:start + 100])
        return {"tracking_uri": uri, "experiment": self.experiment, "run_id": self.run_id,
                "round": int(before.get("round") or 0) if previous else 0}

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in scalars.items()]
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def finish(self, out_dir: Path, failure: str | None) -> None:
        with _quiet_loggers("mlflow", "alembic"):
            for name in ("results.json", "report.png", "error.log"):
                if (out_dir / name).is_file():
                    self.client.log_artifact(self.run_id, str(out_dir / name))
            if failure is not None:
                self.client.set_tag(self.run_id, "flowerpress.failure", failure[:5000])
            status = ("FINISHED" if failure is None
                      else "KILLED" if failure == "interrupted" else "FAILED")
            self.client.set_terminated(self.run_id, status=status)


def experiment_id_for(client: Any, name: str, directory: Path) -> str:
    """The id of MLflow experiment ``name``, created if needed (in the local store
    with its artifacts in ``directory/mlartifacts``, never the working directory)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    location = None
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        location = (directory / MLFLOW_ARTIFACTS).resolve().as_uri()
    try:
        return str(client.create_experiment(name, artifact_location=location))
    except Exception:  # another run of the sweep created it first
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return str(found.experiment_id)


def prepare_mlflow(directory: Path, experiment: str) -> str:
    """Create ``experiment`` (and the local store) once, before a sweep starts its runs
    side by side; return its id. Raises what MLflow raises."""
    from mlflow.tracking import MlflowClient

    directory.mkdir(parents=True, exist_ok=True)
    with _quiet_loggers("mlflow", "alembic"):
        return experiment_id_for(MlflowClient(tracking_uri=mlflow_uri(directory)), experiment,
                                 directory)


def _png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (0, 0 if it is not a PNG)."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or len(data) < 24:
        return 0, 0
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


class _TensorBoard:
    """A TensorBoard run: event files written by TensorBoard's ``EventFileWriter``."""

    name = "tensorboard"

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.writer: Any = None

    def _write(self, summary: Any, step: int) -> None:
        from tensorboard.compat.proto.event_pb2 import Event

        self.writer.add_event(Event(wall_time=time.time(), step=step, summary=summary))

    def start(self, config: Mapping[str, Any], before: Mapping[str, Any]) -> dict[str, Any]:
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.logdir.mkdir(parents=True, exist_ok=True)
        resume = before.get("logdir") == str(self.logdir)
        if not resume:  # a new run of this name replaces the old one's events
            for old in self.logdir.glob("events.out.tfevents.*"):
                old.unlink()
        self.writer = EventFileWriter(str(self.logdir))
        done = int(before.get("round") or 0) if resume else 0
        if resume:
            # TensorBoard drops earlier events at or past this step: rounds run again.
            self.writer.add_event(Event(wall_time=time.time(), step=done + 1,
                                        session_log=SessionLog(status=SessionLog.START)))
        else:
            for summary in _hparams_start(config):
                self._write(summary, 0)
            table = "\n".join(f"| `{k}` | `{v}` |" for k, v in _params(config).items())
            self._write(_text("config", "| key | value |\n|---|---|\n" + table), 0)
        self.writer.flush()
        return {"logdir": str(self.logdir), "round": done}

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        self._write(Summary(value=[Summary.Value(tag=k, simple_value=v)
                                   for k, v in scalars.items()]), step)
        self.writer.flush()

    def finish(self, out_dir: Path, failure: str | None) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        step = 0
        results = out_dir / "results.json"
        if results.is_file():
            text = results.read_text(encoding="utf-8")
            with contextlib.suppress(ValueError, TypeError, KeyError):
                step = int(json.loads(text)["summary"].get("rounds_completed") or 0)
            self._write(_text("results.json", f"```json\n{text}\n```"), step)
        report = out_dir / "report.png"
        if report.is_file():
            data = report.read_bytes()
            width, height = _png_size(data)
            image = Summary.Image(height=height, width=width, colorspace=4,
                                  encoded_image_string=data)
            self._write(Summary(value=[Summary.Value(tag="report", image=image)]), step)
        if failure != "interrupted":  # an interrupted run goes on when it is resumed
            self._write(_hparams_end(failure), step)
        self.writer.close()


def _text(tag: str, markdown: str) -> Any:
    """A summary for TensorBoard's text plugin."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.text.metadata import create_summary_metadata
    from tensorboard.util.tensor_util import make_tensor_proto

    return Summary(value=[Summary.Value(
        tag=tag, metadata=create_summary_metadata(display_name=tag, description=""),
        tensor=make_tensor_proto(markdown))])


def _hparams_start(config: Mapping[str, Any]) -> list[Any]:
    """The HParams plugin's experiment and session-start summaries for ``config``."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    infos, start = [], plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
    for key, value in sorted(config.items()):
        if isinstance(value, bool):
            start.hparams[key].bool_value = value
            kind = api_pb2.DATA_TYPE_BOOL
        elif isinstance(value, int | float):
            start.hparams[key].number_value = float(value)
            kind = api_pb2.DATA_TYPE_FLOAT64
        else:
            start.hparams[key].string_value = str(value)
            kind = api_pb2.DATA_TYPE_STRING
        infos.append(api_pb2.HParamInfo(name=key, type=kind))
    experiment = api_pb2.Experiment(hparam_infos=infos, metric_infos=[
        api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag)) for tag in HPARAM_METRICS])
    out = []
    for tag, data in ((metadata.EXPERIMENT_TAG,
                       plugin_data_pb2.HParamsPluginData(experiment=experiment)),
                      (metadata.SESSION_START_INFO_TAG,
                       plugin_data_pb2.HParamsPluginData(session_start_info=start))):
        out.append(Summary(value=[Summary.Value(
            tag=tag, metadata=metadata.create_summary_metadata(data))]))
    return out


def _hparams_end(failure: str | None) -> Any:
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    status = api_pb2.STATUS_SUCCESS if failure is None else api_pb2.STATUS_FAILURE
    end = plugin_data_pb2.SessionEndInfo(status=status, end_time_secs=time.time())
    return Summary(value=[Summary.Value(
        tag=metadata.SESSION_END_INFO_TAG, metadata=metadata.create_summary_metadata(
            plugin_data_pb2.HParamsPluginData(session_end_info=end)))])


class Tracking:
    """Tracks one simulated run in every chosen backend (a
    :class:`~flowerpress.simulations.runner.RunObserver`).

    The backends work in one thread of their own, in the order the run's events
    arrive: opening a tracking store (importing MLflow, creating its database:
    several seconds) overlaps the SuperLink's and Ray's start, and a slow store
    never holds up the progress lines. :meth:`finished` waits for the work, at
    most ``finish_timeout`` seconds. Every backend call is guarded: the first
    error of a backend is one line on ``stream`` and in ``tracking.json``, and
    that backend is dropped; the run, its results and the other backend go on.
    """

    def __init__(self, settings: TrackSettings, *, stream: TextIO = sys.stderr,
                 finish_timeout: float = 300.0) -> None:
        self.settings, self.stream, self.finish_timeout = settings, stream, finish_timeout
        self.out_dir: Path | None = None
        self.active: list[_Backend] = []
        self.state: dict[str, Any] = {}
        self.errors: dict[str, str] = {}
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._worker: threading.Thread | None = None

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except Exception as exc:  # _call guards the backends; this is a last resort
                print(f"flowerpress: tracking failed: {type(exc).__name__}: {exc}",
                      file=self.stream, flush=True)

    def _backends(self, out_dir: Path) -> list[_Backend]:
        directory = (self.settings.directory or out_dir).resolve()
        name = self.settings.name or out_dir.name
        backends: list[_Backend] = []
        for backend in self.settings.backends:
            if backend == "tensorboard":
                backends.append(_TensorBoard(directory / TB_DIR / name))
            elif backend == "mlflow":
                backends.append(_MLflow(directory, name, self.settings.experiment,
                                        self.settings.tags, out_dir))
        return backends

    def _call(self, backend: _Backend, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            text = " ".join(str(exc).split())[:300]
            line = (f"flowerpress: tracking with {backend.name} failed ({what}): "
                    f"{type(exc).__name__}: {text}; the run goes on, its results are in "
                    f"{self.out_dir}")
            print(line, file=self.stream, flush=True)
            self.errors[backend.name] = line
            if backend in self.active:
                self.active.remove(backend)
            return None

    def _save(self) -> None:
        if self.out_dir is None:
            return
        document = {**self.state, "errors": self.errors}
        path = self.out_dir / STATE_FILE
        tmp = path.with_suffix(".json.tmp")
        try:
            tmp.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
            tmp.replace(path)
        except OSError as exc:
            print(f"flowerpress: tracking could not write {path}: {exc.strerror}",
                  file=self.stream, flush=True)

    def started(self, out_dir: Path, config: Mapping[str, Any], *, resume: bool) -> None:
        """Open the tracked run (on ``resume``, the one ``tracking.json`` names)."""
        self.out_dir = out_dir
        self._worker = threading.Thread(target=self._work, name="flowerpress-tracking",
                                        daemon=True)
        self._worker.start()
        config = dict(config)
        self._jobs.put(lambda: self._start(out_dir, config, resume=resume))

    def row(self, row: Mapping[str, Any]) -> None:
        """Track one round's row (each backend skips the rounds it holds from before a
        resume)."""
        if self._worker is not None:
            row = dict(row)
            self._jobs.put(lambda: self._row(row))

    def finished(self, out_dir: Path, *, failure: str | None) -> None:
        """Log the run's files, close every tracked run; wait for the tracking work."""
        if self._worker is None:
            return
        self._jobs.put(lambda: self._finish(out_dir, failure))
        self._jobs.put(None)
        self._worker.join(self.finish_timeout)
        if self._worker.is_alive():
            print(f"flowerpress: tracking did not finish within {self.finish_timeout:.0f} s; "
                  f"the run's results are in {out_dir}", file=self.stream, flush=True)
        self._worker = None

    def _start(self, out_dir: Path, config: Mapping[str, Any], *, resume: bool) -> None:
        previous: dict[str, Any] = {}
        if resume:
            with contextlib.suppress(OSError, ValueError):
                loaded = json.loads((out_dir / STATE_FILE).read_text(encoding="utf-8"))
                previous = loaded if isinstance(loaded, dict) else {}
        self.state = {"out_dir": str(out_dir)}
        for backend in self._backends(out_dir):
            self.active.append(backend)
            before = previous.get(backend.name)
            opened = self._call(backend, "start", backend.start, config,
                                before if isinstance(before, dict) else {})
            if opened is not None:
                self.state[backend.name] = opened
        self._save()

    def _row(self, row: Mapping[str, Any]) -> None:
        try:
            step = int(row.get("round") or 0)
        except (TypeError, ValueError):
            return
        scalars: dict[str, float] | None = None
        for backend in list(self.active):
            state = self.state[backend.name]
            if step <= int(state.get("round") or 0):
                continue
            scalars = row_scalars(row) if scalars is None else scalars
            self._call(backend, f"round {step}", backend.log, step, scalars)
            state["round"] = step
        if scalars is not None:
            self._save()

    def _finish(self, out_dir: Path, failure: str | None) -> None:
        for backend in list(self.active):
            self._call(backend, "end of run", backend.finish, out_dir, failure)
        self._save()
