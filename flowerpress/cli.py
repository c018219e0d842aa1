"""The ``flowerpress`` command.

``flowerpress simulate --out DIR [--config FILE.toml] [--set KEY=VALUE ...]``
runs a simulated federation (refused where DIR holds another run, unless
``--overwrite``); ``flowerpress simulate --resume DIR`` continues the run
checkpointed in DIR; ``flowerpress certs ...`` writes TLS and
SuperNode keys for a deployment (``flowerpress certs add-node`` adds device keys
to it); ``flowerpress device check ...`` checks a device before it joins;
``flowerpress devices [SUPERLINK] --certs DIR --run OUT_DIR`` lists the fleet (the
SuperLink's nodes, the key file each registered with, and the run's versions and
last rounds);
``flowerpress sweep GRID.toml --out DIR`` runs a grid of configurations at
several seeds and ``flowerpress compare RUN_DIR... --out DIR`` tables existing
runs (median and worst over seeds); ``flowerpress export RUN_DIR --format onnx
--quantize none|int8 --out FILE`` writes the run's model for onnxruntime.
``--track tensorboard|mlflow`` tracks simulate and sweep runs
(flowerpress.tracking), ``--ray-address ADDR`` runs their ClientApps on an
existing Ray cluster. Bad input exits with status 2 and one line.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from flowerpress.config import ConfigError, load_toml, parse_assignments, validate


def _parser() -> argparse.ArgumentParser:
    from flowerpress import __version__

    parser = argparse.ArgumentParser(prog="flowerpress", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"flowerpress {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate",
                         help="run a simulated federation on Flower's simulation engine")
    sim.add_argument("--out", type=Path, help="output directory (required unless --resume)")
    again = sim.add_mutually_exclusive_group()
    again.add_argument("--resume", type=Path, metavar="DIR",
                       help="continue the run checkpointed in DIR, with its run config "
                       "(--config and --set may change rounds, timeouts, max-epsilon)")
    again.add_argument("--overwrite", action="store_true",
                       help="start a new run even if --out holds another run's results or "
                       "checkpoint (they are removed; its privacy spend is not undone: a "
                       "privacy budget belongs to the data, not to a directory)")
    sim.add_argument("--config", type=Path, help="TOML file with run-config keys")
    sim.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                     help="override one run-config key (repeatable)")
    sim.add_argument("--quiet", action="store_true", help="no per-round progress lines")
    _add_cluster_options(sim, default_dir="--out")
    sim.add_argument("--track-name", default=None, metavar="NAME",
                     help="the tracked run's name (default: the out dir's name)")
    sim.add_argument("--track-tag", dest="track_tags", action="append", default=[],
                     metavar="KEY=VALUE", help="an MLflow tag of the tracked run (repeatable)")
    sub.add_parser("certs", help="write a CA, SuperLink certificate and SuperNode keys "
                                 "(`certs add-node`: add device keys)", add_help=False)
    sub.add_parser("device", help="`device check`: check a device's node config, data, "
                                  "certificate and key before it joins", add_help=False)
    sub.add_parser("devices", help="the devices the SuperLink knows: key file, online, "
                                   "flowerpress version, last round and its outcome",
                   add_help=False)
    _add_sweep_parsers(sub)
    _add_export_parser(sub)
    return parser


def _add_export_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``export``: a run's model as an ONNX artifact (flowerpress.export)."""
    exp = sub.add_parser("export", help="write a run's model as an artifact an edge runtime "
                         "loads (ONNX for onnxruntime, float32 or int8), with FILE.json")
    exp.add_argument("run_dir", type=Path, metavar="RUN_DIR",
                     help="a run directory (results.json and model.npz)")
    exp.add_argument("--format", default="onnx", metavar="onnx",
                     help="the artifact's format: onnx (executorch is not supported)")
    exp.add_argument("--quantize", default="none", metavar="none|int8",
                     help="int8: onnxruntime's post-training static quantization, "
                     "calibrated on training data")
    exp.add_argument("--out", type=Path, required=True, metavar="FILE",
                     help="the artifact; its sidecar is FILE.json")
    exp.add_argument("--calibration", action="append", default=[], metavar="KEY=VALUE",
                     help="node config of the data to calibrate on (repeatable; default: "
                     "the run's training partitions)")
    exp.add_argument("--calibration-examples", type=int, default=512, metavar="N")
    exp.add_argument("--latency-examples", type=int, default=300, metavar="N")


def _export(args: argparse.Namespace) -> int:
    from flowerpress.export import (
        ExportError,
        ExportRequest,
        export_run,
        parse_node_config,
        summary_line,
    )

    try:
        sidecar = export_run(ExportRequest(
            run_dir=args.run_dir, out=args.out, format=str(args.format).strip().lower(),
            quantize=str(args.quantize).strip().lower(),
            calibration=parse_node_config(args.calibration),
            calibration_examples=args.calibration_examples,
            latency_examples=args.latency_examples))
    except ExportError as exc:
        raise ConfigError(str(exc)) from None
    print(summary_line(sidecar))
    return 0


def _add_sweep_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``sweep`` and ``compare``: many runs, one table (flowerpress.sweep)."""
    sweep = sub.add_parser("sweep", help="run a grid of configurations at several seeds; "
                           "write summary.csv/json and pareto.png (resumable)")
    sweep.add_argument("grid", type=Path, metavar="GRID.toml",
                       help="[base] keys, [grid] lists of values, seeds = [...], optional "
                       "[[config]] tables and baseline = LABEL")
    sweep.add_argument("--out", type=Path, required=True, help="the sweep's directory; the "
                       "same command again skips finished runs and resumes interrupted ones")
    sweep.add_argument("--jobs", type=int, default=None, help="runs at a time (default: the "
                       "cores, fewer if memory is short)")
    sweep.add_argument("--target", type=float, default=None, metavar="ACC",
                       help="accuracy for rounds, bytes and link time to target (default: "
                       "the whole run)")
    sweep.add_argument("--retry-failed", action="store_true",
                       help="run failed runs again (their directories are set aside)")
    _add_cluster_options(sweep, default_dir="--out")
    comp = sub.add_parser("compare", help="the sweep's table and plots from existing runs "
                          "(runs whose configs differ only in seed are one row)")
    comp.add_argument("runs", type=Path, nargs="+", metavar="RUN_DIR",
                      help="run directories, or directories with runs below them")
    comp.add_argument("--out", type=Path, required=True, help="where the table and plot go")
    comp.add_argument("--target", type=float, default=None, metavar="ACC",
                      help="accuracy for the \"to target\" columns (default: the whole run)")
    comp.add_argument("--baseline", default=None, metavar="LABEL|RUN_DIR",
                      help="the row the byte ratios are taken against (default: the first)")


def _add_cluster_options(parser: argparse.ArgumentParser, *, default_dir: str) -> None:
    """``--track ...`` (flowerpress.tracking) and ``--ray-address`` of simulate and sweep."""
    parser.add_argument("--track", dest="track", action="append", default=[],
                        metavar="{tensorboard,mlflow}",
                        help="track every round, the run config and the run's files with "
                        "TensorBoard or MLflow (repeatable; needs flowerpress[track])")
    parser.add_argument("--track-dir", type=Path, default=None, metavar="DIR",
                        help=f"where TensorBoard's logs (DIR/tb) and the local MLflow store "
                        f"(DIR/mlflow.db, unless MLFLOW_TRACKING_URI is set) go (default: "
                        f"{default_dir})")
    parser.add_argument("--track-experiment", default=None, metavar="NAME",
                        help="the MLflow experiment (default: flowerpress; a sweep: its "
                        "directory's name)")
    parser.add_argument("--ray-address", default=None, metavar="ADDR",
                        help="run the ClientApps on this existing Ray cluster (HOST:PORT of "
                        "its head, as `ray start --head` prints it); default: RAY_ADDRESS if "
                        "set, else a private Ray instance on loopback")


def _tracking(args: argparse.Namespace) -> tuple[str, ...]:
    """The ``--track`` backends (ConfigError: unknown, or the extra is not installed)."""
    from flowerpress.tracking import parse_backends

    return parse_backends(args.track)


def versus_float32(upload: int, fp32: int) -> str:
    """How the uploaded message bytes compare with the float32 arrays they replace."""
    if upload <= fp32:
        return f"{fp32 / max(upload, 1):.1f}x less than float32"
    # Uncompressed, the messages' framing and metadata make them larger than the arrays.
    return f"{upload / max(fp32, 1):.2f}x more than float32"


def _sweep_commands(args: argparse.Namespace) -> int:
    """``flowerpress sweep`` and ``flowerpress compare``; 1 when a run failed."""
    from flowerpress import sweep

    if args.target is not None and not 0.0 < args.target <= 1.0:
        raise ConfigError(f"--target {args.target} is not allowed; expected an accuracy "
                          "in (0, 1]")
    if args.command == "compare":
        table = sweep.compare(args.runs, args.out, target=args.target, baseline=args.baseline)
        print(sweep.markdown_table(table, target=args.target))
        print(f"table in {args.out}/summary.csv and summary.json, plot in {args.out}/pareto.png")
        return 0
    from flowerpress.simulations.runner import cluster_address

    track = sweep.SweepTracking(backends=_tracking(args), directory=args.track_dir,
                                experiment=args.track_experiment)
    ray_address = cluster_address(args.ray_address, os.environ)
    grid = sweep.load_grid(args.grid)
    try:
        outcome = sweep.run_sweep(grid, args.out, jobs=args.jobs, target=args.target,
                                  retry_failed=args.retry_failed, track=track,
                                  ray_address=ray_address)
    except KeyboardInterrupt:
        return 130
    print(sweep.markdown_table(outcome.table, target=args.target))
    print(f"table in {args.out}/summary.csv and summary.json, plot in {args.out}/pareto.png")
    if outcome.failed:
        print(f"{len(outcome.failed)} run(s) failed (reasons in {args.out}/failures.json); "
              "`--retry-failed` runs them again", file=sys.stderr)
        return 1
    return 0


def _resume_values(directory: Path, out: Path | None) -> dict[str, object]:
    """The run config saved in ``directory``'s checkpoint (ConfigError if there is none)."""
    from flowerpress.config import SCHEMA
    from flowerpress.server.checkpoint import CheckpointError, load_checkpoint

    if out is not None and out.resolve() != directory.resolve():
        raise ConfigError(f"--out {out} and --resume {directory} differ; a resumed run "
                          "writes where it was checkpointed")
    try:
        saved = load_checkpoint(directory)
    except CheckpointError as exc:
        raise ConfigError(str(exc)) from None
    if saved is None:
        raise ConfigError(f"--resume {directory}: no checkpoint.npz there")
    return {k: v for k, v in saved.config.items()
            if k in SCHEMA and k not in ("out-dir", "resume", "overwrite")}


def _check_resumable(directory: Path, config: dict[str, object]) -> None:
    """The checkpoint fits ``config``: the same keys but those a resume may change, and a
    round within the planned rounds (the ServerApp checks the task's model and state)."""
    from flowerpress.config import DEFAULTS
    from flowerpress.server.checkpoint import (
        CheckpointError,
        Expected,
        config_differences,
        load_checkpoint,
        verify_checkpoint,
    )

    try:
        saved = load_checkpoint(directory)
        assert saved is not None  # _resume_values found it
        verify_checkpoint(saved, Expected(rounds=_int(config["rounds"])))
    except CheckpointError as exc:
        raise ConfigError(str(exc)) from None
    differences = config_differences(saved.config, config, DEFAULTS)
    if differences:
        raise ConfigError(f"--resume {directory}: these keys cannot change in a resumed run: "
                          f"{'; '.join(differences)}")


def _int(value: object) -> int:
    if not isinstance(value, int):
        raise ConfigError(f"expected an integer, got {value!r}")
    return value


def _simulate(args: argparse.Namespace) -> int:
    if args.out is None and args.resume is None:
        raise ConfigError("simulate needs --out DIR (or --resume DIR)")
    values: dict[str, object] = {}
    if args.resume is not None:
        values.update(_resume_values(args.resume, args.out))
    if args.config is not None:
        values.update(load_toml(args.config))
    values.update(parse_assignments(args.assignments))
    if args.overwrite:
        values["overwrite"] = True
    config = validate(values)
    out: Path = args.out if args.resume is None else args.resume
    if args.resume is not None:
        _check_resumable(args.resume, {**config, "out-dir": str(out.resolve())})
    from flowerpress.simulations.runner import SimulationError, cluster_address, simulate

    backends = _tracking(args)
    observer = None
    if backends:
        from flowerpress.tracking import DEFAULT_EXPERIMENT, Tracking, TrackSettings, parse_tags

        observer = Tracking(TrackSettings(
            backends=backends, directory=args.track_dir, name=args.track_name,
            experiment=args.track_experiment or DEFAULT_EXPERIMENT,
            tags=parse_tags(args.track_tags)))
    ray_address = cluster_address(args.ray_address, os.environ)
    # SIGTERM (a service manager, `timeout`, `kill`) stops the run as Ctrl-C does: the
    # SuperLink and every process it started are stopped on the way out.
    previous = signal.signal(signal.SIGTERM, _interrupted)
    try:
        results = simulate(config, out, progress=not args.quiet,
                           resume=args.resume is not None, ray_address=ray_address,
                           observer=observer)
    except SimulationError as exc:
        print(f"flowerpress: simulation failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"flowerpress: interrupted; `flowerpress simulate --resume {out}` continues "
              "from the last checkpoint", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    s = results["summary"]
    up, fp32 = s["total_upload_bytes"], s["fp32_upload_bytes"]
    acc = "-" if s["final_accuracy"] is None else format(s["final_accuracy"], ".4f")
    print(f"final accuracy {acc}; uploaded {up / 1e6:.3f} MB "
          f"({versus_float32(up, fp32)}); results in {out}/results.json")
    if s.get("stopped"):
        print(s["stopped"])
    return 0


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``flowerpress`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["certs"]:
        from flowerpress.deploy.certs import main as certs_main

        return certs_main(argv[1:])
    if argv[:1] == ["device"]:
        from flowerpress.deploy.check import main as device_main

        return device_main(argv[1:])
    if argv[:1] == ["devices"]:
        from flowerpress.deploy.devices import main as devices_main

        return devices_main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "simulate":
            return _simulate(args)
        if args.command in ("sweep", "compare"):
            return _sweep_commands(args)
        if args.command == "export":
            return _export(args)
    except ConfigError as exc:
        print(f"flowerpress: error: {exc}", file=sys.stderr)
        return 2
    parser.print_usage(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
