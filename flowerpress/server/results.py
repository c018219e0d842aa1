"""``results.json`` and ``report.png``: what a run leaves behind.

The layout is the contract of ARCHITECTURE.md::

    {"config": {...},
     "rounds": [{"round", "accuracy", "loss", "f1_macro", "clients", "rejected",
                 "timed_out", "unavailable", "upload_bytes", "download_bytes",
                 "upload_payload_bytes", "download_payload_bytes", "link_seconds",
                 "device_flops", "device_seconds", "cum_device_flops",
                 "cum_device_seconds", "epsilon", "seconds"}, ...],
     "summary": {"final_accuracy", "total_upload_bytes", "total_download_bytes",
                 "total_bytes", "total_upload_payload_bytes",
                 "total_download_payload_bytes", "total_link_seconds",
                 "total_device_flops", "total_device_seconds",
                 "fp32_upload_bytes", "task": {"name", "run_config_keys",
                 "hyperparameters"}},
     "privacy": {...} | null,
     "nodes": [{"node_id", "partition", "version", "listed", "excluded",
                "last_round", "outcome", "answered", "missed"}, ...]}

``config`` records what ran: a task-only key (``flowerpress.config.TASK_KEYS``:
``lr``, ``batch-size``, ...) that the task does not take is left out, and
``summary.task`` names the task, the run-config keys it took and the values it
reported training with (``Task.hyperparameters``).

``upload_bytes`` and ``download_bytes`` are the Flower messages as Flower
serializes them (``flowerpress.protocol.message_bytes``: metadata, every
record, protobuf framing), both directions, every message of the round;
``*_payload_bytes`` are the array data alone. ``sparsity`` (rows and summary, with the
run-config ``prune`` only) is the fraction of the model's weights pruned.
``link_seconds`` is the round's
estimated time under the run's ``link`` profile (``flowerpress.config.LinkProfile``).
``device_flops`` and ``device_seconds`` are what the round's accepted replies
reported their local training cost (FLOPs, CPU seconds; reporting only), the
``cum_*`` columns the run's so far; null under DP and secure aggregation,
where devices report none.

``nodes`` (a run on a grid, once a round has ended) is what the server knows
about every node: the flowerpress version its start-up answer named, whether
it is excluded and why, the last round it was asked in and what became of
that message (``accepted``, ``rejected: <reason>``, ``timed out``,
``unavailable``), the last round it answered. ``flowerpress devices`` joins
it with the SuperLink's node list. Beside results.json the ServerApp writes
``server.log`` (:func:`run_log`) and, when a run fails, ``error.log``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from flowerpress.config import TASK_KEYS
from flowerpress.tasks.base import Task

ROUND_FIELDS = ("round", "accuracy", "loss", "f1_macro", "clients", "rejected", "timed_out",
                "unavailable", "upload_bytes", "download_bytes", "upload_payload_bytes",
                "download_payload_bytes", "link_seconds", "device_flops", "device_seconds",
                "cum_device_flops", "cum_device_seconds", "epsilon", "seconds")


def build_results(
    config: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    *,
    model_elements: int,
    initial: Mapping[str, float | None] | None = None,
    privacy: Mapping[str, Any] | None = None,
    stopped: str | None = None,
    failed: str | None = None,
    resumed_at: Sequence[int] = (),
    task: Mapping[str, Any] | None = None,
    nodes: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Assemble the results document from the round rows.

    ``failed`` is the one-line reason a run ended in error (the strategy
    produced an unusable model, ...); the rows so far are kept.
    ``resumed_at`` lists the rounds after which the run was resumed from its
    checkpoint (``summary.resumed_after_rounds``). ``task`` is the run's
    :func:`task_record`: with it, ``config`` keeps only the task-only keys the
    task took. ``nodes`` is the membership's per-node record
    (:meth:`~flowerpress.server.membership.Membership.report`: node id,
    partition, flowerpress version, excluded and why, the last round asked,
    its outcome, the last round answered), results.json's ``nodes``.
    """
    fp32 = sum(int(r["clients"]) + int(r["rejected"]) for r in rows) * model_elements * 4
    summary: dict[str, Any] = {
        "final_accuracy": rows[-1]["accuracy"] if rows else None,
        "total_upload_bytes": sum(int(r["upload_bytes"]) for r in rows),
        "total_download_bytes": sum(int(r["download_bytes"]) for r in rows),
        "total_bytes": sum(int(r["upload_bytes"]) + int(r["download_bytes"]) for r in rows),
        "total_upload_payload_bytes": sum(int(r.get("upload_payload_bytes") or 0)
                                          for r in rows),
        "total_download_payload_bytes": sum(int(r.get("download_payload_bytes") or 0)
                                            for r in rows),
        "total_link_seconds": (sum(float(r["link_seconds"]) for r in rows)
                               if rows and all(r.get("link_seconds") is not None for r in rows)
                               else None),
        "total_device_flops": _last_cumulative(rows, "cum_device_flops"),
        "total_device_seconds": _last_cumulative(rows, "cum_device_seconds"),
        "fp32_upload_bytes": fp32,
        "model_parameters": model_elements,
        "rounds_completed": len(rows),
    }
    start = None if initial is None else initial.get("accuracy")
    if start is not None:
        summary["initial_accuracy"] = float(start)
    if stopped is not None:
        summary["stopped"] = stopped
    if failed is not None:
        summary["failed"] = failed
    if rows and "sparsity" in rows[-1]:  # federated pruning: the final model's
        summary["sparsity"] = rows[-1]["sparsity"]
    if resumed_at:
        summary["resumed_after_rounds"] = [int(r) for r in resumed_at]
    recorded = dict(config)
    if task is not None:
        taken = set(task["run_config_keys"])
        recorded = {k: v for k, v in recorded.items() if k not in TASK_KEYS or k in taken}
        summary["task"] = dict(task)
    document = {"config": recorded, "rounds": [dict(r) for r in rows], "summary": summary,
                "privacy": dict(privacy) if privacy is not None else None}
    if nodes is not None:
        document["nodes"] = [dict(n) for n in nodes]
    cleaned: dict[str, Any] = finite_json(document)
    return cleaned


def _last_cumulative(rows: Sequence[Mapping[str, Any]], key: str) -> float | None:
    """The last row's running total ``key`` (None: no round reported it)."""
    value = next((r.get(key) for r in reversed(rows) if r.get(key) is not None), None)
    return None if value is None else float(value)


def task_record(task: Task, *, name: str, taken: Collection[str]) -> dict[str, Any]:
    """results.json's ``summary.task``: its spec or ``module:Class``, keys taken, values.

    ``taken`` is what the run config gave it (``Task.run_config_keys`` for a
    task built from the run config; nothing for a task object).
    """
    return {"name": name, "run_config_keys": sorted(taken),
            "hyperparameters": dict(task.hyperparameters())}


def finite_json(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None (valid JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    return value


def failure_line(exc: BaseException) -> str:
    """One line naming an exception and its cause (for results.json and the CLI)."""
    text = str(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    return line if len(line) <= 500 else line[:497] + "..."


def write_error_log(path: Path, exc: BaseException) -> None:
    """Write ``exc``'s full traceback to ``path`` (the file a one-line failure names)."""
    import traceback

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(traceback.format_exception(exc)), encoding="utf-8")


#: The run's log beside results.json: flowerpress's and Flower's lines, INFO and up.
SERVER_LOG = "server.log"
#: Loggers whose lines the run log keeps (the ServerApp's and Flower's own).
_RUN_LOGGERS = ("flowerpress", "flwr")


def has_text(record: logging.LogRecord) -> bool:
    """A log filter: leave out records whose message is blank (Flower logs empty lines)."""
    return bool(record.getMessage().strip())


@contextlib.contextmanager
def run_log(out_dir: Path | None, *, append: bool) -> Iterator[None]:
    """Copy the run's log lines to ``out_dir/server.log`` while the block runs.

    A new run starts the file, a resumed run (``append``) adds to it, so one
    out-dir holds one run's whole log. An exception leaving the block is
    written as the run's one failure line (the traceback is ``error.log``'s);
    the loggers' handlers and levels are restored afterwards. ``out_dir=None``
    writes nothing.
    """
    if out_dir is None:
        yield
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out_dir / SERVER_LOG, mode="a" if append else "w",
                                  encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(has_text)
    loggers = [logging.getLogger(name) for name in _RUN_LOGGERS]
    levels = [logger.level for logger in loggers]
    added: list[tuple[logging.Logger, logging.Handler]] = []
    for logger in loggers:
        if not logger.hasHandlers() and logging.lastResort is not None:
            # Where no handler was configured, warnings went to stderr through
            # logging's last resort (Flower's `flwr log` captures stderr): keep that.
            added.append((logger, logging.lastResort))
        added.append((logger, handler))
        if logger.getEffectiveLevel() > logging.INFO:  # INFO lines too: one per round
            logger.setLevel(logging.INFO)
    for logger, each in added:
        logger.addHandler(each)
    try:
        yield
    except Exception as exc:
        handler.handle(logging.makeLogRecord({
            "name": "flowerpress.server.app", "levelno": logging.ERROR, "levelname": "ERROR",
            "msg": "flowerpress: run failed: %s", "args": (failure_line(exc),)}))
        raise
    finally:
        for logger, each in added:
            logger.removeHandler(each)
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        handler.close()


def save_model_atomic(path: Path, weights: Sequence[Any]) -> None:
    """Write the global weights (``arr_0``, ``arr_1``, ... in state_dict order) atomically."""
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp.npz")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, *weights)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, document: Mapping[str, Any]) -> None:
    """Write JSON via a temporary file and rename, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(finite_json(document), fh, indent=2, allow_nan=False)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report(path: Path, results: Mapping[str, Any]) -> None:
    """Plot accuracy against round, cumulative message MB (both directions), link time
    and, where devices reported it, cumulative device compute (TFLOPs and CPU hours)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rounds"]
    rounds = [r["round"] for r in rows]
    acc = [r["accuracy"] for r in rows]
    up_mb, total_mb, minutes = [], [], []
    up = total = 0
    seconds = 0.0
    for r in rows:
        up += r["upload_bytes"]
        total += r["upload_bytes"] + r["download_bytes"]
        seconds += float(r.get("link_seconds") or 0.0)
        up_mb.append(up / 1e6)
        total_mb.append(total / 1e6)
        minutes.append(seconds / 60.0)
    has_link = any(r.get("link_seconds") is not None for r in rows)
    has_compute = any(r.get("cum_device_flops") is not None
                      or r.get("cum_device_seconds") is not None for r in rows)
    cfg = results["config"]
    panels = 2 + has_link + has_compute
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), squeeze=False)
    axes = axes[0]
    ax1, ax2 = axes[0], axes[1]
    ax1.plot(rounds, acc, marker="o")
    ax1.set_xlabel("round")
    ax1.set_ylabel("test accuracy")
    ax1.grid(alpha=0.3)
    ax2.plot(total_mb, acc, marker="o", label="upload + download")
    ax2.plot(up_mb, acc, marker=".", linestyle="--", label="upload")
    ax2.set_xlabel("cumulative message MB (as Flower sends them)")
    ax2.set_ylabel("test accuracy")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    if has_link:
        ax3 = axes[2]
        ax3.plot(minutes, acc, marker="o")
        ax3.set_xlabel(f"estimated time (min), link {cfg.get('link')}")
        ax3.set_ylabel("test accuracy")
        ax3.grid(alpha=0.3)
    if has_compute:
        _compute_panel(axes[-1], rows)
    # A user task takes no dataset or partition: config then leaves them out.
    what = " ".join(str(v) for v in (cfg.get("task") or cfg.get("dataset"),
                                      cfg.get("partition")) if v)
    fig.suptitle(f"{what}  "
                 f"compression={cfg.get('compression')}  "
                 f"download={cfg.get('download-compression')}  dp={cfg.get('dp')}  "
                 f"strategy={cfg.get('strategy')}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _compute_panel(ax: Any, rows: Sequence[Mapping[str, Any]]) -> None:
    """Accuracy against the devices' cumulative FLOPs (CPU seconds where no FLOPs)."""
    use_flops = any(r.get("cum_device_flops") is not None for r in rows)
    key, scale, label = (("cum_device_flops", 1e12, "cumulative device TFLOPs (local training)")
                         if use_flops else
                         ("cum_device_seconds", 1.0, "cumulative device CPU seconds"))
    points = [(float(r[key]) / scale, r["accuracy"]) for r in rows
              if r.get(key) is not None and r.get("accuracy") is not None]
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
    ax.set_xlabel(label)
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
