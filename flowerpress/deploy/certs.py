"""Certificates and keys for a TLS + SuperNode-authenticated Flower deployment.

``flowerpress certs --out DIR --host HOST[,HOST...] --nodes N`` writes, using the
``cryptography`` package only (no ``openssl`` subprocess):

============================  ==========================================================
``DIR/ca.crt``                CA certificate (PEM). SuperLink ``--ssl-ca-certfile``,
                              SuperNode ``--root-certificates``, and
                              ``root-certificates`` of the ``flwr`` CLI connection.
``DIR/ca.key``                CA private key (PEM, PKCS#8, mode 0600). Keep it offline;
                              it is only needed to issue more server certificates.
``DIR/superlink.crt``         SuperLink certificate (PEM) signed by the CA, with a
                              subject alternative name for every host plus
                              ``localhost``, ``127.0.0.1`` and ``::1``.
                              SuperLink ``--ssl-certfile``.
``DIR/superlink.key``         SuperLink private key (PEM, PKCS#8, mode 0600).
                              SuperLink ``--ssl-keyfile``.
``DIR/supernode-<i>.key``     SuperNode ``i`` EC P-384 private key in OpenSSH format
                              (mode 0600). SuperNode ``--auth-supernode-private-key``.
``DIR/supernode-<i>.pub``     The matching OpenSSH public key
                              (``ecdsa-sha2-nistp384 ...``). ``flwr supernode register``.
============================  ==========================================================

``flowerpress certs add-node --out DIR [--count K]`` adds ``K`` SuperNode key pairs to
an existing directory (the next free ``supernode-<i>``), reading and writing nothing
else: the CA, the SuperLink identity and the other devices' keys stay as they are,
and the CA's private key is not needed (SuperNode keys are registered with the
SuperLink, not signed by the CA).

These are the formats Flower 1.41 reads: the SuperLink loads the three PEM files
as bytes for gRPC/uvicorn TLS, ``flower-supernode`` parses its key with
``load_ssh_private_key`` and requires an EC key, and ``flwr supernode register``
parses ``load_ssh_public_key`` and requires a NIST EC curve.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CertError",
    "DeploymentCredentials",
    "add_node_keys",
    "generate_credentials",
    "main",
]

#: Hosts every SuperLink certificate is valid for, so a loopback test always works.
ALWAYS_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")

# P-384 is the curve Flower's SuperNode-authentication guide uses (ssh-keygen -t ecdsa
# -b 384); `flwr supernode register` accepts any NIST curve.
_CURVE = ec.SECP384R1


class CertError(ValueError):
    """Credentials cannot be written (bad arguments or files already present)."""


@dataclass(frozen=True)
class DeploymentCredentials:
    """Paths of the files written by :func:`generate_credentials`."""

    # Trust anchor: shipped to every device and to every `flwr` CLI user.
    ca_cert: Path
    ca_key: Path
    # SuperLink TLS identity.
    superlink_cert: Path
    superlink_key: Path
    # One (private, public) OpenSSH key pair per SuperNode, index i == node i.
    node_private_keys: tuple[Path, ...]
    node_public_keys: tuple[Path, ...]
    # Hosts listed as subject alternative names of the SuperLink certificate.
    hosts: tuple[str, ...]

    def all_paths(self) -> tuple[Path, ...]:
        """Return every file path, public and private."""
        return (
            self.ca_cert,
            self.ca_key,
            self.superlink_cert,
            self.superlink_key,
            *self.node_private_keys,
            *self.node_public_keys,
        )


def _planned_paths(out: Path, nodes: int) -> DeploymentCredentials:
    return DeploymentCredentials(
        ca_cert=out / "ca.crt",
        ca_key=out / "ca.key",
        superlink_cert=out / "superlink.crt",
        superlink_key=out / "superlink.key",
        node_private_keys=tuple(out / f"supernode-{i}.key" for i in range(nodes)),
        node_public_keys=tuple(out / f"supernode-{i}.pub" for i in range(nodes)),
        hosts=(),
    )


def _normalize_hosts(hosts: Sequence[str]) -> tuple[str, ...]:
    """Split comma lists, drop blanks and duplicates, append the loopback names."""
    seen: list[str] = []
    for item in hosts:
        for raw in item.split(","):
            host = raw.strip()
            if not host:
                continue
            if any(c.isspace() for c in host) or "/" in host or "://" in host:
                raise CertError(
                    f"--host: {host!r} is not a host name or IP address "
                    "(expected e.g. 192.168.1.10 or server.lan, no scheme or port)"
                )
            if host not in seen:
                seen.append(host)
    for host in ALWAYS_HOSTS:
        if host not in seen:
            seen.append(host)
    return tuple(seen)


def _san_entry(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` so that no other user can read it, ever (mode 0600 at creation)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # O_CREAT's mode is ignored when the file already exists
        with os.fdopen(fd, "wb") as handle:
            fd = -1
            handle.write(data)
    finally:
        if fd >= 0:
            os.close(fd)


def _write_public(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o644)


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_node_key(priv_path: Path, pub_path: Path, index: int) -> None:
    """Write one SuperNode's OpenSSH EC key pair (private 0600, public 0644)."""
    node_key = ec.generate_private_key(_CURVE())
    priv = node_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    pub = node_key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write_private(priv_path, priv)
    _write_public(pub_path, pub + f" flowerpress-supernode-{index}\n".encode())


_NODE_KEY = re.compile(r"supernode-(\d+)\.(key|pub)")


def add_node_keys(out: Path | str, count: int = 1) -> tuple[tuple[Path, Path], ...]:
    """Add ``count`` SuperNode key pairs to an existing credentials directory.

    The new pairs take the next free indices after every ``supernode-<i>.key`` or
    ``.pub`` present; no other file is read, written or replaced.

    Parameters
    ----------
    out : Path or str
        A directory written by :func:`generate_credentials` (it holds ``ca.crt``).
    count : int
        How many key pairs to add.

    Returns
    -------
    tuple of (Path, Path)
        ``(private key, public key)`` per new SuperNode.

    Raises
    ------
    CertError
        The directory has no ``ca.crt`` (not a deployment's credentials) or ``count < 1``.
    """
    if count < 1:
        raise CertError(f"--count: expected an integer >= 1, got {count}")
    out_dir = Path(out).expanduser()
    if not (out_dir / "ca.crt").is_file():
        raise CertError(
            f"--out: {out_dir / 'ca.crt'} not found; add-node adds device keys to the "
            "directory `flowerpress certs --out DIR` wrote (run that first)"
        )
    used = [int(m.group(1)) for p in out_dir.iterdir() if (m := _NODE_KEY.fullmatch(p.name))]
    first = max(used, default=-1) + 1
    written = []
    for index in range(first, first + count):
        priv_path, pub_path = out_dir / f"supernode-{index}.key", out_dir / f"supernode-{index}.pub"
        _write_node_key(priv_path, pub_path, index)
        written.append((priv_path, pub_path))
    return tuple(written)


def generate_credentials(
    out: Path | str,
    hosts: Sequence[str],
    nodes: int,
    *,
    force: bool = False,
    days: int = 365,
) -> DeploymentCredentials:
    """Write a CA, the SuperLink TLS identity and ``nodes`` SuperNode key pairs.

    Parameters
    ----------
    out : Path or str
        Output directory (created if missing).
    hosts : Sequence[str]
        Host names / IP addresses devices use to reach the SuperLink; entries may be
        comma-separated lists. ``localhost``, ``127.0.0.1`` and ``::1`` are always added.
    nodes : int
        Number of SuperNode key pairs (``supernode-0`` ... ``supernode-{nodes-1}``).
    force : bool
        Overwrite existing files. Without it, nothing is written if any target exists.
    days : int
        Validity of the CA and SuperLink certificates.

    Returns
    -------
    DeploymentCredentials
        Paths of the written files.

    Raises
    ------
    CertError
        On invalid arguments or when a target file exists and ``force`` is false.
    """
    if nodes < 0:
        raise CertError(f"--nodes: expected an integer >= 0, got {nodes}")
    if days < 1:
        raise CertError(f"--days: expected an integer >= 1, got {days}")
    all_hosts = _normalize_hosts(hosts)
    out_dir = Path(out).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise CertError(f"--out: {out_dir} exists and is not a directory")
    planned = _planned_paths(out_dir, nodes)
    if not force:
        existing = [p for p in planned.all_paths() if p.exists()]
        if existing:
            raise CertError(
                f"{existing[0]} already exists ({len(existing)} of the files to write "
                "exist); pass --force to overwrite"
            )
    out_dir.mkdir(parents=True, exist_ok=True)

    now = datetime.datetime.now(datetime.UTC)
    not_before = now - datetime.timedelta(minutes=5)  # tolerate small clock skew
    not_after = now + datetime.timedelta(days=days)

    # --- CA --------------------------------------------------------------------
    ca_key = ec.generate_private_key(_CURVE())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "flowerpress"),
            x509.NameAttribute(NameOID.COMMON_NAME, "flowerpress deployment CA"),
        ]
    )
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    # --- SuperLink ---------------------------------------------------------------
    server_key = ec.generate_private_key(_CURVE())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "flowerpress"),
                    x509.NameAttribute(NameOID.COMMON_NAME, all_hosts[0]),
                ]
            )
        )
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([_san_entry(h) for h in all_hosts]), critical=False
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )

    _write_private(planned.ca_key, _pem_private(ca_key))
    _write_public(planned.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(planned.superlink_key, _pem_private(server_key))
    _write_public(planned.superlink_cert, server_cert.public_bytes(serialization.Encoding.PEM))

    # --- SuperNodes: OpenSSH EC key pairs ------------------------------------------
    for i, (priv_path, pub_path) in enumerate(
        zip(planned.node_private_keys, planned.node_public_keys, strict=True)
    ):
        _write_node_key(priv_path, pub_path, i)

    return DeploymentCredentials(
        ca_cert=planned.ca_cert,
        ca_key=planned.ca_key,
        superlink_cert=planned.superlink_cert,
        superlink_key=planned.superlink_key,
        node_private_keys=planned.node_private_keys,
        node_public_keys=planned.node_public_keys,
        hosts=all_hosts,
    )


def build_parser() -> argparse.ArgumentParser:
    """Return the ``flowerpress certs`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="flowerpress certs",
        description=(
            "Write a CA, the SuperLink TLS certificate and key, and N SuperNode "
            "authentication key pairs for a Flower deployment. "
            "`flowerpress certs add-node --out DIR` adds device keys to an existing DIR."
        ),
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="HOST[,HOST...]",
        help=(
            "host name(s) or IP address(es) devices use to reach the SuperLink; "
            "repeatable; localhost, 127.0.0.1 and ::1 are always included"
        ),
    )
    parser.add_argument(
        "--nodes", type=int, default=0, metavar="N", help="number of SuperNode key pairs"
    )
    parser.add_argument(
        "--days", type=int, default=365, help="certificate validity in days (default 365)"
    )
    parser.add_argument("--force", action="store_true", help="overwrite existing files")
    return parser


def _add_node_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="flowerpress certs add-node",
        description=(
            "Add SuperNode authentication key pairs to an existing `flowerpress certs` "
            "directory; the CA, the SuperLink's files and other keys are left untouched."
        ),
    )
    parser.add_argument("--out", required=True, type=Path,
                        help="the directory `flowerpress certs` wrote (holds ca.crt)")
    parser.add_argument("--count", type=int, default=1, metavar="K",
                        help="how many key pairs to add (default 1)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else 2
    try:
        pairs = add_node_keys(args.out, args.count)
    except CertError as exc:
        print(f"flowerpress certs add-node: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"flowerpress certs add-node: error: cannot write {args.out}: {exc}",
              file=sys.stderr)
        return 2
    for priv, pub in pairs:
        print(f"SuperNode key pair:    {priv}  {pub}")
        print(f"  register it:         flwr supernode register {pub} <connection>")
    print("Copy ca.crt and the new supernode-<i>.key to the new device.")
    return 0


def main(argv: list[str]) -> int:
    """Run ``flowerpress certs``; return the process exit code.

    Parameters
    ----------
    argv : list[str]
        Arguments after ``certs``.

    Returns
    -------
    int
        0 on success; 2 on bad input, existing files without ``--force`` or an
        unwritable directory (one line on stderr), as for every ``flowerpress`` command.
    """
    if argv[:1] == ["add-node"]:
        return _add_node_main(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed the usage line
        return int(exc.code) if isinstance(exc.code, int) else 2
    try:
        creds = generate_credentials(
            args.out, args.host, args.nodes, force=args.force, days=args.days
        )
    except CertError as exc:
        print(f"flowerpress certs: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"flowerpress certs: error: cannot write {args.out}: {exc}", file=sys.stderr)
        return 2
    print(f"CA certificate:        {creds.ca_cert}")
    print(f"SuperLink certificate: {creds.superlink_cert} (hosts: {', '.join(creds.hosts)})")
    print(f"SuperLink key:         {creds.superlink_key}")
    for priv, pub in zip(creds.node_private_keys, creds.node_public_keys, strict=True):
        print(f"SuperNode key pair:    {priv}  {pub}")
    print("Copy ca.crt and one supernode-<i>.key to each device; keep ca.key offline.")
    return 0
