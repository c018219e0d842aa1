"""`flowerpress device check`: one line per problem, exit 0 / 1 / 2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flowerpress.cli import main as cli_main
from flowerpress.deploy.certs import generate_credentials
from flowerpress.deploy.check import check_device, parse_node_config
from flowerpress.deploy.data import save_device_data


@pytest.fixture
def device(tmp_path: Path) -> dict[str, Path]:
    creds = generate_credentials(tmp_path / "certs", [], 1)
    rng = np.random.default_rng(0)
    data = save_device_data(tmp_path / "data.npz", rng.random((20, 64)), rng.integers(0, 10, 20))
    return {"ca": creds.ca_cert, "key": creds.node_private_keys[0], "data": data,
            "pub": creds.node_public_keys[0], "dir": tmp_path}


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str], list[str]]:
    code = cli_main(["device", "check", *args])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


def test_ready_device_exits_zero(device: dict[str, Path],
                                 capsys: pytest.CaptureFixture[str]) -> None:
    # Execute
    code, out, err = _run(
        capsys, "--node-config", f"data-path='{device['data']}' cache-dir='{device['dir']}/c'",
        "--dataset", "digits", "--root-certificates", str(device["ca"]),
        "--auth-supernode-private-key", str(device["key"]))

    # Assert
    assert code == 0 and err == []
    assert out[-1] == "device check: ready"
    assert any("20 examples" in line for line in out)


def test_every_problem_is_one_line_and_exit_one(device: dict[str, Path],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: a text file named .npz, the CA key instead of the certificate, the public key
    bad = device["dir"] / "bad.npz"
    bad.write_text("x,y\n1,2\n")
    ca_key = device["ca"].with_name("ca.key")

    # Execute
    code, _, err = _run(capsys, "--node-config", f"data-path='{bad}'",
                        "--root-certificates", str(ca_key),
                        "--auth-supernode-private-key", str(device["pub"]))

    # Assert: three problems, one line each, then the count
    assert code == 1
    problems = [line for line in err if line.startswith("problem: ")]
    assert len(problems) == 3, err
    assert "not an .npz archive" in problems[0] and "pickle" not in problems[0]
    assert "not a PEM certificate" in problems[1]
    assert "OpenSSH private key" in problems[2]
    assert err[-1] == "device check: 3 problem(s)"


def test_unquoted_path_in_node_config_is_reported(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "--node-config", "data-path=/data/device.npz")
    assert code == 2 and len(err) == 1 and "strings need quotes" in err[0]


def test_usage_error_exits_two(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["device"]) == 2
    assert cli_main(["device", "check", "--no-such-flag"]) == 2
    capsys.readouterr()


@pytest.mark.parametrize(
    ("node_config", "problem"),
    [
        ("", "names no data"),
        ("partition-id=3 num-partitions=3", "out of range 0..2"),
        ("partition-id='0' num-partitions=3", "must both be integers"),
        ("data-path='/nonexistent/device.npz'", "file not found"),
    ],
)
def test_node_config_problems(node_config: str, problem: str) -> None:
    report = check_device(parse_node_config(node_config))
    assert not report.ok and len(report.problems) == 1 and problem in report.problems[0]


def test_data_checked_against_the_run_dataset(device: dict[str, Path]) -> None:
    # Prepare
    config = parse_node_config(f"data-path='{device['data']}'")

    # Execute / Assert: 64 features fit digits, not MNIST's 28x28 images
    assert check_device(config, dataset="digits").ok
    (problem,) = check_device(config, dataset="mnist").problems
    assert "(1, 28, 28)" in problem


def test_private_key_readable_by_others_is_a_problem(device: dict[str, Path]) -> None:
    # Prepare
    device["key"].chmod(0o644)

    # Execute
    report = check_device({"partition-id": 0, "num-partitions": 1},
                          private_key=device["key"])

    # Assert
    assert report.problems == [f"SuperNode private key {device['key']}: readable by other "
                               "users (mode 644); chmod 600 it"]


def test_cache_dir_that_is_a_file_is_a_problem(device: dict[str, Path]) -> None:
    report = check_device({"partition-id": 0, "num-partitions": 1,
                           "cache-dir": str(device["data"] / "sub")})
    assert len(report.problems) == 1 and "is not a directory" in report.problems[0]


@pytest.mark.parametrize(("where", "problem"), [
    ("data.npz/device.log", "is not a directory"),  # below a file
    (".", "not a regular file"),  # a directory
    ("new/dir/device.log", None),  # created on first use
])
def test_log_file_must_be_appendable(device: dict[str, Path], where: str,
                                     problem: str | None) -> None:
    # Execute
    report = check_device({"partition-id": 0, "num-partitions": 1,
                           "log-file": str(device["dir"] / where)})
    # Assert
    if problem is None:
        assert report.ok and any(f.startswith("device log: ") for f in report.facts)
    else:
        assert len(report.problems) == 1 and problem in report.problems[0]


def test_the_superlink_certificate_is_not_a_root_certificate(
        device: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: the server's certificate copied instead of ca.crt (an easy mix-up)
    server_crt = device["ca"].with_name("superlink.crt")

    # Execute
    code, _, err = _run(capsys, "--root-certificates", str(server_crt))

    # Assert
    assert code == 1
    assert any("not a CA certificate" in line and "ca.crt" in line for line in err), err


@pytest.mark.parametrize(("imports", "limit", "problem"), [
    ("import sys", 60.0, None),
    ("import sys", 0.0, "Runtime task-token authentication failed"),  # over any limit
    ("import no_such_module_anywhere", 60.0, "the imports fail: ModuleNotFoundError"),
])
def test_clientapp_start_up_is_timed_against_flowers_limit(
        imports: str, limit: float, problem: str | None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a cheap stand-in for the ClientApp's imports (torch takes seconds)
    from flowerpress.deploy import check

    monkeypatch.setattr(check, "_CLIENTAPP_IMPORTS", imports)
    report = check.DeviceReport()
    # Execute
    seconds = check.check_startup(report, limit=limit)
    # Assert
    if problem is None:
        assert seconds is not None and report.ok and "Flower allows 30 s" in report.facts[0]
    else:
        assert len(report.problems) == 1 and problem in report.problems[0]
