"""``flowerpress sweep`` and ``flowerpress compare``: grids, the median/worst table, resume.

Most tests run the sweep with a stand-in for ``flowerpress simulate`` (a small
script that writes ``results.json`` and a checkpoint round by round and
resumes from it) so that killing and resuming a sweep costs seconds; one test
runs the real ``flowerpress simulate`` on Flower's simulation engine.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from flowerpress import sweep
from flowerpress.cli import main, versus_float32
from flowerpress.config import ConfigError
from tests.tracked import read_back

BASE = {"dataset": "digits", "model": "logreg", "partition": "iid", "num-clients": 4,
        "clients-per-round": 4, "rounds": 2, "local-epochs": 1}

# Stands in for `flowerpress simulate`: same arguments, one round every DELAY
# seconds; results.json and a checkpoint after each round. lr=0.5 fails the run the
# way the ServerApp does (summary.failed), lr=0.25 crashes without results; a fresh
# run of seed 7 stops after round 1 until it is killed.
FAKE_SIMULATE = textwrap.dedent("""
    import json, os, sys, time, tomllib
    from pathlib import Path
    args = sys.argv[1:]
    log = Path(os.environ["FAKE_CALLS"])
    with log.open("a") as fh:
        fh.write(json.dumps(args) + "\\n")
    if "--resume" in args:
        out = Path(args[args.index("--resume") + 1])
        state = json.loads((out / "checkpoint.npz").read_text())
        config, rows = state["config"], state["rows"]
    else:
        out = Path(args[args.index("--out") + 1])
        assert not out.exists() or not any(out.iterdir()), "a fresh run needs an empty dir"
        config = tomllib.loads(Path(args[args.index("--config") + 1]).read_text())
        config["seed"] = int(args[args.index("--set") + 1].split("=")[1])
        rows = []
    out.mkdir(parents=True, exist_ok=True)
    Path(os.environ["FAKE_CALLS"] + f".pid-{config['seed']}").write_text(str(os.getpid()))
    if config["lr"] == 0.25:
        print("flowerpress: simulation failed: the SuperLink did not start", file=sys.stderr)
        sys.exit(1)
    seed = config["seed"]
    for r in range(len(rows) + 1, config["rounds"] + 1):
        time.sleep(0.05)
        rows.append({"round": r, "accuracy": 0.5 + 0.1 * r + 0.01 * seed, "f1_macro": 0.4,
                     "upload_bytes": 100 * (2 if config["compression"] == "none" else 1),
                     "download_bytes": 200, "link_seconds": 1.5, "epsilon": None})
        failed = "StrategyError: NaN" if config["lr"] == 0.5 else None
        summary = {"final_accuracy": rows[-1]["accuracy"], "rounds_completed": len(rows)}
        if failed:
            summary["failed"] = failed
        document = {"config": config, "rounds": rows, "summary": summary, "privacy": None}
        (out / "results.json").write_text(json.dumps(document))
        (out / "checkpoint.npz").write_text(json.dumps({"config": config, "rows": rows}))
        if failed:
            print(f"flowerpress: simulation failed: {failed}", file=sys.stderr)
            sys.exit(1)
        if seed == 7 and "--resume" not in args:
            time.sleep(600)
""")


def _fake(tmp_path: Path) -> tuple[sweep.RunCommand, Path]:
    script = tmp_path / "fake_simulate.py"
    script.write_text(FAKE_SIMULATE)
    calls = tmp_path / "calls.jsonl"

    def command(run: sweep.Run, resume: bool) -> list[str]:
        return [sys.executable, str(script), *sweep.simulate_command(run, resume)[4:]]

    return command, calls


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2:].split()[:1] != ["Z"]


def _calls(calls: Path) -> list[list[str]]:
    if not calls.exists():
        return []
    return [json.loads(line) for line in calls.read_text().splitlines()]


def _grid(**extra: Any) -> dict[str, Any]:
    return {"base": dict(BASE), "grid": {"compression": ["none", "q:8"]}, "seeds": [0, 1],
            **extra}


# --- the grid ---------------------------------------------------------------------------


def test_grid_expands_to_the_product_then_the_explicit_configurations() -> None:
    # Prepare
    data = {"base": BASE,
            "grid": {"compression": ["none", "q:8"], "dp": ["off", "local:clip=1.0,noise=0.5"]},
            "config": [{"name": "topk", "compression": "topk:0.05+q:8+ef"}],
            "seeds": [0, 1, 2], "baseline": "compression=none, dp=off"}
    # Execute
    grid = sweep.parse_grid(data)
    # Assert: the last grid key varies fastest; [[config]] after the product
    assert [c.label for c in grid.configurations] == [
        "compression=none, dp=off", "compression=none, dp=local:clip=1.0,noise=0.5",
        "compression=q:8, dp=off", "compression=q:8, dp=local:clip=1.0,noise=0.5", "topk"]
    assert grid.configurations[3].config["compression"] == "q:8"
    assert grid.configurations[3].config["rounds"] == 2
    assert grid.configurations[4].overrides == {"compression": "topk:0.05+q:8+ef"}
    assert len({c.id for c in grid.configurations}) == 5
    assert all("/" not in c.id and ":" not in c.id for c in grid.configurations)
    assert grid.seeds == (0, 1, 2) and grid.baseline == "compression=none, dp=off"
    runs = sweep.plan_runs(grid, Path("out"))
    assert len(runs) == 15 and [r.seed for r in runs[:5]] == [0] * 5
    assert runs[0].out == Path("out/runs") / grid.configurations[0].id / "seed-0"


def test_the_readme_grid_is_two_codecs_by_two_privacy_levels_at_three_seeds() -> None:
    grid = sweep.load_grid(Path(__file__).resolve().parents[1] / "examples/sweep/digits.toml")
    assert len(grid.configurations) == 4 and grid.seeds == (0, 1, 2)
    assert grid.baseline == "compression=none, dp=off"
    assert {c.config["dataset"] for c in grid.configurations} == {"digits"}


def test_the_baseline_defaults_to_the_first_configuration_and_ids_are_stable() -> None:
    first, again = sweep.parse_grid(_grid()), sweep.parse_grid(_grid())
    assert first.baseline == "compression=none"
    assert [c.id for c in first.configurations] == [c.id for c in again.configurations]
    changed = sweep.parse_grid({**_grid(), "base": {**BASE, "rounds": 3}})
    assert first.configurations[0].id != changed.configurations[0].id


@pytest.mark.parametrize(("data", "needles"), [
    (_grid(grid={"compression": ["none", "q:99"]}), ["[grid]", "compression='q:99'"]),
    (_grid(grid={"lr": [0.1, -1.0]}), ["lr=-1.0", ">= 0"]),
    (_grid(grid={"clients-per-round": [2, 8]}), ["clients-per-round=8", "num-clients"]),
    (_grid(grid={"compression": "q:8"}), ["compression must be a non-empty list"]),
    (_grid(base={**BASE, "seed": 3}), ["'seed'", "seeds"]),
    (_grid(grid={"colour": ["red"]}), ["unknown key 'colour'"]),
    (_grid(seeds=[]), ["seeds must be"]),
    (_grid(seeds=[1, 1]), ["repeat"]),
    (_grid(baseline="nope"), ["baseline='nope'", "compression=none"]),
    (_grid(config=[{"compression": "none"}]), ["same run config"]),
    ({**_grid(), "bogus": 1}, ["unknown key 'bogus'"]),
])
def test_grid_refusals_are_one_line_naming_the_key_and_value(
        data: dict[str, Any], needles: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        sweep.parse_grid(data, source="g.toml")
    message = str(info.value)
    assert len(message.splitlines()) == 1 and message.startswith("g.toml")
    assert all(n in message for n in needles), message


def test_the_cli_refuses_a_bad_grid_before_running_anything(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    grid = tmp_path / "g.toml"
    grid.write_text('seeds = [0]\n[grid]\ncompression = ["none", "zip:9"]\n')
    # Execute
    code = main(["sweep", str(grid), "--out", str(tmp_path / "out")])
    # Assert
    err = capsys.readouterr().err
    assert code == 2 and "compression='zip:9'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


# --- the maths --------------------------------------------------------------------------


def test_median_and_worst_over_seeds() -> None:
    assert sweep.median_worst([0.8, 0.9, 0.7], higher_is_better=True) == (0.8, 0.7)
    assert sweep.median_worst([0.8, 0.9], higher_is_better=True) == (pytest.approx(0.85), 0.8)
    assert sweep.median_worst([3.0, 5.0, 4.0], higher_is_better=False) == (4.0, 5.0)
    # A seed that never reached the target counts as infinitely many rounds.
    assert sweep.median_worst([3.0, math.inf, 5.0], higher_is_better=False) == (5.0, math.inf)
    assert sweep.median_worst([None, 2.0], higher_is_better=False) == (2.0, 2.0)
    assert sweep.median_worst([None], higher_is_better=True) == (None, None)


def _document(seed: int, accuracies: list[float], upload: int, *,
              epsilon: float | None = None) -> dict[str, Any]:
    rows = [{"round": i + 1, "accuracy": a, "f1_macro": a - 0.1, "upload_bytes": upload,
             "download_bytes": 1000, "link_seconds": 2.0, "epsilon": epsilon}
            for i, a in enumerate(accuracies)]
    return {"config": {**BASE, "rounds": len(rows), "seed": seed, "compression": "none"},
            "rounds": rows, "summary": {"rounds_completed": len(rows),
                                        "final_accuracy": accuracies[-1]}, "privacy": None}


def test_to_target_sums_the_rounds_up_to_the_first_that_reached_it() -> None:
    # Prepare
    document = _document(0, [0.5, 0.8, 0.7, 0.9], 100, epsilon=1.5)
    # Execute
    hit = sweep.seed_result(document, seed=0, path="p", target=0.75)
    miss = sweep.seed_result(document, seed=0, path="p", target=0.95)
    whole = sweep.seed_result(document, seed=0, path="p", target=None)
    # Assert
    assert hit.reached and hit.rounds_to_target == 2 and hit.upload_bytes == 200
    assert hit.total_bytes == 2200 and hit.link_seconds == 4.0
    assert hit.accuracy == 0.9 and hit.f1_macro == pytest.approx(0.8) and hit.epsilon == 1.5
    assert not miss.reached and miss.total_bytes == math.inf and miss.link_seconds == math.inf
    assert whole.rounds_to_target == 4 and whole.total_bytes == 4400
    assert hit.compute_seconds is None and hit.run_total_bytes == 4400


def test_the_table_takes_median_and_worst_and_ratios_at_the_same_seed(tmp_path: Path) -> None:
    # Prepare: baseline uploads 1000 a round; the other 100, 100, 400 (seeds 0-2);
    # seed 2 of the other never reaches 0.75
    def record(seed: int, document: dict[str, Any]) -> sweep.RunRecord:
        return sweep.RunRecord(seed=seed, path=tmp_path, status="finished",
                               result=sweep.seed_result(document, seed=seed, path="p",
                                                        target=0.75))

    base = [record(s, _document(s, [0.6, 0.8, 0.9], 1000)) for s in range(3)]
    other = [record(0, _document(0, [0.8, 0.85, 0.9], 100)),
             record(1, _document(1, [0.6, 0.8, 0.82], 100)),
             record(2, _document(2, [0.6, 0.7, 0.7], 400)),
             sweep.RunRecord(seed=3, path=tmp_path, status="failed", failure="boom")]
    # Execute
    table = sweep.build_table([("base", "b", base), ("other", "o", other)], baseline="base",
                              target=0.75)
    # Assert
    b, o = table
    assert b["seeds"] == 3 and b["seeds_reached"] == 3 and b["rounds_to_target_median"] == 2
    assert b["upload_bytes_median"] == 2000 and b["upload_reduction_median"] == 1
    assert o["seeds"] == 3 and o["seeds_failed"] == 1 and o["seeds_reached"] == 2
    assert o["accuracy_median"] == 0.82 and o["accuracy_worst"] == 0.7
    assert o["rounds_to_target_median"] == 2 and o["rounds_to_target_worst"] is None
    # upload to target: seed 0: 100 (1 round), seed 1: 200, seed 2: never
    assert o["upload_bytes_median"] == 200 and o["upload_bytes_worst"] is None
    # ratios at the same seed: 2000/100 = 20, 2000/200 = 10, seed 2 not reached: 0
    assert o["upload_reduction_median"] == 10 and o["upload_reduction_worst"] == 0
    assert o["link_seconds_median"] == 4.0 and o["epsilon_median"] is None


# --- the sweep with a stand-in for `flowerpress simulate` ---------------------------------


def test_a_failed_run_is_recorded_and_the_others_finish(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: lr 0.5 fails in the ServerApp, lr 0.25 never starts
    command, calls = _fake(tmp_path)
    monkeypatch.setenv("FAKE_CALLS", str(calls))
    grid = sweep.parse_grid({"base": BASE, "grid": {"lr": [0.1, 0.5, 0.25]}, "seeds": [0, 1]})
    out = tmp_path / "sweep"
    # Execute
    outcome = sweep.run_sweep(grid, out, jobs=2, command=command, poll_seconds=0.05)
    # Assert
    assert len(outcome.finished) == 2 and len(outcome.failed) == 4
    assert set(outcome.failed.values()) == {"StrategyError: NaN",
                                            "simulation failed: the SuperLink did not start"}
    rows = {r["config"]: r for r in json.loads((out / "summary.json").read_text())["rows"]}
    assert rows["lr=0.1"]["seeds"] == 2 and rows["lr=0.1"]["accuracy_median"] == pytest.approx(
        0.705)
    assert rows["lr=0.5"]["seeds"] == 0 and rows["lr=0.5"]["seeds_failed"] == 2
    assert rows["lr=0.25"]["seeds_failed"] == 2
    assert len(json.loads((out / "failures.json").read_text())) == 4
    assert (out / "summary.csv").read_text().count("\n") == 4 and (out / "pareto.png").exists()
    assert "FAILED lr=0.5 seed 0: StrategyError: NaN" in capsys.readouterr().out
    # Execute: again; failures written by the ServerApp stay failed, the rest is retried
    calls.unlink()
    again = sweep.run_sweep(grid, out, jobs=2, command=command, poll_seconds=0.05)
    assert sorted(again.skipped) == sorted(outcome.finished)
    assert len(again.failed) == 4 and len(_calls(calls)) == 2  # lr=0.25, a fresh start
    # Execute: --retry-failed sets the failed directories aside and starts them afresh
    calls.unlink()
    sweep.run_sweep(grid, out, jobs=2, command=command, poll_seconds=0.05, retry_failed=True)
    assert len(_calls(calls)) == 4
    assert (out / "runs" / grid.configurations[1].id / "seed-0.failed-1").is_dir()


def test_a_killed_sweep_resumes_skipping_finished_runs(tmp_path: Path) -> None:
    # Prepare: 2 runs of 2 rounds; seed 7's first attempt hangs after round 1
    command, calls = _fake(tmp_path)
    grid_file = tmp_path / "g.toml"
    grid_file.write_text(f"seeds = [0, 7]\n[base]\n{sweep._toml_lines(BASE)}")
    out = tmp_path / "sweep"
    driver = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from flowerpress import sweep
        script = {str(tmp_path / "fake_simulate.py")!r}
        def command(run, resume):
            return [sys.executable, script, *sweep.simulate_command(run, resume)[4:]]
        sweep.run_sweep(sweep.load_grid(Path({str(grid_file)!r})), Path({str(out)!r}), jobs=1,
                        command=command, poll_seconds=0.05)
    """)
    env = {**os.environ, "FAKE_CALLS": str(calls)}
    # Started as `sweep ... &` from a script would be: with SIGINT ignored, which its
    # children must not inherit (they stop on SIGINT when the sweep dies).
    proc = subprocess.Popen([sys.executable, "-c", driver], env=env, stdout=subprocess.DEVNULL,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    grid = sweep.load_grid(grid_file)
    first, second = sweep.plan_runs(grid, out)
    try:
        deadline = time.monotonic() + 60
        while not (second.out / "checkpoint.npz").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sweep.run_status(first.out) == "finished"
        assert sweep.run_status(second.out) == "interrupted"
        # Execute: kill the sweep, as a crash would
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    # Assert: the run in progress died with the sweep (it does not write on behind our back)
    child = int((tmp_path / "calls.jsonl.pid-7").read_text())
    deadline = time.monotonic() + 10
    while _running(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(child)
    # Execute: the same sweep again
    os.environ["FAKE_CALLS"] = str(calls)
    try:
        outcome = sweep.run_sweep(grid, out, jobs=1, command=command, poll_seconds=0.05)
    finally:
        del os.environ["FAKE_CALLS"]
    # Assert: the finished run was not run again; the interrupted one resumed and finished
    assert outcome.skipped == [first.name] and outcome.resumed == [second.name]
    assert outcome.finished == [second.name] and not outcome.failed
    invocations = _calls(calls)
    assert len(invocations) == 3 and invocations[-1][:2] == ["--quiet", "--resume"]
    rows = json.loads((second.out / "results.json").read_text())["rounds"]
    assert [r["round"] for r in rows] == [1, 2]
    (row,) = outcome.table
    assert row["seeds"] == 2 and row["seeds_missing"] == 0


# --- compare ----------------------------------------------------------------------------


def _write_run(path: Path, document: dict[str, Any]) -> Path:
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps(document))
    return path


def test_compare_groups_runs_that_differ_only_in_seed(tmp_path: Path) -> None:
    # Prepare: two codecs x three seeds, in no particular layout
    for seed in range(3):
        plain = _document(seed, [0.6, 0.8 + 0.01 * seed], 1000)
        quant = _document(seed, [0.6, 0.78 + 0.01 * seed], 250)
        quant["config"]["compression"] = "q:8"
        _write_run(tmp_path / "a" / f"plain-{seed}", plain)
        _write_run(tmp_path / "b" / f"q8-{seed}", quant)
    # Execute
    code = main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out",
                 str(tmp_path / "cmp")])
    # Assert
    assert code == 0
    summary = json.loads((tmp_path / "cmp" / "summary.json").read_text())
    plain_row, quant_row = summary["rows"]
    assert (plain_row["config"], quant_row["config"]) == ("compression=none", "compression=q:8")
    assert summary["baseline"] == "compression=none"
    assert quant_row["seeds"] == 3 and quant_row["accuracy_median"] == pytest.approx(0.79)
    assert quant_row["accuracy_worst"] == pytest.approx(0.78)
    assert quant_row["upload_reduction_median"] == 4 and quant_row["upload_reduction_worst"] == 4
    assert (tmp_path / "cmp" / "pareto.png").stat().st_size > 0
    assert "| `compression=q:8` | 3 |" in (tmp_path / "cmp" / "summary.md").read_text()


def test_compare_refuses_two_runs_of_the_same_config_and_seed(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_run(tmp_path / "x", _document(0, [0.5], 10))
    _write_run(tmp_path / "y", _document(0, [0.6], 10))
    code = main(["compare", str(tmp_path / "x"), str(tmp_path / "y"), "--out",
                 str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2 and "same seed 0" in err and len(err.strip().splitlines()) == 1


def test_the_uncompressed_summary_says_more_than_float32() -> None:
    assert versus_float32(25614, 20800) == "1.23x more than float32"
    assert versus_float32(1000, 20800) == "20.8x less than float32"


# --- the real thing ---------------------------------------------------------------------


@pytest.mark.timeout(600)
def test_a_sweep_of_flowerpress_simulate_then_again_then_compare(tmp_path: Path) -> None:
    # Prepare: one configuration at one seed on Flower's simulation engine, tracked in
    # TensorBoard and MLflow. This is make test's run of `flowerpress simulate` as a
    # console script (the sweep starts one per run); the run with live progress
    # lines is tests/test_cli.py's, in make test-slow.
    grid = tmp_path / "g.toml"
    grid.write_text(f"seeds = [0]\n[base]\n{sweep._toml_lines(BASE)}")
    out = tmp_path / "sweep"
    track = ["--track", "tensorboard", "--track", "mlflow"]
    # Execute
    code = main(["sweep", str(grid), "--out", str(out), "--jobs", "1", "--target", "0.5",
                 *track])
    (results,) = (out / "runs").glob("*/seed-0/results.json")
    first = results.stat().st_mtime_ns, results.read_bytes()
    again = main(["sweep", str(grid), "--out", str(out), "--jobs", "1", "--target", "0.5",
                  *track])
    compared = main(["compare", str(out / "runs"), "--out", str(tmp_path / "cmp"),
                     "--target", "0.5"])
    # Assert
    assert code == 0 and again == 0 and compared == 0
    assert (results.stat().st_mtime_ns, results.read_bytes()) == first  # nothing ran again
    (row,) = json.loads((out / "summary.json").read_text())["rows"]
    assert row["seeds"] == 1 and row["seeds_reached"] == 1 and row["accuracy_median"] > 0.5
    assert row["total_bytes_median"] > 0 and row["link_seconds_median"] > 0
    (run_dir,) = (out / "runs").glob("*/seed-0")
    document = json.loads((run_dir / "results.json").read_text())
    assert document["config"]["seed"] == 0
    (cmp_row,) = json.loads((tmp_path / "cmp" / "summary.json").read_text())["rows"]
    assert {k: v for k, v in cmp_row.items() if k not in ("config", "id")} == {
        k: v for k, v in row.items() if k not in ("config", "id")}
    # The run itself: every file a run leaves, every round's fields, every node each round
    _check_run(run_dir, document)
    # Tracked: the rows read back by TensorBoard's and MLflow's own readers
    _check_tracked(out, run_dir, document["rounds"])


def _check_run(run_dir: Path, document: dict[str, Any]) -> None:
    from flowerpress.server.results import ROUND_FIELDS

    assert (run_dir / "report.png").stat().st_size > 1000
    assert set(document) == {"config", "rounds", "summary", "privacy", "nodes"}
    rows = document["rounds"]
    assert len(rows) == BASE["rounds"]
    assert [n["last_round"] for n in document["nodes"]] == [BASE["rounds"]] * BASE["num-clients"]
    assert f"round {BASE['rounds']}: accuracy" in (run_dir / "server.log").read_text()
    for r in rows:
        assert set(ROUND_FIELDS) <= set(r)
        assert r["clients"] == BASE["clients-per-round"] and r["upload_bytes"] > 0
    summary = document["summary"]
    assert summary["final_accuracy"] > summary["initial_accuracy"] + 0.2
    assert summary["total_upload_bytes"] == sum(r["upload_bytes"] for r in rows)


def _check_tracked(out: Path, run_dir: Path, rows: list[dict[str, Any]]) -> None:
    from flowerpress import tracking

    (tb_run,) = {p.parent for p in (out / tracking.TB_DIR).rglob("events.out.tfevents.*")}
    run = read_back(tb_run, run_dir, rows)
    assert run.data.tags["flowerpress.seed"] == "0"
    assert run.data.params["num-clients"] == str(BASE["num-clients"])
