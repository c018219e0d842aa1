"""``flowerpress devices``: the fleet as the SuperLink and the last run see it.

One row per SuperNode the SuperLink knows, joining three sources:

* **the SuperLink** (Flower's Control API ``ListNodes``, the call behind
  ``flwr supernode ls``, through the ``flwr`` CLI's own connection handling and
  ``$FLWR_HOME/config.toml``): node id, status (``online``, ``offline``,
  ``registered``; ``unregistered`` with ``--all``) and the public key each node
  registered with. ``flwr supernode ls --format json`` prints everything but
  the key, which is what ties a node id to a device;
* **the key files** (``--certs DIR``, where ``flowerpress certs`` and
  ``certs add-node`` wrote ``supernode-<i>.pub``): the name of the file whose
  key the node registered with (``supernode-3``), compared as Flower compares
  keys (the PEM SubjectPublicKeyInfo ``flwr supernode register`` sends);
* **a run's results** (``--run OUT_DIR``, results.json's ``nodes``): the
  flowerpress version the node's start-up answer named, its partition,
  whether the run excluded it and why, the last round it was asked in, what
  became of that message and the last round it answered.

A node in the run that the SuperLink does not list (unregistered, or a
SuperLink restarted without ``--database``) is shown with status ``unknown``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DeviceRow",
    "DevicesError",
    "FlowerNode",
    "join_devices",
    "key_names",
    "list_nodes",
    "main",
    "nodes_from_info",
    "render_table",
    "run_nodes",
]

#: SuperLink statuses listed by default (``flwr supernode ls`` hides unregistered too).
LISTED = ("online", "offline", "registered")
UNKNOWN = "unknown"


class DevicesError(RuntimeError):
    """The SuperLink, the key directory or the run's results could not be read (one line)."""


@dataclass(frozen=True)
class FlowerNode:
    """One SuperNode as the SuperLink lists it."""

    node_id: int
    status: str
    public_key: bytes = b""
    name: str = ""  # `flwr supernode register --name`, if given
    status_since: str = ""  # when it last went online or offline (SuperLink's clock)


@dataclass
class DeviceRow:
    """One line of ``flowerpress devices``."""

    node_id: int
    key: str | None  # the .pub file (stem) the node registered with
    status: str
    version: str | None = None
    partition: int | None = None
    last_round: int | None = None  # the last round it was asked in
    outcome: str | None = None  # what became of that message
    answered: int | None = None  # the last round it answered
    excluded: str | None = None  # why the run excluded it
    name: str | None = None


def nodes_from_info(infos: Iterable[Any]) -> list[FlowerNode]:
    """:class:`FlowerNode` values from Flower's ``NodeInfo`` protobuf messages."""
    nodes = []
    for info in infos:
        status = str(info.status)
        since = info.last_activated_at if status == "online" else info.last_deactivated_at
        nodes.append(FlowerNode(node_id=int(info.node_id), status=status,
                                public_key=bytes(info.public_key), name=str(info.name or ""),
                                status_since=str(since or "")))
    return nodes


def list_nodes(connection: str | None) -> list[FlowerNode]:
    """The SuperNodes the SuperLink of ``connection`` knows (Flower's Control API).

    ``connection`` names a SuperLink in ``$FLWR_HOME/config.toml`` (None: its
    default), exactly as for ``flwr supernode ls``.

    Raises
    ------
    DevicesError
        The connection is not configured, or the SuperLink cannot be reached or
        refuses (Flower's one-line message).
    """
    import click

    try:
        from flwr.cli.flower_config import read_superlink_connection
        from flwr.cli.utils import flwr_cli_exc_handler, init_http_client_from_connection
        from flwr.proto.control_pb2 import ListNodesRequest
    except ImportError as exc:  # another Flower than the 1.41 line this is written for
        raise DevicesError(f"this Flower has no Control API client ({exc}); flowerpress "
                           "needs flwr>=1.41,<2") from None
    client = None
    # The flwr CLI helpers print "Using SuperLink: ..." on stdout: keep --json clean.
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            link = read_superlink_connection(connection)
            client = init_http_client_from_connection(link)
            with flwr_cli_exc_handler():
                response = client.ListNodes(ListNodesRequest())
        except click.ClickException as exc:
            raise DevicesError(" ".join(exc.format_message().split())) from None
        except SystemExit as exc:  # flwr_exit() on a malformed config.toml
            raise DevicesError(f"the flwr CLI configuration could not be read (exit "
                               f"{exc.code}); check $FLWR_HOME/config.toml") from None
        finally:
            if client is not None:
                client.close()
    return nodes_from_info(response.nodes_info)


def key_names(certs: Path) -> dict[bytes, str]:
    """Public key (as the SuperLink stores it) -> the stem of the ``.pub`` file holding it.

    Every ``*.pub`` in ``certs`` that is an OpenSSH EC public key counts (what
    ``flwr supernode register`` accepts); other files are skipped.

    Raises
    ------
    DevicesError
        ``certs`` is not a directory.
    """
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if not certs.is_dir():
        raise DevicesError(f"--certs {certs}: not a directory (the one `flowerpress certs "
                           "--out` wrote, holding supernode-<i>.pub)")
    names: dict[bytes, str] = {}
    for path in sorted(certs.glob("*.pub")):
        try:
            key = serialization.load_ssh_public_key(path.read_bytes())
        except (OSError, ValueError, TypeError, UnsupportedAlgorithm):
            continue
        if not isinstance(key, ec.EllipticCurvePublicKey):
            continue
        # flwr supernode register sends public_key_to_bytes(key): PEM SubjectPublicKeyInfo.
        pem = key.public_bytes(serialization.Encoding.PEM,
                               serialization.PublicFormat.SubjectPublicKeyInfo)
        names.setdefault(pem, path.stem)
    return names


def run_nodes(run: Path) -> dict[int, dict[str, Any]]:
    """results.json's ``nodes`` by node id; ``run`` is the run's out-dir or its results.json.

    Raises
    ------
    DevicesError
        No readable results.json, or one without a ``nodes`` list (a run made by
        a flowerpress before 0.2.1, or one that has not finished a round).
    """
    path = run / "results.json" if run.is_dir() else run
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DevicesError(f"--run {run}: cannot read {path} ({exc.strerror})") from None
    except (ValueError, UnicodeDecodeError):
        raise DevicesError(f"--run {run}: {path} is not valid JSON") from None
    nodes = document.get("nodes") if isinstance(document, dict) else None
    if not isinstance(nodes, list):
        raise DevicesError(f"--run {run}: {path} has no \"nodes\" (the run has not finished "
                           "a round, or an older flowerpress wrote it)")
    out: dict[int, dict[str, Any]] = {}
    for item in nodes:
        node = item.get("node_id") if isinstance(item, dict) else None
        if isinstance(node, int) and not isinstance(node, bool):
            out[node] = item
    return out


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value else None


def _text_or_none(value: object) -> str | None:
    return " ".join(value.split())[:300] if isinstance(value, str) and value.strip() else None


def join_devices(nodes: Sequence[FlowerNode], keys: Mapping[bytes, str] | None = None,
                 run: Mapping[int, Mapping[str, Any]] | None = None, *,
                 show_all: bool = False) -> list[DeviceRow]:
    """One row per node: the SuperLink's list joined with the key files and the run.

    Nodes whose status is not in :data:`LISTED` are left out unless
    ``show_all``; nodes only the run knows are added with status ``unknown``.
    Rows are ordered by key name (devices without one last), then node id.
    """
    keys, run = keys or {}, run or {}
    rows = []
    listed = set()
    for node in nodes:
        listed.add(node.node_id)
        if node.status not in LISTED and not show_all:
            continue
        rows.append(DeviceRow(node_id=node.node_id, key=keys.get(node.public_key),
                              status=node.status, name=node.name or None))
    rows += [DeviceRow(node_id=n, key=None, status=UNKNOWN) for n in sorted(run)
             if n not in listed]
    for row in rows:
        seen = run.get(row.node_id)
        if seen is None:
            continue
        version = seen.get("version")
        row.version = version if isinstance(version, str) else None
        row.partition = seen.get("partition") if isinstance(seen.get("partition"), int) \
            else None
        row.last_round = _int_or_none(seen.get("last_round"))
        row.outcome = _text_or_none(seen.get("outcome"))
        row.answered = _int_or_none(seen.get("answered"))
        row.excluded = _text_or_none(seen.get("excluded"))

    def order(row: DeviceRow) -> tuple[int, str, int, int]:
        # supernode-10 after supernode-9: the trailing number as a number
        stem, _, tail = (row.key or "").rpartition("-")
        number = int(tail) if tail.isdigit() else -1
        return (row.key is None, stem if number >= 0 else (row.key or ""), number, row.node_id)

    return sorted(rows, key=order)


_COLUMNS = (("node id", "node_id"), ("key", "key"), ("status", "status"),
            ("version", "version"), ("partition", "partition"),
            ("last round", "last_round"), ("outcome", "outcome"),
            ("answered", "answered"))


def render_table(rows: Sequence[DeviceRow], *, outcome_width: int = 60) -> str:
    """The rows as a plain-text table (``-`` for unknown values; excluded nodes say why)."""
    def cell(row: DeviceRow, field: str) -> str:
        value: object = getattr(row, field)
        if field == "outcome" and row.excluded is not None:
            value = f"excluded: {row.excluded}"
        if field == "key" and value is None and row.name:
            value = row.name
        text = "-" if value is None else str(value)
        if field == "outcome" and len(text) > outcome_width:
            text = text[:outcome_width - 3] + "..."
        return text

    table = [[title for title, _ in _COLUMNS]]
    table += [[cell(row, field) for _, field in _COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(_COLUMNS))]
    lines = ["  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True))
             .rstrip() for line in table]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The ``flowerpress devices`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="flowerpress devices",
        description="The devices the SuperLink knows: node id, the key file each registered "
                    "with, online or not, and from a run's results the flowerpress version, "
                    "the last round asked and its outcome.")
    parser.add_argument("connection", nargs="?", default=None, metavar="SUPERLINK",
                        help="a SuperLink connection of $FLWR_HOME/config.toml (default: "
                             "its default), as for `flwr supernode ls`")
    parser.add_argument("--certs", type=Path, default=None, metavar="DIR",
                        help="the directory with the devices' supernode-<i>.pub files "
                             "(`flowerpress certs --out DIR`)")
    parser.add_argument("--run", type=Path, default=None, metavar="OUT_DIR",
                        help="a run's out-dir (or its results.json) on this machine")
    parser.add_argument("--all", action="store_true", dest="show_all",
                        help="also nodes whose key was unregistered")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def main(argv: Sequence[str]) -> int:
    """Run ``flowerpress devices``; 0 on success, 1 when the SuperLink cannot be read,
    2 for bad arguments (a missing --certs directory or --run file)."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else 2
    try:
        keys = key_names(args.certs) if args.certs is not None else None
        run = run_nodes(args.run) if args.run is not None else None
    except DevicesError as exc:
        print(f"flowerpress devices: {exc}", file=sys.stderr)
        return 2
    try:
        nodes = list_nodes(args.connection)
    except DevicesError as exc:
        print(f"flowerpress devices: {exc}", file=sys.stderr)
        return 1
    rows = join_devices(nodes, keys, run, show_all=args.show_all)
    if args.json:
        print(json.dumps({"devices": [asdict(row) for row in rows]}, indent=2))
    else:
        print(render_table(rows))
    return 0
