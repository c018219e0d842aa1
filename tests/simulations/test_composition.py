"""Features that compose: a pairwise composition matrix on Flower's simulation engine (issue 21).

Every pair of levels of the factors below either runs, on Flower's
simulation engine (Ray backend) through the same SuperLink/``flwr run`` path
as ``flowerpress simulate``, for more rounds than ``max-missed-rounds``, or
is refused by design: run-config validation raises a one-line
:class:`~flowerpress.config.ConfigError`.

The full product of the factors is thousands of runs; a pairwise covering
array (:func:`all_pairs`, a greedy AETG-style generator) covers every allowed
pair in a couple of dozen. Runs go a few at a time through a few lanes, each
one SuperLink and one Ray head started once, so the engine's start-up is paid
once per lane, not per run, and overlapped.

Each completed run is checked for: every round present, the devices each
round expects (``clients == cohort``, or ``clients + rejected == cohort``
with a hostile device), a finite ``model.npz``, an epsilon that is set and
grows every round when DP is on, and a ``results.json`` that is strict JSON.
A failing cell is a finding: its assertion stays as it is.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import queue
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flowerpress.config import Config, ConfigError, validate
from flowerpress.simulations.runner import (
    RUN_LOG,
    LocalRayHead,
    SimulationError,
    SimulationLink,
    _wait_for_results,
    write_app_dir,
)

# --- the federation every cell runs ------------------------------------------------------

NUM_CLIENTS = 8
PARTIAL = 6  # clients per round under partial participation (poisson: q = 0.75)
MAX_MISSED = 2  # max-missed-rounds (default 3): every run goes past it, in one round fewer
ROUNDS = MAX_MISSED + 1
RESUME_AFTER = 2  # a resumed cell runs RESUME_AFTER rounds, then resumes to ROUNDS
#: Runs at once, one per lane (a SuperLink and a Ray head): enough to overlap
#: start-up on two cores.
CONCURRENT_RUNS = int(os.environ.get("FLOWERPRESS_MATRIX_CONCURRENCY", "3"))
RUN_TIMEOUT = 300.0

BASE: dict[str, object] = {
    "dataset": "digits", "model": "logreg", "partition": "iid", "num-clients": NUM_CLIENTS,
    "rounds": ROUNDS, "local-epochs": 1, "batch-size": 32, "max-missed-rounds": MAX_MISSED,
    "round-timeout": 60.0, "seed": 0,
}

# --- the factors: level name -> the run-config keys it sets ------------------------------

Levels = dict[str, dict[str, object]]
FACTORS: dict[str, Levels] = {
    "compression": {  # the first level of each factor is its neutral one
        "q8": {"compression": "q:8"},
        "flat-topk-q-ef": {"compression": "flat+topk:0.1+q:8+ef"},
        "lowrank-sign-ef": {"compression": "lowrank:2+sign+ef"},
        "topk-ef21": {"compression": "topk:0.1+ef21"},
    },
    "download": {
        "full": {},
        "history": {"download-history": 1.0, "download-compression": "q:8"},
    },
    "dp": {
        "off": {},
        "local": {"dp": "local:clip=1.0,noise=1.0"},
        "distributed": {"dp": "distributed:clip=1.0,noise=1.0"},
    },
    "sampling": {
        "fixed": {"dp-sampling": "fixed"},
        "poisson": {"dp-sampling": "poisson"},
        "predictable": {"dp-sampling": "predictable"},
    },
    "secagg": {
        "off": {},
        "on": {"secagg": "on"},
        "on-noise": {"secagg": "on:noise=1.0"},
    },
    "strategy": {
        "fedavg": {"strategy": "fedavg"},
        "fedavgm": {"strategy": "fedavgm"},
        "median": {"strategy": "median"},
        "flwr-fedadam": {"strategy": "flwr:FedAdam"},
    },
    "resume": {"no": {}, "yes": {}},
    "participation": {
        "full": {"clients-per-round": NUM_CLIENTS},
        "partial": {"clients-per-round": PARTIAL},
    },
    "attack": {
        "none": {},
        "signflip": {"attack": "signflip:fraction=0.1,scale=10"},  # one device of eight
    },
}

Row = dict[str, str]  # factor -> level


def config_of(row: Mapping[str, str]) -> dict[str, object]:
    """The run config of a (possibly partial) row; missing factors take their first level."""
    values = dict(BASE)
    for factor, levels in FACTORS.items():
        values.update(levels[row.get(factor, next(iter(levels)))])
    return values


def refusal(row: Mapping[str, str]) -> str | None:
    """The ConfigError line that refuses this row's config, or None if it validates."""
    try:
        validate(config_of(row))
    except ConfigError as exc:
        return str(exc)
    return None


# --- the all-pairs generator -------------------------------------------------------------

Pair = tuple[tuple[str, str], tuple[str, str]]


def all_pairs(factors: Mapping[str, Sequence[str]],
              allowed: Callable[[Mapping[str, str]], bool], *,
              candidates: int = 40, seed: int = 1) -> tuple[list[Row], list[Pair]]:
    """A pairwise covering array: rows that hold every allowed pair of levels at least once.

    Greedy, as AETG does (Cohen et al. 1997, "The AETG System: An Approach to
    Testing Based on Combinatorial Design", IEEE TSE 23(7)): each new row is
    the best of ``candidates`` built from an uncovered pair, filling the other
    factors in a shuffled order, each with the level that covers the most
    uncovered pairs with the levels already chosen, among those that keep the
    partial row clear of the pairs ``allowed`` refuses. Seeded, so the rows are
    the same on every run.

    Parameters
    ----------
    factors
        Factor name -> its levels.
    allowed
        Whether a row may run (asked of every pair, then of every full row built).
    candidates
        Rows tried for each row kept.
    seed
        Seed of the shuffles and tie-breaks.

    Returns
    -------
    rows, refused
        The rows, and the pairs ``allowed`` refuses on their own.
    """
    names = list(factors)
    rng = np.random.default_rng(seed)
    refused: list[Pair] = []
    uncovered: set[Pair] = set()
    order: dict[Pair, int] = {}
    for a, b in itertools.combinations(names, 2):
        for x, y in itertools.product(factors[a], factors[b]):
            pair = ((a, x), (b, y))
            order[pair] = len(order)
            if allowed({a: x, b: y}):
                uncovered.add(pair)
            else:
                refused.append(pair)

    refused_set = set(refused)

    def pairs_of(row: Mapping[str, str]) -> set[Pair]:
        return {((a, row[a]), (b, row[b])) for a, b in itertools.combinations(names, 2)}

    def build(start: Pair, shuffle: bool) -> Row | None:
        (a, x), (b, y) = start
        row: Row = {a: x, b: y}
        rest = [n for n in names if n not in row]
        if shuffle:
            rest = [rest[i] for i in rng.permutation(len(rest))]
        for name in rest:
            def gain(level: str, name: str = name) -> tuple[int, float]:
                hits = sum(1 for other, value in row.items()
                           if _ordered(names, name, level, other, value) in uncovered)
                return (-hits, float(rng.random()) if shuffle else 0.0)

            ranked = sorted(factors[name], key=gain)
            choice = next((lv for lv in ranked if not any(
                _ordered(names, name, lv, other, value) in refused_set
                for other, value in row.items())), None)
            if choice is None:
                return None
            row[name] = choice
        return {n: row[n] for n in names}

    rows: list[Row] = []
    while uncovered:
        pending = sorted(uncovered, key=order.__getitem__)
        # Start from the pairs of the level in the most uncovered pairs (AETG's rule).
        count: dict[tuple[str, str], int] = {}
        for pair in pending:
            for level in pair:
                count[level] = count.get(level, 0) + 1
        top = max(count, key=count.__getitem__)
        seeds = [pair for pair in pending if top in pair]
        tried = [build(seeds[0], shuffle=False)]
        tried += [build(seeds[int(rng.integers(len(seeds)))], shuffle=True)
                  for _ in range(candidates - 1)]
        built = sorted((row for row in tried if row is not None),
                       key=lambda row: -len(pairs_of(row) & uncovered))
        best = next((row for row in built if allowed(row)), None)
        if best is None:
            raise AssertionError(f"no allowed row holds the level {top}")
        uncovered -= pairs_of(best)
        rows.append(best)
    return rows, refused


def _ordered(names: Sequence[str], a: str, x: str, b: str, y: str) -> Pair:
    """The pair ``a=x, b=y`` with its factors in the order of ``names``."""
    return ((a, x), (b, y)) if names.index(a) < names.index(b) else ((b, y), (a, x))


def _pair(a: str, x: str, b: str, y: str) -> Pair:
    return _ordered(list(FACTORS), a, x, b, y)


@functools.cache
def _allowed_items(items: frozenset[tuple[str, str]]) -> bool:
    return refusal(dict(items)) is None


def _allowed(row: Mapping[str, str]) -> bool:
    return _allowed_items(frozenset(row.items()))


ROWS, REFUSED = all_pairs({f: list(levels) for f, levels in FACTORS.items()}, _allowed)


def cell_id(row: Mapping[str, str]) -> str:
    return "-".join(f"{factor}={row[factor]}" for factor in FACTORS)


# --- the shared engine: one SuperLink, a few runs at a time ------------------------------


@dataclass
class Outcome:
    """A finished cell: its results (and, resumed, the first part's) or its one-line error."""

    out: Path
    document: dict[str, Any] | None = None
    first: dict[str, Any] | None = None
    error: str | None = None


class SharedEngine:
    """A few lanes, each one simulation SuperLink and one Ray head, that the cells share.

    A cell takes a free lane for all its runs. Each lane's Ray head is started
    once (not once per run), and one run at a time uses it: a run's actor pool
    asks for every CPU of the cluster it joins, so runs sharing one head would
    queue for its actors, and Ray does not serve that queue in order.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.app_dir = write_app_dir(workdir / "app")
        self._stack = contextlib.ExitStack()
        self._lanes: queue.Queue[SimulationLink] = queue.Queue()
        self._pool = ThreadPoolExecutor(max_workers=CONCURRENT_RUNS)
        self._cells: dict[str, Future[Outcome]] = {}

    def __enter__(self) -> SharedEngine:
        with contextlib.ExitStack() as stack:
            for lane in range(CONCURRENT_RUNS):
                where = self.workdir / f"lane-{lane}"
                # Worker ports apart from every other Ray on the machine (10002-19999).
                ports = (20000 + 2000 * lane, 21999 + 2000 * lane)
                head = stack.enter_context(LocalRayHead(where / "ray", num_cpus=2,
                                                        worker_ports=ports))
                self._lanes.put(stack.enter_context(
                    SimulationLink(where, ray_address=head.address)))
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc: object) -> None:
        for future in self._cells.values():
            future.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._stack.close()

    def submit(self, row: Row) -> Future[Outcome]:
        """Start the cell's runs (once); the future gives its outcome."""
        name = cell_id(row)
        if name not in self._cells:
            self._cells[name] = self._pool.submit(self._run_cell, row, name)
        return self._cells[name]

    def _run(self, link: SimulationLink, config: Config, out: Path) -> dict[str, Any]:
        run_config = {**config, "out-dir": str(out)}
        proc = link.run(self.app_dir, run_config, NUM_CLIENTS)
        try:
            return _wait_for_results(proc, out / "results.json", None, int(config["rounds"]),
                                     RUN_TIMEOUT)
        finally:
            proc.stop()
            # The error names out/flwr-run.log, as `flowerpress simulate` writes it.
            shutil.copyfile(proc.log_path, out / RUN_LOG)

    def _run_cell(self, row: Row, name: str) -> Outcome:
        outcome = Outcome(out=self.workdir / "cells" / name)
        outcome.out.mkdir(parents=True)
        config = validate(config_of(row))
        link = self._lanes.get()
        try:
            if row["resume"] == "yes":
                outcome.first = self._run(link, {**config, "rounds": RESUME_AFTER}, outcome.out)
                config = {**config, "resume": True}
            outcome.document = self._run(link, config, outcome.out)
        except SimulationError as exc:
            outcome.error = str(exc)
        finally:
            self._lanes.put(link)
        return outcome


@pytest.fixture(scope="module")
def engine(request: pytest.FixtureRequest,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedEngine]:
    """The shared engine, with every selected cell already submitted (so they overlap).

    Its directory is pytest's (kept for the last three sessions), so a failing
    cell's ``error.log`` and ``flwr-run.log`` are still there to read.
    """
    with SharedEngine(tmp_path_factory.mktemp("matrix")) as shared:
        selected = {item.callspec.params["row"]["__id__"]  # type: ignore[attr-defined]
                    for item in request.session.items
                    if item.originalname == "test_cell_runs_every_round_with_the_expected_devices"
                    and hasattr(item, "callspec")}
        for row in ROWS:
            if cell_id(row) in selected:
                shared.submit(row)
        yield shared


# --- the checks --------------------------------------------------------------------------


def _strict_json(text: str) -> Any:
    def refuse(constant: str) -> None:
        raise ValueError(f"results.json holds {constant}, which is not JSON")

    return json.loads(text, parse_constant=refuse)


def _dp_on(row: Mapping[str, str]) -> bool:
    return row["dp"] != "off" or row["secagg"] == "on-noise"


def _cohort(row: Mapping[str, str]) -> int | None:
    """Devices asked each round, or None where the cohort's size is random (Poisson)."""
    if row["dp"] != "off" and row["sampling"] == "poisson" and row["participation"] == "partial":
        return None
    return NUM_CLIENTS if row["participation"] == "full" else PARTIAL


def check_document(row: Mapping[str, str], outcome: Outcome) -> None:
    """The checks every completed run passes (see the module docstring)."""
    document = _strict_json((outcome.out / "results.json").read_text(encoding="utf-8"))
    rows = document["rounds"]
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1)), "rounds missing"
    assert document["summary"].get("rounds_completed") == ROUNDS
    cohort = _cohort(row)
    hostile = row["attack"] != "none"
    for r in rows:
        seen = r["clients"] + r["rejected"]
        where = f"round {r['round']}: {r}"
        assert r["timed_out"] == 0 and r["unavailable"] == 0, where
        if not hostile:
            assert r["rejected"] == 0, where
        if cohort is not None:
            assert seen == cohort, where
        else:
            assert 1 <= seen <= NUM_CLIENTS, where
    with np.load(outcome.out / "model.npz") as model:
        arrays = [model[key] for key in model.files]
    assert arrays and all(np.isfinite(a).all() for a in arrays), "model.npz is not finite"
    if _dp_on(row):
        eps = [r["epsilon"] for r in rows]
        assert all(e is not None for e in eps), f"epsilon missing: {eps}"
        # (Secure aggregation's noise accounts the decoded sum: its block names no unit.)
        if document["privacy"].get("accounting_unit", "the aggregate").startswith(
                "the aggregate"):
            assert all(b > a for a, b in itertools.pairwise(eps)), f"epsilon does not grow: {eps}"
        else:
            # Per device (local DP, a non-sum rule, predictable cohorts): epsilon is the
            # most-charged device's, which grows only in rounds whose cohort holds it
            # (a Poisson cohort of 3 may hold none of them).
            assert all(b >= a for a, b in itertools.pairwise(eps)), f"epsilon fell: {eps}"
            assert eps[-1] > eps[0], f"epsilon does not grow: {eps}"
    if row["resume"] == "yes":
        assert outcome.first is not None
        assert len(outcome.first["rounds"]) == RESUME_AFTER
        assert document["summary"].get("resumed_after_rounds") == [RESUME_AFTER]
        assert rows[:RESUME_AFTER] == outcome.first["rounds"]


# --- the tests ---------------------------------------------------------------------------


def _cell_param(row: Row) -> Any:
    return pytest.param({**row, "__id__": cell_id(row)}, id=cell_id(row))


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("row", [_cell_param(row) for row in ROWS])
def test_cell_runs_every_round_with_the_expected_devices(row: dict[str, str],
                                                         engine: SharedEngine) -> None:
    # Execute (the engine started it with the others)
    outcome = engine.submit({f: row[f] for f in FACTORS}).result()
    # Assert
    assert outcome.error is None, outcome.error
    check_document(row, outcome)


@pytest.mark.parametrize("pair", REFUSED, ids=lambda p: f"{p[0][0]}={p[0][1]}+{p[1][0]}={p[1][1]}")
def test_a_refused_pair_is_refused_in_one_line(pair: Pair) -> None:
    # Prepare
    (a, x), (b, y) = pair
    # Execute
    with pytest.raises(ConfigError) as info:
        validate(config_of({a: x, b: y}))
    # Assert
    assert "\n" not in str(info.value)
    assert str(info.value).startswith(("secagg=", "compression=", "strategy=", "dp="))


def test_the_rows_cover_every_allowed_pair_and_run_past_max_missed_rounds() -> None:
    # Prepare
    names = list(FACTORS)
    covered = {_pair(a, row[a], b, row[b]) for row in ROWS
               for a, b in itertools.combinations(names, 2)}
    refused = set(REFUSED)
    # Assert: every pair is covered or refused, never both; every row validates
    for a, b in itertools.combinations(names, 2):
        for x, y in itertools.product(FACTORS[a], FACTORS[b]):
            pair = ((a, x), (b, y))
            assert (pair in covered) != (pair in refused), pair
    assert all(refusal(row) is None for row in ROWS)
    assert ROUNDS > MAX_MISSED
    assert len(ROWS) < 40  # pairwise, not the product


def test_all_pairs_of_three_binary_factors_takes_five_rows_and_skips_a_refused_pair() -> None:
    # Prepare: three factors of two levels; a=1 with b=1 is refused
    factors = {"a": ["0", "1"], "b": ["0", "1"], "c": ["0", "1"]}

    def allowed(row: Mapping[str, str]) -> bool:
        return not (row.get("a") == "1" and row.get("b") == "1")

    # Execute
    rows, refused = all_pairs(factors, allowed)
    # Assert: every other pair is held; no row holds the refused one
    assert refused == [(("a", "1"), ("b", "1"))]
    held = {((p, row[p]), (q, row[q])) for row in rows
            for p, q in itertools.combinations(factors, 2)}
    for p, q in itertools.combinations(factors, 2):
        for x, y in itertools.product(factors[p], factors[q]):
            assert (((p, x), (q, y)) in held) == allowed({p: x, q: y})
    # a=1 needs c=0 and c=1, both with b=0; so a=0 needs b=1 with c=0 and c=1; and a0b0
    assert len(rows) == 5
