"""Tests for flowerpress.deploy.certs: formats Flower 1.41 accepts, modes, overwrite rules."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key
from flwr.cli.supernode.register import try_load_public_key
from flwr.supercore.primitives.asymmetric import public_key_to_bytes

from flowerpress.deploy.certs import CertError, add_node_keys, generate_credentials, main


def _tls_handshake(cert: Path, key: Path, ca: Path, server_hostname: str) -> str:
    """Serve one TLS handshake with (cert, key) on loopback; verify it as a client via ca."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        errors: list[BaseException] = []

        def serve() -> None:
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)
            except (ssl.SSLError, OSError) as exc:  # client may reject us
                errors.append(exc)

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
                client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls,
            ):
                version = tls.version() or ""
                tls.sendall(b"x")
        finally:
            thread.join(timeout=10)
    return version


def test_writes_all_files_with_private_modes(tmp_path: Path) -> None:
    # Prepare
    out = tmp_path / "certs"

    # Execute
    creds = generate_credentials(out, ["server.lan,10.1.2.3"], 3)

    # Assert
    assert all(p.is_file() for p in creds.all_paths())
    private = [creds.ca_key, creds.superlink_key, *creds.node_private_keys]
    for path in private:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for path in (creds.ca_cert, creds.superlink_cert, *creds.node_public_keys):
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 != 0o077  # readable, not secret
    assert [p.name for p in creds.node_private_keys] == [f"supernode-{i}.key" for i in range(3)]


def test_superlink_certificate_names_every_host_and_chains_to_ca(tmp_path: Path) -> None:
    # Prepare / Execute
    creds = generate_credentials(tmp_path, ["server.lan", "10.1.2.3"], 0)

    # Assert
    cert = x509.load_pem_x509_certificate(creds.superlink_cert.read_bytes())
    ca = x509.load_pem_x509_certificate(creds.ca_cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"server.lan", "localhost"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("10.1.2.3"),
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    cert.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    key = load_pem_private_key(creds.superlink_key.read_bytes(), None)
    assert key.public_key() == cert.public_key()


@pytest.mark.parametrize("hostname", ["localhost", "127.0.0.1", "server.lan"])
def test_tls_handshake_verifies_for_each_host(tmp_path: Path, hostname: str) -> None:
    # Prepare
    creds = generate_credentials(tmp_path, ["server.lan"], 0)

    # Execute
    version = _tls_handshake(creds.superlink_cert, creds.superlink_key, creds.ca_cert, hostname)

    # Assert
    assert version.startswith("TLS")


def test_tls_handshake_fails_for_unlisted_host(tmp_path: Path) -> None:
    # Prepare
    creds = generate_credentials(tmp_path, ["server.lan"], 0)

    # Execute / Assert
    with pytest.raises(ssl.SSLCertVerificationError):
        _tls_handshake(creds.superlink_cert, creds.superlink_key, creds.ca_cert, "other.lan")


def test_node_keys_load_the_way_flower_loads_them(tmp_path: Path) -> None:
    # Prepare
    creds = generate_credentials(tmp_path, [], 2)

    for priv_path, pub_path in zip(creds.node_private_keys, creds.node_public_keys, strict=True):
        # Execute: flower-supernode --auth-supernode-private-key / flwr supernode register
        private = load_ssh_private_key(priv_path.read_bytes(), None)
        registered = try_load_public_key(pub_path)

        # Assert
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert registered == public_key_to_bytes(private.public_key())
    assert creds.node_public_keys[0].read_text() != creds.node_public_keys[1].read_text()


def test_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    # Prepare
    first = generate_credentials(tmp_path, [], 1)
    before = first.ca_cert.read_bytes()

    # Execute / Assert
    with pytest.raises(CertError, match=r"already exists.*--force"):
        generate_credentials(tmp_path, [], 1)
    assert first.ca_cert.read_bytes() == before
    forced = generate_credentials(tmp_path, [], 1, force=True)
    assert forced.ca_cert.read_bytes() != before
    assert stat.S_IMODE(forced.ca_key.stat().st_mode) == 0o600


def test_main_reports_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    argv = ["--out", str(tmp_path), "--host", "a.lan", "--nodes", "2"]

    # Execute
    first = main(argv)
    capsys.readouterr()
    second = main(argv)
    err = capsys.readouterr().err
    bad_host = main(["--out", str(tmp_path / "x"), "--host", "https://a.lan", "--force"])
    bad_host_err = capsys.readouterr().err
    negative = main(["--out", str(tmp_path / "y"), "--nodes", "-1"])
    negative_err = capsys.readouterr().err

    # Assert
    assert (first, second, bad_host, negative) == (0, 2, 2, 2)
    for message in (err, bad_host_err, negative_err):
        assert message.count("\n") == 1 and message.startswith("flowerpress certs: error:")
    assert "--force" in err
    assert "--host" in bad_host_err
    assert "--nodes" in negative_err
    assert (tmp_path / "supernode-1.pub").is_file()


def test_main_usage_error_returns_nonzero(capsys: pytest.CaptureFixture[str]) -> None:
    # Execute
    code = main(["--nodes", "3"])  # --out missing

    # Assert
    assert code == 2
    assert "--out" in capsys.readouterr().err


def _snapshot(directory: Path) -> dict[str, tuple[bytes, int, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns, stat.S_IMODE(p.stat().st_mode))
            for p in sorted(directory.iterdir())}


def test_add_node_leaves_ca_and_other_keys_untouched(tmp_path: Path) -> None:
    # Prepare
    creds = generate_credentials(tmp_path, ["server.lan"], 2)
    before = _snapshot(tmp_path)

    # Execute
    pairs = add_node_keys(tmp_path, count=2)

    # Assert: the old files byte for byte (and mtime, mode); two new pairs after them
    after = _snapshot(tmp_path)
    assert {k: after[k] for k in before} == before
    assert [(p.name, q.name) for p, q in pairs] == [
        ("supernode-2.key", "supernode-2.pub"), ("supernode-3.key", "supernode-3.pub")]
    assert set(after) - set(before) == {p.name for pair in pairs for p in pair}
    for priv_path, pub_path in pairs:
        private = load_ssh_private_key(priv_path.read_bytes(), None)
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert try_load_public_key(pub_path) == public_key_to_bytes(private.public_key())
        assert stat.S_IMODE(priv_path.stat().st_mode) == 0o600
    assert creds.ca_key.read_bytes() == before["ca.key"][0]


def test_add_node_takes_the_index_after_the_highest(tmp_path: Path) -> None:
    # Prepare: keys 0 and 1, then 0 removed (a retired device): indices are never reused
    generate_credentials(tmp_path, [], 2)
    (tmp_path / "supernode-0.key").unlink()
    (tmp_path / "supernode-0.pub").unlink()

    # Execute
    ((priv, _),) = add_node_keys(tmp_path)

    # Assert
    assert priv.name == "supernode-2.key"


def test_add_node_needs_an_existing_credentials_directory(tmp_path: Path) -> None:
    with pytest.raises(CertError, match=r"ca\.crt not found"):
        add_node_keys(tmp_path / "nothing-here")
    generate_credentials(tmp_path, [], 0)
    with pytest.raises(CertError, match="--count"):
        add_node_keys(tmp_path, count=0)


def test_add_node_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    generate_credentials(tmp_path, [], 1)

    # Execute
    ok = main(["add-node", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    missing = main(["add-node", "--out", str(tmp_path / "other")])
    err = capsys.readouterr().err

    # Assert
    assert ok == 0 and "supernode-1.pub" in out and "flwr supernode register" in out
    assert missing == 2 and len(err.strip().splitlines()) == 1
