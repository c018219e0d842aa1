"""One checkpoint per round: everything a resumed run needs, in one atomic file.

After every round the server writes ``OUT_DIR/checkpoint.npz`` (STYLE.md,
habit 14: server state is one serializable value): the global model, the
strategy's state (server momentum, adaptive moments), the privacy ledger, the
sampling generator's state, the membership bookkeeping, the round number and
every round row so far. It is written to a temporary file, flushed to disk
and renamed over the previous one, so a crash at any moment leaves either the
previous round's checkpoint or this round's, never half a file.

The file is a plain ``.npz`` (no pickle): one JSON document under ``state``
whose arrays are stored as ``a/0``, ``a/1``, ... and referenced from the JSON
as ``{"__array__": i}``. Arrays keep their dtype (float64 moments stay
float64), so a resumed run continues bit for bit.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

CHECKPOINT_NAME = "checkpoint.npz"
FORMAT = "flowerpress-checkpoint"
VERSION = 1
#: Run-config keys a resumed run may change; every other key must be the checkpoint's.
RESUME_MAY_CHANGE = frozenset({"rounds", "round-timeout", "min-replies", "max-missed-rounds",
                               "max-rejected-rounds", "max-epsilon", "max-client-weight",
                               "out-dir", "resume"})
_ARRAY = "__array__"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or belongs to another run configuration."""


@dataclass
class LoopState:
    """The round loop's state after ``server_round`` rounds; what a checkpoint holds.

    Attributes
    ----------
    server_round
        Rounds completed (the next round is ``server_round + 1``).
    weights
        The global model after that round (float32, state_dict order).
    rows
        Every results row so far, one per completed round.
    rng
        The sampling generator's ``bit_generator.state``.
    membership
        :meth:`flowerpress.server.membership.Membership.state_dict`.
    strategy
        The strategy's ``state_dict()`` (arrays allowed).
    privacy
        The privacy ledger's ``state_dict()``, or None without DP.
    privacy_population
        The population the ledger was built for (its sampling rate depends on it).
    download
        State of the download codec (None: the broadcast codecs keep none today).
    resumed_at
        The rounds after which the run was resumed, in order.
    """

    server_round: int
    weights: list[NDArray[np.float32]]
    rows: list[dict[str, Any]]
    rng: dict[str, Any]
    membership: dict[str, Any]
    strategy: dict[str, Any]
    privacy: dict[str, Any] | None = None
    privacy_population: int | None = None
    download: Any = None
    resumed_at: list[int] = field(default_factory=list)


def _encode(value: Any, arrays: list[NDArray[Any]]) -> Any:
    if isinstance(value, np.ndarray):
        arrays.append(value)
        return {_ARRAY: len(arrays) - 1}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"checkpoint state: mapping keys must be str, got {key!r}")
            out[key] = _encode(item, arrays)
        return out
    if isinstance(value, list | tuple):
        return [_encode(item, arrays) for item in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"checkpoint state: cannot store a {type(value).__name__} "
                    "(use numbers, strings, lists, dicts and numpy arrays)")


def _decode(value: Any, arrays: Mapping[int, NDArray[Any]]) -> Any:
    if isinstance(value, dict):
        if set(value) == {_ARRAY}:
            return arrays[int(value[_ARRAY])]
        return {k: _decode(v, arrays) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, arrays) for v in value]
    return value


def save_checkpoint(out_dir: Path, state: LoopState, config: Mapping[str, Any]) -> Path:
    """Write ``state`` (and the run ``config``) atomically to ``out_dir/checkpoint.npz``."""
    arrays: list[NDArray[Any]] = []
    document = {
        "format": FORMAT, "version": VERSION, "config": dict(config),
        "round": state.server_round,
        "weights": _encode(list(state.weights), arrays),
        "rows": _encode(state.rows, arrays),
        "rng": _encode(state.rng, arrays),
        "membership": _encode(state.membership, arrays),
        "strategy": _encode(state.strategy, arrays),
        "privacy": _encode(state.privacy, arrays),
        "privacy_population": state.privacy_population,
        "download": _encode(state.download, arrays),
        "resumed_at": list(state.resumed_at),
    }
    text = json.dumps(document)
    path = out_dir / CHECKPOINT_NAME
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=CHECKPOINT_NAME, suffix=".tmp")
    try:
        named: dict[str, Any] = {f"a/{i}": a for i, a in enumerate(arrays)}
        savez: Any = np.savez  # its stubs type **kwds as its keyword-only flags
        with os.fdopen(fd, "wb") as fh:
            savez(fh, state=np.array(text), **named)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read back: the loop state and the run config it was written with."""

    state: LoopState
    config: dict[str, Any]


def load_checkpoint(out_dir: Path) -> Checkpoint | None:
    """The checkpoint in ``out_dir``, or None if there is none.

    Raises
    ------
    CheckpointError
        The file exists but is not a flowerpress checkpoint this version reads.
    """
    path = out_dir / CHECKPOINT_NAME
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            document = json.loads(str(data["state"]))
            arrays = {int(k.split("/", 1)[1]): data[k] for k in data.files if k.startswith("a/")}
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path} is not a readable checkpoint: {exc}") from None
    if document.get("format") != FORMAT or document.get("version") != VERSION:
        raise CheckpointError(f"{path} is not a flowerpress checkpoint of version {VERSION}")
    state = LoopState(
        server_round=int(document["round"]),
        weights=[np.asarray(w, dtype=np.float32)
                 for w in _decode(document["weights"], arrays)],
        rows=_decode(document["rows"], arrays),
        rng=_decode(document["rng"], arrays),
        membership=_decode(document["membership"], arrays),
        strategy=_decode(document["strategy"], arrays),
        privacy=_decode(document["privacy"], arrays),
        privacy_population=document.get("privacy_population"),
        download=_decode(document["download"], arrays),
        resumed_at=[int(r) for r in document.get("resumed_at", [])],
    )
    return Checkpoint(state=state, config=dict(document["config"]))


def unfinished_run(out_dir: Path) -> str | None:
    """Why a new run must not start in ``out_dir`` (it holds an unfinished run's checkpoint).

    Returns None when ``out_dir`` has no checkpoint or a finished run's. A new
    run would overwrite the checkpoint, and with it the privacy already spent.
    """
    saved = load_checkpoint(out_dir)
    if saved is None:
        return None
    planned = int(saved.config.get("rounds", 0))
    if saved.state.server_round >= planned:
        return None
    return (f"{out_dir} holds the checkpoint of an unfinished run (round "
            f"{saved.state.server_round} of {planned}); set resume=true "
            "(flowerpress simulate --resume DIR) to continue it, or choose another out-dir")


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any],
                       defaults: Mapping[str, Any]) -> list[str]:
    """The keys (outside :data:`RESUME_MAY_CHANGE`) whose values differ, as ``key: a -> b``."""
    out = []
    for key in sorted(set(saved) | set(current)):
        if key in RESUME_MAY_CHANGE:
            continue
        old = saved.get(key, defaults.get(key))
        new = current.get(key, defaults.get(key))
        if old != new:
            out.append(f"{key}: {old!r} -> {new!r}")
    return out


def check_weights(saved: Sequence[NDArray[Any]], initial: Sequence[NDArray[Any]]) -> None:
    """Raise CheckpointError unless ``saved`` has the model's tensor count and shapes."""
    if len(saved) != len(initial) or any(
            s.shape != i.shape for s, i in zip(saved, initial, strict=True)):
        raise CheckpointError(
            f"the checkpoint's model ({[s.shape for s in saved]}) is not this task's model "
            f"({[i.shape for i in initial]})")
