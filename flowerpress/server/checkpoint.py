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
float64), so a resumed run continues bit for bit. Since version 2 a
``digest`` entry holds a SHA-256 over the document and every array (dtype,
shape and bytes), so a file changed after it was written is refused.

A checkpoint is read like a device's reply: never trusted (issue 20).
:func:`load_checkpoint` checks the file (readable, format, version, digest,
types, finite model, round not negative); :func:`verify_checkpoint` checks it
against the run that wants to continue it (the planned rounds, the task's
model, the strategy's, the ledger's and the membership's state). Every
refusal is a :class:`CheckpointError` of one line naming the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.npz"
RESULTS_NAME = "results.json"
FORMAT = "flowerpress-checkpoint"
#: The version written. Version 1 (no digest) is still read, with a warning.
VERSION = 2
READABLE_VERSIONS = frozenset({1, 2})
#: Run-config keys a resumed run may change; every other key must be the checkpoint's.
RESUME_MAY_CHANGE = frozenset({"rounds", "round-timeout", "min-replies", "max-missed-rounds",
                               "max-rejected-rounds", "max-epsilon", "max-client-weight",
                               "out-dir", "resume", "overwrite"})
#: Files of a run in its out-dir (``overwrite`` removes them before a new run starts).
RUN_FILES = (CHECKPOINT_NAME, RESULTS_NAME, "model.npz", "report.png", "error.log")
_ARRAY = "__array__"
_DIGEST = "sha256:"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, damaged, or does not belong to this run.

    Its message is one line that names the file and what is wrong.
    """


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
    bound
        :meth:`flowerpress.server.bounds.UpdateNormBound.state_dict` (None in
        checkpoints written before the bound had state).
    resumed_at
        The rounds after which the run was resumed, in order.
    prune
        :meth:`flowerpress.server.prune.Pruner.state_dict` (the pruning mask;
        None without pruning).
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
    bound: dict[str, Any] | None = None
    prune: dict[str, Any] | None = None


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


def _digest(text: str, arrays: Sequence[NDArray[Any]]) -> str:
    """SHA-256 over the JSON document and every array's dtype, shape and bytes, in order."""
    h = hashlib.sha256(text.encode("utf-8"))
    for i, a in enumerate(arrays):
        h.update(f"\n{i}:{a.dtype.str}:{a.shape}\n".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return _DIGEST + h.hexdigest()


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
        "bound": state.bound,
        "prune": _encode(state.prune, arrays),
    }
    text = json.dumps(document)
    digest = _digest(text, arrays)
    path = out_dir / CHECKPOINT_NAME
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=CHECKPOINT_NAME, suffix=".tmp")
    try:
        named: dict[str, Any] = {f"a/{i}": a for i, a in enumerate(arrays)}
        savez: Any = np.savez  # its stubs type **kwds as its keyword-only flags
        with os.fdopen(fd, "wb") as fh:
            savez(fh, state=np.array(text), digest=np.array(digest), **named)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read back: the loop state, the run config it was written with, its file."""

    state: LoopState
    config: dict[str, Any]
    path: Path = Path(CHECKPOINT_NAME)


def _one_line(exc: BaseException) -> str:
    """An exception as a short single line (library messages may span lines)."""
    text = " ".join(str(exc).split()) or "no detail"
    line = f"{type(exc).__name__}: {text}"
    return line if len(line) <= 200 else line[:197] + "..."


def _read(path: Path) -> tuple[str, str | None, dict[int, NDArray[Any]]]:
    """The document text, the stored digest and the arrays of the file at ``path``."""
    def fail(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: {what}")

    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise fail("not a checkpoint (a single array, not an .npz archive)")
        with loaded as data:
            names = list(data.files)
            if "state" not in names:
                raise fail("not a checkpoint (no 'state' entry)")
            text = data["state"]
            digest = data["digest"] if "digest" in names else None
            arrays: dict[int, NDArray[Any]] = {}
            for name in names:
                if name in ("state", "digest"):
                    continue
                index = name[2:] if name.startswith("a/") else ""
                if not index.isdigit() or str(int(index)) != index:
                    raise fail(f"not a checkpoint (unexpected entry {name!r})")
                arrays[int(index)] = data[name]
    except CheckpointError:
        raise
    except Exception as exc:  # any failure to parse the file means it is damaged
        raise fail(f"not a readable checkpoint (empty, truncated or corrupted: "
                   f"{_one_line(exc)})") from None
    if sorted(arrays) != list(range(len(arrays))):
        raise fail("damaged: its arrays are not numbered 0..n-1")
    if text.shape != () or text.dtype.kind != "U":
        raise fail("damaged: 'state' is not one string")
    if digest is not None and (digest.shape != () or digest.dtype.kind != "U"):
        raise fail("damaged: 'digest' is not one string")
    return str(text), None if digest is None else str(digest), arrays


def _require(ok: bool, path: Path, what: str) -> None:
    if not ok:
        raise CheckpointError(f"{path}: {what}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def load_checkpoint(out_dir: Path) -> Checkpoint | None:
    """The checkpoint in ``out_dir``, or None if there is none.

    Checks what can be checked without the run: the file is a readable
    flowerpress checkpoint of a version this code reads, its digest matches its
    contents, its parts have their types, the model's weights are finite and
    the round is not negative. :func:`verify_checkpoint` checks the rest.

    Raises
    ------
    CheckpointError
        One line naming the file and what is wrong with it.
    """
    path = out_dir / CHECKPOINT_NAME
    if not path.exists():
        return None
    text, digest, arrays = _read(path)
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise CheckpointError(f"{path}: damaged: its state is not JSON "
                              f"({_one_line(exc)})") from None
    _require(isinstance(document, dict) and document.get("format") == FORMAT, path,
             "not a flowerpress checkpoint")
    version = document.get("version")
    _require(_is_int(version) and version in READABLE_VERSIONS, path,
             f"checkpoint version {version!r}; this flowerpress reads versions "
             f"{sorted(READABLE_VERSIONS)}")
    if version >= 2:
        _require(digest is not None, path, "damaged: no digest")
        ordered = [arrays[i] for i in range(len(arrays))]
        _require(digest == _digest(text, ordered), path,
                 "damaged: its contents do not match its digest (changed or corrupted "
                 "after it was written)")
    else:
        log.warning("%s: a version-1 checkpoint has no digest; its contents are checked, "
                    "not their integrity", path)
    try:
        return Checkpoint(state=_state(document, arrays, path), config=document["config"],
                          path=path)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError,
            RecursionError) as exc:
        raise CheckpointError(f"{path}: malformed state ({_one_line(exc)})") from None


def _state(document: dict[str, Any], arrays: Mapping[int, NDArray[Any]],
           path: Path) -> LoopState:
    """The LoopState in ``document``, its types and run-independent bounds checked."""
    _require(isinstance(document["config"], dict), path, "malformed state: config is not a table")
    server_round = document["round"]
    _require(_is_int(server_round), path, f"the round {server_round!r} is not an integer")
    _require(server_round >= 0, path, f"the round {server_round} is negative")
    raw = _decode(document["weights"], arrays)
    _require(isinstance(raw, list) and all(isinstance(w, np.ndarray) for w in raw), path,
             "malformed state: the model is not a list of arrays")
    _require(all(w.dtype.kind in "fiu" for w in raw), path,
             "malformed state: the model has non-numeric arrays")
    with np.errstate(over="ignore"):  # a float64 beyond float32 becomes inf, refused below
        weights = [np.asarray(w, dtype=np.float32) for w in raw]
    for i, w in enumerate(weights):
        _require(bool(np.isfinite(w).all()), path,
                 f"the model's tensor {i} {w.shape} has NaN or infinite weights")
    rows = _decode(document["rows"], arrays)
    _require(isinstance(rows, list) and all(isinstance(r, dict) for r in rows), path,
             "malformed state: rows are not a list of tables")
    for name in ("rng", "membership", "strategy"):
        _require(isinstance(document[name], dict), path, f"malformed state: {name} is not a table")
    privacy = _decode(document["privacy"], arrays)
    _require(privacy is None or isinstance(privacy, dict), path,
             "malformed state: privacy is not a table")
    population = document.get("privacy_population")
    _require(population is None or (_is_int(population) and population >= 1), path,
             f"the privacy population {population!r} is not a positive integer")
    bound = document.get("bound")
    _require(bound is None or isinstance(bound, dict), path,
             "malformed state: the update bound is not a table")
    prune = _decode(document.get("prune"), arrays)
    _require(prune is None or isinstance(prune, dict), path,
             "malformed state: the pruning mask is not a table")
    resumed_at = document.get("resumed_at", [])
    _require(isinstance(resumed_at, list) and all(
        _is_int(r) and 0 <= r <= server_round for r in resumed_at), path,
        f"resumed_at {resumed_at!r} is not a list of rounds up to {server_round}")
    return LoopState(
        server_round=server_round, weights=weights, rows=rows,
        rng=_decode(document["rng"], arrays),
        membership=_decode(document["membership"], arrays),
        strategy=_decode(document["strategy"], arrays),
        privacy=privacy, privacy_population=population,
        download=_decode(document["download"], arrays),
        resumed_at=list(resumed_at), bound=bound, prune=prune,
    )


def existing_run(out_dir: Path) -> str | None:
    """Why a new run must not start in ``out_dir``: it holds another run; None if it does not.

    Another run is a ``checkpoint.npz`` (finished or not, readable or not) or a
    ``results.json`` with at least one round (or one that cannot be read). A
    ``results.json`` without rounds (a run that failed before its first round)
    released nothing and does not count. A new run there would overwrite that
    run's results and, under DP, report its epsilon from zero again, although
    the data was already used: a privacy budget belongs to the data, not to a
    directory.
    """
    what: str | None = None
    if (out_dir / CHECKPOINT_NAME).exists():
        try:
            saved = load_checkpoint(out_dir)
        except CheckpointError:
            saved = None
            what = f"a damaged {CHECKPOINT_NAME}"
        if saved is not None:
            done, planned = saved.state.server_round, saved.config.get("rounds")
            finished = isinstance(planned, int) and done >= planned
            what = (f"the checkpoint of {'a finished' if finished else 'an unfinished'} run "
                    f"(round {done} of {planned})")
    elif (out_dir / RESULTS_NAME).exists():
        try:
            rounds = json.loads((out_dir / RESULTS_NAME).read_text(encoding="utf-8"))["rounds"]
            count: int | None = len(rounds)
        except (OSError, ValueError, KeyError, TypeError):
            count = None
        if count != 0:
            what = (f"the {RESULTS_NAME} of another run "
                    f"({'unreadable' if count is None else f'{count} rounds'})")
    if what is None:
        return None
    return (f"{out_dir} holds {what}; a new run would overwrite it and restart its privacy "
            "accounting (a privacy budget belongs to the data, not to a directory): continue "
            "it with resume=true (flowerpress simulate --resume DIR), discard it with "
            "overwrite=true (--overwrite), or choose another out-dir")


#: Loads a saved state into this run's component (raises ValueError, TypeError or KeyError).
StateLoader = Callable[[Any], None]
#: Loads a saved ledger state into this run's ledger built for a population.
PrivacyLoader = Callable[[int, Mapping[str, Any]], None]


@dataclass(frozen=True)
class Expected:
    """What the run that wants to continue a checkpoint expects of it.

    ``rounds`` is always known (the run config); the rest only where the run's
    components are built (the ServerApp): ``None`` skips that check.
    """

    # -- from the run config
    rounds: int  # the planned rounds: the checkpoint's round must not exceed them
    dp: bool | None = None  # whether the run accounts privacy (None: unknown, not checked)
    # -- from the run's components
    model: Sequence[NDArray[Any]] | None = None  # the task's initial weights (their shapes)
    load_strategy: StateLoader | None = None  # the strategy's load_state_dict
    load_privacy: PrivacyLoader | None = None  # a fresh ledger's load, for a population
    load_download: StateLoader | None = None  # the download history's load (None: off)


def verify_checkpoint(saved: Checkpoint, expected: Expected) -> None:
    """Check that ``saved`` can continue the run described by ``expected``.

    The round is at most the planned rounds and there is one result row per
    round; the model has the task's tensor shapes; the sampling generator's,
    the membership's, the strategy's, the privacy ledger's and the download
    history's states load into this run's components (each refuses another
    schema), strategy arrays are finite and model-shaped buffers have the
    model's shapes.

    Raises
    ------
    CheckpointError
        One line naming the file and the first thing that does not fit.
    """
    path, state = saved.path, saved.state

    def fail(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: {what}")

    if state.server_round > expected.rounds:
        raise fail(f"round {state.server_round} is beyond the run's planned rounds "
                   f"({expected.rounds})")
    numbers = [r.get("round") for r in state.rows]
    if numbers != list(range(1, state.server_round + 1)):
        raise fail(f"its result rows are for rounds {_short(numbers)}, not 1..{state.server_round}")
    try:
        np.random.default_rng(0).bit_generator.state = state.rng
    except (TypeError, ValueError, KeyError) as exc:
        raise fail(f"the sampling generator's state does not load ({_one_line(exc)})") from None
    _verify_membership(state, fail)
    if expected.model is not None:
        shapes = [w.shape for w in state.weights]
        wanted = [tuple(w.shape) for w in expected.model]
        if shapes != wanted:
            raise fail(f"the model's shapes {_short(shapes)} are not the task's {_short(wanted)}")
    if expected.load_strategy is not None:
        _verify_strategy(state, expected, fail)
    if expected.dp is not None:
        if expected.dp and (state.privacy is None or state.privacy_population is None):
            raise fail("no privacy ledger state, but this run uses DP (its epsilon would "
                       "restart from zero)")
        if not expected.dp and state.privacy is not None:
            raise fail("a privacy ledger state, but this run does not use DP")
    if expected.load_privacy is not None and state.privacy is not None:
        assert state.privacy_population is not None  # checked by load_checkpoint's types
        try:
            expected.load_privacy(state.privacy_population, state.privacy)
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
            raise fail(f"the privacy ledger state does not fit this run "
                       f"({_one_line(exc)})") from None
    if expected.load_download is not None and state.download is not None:
        try:
            expected.load_download(state.download)
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
            raise fail(f"the download history's state does not fit this run "
                       f"({_one_line(exc)})") from None


def _short(items: Sequence[Any]) -> str:
    text = str(list(items))
    return text if len(text) <= 120 else text[:117] + "..."


def _verify_membership(state: LoopState, fail: Callable[[str], CheckpointError]) -> None:
    """The membership records: their fields' types and bounds, then the real load."""
    from flowerpress import protocol
    from flowerpress.server.membership import Membership

    nodes = state.membership.get("nodes")
    if not isinstance(nodes, list) or not all(isinstance(n, dict) for n in nodes):
        raise fail("the membership state has no list of node records")
    seen: set[int] = set()
    for item in nodes:
        node, partition = item.get("node_id"), item.get("partition")
        since, missed = item.get("since", 0), item.get("missed", 0)
        if not (_is_int(node) and node >= 0) or node in seen:
            raise fail(f"the membership state has a bad or repeated node id {node!r}")
        seen.add(node)
        if partition is not None and not (_is_int(partition) and partition >= 0):
            raise fail(f"the membership state gives node {node} partition {partition!r}")
        if not (_is_int(since) and 0 <= since <= state.server_round):
            raise fail(f"the membership state has node {node} known since round {since!r}")
        if not (_is_int(missed) and missed >= 0):
            raise fail(f"the membership state has node {node} missing {missed!r} rounds")
        if not isinstance(item.get("listed", True), bool):
            raise fail(f"the membership state's 'listed' of node {node} is not a boolean")
        anchor = item.get("anchor")
        if anchor is not None and protocol.parse_digest(anchor) is None:
            raise fail(f"the membership state has node {node} with a malformed anchor")
        for key in ("last_round", "answered"):
            value = item.get(key, 0)
            if not (_is_int(value) and 0 <= value <= state.server_round):
                raise fail(f"the membership state has node {node} with {key} {value!r}")
        version, outcome = item.get("version"), item.get("outcome")
        if version is not None and protocol.parse_flowerpress_version(version) is None:
            raise fail(f"the membership state has node {node} with a malformed version")
        if outcome is not None and not isinstance(outcome, str):
            raise fail(f"the membership state has node {node} with a non-text outcome")
    try:
        Membership(max_missed=1).load_state_dict(state.membership)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise fail(f"the membership state does not load ({_one_line(exc)})") from None


def _arrays(value: Any) -> list[NDArray[Any]]:
    if isinstance(value, np.ndarray):
        return [value]
    if isinstance(value, dict):
        return [a for v in value.values() for a in _arrays(v)]
    if isinstance(value, list):
        return [a for v in value for a in _arrays(v)]
    return []


def _model_buffers(value: Any) -> list[list[NDArray[Any]]]:
    """The lists (or tables) of arrays in ``value``, each one candidate model-shaped buffer."""
    if isinstance(value, dict | list):
        items = list(value.values()) if isinstance(value, dict) else value
        here = [items] if items and all(isinstance(v, np.ndarray) for v in items) else []
        return here + [b for v in items for b in _model_buffers(v)]
    return []


def _verify_strategy(state: LoopState, expected: Expected,
                     fail: Callable[[str], CheckpointError]) -> None:
    """The strategy's own load refuses another schema; its arrays must be usable.

    A buffer of as many arrays as the model has tensors (momentum, moments,
    Flower's current arrays) must have the model's shapes, or the first round
    after the resume would fail in the strategy instead of here.
    """
    assert expected.load_strategy is not None
    for a in _arrays(state.strategy):
        if a.dtype.kind == "f" and not bool(np.isfinite(a).all()):
            raise fail(f"the strategy state has NaN or infinite values (an array of shape "
                       f"{a.shape})")
    if expected.model is not None:
        wanted = [tuple(w.shape) for w in expected.model]
        for buffer in _model_buffers(state.strategy):
            shapes = [a.shape for a in buffer]
            if len(shapes) == len(wanted) and shapes != wanted:
                raise fail(f"the strategy state holds arrays of shapes {_short(shapes)}, "
                           f"not the model's {_short(wanted)}")
    try:
        expected.load_strategy(dict(state.strategy))
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
        raise fail(f"the strategy state does not fit this run's strategy "
                   f"({_one_line(exc)})") from None


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


