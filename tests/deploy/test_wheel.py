"""The operator's install route (issue 24): a wheel built from the checkout installs and runs.

The wheel is built from this checkout (``pip wheel --no-deps``, what ``make
wheel`` does) and installed into a new virtual environment with ``--no-deps``
and ``--no-index``: flowerpress itself comes only from the wheel. Its
dependencies are the ones ``make install`` put in this environment, made
visible through a ``.pth`` file (a full dependency install from the package
index takes minutes on this machine; ``pip check`` in the new environment
verifies the wheel's declared requirements against them). Then the console
script runs: ``flowerpress --version`` and ``flowerpress device check --help``.
"""

from __future__ import annotations

import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import flowerpress

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300,
                          cwd=cwd, check=False)


@pytest.mark.timeout(400)
def test_the_wheel_built_from_the_checkout_installs_and_its_commands_run(tmp_path: Path) -> None:
    # Prepare: the wheel, as `make wheel` builds it
    dist = tmp_path / "dist"
    built = _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                 "-w", dist, ROOT)
    assert built.returncode == 0, built.stderr[-2000:]
    wheels = list(dist.glob("flowerpress-*.whl"))
    assert len(wheels) == 1
    # Execute: a new environment; flowerpress from the wheel only
    env = tmp_path / "env"
    assert _run(sys.executable, "-m", "venv", "--without-pip", env).returncode == 0
    purelib = Path(sysconfig.get_path("purelib", vars={"base": str(env),
                                                       "platbase": str(env)}))
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (purelib / "_flowerpress_deps.pth").write_text("\n".join(deps) + "\n")
    python = env / "bin" / "python"
    installed = _run(python, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                     "--ignore-installed",
                     wheels[0])
    assert installed.returncode == 0, installed.stderr[-2000:]
    # Assert: the package is the wheel's, its requirements are met, its commands run
    where = _run(python, "-c", "import flowerpress; print(flowerpress.__file__)", cwd=tmp_path)
    assert where.returncode == 0 and where.stdout.strip().startswith(str(env)), where
    check = _run(python, "-m", "pip", "check")
    assert check.returncode == 0, check.stdout + check.stderr
    version = _run(env / "bin" / "flowerpress", "--version", cwd=tmp_path)
    assert version.returncode == 0 and flowerpress.__version__ in version.stdout, version
    helped = _run(env / "bin" / "flowerpress", "device", "check", "--help", cwd=tmp_path)
    assert helped.returncode == 0 and "--node-config" in helped.stdout, helped
