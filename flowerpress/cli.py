"""The ``flowerpress`` command.

``flowerpress simulate --out DIR [--config FILE.toml] [--set KEY=VALUE ...]``
runs a simulated federation (refused where DIR holds another run, unless
``--overwrite``); ``flowerpress simulate --resume DIR`` continues the run
checkpointed in DIR; ``flowerpress certs ...`` writes TLS and
SuperNode keys for a deployment (``flowerpress certs add-node`` adds device keys
to it); ``flowerpress device check ...`` checks a device before it joins. Bad
input exits with status 2 and one line.
"""

from __future__ import annotations

import argparse
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
    sub.add_parser("certs", help="write a CA, SuperLink certificate and SuperNode keys "
                                 "(`certs add-node`: add device keys)", add_help=False)
    sub.add_parser("device", help="`device check`: check a device's node config, data, "
                                  "certificate and key before it joins", add_help=False)
    return parser


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
    from flowerpress.simulations.runner import SimulationError, simulate

    try:
        results = simulate(config, out, progress=not args.quiet,
                           resume=args.resume is not None)
    except SimulationError as exc:
        print(f"flowerpress: simulation failed: {exc}", file=sys.stderr)
        return 1
    s = results["summary"]
    up, fp32 = s["total_upload_bytes"], s["fp32_upload_bytes"]
    acc = "-" if s["final_accuracy"] is None else format(s["final_accuracy"], ".4f")
    print(f"final accuracy {acc}; uploaded {up / 1e6:.3f} MB "
          f"({fp32 / max(up, 1):.1f}x less than float32); results in {out}/results.json")
    if s.get("stopped"):
        print(s["stopped"])
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``flowerpress`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["certs"]:
        from flowerpress.deploy.certs import main as certs_main

        return certs_main(argv[1:])
    if argv[:1] == ["device"]:
        from flowerpress.deploy.check import main as device_main

        return device_main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "simulate":
            return _simulate(args)
    except ConfigError as exc:
        print(f"flowerpress: error: {exc}", file=sys.stderr)
        return 2
    parser.print_usage(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
