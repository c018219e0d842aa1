"""``flowerpress device check``: is this device ready to join, before it joins?

Takes the same ``--node-config`` string (and, optionally, the same certificate and
key flags) as ``flower-supernode`` and checks, without contacting the SuperLink:

* the node config parses as Flower parses it (strings need quotes);
* it names the node's data: ``data-path`` (or ``partition-id`` + ``num-partitions``
  for a demo partition, in range);
* the ``data-path`` file has the device data format (:mod:`flowerpress.deploy.data`),
  and its samples have the shape the run's ``--dataset`` model takes;
* ``cache-dir`` (if set) is a writable directory, ``log-file`` (if set) a file
  this user can append to;
* ``--root-certificates`` is a PEM CA certificate that is valid now;
* ``--auth-supernode-private-key`` is an OpenSSH EC private key (what Flower's
  SuperNode authentication needs) that other users cannot read;
* with ``--startup``, a fresh Python process imports what a ClientApp imports
  (Flower, torch, flowerpress) well within the time Flower gives a ClientApp
  process to start (:data:`TASK_START_S`).

Every problem is one line; the exit code is 0 when there is none, 1 otherwise
and 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import datetime
import os
import stat
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from flowerpress.deploy.cache import CACHE_DIR_KEY
from flowerpress.deploy.data import DATA_PATH_KEY, check_device_file
from flowerpress.deploy.devicelog import LOG_FILE_KEY, device_log_path

__all__ = ["DeviceReport", "check_device", "check_startup", "main", "parse_node_config"]

#: Seconds Flower 1.41 gives a ClientApp process, from the SuperNode's claim of a
#: message's task to the process asking for its input
#: (``flwr.common.constant.HEARTBEAT_DEFAULT_INTERVAL``); a slower process loses its
#: task token and every call it makes is refused (HTTP 401 "Runtime task-token
#: authentication failed"), so the device never answers.
TASK_START_S = 30.0
#: A ClientApp whose imports take longer than this is reported: it leaves too little
#: of TASK_START_S for Python itself, the SuperExec and a loaded device.
STARTUP_LIMIT_S = 20.0
#: What a flowerpress ClientApp process imports before it asks for its input.
_CLIENTAPP_IMPORTS = "import flwr.clientapp, torch, flowerpress.client.app"


@dataclass
class DeviceReport:
    """What ``device check`` found: problems (each one line) and facts for the operator."""

    problems: list[str] = field(default_factory=list)
    facts: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether there is no problem."""
        return not self.problems


def parse_node_config(text: str) -> dict[str, object]:
    """Parse a ``--node-config`` string (or a ``.toml`` path) as ``flower-supernode`` does.

    Raises
    ------
    ValueError
        One line saying what is wrong.
    """
    import click
    from flwr.common.config import parse_config_args

    try:
        return dict(parse_config_args([text] if text else None))
    except click.ClickException:
        raise ValueError(
            f"node config {text!r} is not valid TOML key=value pairs (strings need quotes: "
            "data-path='/path/to/data.npz')") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"node config {text!r}: {str(exc).splitlines()[0]}") from None


def _check_data(config: Mapping[str, object], dataset: str | None, report: DeviceReport) -> None:
    raw = config.get(DATA_PATH_KEY)
    pid, n = config.get("partition-id"), config.get("num-partitions")
    if raw is not None:
        if not isinstance(raw, str) or not raw.strip():
            report.problems.append(f"{DATA_PATH_KEY}: expected a quoted path, got {raw!r}")
            return
        path = Path(raw.strip()).expanduser()
        problems = check_device_file(path)
        report.problems += [f"{DATA_PATH_KEY} {path}: {p}" for p in problems]
        if problems:
            return
        import numpy as np

        with np.load(path, allow_pickle=False) as archive:
            x_shape, y = archive["x"].shape, archive["y"]
            labels = int(np.unique(y).size)
        report.facts.append(f"{DATA_PATH_KEY} {path}: {x_shape[0]} examples, samples of "
                            f"shape {tuple(x_shape[1:])}, {labels} distinct labels")
        if dataset:
            from flowerpress.tasks.data import input_spec

            spec = input_spec(dataset)
            if spec is not None and tuple(x_shape[1:]) != spec[0]:
                report.problems.append(
                    f"{DATA_PATH_KEY} {path}: samples of shape {tuple(x_shape[1:])}, but "
                    f"dataset {dataset!r} models take {spec[0]}")
            elif spec is not None and int(y.max()) >= spec[1]:
                report.problems.append(
                    f"{DATA_PATH_KEY} {path}: label {int(y.max())}, but dataset "
                    f"{dataset!r} models predict {spec[1]} classes (0..{spec[1] - 1})")
        return
    if pid is None and n is None:
        report.problems.append(f"node config names no data: set {DATA_PATH_KEY}='/path/to/"
                               "data.npz' (or partition-id=I num-partitions=N for a demo)")
        return
    if not (isinstance(pid, int) and isinstance(n, int)) or isinstance(pid, bool):
        report.problems.append(f"partition-id and num-partitions must both be integers, got "
                               f"{pid!r} and {n!r}")
    elif not 0 <= pid < n:
        report.problems.append(f"partition-id {pid} is out of range 0..{n - 1}")
    else:
        report.facts.append(f"demo partition {pid} of {n} of the run's dataset")


def _check_cache_dir(config: Mapping[str, object], report: DeviceReport) -> None:
    raw = config.get(CACHE_DIR_KEY)
    if raw is None:
        report.facts.append("device cache: $FLWR_HOME/flowerpress-cache (set cache-dir to "
                            "choose)")
        return
    if not isinstance(raw, str) or not raw.strip():
        report.problems.append(f"{CACHE_DIR_KEY}: expected a quoted directory, got {raw!r}")
        return
    path = Path(raw.strip()).expanduser()
    _check_creatable(CACHE_DIR_KEY, path, path, f"device cache: {path}", report)


def _check_creatable(key: str, path: Path, start: Path, fact: str,
                     report: DeviceReport) -> None:
    """``path`` can be made: its nearest existing ancestor from ``start`` up is a
    directory this user may write to (then ``fact``), else one problem line."""
    existing = start
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        report.problems.append(f"{key} {path}: {existing} is not a directory")
    elif not os.access(existing, os.W_OK | os.X_OK):
        report.problems.append(f"{key} {path}: {existing} is not writable by this user")
    else:
        report.facts.append(fact)


def _check_log_file(config: Mapping[str, object], report: DeviceReport) -> None:
    try:
        path = device_log_path(config)
    except ValueError as exc:
        report.problems.append(str(exc))
        return
    if path is None:
        report.facts.append(f"device log: the SuperNode's output only (set {LOG_FILE_KEY} "
                            "for a file)")
        return
    if path.exists():
        if not path.is_file():
            report.problems.append(f"{LOG_FILE_KEY} {path}: not a regular file")
        elif not os.access(path, os.W_OK):
            report.problems.append(f"{LOG_FILE_KEY} {path}: not writable by this user")
        else:
            report.facts.append(f"device log: {path}")
        return
    _check_creatable(LOG_FILE_KEY, path, path.parent, f"device log: {path}", report)


def _check_ca(path: Path, report: DeviceReport) -> None:
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as exc:
        report.problems.append(f"root certificates {path}: cannot read ({exc.strerror})")
        return
    except ValueError:
        report.problems.append(f"root certificates {path}: not a PEM certificate (expected "
                               "the deployment's ca.crt)")
        return
    try:
        is_ca = bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        # e.g. superlink.crt: a SuperNode trusting it fails the TLS handshake.
        report.problems.append(f"root certificates {path}: {cert.subject.rfc4514_string()} is "
                               "not a CA certificate (expected the deployment's ca.crt)")
        return
    now = datetime.datetime.now(datetime.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        report.problems.append(
            f"root certificates {path}: valid {cert.not_valid_before_utc:%Y-%m-%d} to "
            f"{cert.not_valid_after_utc:%Y-%m-%d}, not now (check the device's clock)")
    else:
        report.facts.append(f"root certificates {path}: {cert.subject.rfc4514_string()}, "
                            f"valid until {cert.not_valid_after_utc:%Y-%m-%d}")


def _check_key(path: Path, report: DeviceReport) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    try:
        data = path.read_bytes()
        mode = path.stat().st_mode
    except OSError as exc:
        report.problems.append(f"SuperNode private key {path}: cannot read ({exc.strerror})")
        return
    try:
        key = load_ssh_private_key(data, password=None)
    except (ValueError, TypeError):
        report.problems.append(f"SuperNode private key {path}: not an unencrypted OpenSSH "
                               "private key (expected a supernode-<i>.key of flowerpress certs)")
        return
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        report.problems.append(f"SuperNode private key {path}: a {type(key).__name__}; "
                               "Flower's SuperNode authentication needs an EC key")
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        report.problems.append(f"SuperNode private key {path}: readable by other users (mode "
                               f"{stat.S_IMODE(mode):o}); chmod 600 it")
        return
    report.facts.append(f"SuperNode private key {path}: EC {key.curve.name}")


def check_startup(report: DeviceReport, *, limit: float = STARTUP_LIMIT_S,
                  timeout: float = 120.0) -> float | None:
    """Time a fresh Python importing what a ClientApp imports; a problem above ``limit``.

    Returns the seconds taken, or None when the imports failed or timed out (a
    problem either way).
    """
    started = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-c", _CLIENTAPP_IMPORTS], capture_output=True,
                              text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        report.problems.append(f"ClientApp start-up: importing Flower, torch and flowerpress "
                               f"took over {timeout:.0f} s")
        return None
    seconds = time.monotonic() - started
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        report.problems.append(f"ClientApp start-up: the imports fail: {last[:300]}")
        return None
    if seconds > limit:
        report.problems.append(
            f"ClientApp start-up: a fresh process took {seconds:.1f} s to import Flower, torch "
            f"and flowerpress; Flower gives a ClientApp {TASK_START_S:.0f} s to start, then "
            "refuses it (401 Runtime task-token authentication failed): stop other load, "
            "use faster storage, or a faster device")
    else:
        report.facts.append(f"ClientApp start-up: imports in {seconds:.1f} s (Flower allows "
                            f"{TASK_START_S:.0f} s)")
    return seconds


def check_device(node_config: Mapping[str, object], *, dataset: str | None = None,
                 root_certificates: Path | None = None,
                 private_key: Path | None = None) -> DeviceReport:
    """Check a device's node config, data, cache directory, log file, certificate and key.

    Parameters
    ----------
    node_config
        The parsed node config (:func:`parse_node_config`).
    dataset
        The run's ``dataset``, to check the data's sample shape against its model
        (the node config's ``dataset`` wins when set).
    root_certificates, private_key
        The SuperNode's ``--root-certificates`` and ``--auth-supernode-private-key``.
    """
    report = DeviceReport()
    chosen = node_config.get("dataset", dataset)
    _check_data(node_config, str(chosen) if chosen else None, report)
    _check_cache_dir(node_config, report)
    _check_log_file(node_config, report)
    if root_certificates is not None:
        _check_ca(root_certificates.expanduser(), report)
    if private_key is not None:
        _check_key(private_key.expanduser(), report)
    return report


def build_parser() -> argparse.ArgumentParser:
    """The ``flowerpress device check`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="flowerpress device check",
        description="Check a device's node config, data file, cache directory, CA "
                    "certificate and SuperNode key before it joins (one line per problem; "
                    "exit 0 when ready, 1 otherwise).")
    parser.add_argument("--node-config", default="", metavar="KEY=VALUE ...",
                        help="the flower-supernode --node-config string, e.g. "
                             "\"data-path='/home/pi/data.npz'\"")
    parser.add_argument("--dataset", default=None,
                        help="the run's dataset (mnist, digits, synthetic:A,B), to check the "
                             "data's sample shape against its model")
    parser.add_argument("--root-certificates", type=Path, default=None, metavar="CA.CRT",
                        help="the flower-supernode --root-certificates file")
    parser.add_argument("--auth-supernode-private-key", type=Path, default=None,
                        metavar="KEY", help="the flower-supernode "
                                            "--auth-supernode-private-key file")
    parser.add_argument("--startup", action="store_true",
                        help="also time a fresh process importing what a ClientApp imports "
                             f"(Flower allows {TASK_START_S:.0f} s for a ClientApp to start)")
    parser.add_argument("--quiet", action="store_true", help="print problems only")
    return parser


def main(argv: list[str]) -> int:
    """Run ``flowerpress device check``; return the exit code (0 ready, 1 problems, 2 usage)."""
    if argv[:1] != ["check"]:
        print("usage: flowerpress device check [--node-config KEY=VALUE ...] [--dataset NAME] "
              "[--root-certificates CA.CRT] [--auth-supernode-private-key KEY]",
              file=sys.stderr)
        return 2
    parser = build_parser()
    try:
        args = parser.parse_args(argv[1:])
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else 2
    try:
        config = parse_node_config(args.node_config)
    except ValueError as exc:  # a bad --node-config is a usage error (docs/deploy.md)
        print(f"device check: {exc}", file=sys.stderr)
        return 2
    report = check_device(config, dataset=args.dataset,
                          root_certificates=args.root_certificates,
                          private_key=args.auth_supernode_private_key)
    if args.startup:
        check_startup(report)
    if not args.quiet:
        for fact in report.facts:
            print(f"ok: {fact}")
    for problem in report.problems:
        print(f"problem: {problem}", file=sys.stderr)
    if report.ok:
        print("device check: ready")
        return 0
    print(f"device check: {len(report.problems)} problem(s)", file=sys.stderr)
    return 1
