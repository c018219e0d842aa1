"""Registries of DP mechanisms, clipping rules and accountants; the lean device import."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import RdpAccountant

from flowerpress.privacy import (
    Accountant,
    DpMechanism,
    GaussianRelease,
    ServerPrivacy,
    available_accountants,
    available_clippings,
    available_mechanisms,
    get_mechanism,
    parse_dp,
    register_accountant,
    register_mechanism,
)
from flowerpress.privacy import registry as registry_module
from flowerpress.privacy.accounting import RdpGaussianAccountant
from flowerpress.privacy.mechanisms import DistributedDp, LocalDp

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def restore_registries() -> Iterator[None]:
    """Snapshot every registry and restore it: no test changes global state."""
    saved = [
        (reg, dict(reg.entries))
        for reg in (registry_module._MECHANISMS, registry_module._CLIPPING,
                    registry_module._ACCOUNTANTS)
    ]
    try:
        yield
    finally:
        for reg, entries in saved:
            reg.entries.clear()
            reg.entries.update(entries)


class HalfShare(DpMechanism):
    """A user's mechanism: every device adds z*C/2 whatever the cohort."""

    trust_model = "test: each update carries z*C/2"
    per_update = True

    def device_noise_multiplier(self, noise: float, *, cohort_size: int) -> float:
        return noise / 2.0


class DoubledRdp(RdpGaussianAccountant):
    """A user's (deliberately conservative) accountant: twice the RDP epsilon."""

    def get_epsilon(self, delta: float) -> float:
        return 2.0 * super().get_epsilon(delta)

    def describe(self) -> str:
        return "doubled rdp"


def test_builtins_are_registered_by_name() -> None:
    assert {"distributed", "local"} <= set(available_mechanisms())
    assert {"fixed", "adaptive"} <= set(available_clippings())
    assert {"rdp", "pld"} <= set(available_accountants())
    assert isinstance(get_mechanism("distributed"), DistributedDp)
    assert isinstance(get_mechanism("local"), LocalDp)


@pytest.mark.usefixtures("restore_registries")
def test_user_mechanism_is_parsed_and_accounted() -> None:
    # Prepare
    register_mechanism("half", HalfShare)

    # Execute
    dp = parse_dp("half:clip=1.0,noise=4.0")
    assert dp is not None
    server = ServerPrivacy(dp, num_clients=20, clients_per_round=5, delta=1e-5,
                           max_epsilon=None)
    eps = server.end_round([1, 2, 3, 4, 5], [])

    # Assert: a per-update mechanism with multiplier 2.0 relative to C -> 1.0 vs 2C.
    reference = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    reference.compose(dp_accounting.GaussianDpEvent(1.0))
    assert eps == pytest.approx(reference.get_epsilon(1e-5), rel=1e-12)
    assert server.privacy_block()["trust_model"] == HalfShare.trust_model


@pytest.mark.usefixtures("restore_registries")
def test_user_accountant_decides_the_epsilon() -> None:
    register_accountant("doubled", DoubledRdp)
    dp = parse_dp("distributed:clip=1.0,noise=1.0")
    assert dp is not None
    plain = ServerPrivacy(dp, num_clients=20, clients_per_round=5, delta=1e-5, max_epsilon=None)
    doubled = ServerPrivacy(dp, num_clients=20, clients_per_round=5, delta=1e-5,
                            max_epsilon=None, accountant="doubled")

    e_plain = plain.end_round(list(range(5)), [])
    e_doubled = doubled.end_round(list(range(5)), [])

    assert e_doubled == pytest.approx(2 * e_plain)
    assert doubled.privacy_block()["epsilon_by_accountant"]["rdp"] == pytest.approx(e_plain)


@pytest.mark.usefixtures("restore_registries")
def test_duplicates_are_refused_unless_forced() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_mechanism("local", HalfShare)
    with pytest.raises(ValueError, match="already registered"):
        register_accountant("rdp", DoubledRdp)

    register_mechanism("local", HalfShare, force=True)

    assert isinstance(get_mechanism("local"), HalfShare)


def test_registry_rejects_bad_names_and_classes() -> None:
    with pytest.raises(ValueError, match="lower-case"):
        register_mechanism("Bad Name", HalfShare)
    with pytest.raises(TypeError, match="DpMechanism"):
        register_mechanism("thing", int)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown DP mechanism 'nope'"):
        get_mechanism("nope")


def test_unknown_mode_lists_the_registered_ones() -> None:
    with pytest.raises(ValueError, match="distributed"):
        parse_dp("central:clip=1,noise=1")


def test_release_json_round_trip() -> None:
    release = GaussianRelease(0.5, "replace-one", "fixed", 50, 10)
    assert GaussianRelease.from_json(release.to_json()) == release
    with pytest.raises(ValueError, match="noise_multiplier"):
        GaussianRelease(0.0, "replace-one")


def test_accountant_interface_is_abstract() -> None:
    with pytest.raises(TypeError):
        Accountant()  # type: ignore[abstract]
    assert math.isfinite(RdpGaussianAccountant().get_epsilon(1e-5))


def test_device_import_does_not_load_the_accountant() -> None:
    # Execute: a fresh interpreter imports what a device runs.
    code = (
        "import flowerpress.privacy.mod, sys; "
        "print(sorted(m for m in ('dp_accounting', 'scipy') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=120,
    )

    # Assert
    assert out.stdout.strip() == "[]", out.stderr


def test_every_public_name_still_imports_from_the_package() -> None:
    import flowerpress.privacy as privacy

    for name in privacy.__all__:
        assert getattr(privacy, name) is not None
    assert np.isfinite(privacy.epsilon_after(
        noise_multiplier=1.0, rounds=2, delta=1e-5, num_clients=50, clients_per_round=10))
