"""``results.json`` and ``report.png``: what a run leaves behind.

The layout is the contract of ARCHITECTURE.md::

    {"config": {...},
     "rounds": [{"round", "accuracy", "loss", "f1_macro", "clients", "rejected",
                 "timed_out", "unavailable", "upload_bytes", "download_bytes",
                 "epsilon", "seconds"}, ...],
     "summary": {"final_accuracy", "total_upload_bytes", "total_download_bytes",
                 "fp32_upload_bytes"},
     "privacy": {...} | null}

Bytes are the sizes of the array payloads carried in the Flower messages.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROUND_FIELDS = ("round", "accuracy", "loss", "f1_macro", "clients", "rejected", "timed_out",
                "unavailable", "upload_bytes", "download_bytes", "epsilon", "seconds")


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
) -> dict[str, Any]:
    """Assemble the results document from the round rows.

    ``failed`` is the one-line reason a run ended in error (the strategy
    produced an unusable model, ...); the rows so far are kept.
    ``resumed_at`` lists the rounds after which the run was resumed from its
    checkpoint (``summary.resumed_after_rounds``).
    """
    fp32 = sum(int(r["clients"]) + int(r["rejected"]) for r in rows) * model_elements * 4
    summary: dict[str, Any] = {
        "final_accuracy": rows[-1]["accuracy"] if rows else None,
        "total_upload_bytes": sum(int(r["upload_bytes"]) for r in rows),
        "total_download_bytes": sum(int(r["download_bytes"]) for r in rows),
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
    if resumed_at:
        summary["resumed_after_rounds"] = [int(r) for r in resumed_at]
    document = {"config": dict(config), "rounds": [dict(r) for r in rows], "summary": summary,
                "privacy": dict(privacy) if privacy is not None else None}
    cleaned: dict[str, Any] = finite_json(document)
    return cleaned


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
    """Plot accuracy against round and against cumulative upload MB."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rounds"]
    rounds = [r["round"] for r in rows]
    acc = [r["accuracy"] for r in rows]
    mb, total = [], 0
    for r in rows:
        total += r["upload_bytes"]
        mb.append(total / 1e6)
    cfg = results["config"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(rounds, acc, marker="o")
    ax1.set_xlabel("round")
    ax1.set_ylabel("test accuracy")
    ax1.grid(alpha=0.3)
    ax2.plot(mb, acc, marker="o")
    ax2.set_xlabel("cumulative upload (MB)")
    ax2.set_ylabel("test accuracy")
    ax2.grid(alpha=0.3)
    fig.suptitle(f"{cfg.get('dataset')} {cfg.get('partition')}  "
                 f"compression={cfg.get('compression')}  dp={cfg.get('dp')}  "
                 f"strategy={cfg.get('strategy')}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
