"""A checkpoint is read like a device's reply: checked before anything uses it (issue 20).

Every damaged or foreign checkpoint is refused with one line that names the file
and what is wrong; a run dir that holds another run is recognised as such.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flowerpress.server import checkpoint as ckpt
from flowerpress.server.checkpoint import (
    Checkpoint,
    CheckpointError,
    Expected,
    LoopState,
    existing_run,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)

MODEL = [np.zeros((2, 3), dtype=np.float32), np.zeros(3, dtype=np.float32)]


def _state(server_round: int = 2, **changes: Any) -> LoopState:
    values: dict[str, Any] = {
        "server_round": server_round,
        "weights": [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(3, np.float32)],
        "rows": [{"round": r + 1, "accuracy": 0.5} for r in range(int(server_round))],
        "rng": dict(np.random.default_rng(3).bit_generator.state),
        "membership": {"max_missed": 3, "nodes": [
            {"node_id": 7, "partition": 0, "since": 0, "missed": 0, "listed": True,
             "anchor": None}]},
        "strategy": {"velocity": [np.zeros((2, 3)), np.zeros(3)]},
    }
    values.update(changes)
    return LoopState(**values)


def _saved(tmp_path: Path, state: LoopState | None = None) -> Checkpoint:
    save_checkpoint(tmp_path, state or _state(), {"rounds": 4, "seed": 0})
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None
    return loaded


def _refusal(call: Callable[[], object]) -> str:
    with pytest.raises(CheckpointError) as info:
        call()
    text = str(info.value)
    assert "\n" not in text
    return text


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x10
    path.write_bytes(bytes(data))


def _not_npz(path: Path) -> None:
    path.write_text("hello", encoding="utf-8")


def _single_array(path: Path) -> None:
    with path.open("wb") as fh:
        np.save(fh, np.zeros(3))


# --- the file ------------------------------------------------------------------------------

@pytest.mark.parametrize(("damage", "words"), [
    (_truncate, "not a readable checkpoint"),
    (_empty, "not a readable checkpoint"),
    (_flip_a_bit, "checkpoint"),
    (_not_npz, "not a readable checkpoint"),
    (_single_array, "not a checkpoint"),
])
def test_a_damaged_file_is_one_line_naming_it(tmp_path: Path,
                                              damage: Callable[[Path], None],
                                              words: str) -> None:
    # Prepare
    save_checkpoint(tmp_path, _state(), {"rounds": 4})
    path = tmp_path / "checkpoint.npz"
    damage(path)
    # Execute
    text = _refusal(lambda: load_checkpoint(tmp_path))
    # Assert
    assert text.startswith(f"{path}: ") and words in text


def test_contents_changed_after_writing_do_not_match_the_digest(tmp_path: Path) -> None:
    # Prepare: a valid archive (its CRCs fit) whose model was edited afterwards
    save_checkpoint(tmp_path, _state(), {"rounds": 4})
    path = tmp_path / "checkpoint.npz"
    with np.load(path) as data:
        entries = {name: data[name] for name in data.files}
    entries["a/0"] = entries["a/0"] + 1
    np.savez(path, **entries)
    # Execute
    text = _refusal(lambda: load_checkpoint(tmp_path))
    # Assert
    assert text == (f"{path}: damaged: its contents do not match its digest (changed or "
                    "corrupted after it was written)")


def test_a_checkpoint_without_a_digest_is_refused(tmp_path: Path) -> None:
    # Prepare: version 2 claims a digest
    save_checkpoint(tmp_path, _state(), {"rounds": 4})
    path = tmp_path / "checkpoint.npz"
    with np.load(path) as data:
        entries = {name: data[name] for name in data.files if name != "digest"}
    np.savez(path, **entries)
    # Execute / Assert
    assert _refusal(lambda: load_checkpoint(tmp_path)) == f"{path}: damaged: no digest"


def test_a_version_1_checkpoint_is_still_read(tmp_path: Path) -> None:
    # Prepare: what the previous flowerpress wrote (no digest)
    save_checkpoint(tmp_path, _state(), {"rounds": 4})
    path = tmp_path / "checkpoint.npz"
    with np.load(path) as data:
        entries = {name: data[name] for name in data.files if name != "digest"}
    document = json.loads(str(entries["state"]))
    document["version"] = 1
    entries["state"] = np.array(json.dumps(document))
    np.savez(path, **entries)
    # Execute
    loaded = load_checkpoint(tmp_path)
    # Assert
    assert loaded is not None and loaded.state.server_round == 2


def test_an_unknown_version_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    monkeypatch.setattr(ckpt, "VERSION", 9)
    save_checkpoint(tmp_path, _state(), {"rounds": 4})
    monkeypatch.undo()
    # Execute / Assert
    assert "checkpoint version 9; this flowerpress reads versions [1, 2]" in _refusal(
        lambda: load_checkpoint(tmp_path))


@pytest.mark.parametrize(("weights", "words"), [
    ([np.full((2, 3), np.nan, np.float32), np.ones(3, np.float32)],
     "the model's tensor 0 (2, 3) has NaN or infinite weights"),
    ([np.ones((2, 3), np.float32), np.array([1.0, np.inf, 0.0], np.float32)],
     "the model's tensor 1 (3,) has NaN or infinite weights"),
    ([np.ones((2, 3), np.float32), np.array([1e300, 0.0, 0.0])],  # inf as float32
     "the model's tensor 1 (3,) has NaN or infinite weights"),
    ([np.array(["a", "b"])], "non-numeric"),
])
def test_a_model_that_is_not_finite_numbers_is_refused(tmp_path: Path, weights: list[Any],
                                                       words: str) -> None:
    # Prepare: written with a valid digest, so only the content check can refuse it
    save_checkpoint(tmp_path, _state(weights=weights), {"rounds": 4})
    # Execute / Assert
    assert words in _refusal(lambda: load_checkpoint(tmp_path))


@pytest.mark.parametrize(("server_round", "words"), [
    (-5, "the round -5 is negative"),
    (2.5, "the round 2.5 is not an integer"),
    (True, "the round True is not an integer"),
])
def test_a_round_that_is_not_a_count_is_refused(tmp_path: Path, server_round: Any,
                                                words: str) -> None:
    # Prepare
    save_checkpoint(tmp_path, _state(rows=[], server_round=server_round), {"rounds": 4})
    # Execute / Assert
    assert words in _refusal(lambda: load_checkpoint(tmp_path))


def test_a_malformed_document_is_one_line(tmp_path: Path) -> None:
    # Prepare: an array reference to an array that is not there, with a valid digest
    save_checkpoint(tmp_path, _state(strategy={}), {"rounds": 4})
    path = tmp_path / "checkpoint.npz"
    with np.load(path) as data:
        entries = {name: data[name] for name in data.files}
    document = json.loads(str(entries["state"]))
    document["strategy"] = {"m": {"__array__": 99}}
    entries["state"] = np.array(json.dumps(document))
    arrays = [entries[f"a/{i}"] for i in range(len(entries) - 2)]
    entries["digest"] = np.array(ckpt._digest(str(entries["state"]), arrays))
    np.savez(path, **entries)
    # Execute / Assert
    assert "malformed state (KeyError: 99)" in _refusal(lambda: load_checkpoint(tmp_path))


def test_no_file_is_no_checkpoint(tmp_path: Path) -> None:
    assert load_checkpoint(tmp_path) is None


def test_the_digest_covers_every_entry(tmp_path: Path) -> None:
    # Prepare / Execute
    save_checkpoint(tmp_path, _state(), {"rounds": 4})
    # Assert: the archive holds the document, the digest and the arrays, nothing else
    with zipfile.ZipFile(tmp_path / "checkpoint.npz") as archive:
        names = sorted(archive.namelist())
    assert names[:2] == ["a/0.npy", "a/1.npy"] and "digest.npy" in names
    assert "state.npy" in names


# --- against the run -------------------------------------------------------------------------

def test_a_checkpoint_that_fits_the_run_passes(tmp_path: Path) -> None:
    # Prepare
    saved = _saved(tmp_path)
    loaded: list[dict[str, Any]] = []
    # Execute
    verify_checkpoint(saved, Expected(rounds=4, dp=False, model=MODEL,
                                      load_strategy=loaded.append))
    # Assert
    assert len(loaded) == 1 and set(loaded[0]) == {"velocity"}


def _strict_strategy(state: dict[str, Any]) -> None:
    if set(state) != {"m", "v"}:
        raise ValueError(f"FedAdam state needs keys ['m', 'v'], got {sorted(state)}")


def _refusing_ledger(population: int, state: Any) -> None:
    raise ValueError("privacy state: dp spec 'x' differs from this run's 'y'")


@pytest.mark.parametrize(("state", "expected", "words"), [
    (_state(server_round=5), Expected(rounds=4),
     "round 5 is beyond the run's planned rounds (4)"),
    (_state(), Expected(rounds=4, model=[np.zeros((3, 2), np.float32), np.zeros(3, np.float32)]),
     "the model's shapes [(2, 3), (3,)] are not the task's [(3, 2), (3,)]"),
    (_state(), Expected(rounds=4, model=MODEL[:1]), "are not the task's [(2, 3)]"),
    (_state(rows=[{"round": 1}]), Expected(rounds=4),
     "its result rows are for rounds [1], not 1..2"),
    (_state(rng={"bit_generator": "MT19937", "state": {}}), Expected(rounds=4),
     "the sampling generator's state does not load"),
    (_state(membership={"nodes": "all"}), Expected(rounds=4),
     "the membership state has no list of node records"),
    (_state(membership={"nodes": [{"node_id": -1}]}), Expected(rounds=4),
     "bad or repeated node id -1"),
    (_state(membership={"nodes": [{"node_id": 1}, {"node_id": 1}]}), Expected(rounds=4),
     "bad or repeated node id 1"),
    (_state(membership={"nodes": [{"node_id": 1, "since": 9}]}), Expected(rounds=4),
     "node 1 known since round 9"),
    (_state(membership={"nodes": [{"node_id": 1, "partition": "p0"}]}), Expected(rounds=4),
     "gives node 1 partition 'p0'"),
    (_state(membership={"nodes": [{"node_id": 1, "anchor": 12}]}), Expected(rounds=4),
     "the membership state has node 1 with a malformed anchor"),
    (_state(membership={"nodes": [{"node_id": 1, "last_round": 3}]}), Expected(rounds=4),
     "the membership state has node 1 with last_round 3"),
    (_state(membership={"nodes": [{"node_id": 1, "version": "0.2.0; rm -rf"}]}),
     Expected(rounds=4), "the membership state has node 1 with a malformed version"),
    (_state(), Expected(rounds=4, load_strategy=_strict_strategy),
     "the strategy state does not fit this run's strategy (ValueError: FedAdam state needs "
     "keys ['m', 'v'], got ['velocity'])"),
    (_state(strategy={"velocity": [np.full((2, 3), np.nan), np.zeros(3)]}),
     Expected(rounds=4, load_strategy=lambda s: None),
     "the strategy state has NaN or infinite values (an array of shape (2, 3))"),
    (_state(strategy={"velocity": [np.zeros((3, 2)), np.zeros(3)]}),
     Expected(rounds=4, model=MODEL, load_strategy=lambda s: None),
     "the strategy state holds arrays of shapes [(3, 2), (3,)], not the model's"),
    (_state(), Expected(rounds=4, dp=True), "no privacy ledger state, but this run uses DP"),
    (_state(privacy={"epsilon": 1.0}, privacy_population=4), Expected(rounds=4, dp=False),
     "a privacy ledger state, but this run does not use DP"),
    (_state(privacy={"epsilon": 1.0}, privacy_population=4),
     Expected(rounds=4, dp=True, load_privacy=_refusing_ledger),
     "the privacy ledger state does not fit this run (ValueError: privacy state: dp spec"),
])
def test_a_checkpoint_that_does_not_fit_the_run_is_refused(
        tmp_path: Path, state: LoopState, expected: Expected, words: str) -> None:
    # Prepare
    saved = _saved(tmp_path, state)
    # Execute
    text = _refusal(lambda: verify_checkpoint(saved, expected))
    # Assert
    assert text.startswith(f"{tmp_path / 'checkpoint.npz'}: ") and words in text


def test_the_strategy_is_not_loaded_when_its_arrays_are_unusable(tmp_path: Path) -> None:
    # Prepare
    saved = _saved(tmp_path, _state(strategy={"velocity": [np.full(3, np.inf)]}))
    loaded: list[dict[str, Any]] = []
    # Execute
    _refusal(lambda: verify_checkpoint(saved, Expected(rounds=4, load_strategy=loaded.append)))
    # Assert
    assert loaded == []


# --- one run per out-dir ----------------------------------------------------------------------

def test_an_empty_dir_and_a_run_that_released_nothing_hold_no_run(tmp_path: Path) -> None:
    # Prepare: a run that failed before its first round left a results.json without rounds
    (tmp_path / "results.json").write_text(json.dumps({"rounds": [], "summary": {}}))
    # Execute / Assert
    assert existing_run(tmp_path / "missing") is None
    assert existing_run(tmp_path) is None


@pytest.mark.parametrize(("make", "words"), [
    (lambda d: save_checkpoint(d, _state(server_round=4, rows=[
        {"round": r} for r in range(1, 5)]), {"rounds": 4}),
     "holds the checkpoint of a finished run (round 4 of 4)"),
    (lambda d: save_checkpoint(d, _state(), {"rounds": 4}),
     "holds the checkpoint of an unfinished run (round 2 of 4)"),
    (lambda d: (d / "checkpoint.npz").write_bytes(b"junk"), "holds a damaged checkpoint.npz"),
    (lambda d: (d / "results.json").write_text(json.dumps({"rounds": [{"round": 1}]})),
     "holds the results.json of another run (1 rounds)"),
    (lambda d: (d / "results.json").write_text("{"),
     "holds the results.json of another run (unreadable)"),
])
def test_a_dir_holding_another_run_is_named_in_one_line(
        tmp_path: Path, make: Callable[[Path], object], words: str) -> None:
    # Prepare
    make(tmp_path)
    # Execute
    reason = existing_run(tmp_path)
    # Assert
    assert reason is not None and "\n" not in reason
    assert reason.startswith(f"{tmp_path} {words}")
    assert "a privacy budget belongs to the data, not to a directory" in reason
    assert "resume=true" in reason and "overwrite=true" in reason
