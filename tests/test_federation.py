"""The federation checks the ServerApp runs before the first round."""

from __future__ import annotations

import pytest

from flowerpress.config import Config, validate
from flowerpress.federation import federation_mismatch, runtime_env_mismatch


def _config(*, num_clients: int, clients_per_round: int) -> Config:
    return validate({"num-clients": num_clients, "clients-per-round": clients_per_round})


def test_matching_federation_passes() -> None:
    # Prepare
    config = _config(num_clients=10, clients_per_round=5)

    # Execute / Assert
    assert federation_mismatch(10, config) is None


@pytest.mark.parametrize("found", [2, 9, 11])
def test_other_size_is_one_line_naming_both_numbers_and_the_fix(found: int) -> None:
    # Prepare: Flower's managed local SuperLink defaults to 2 simulated nodes.
    config = _config(num_clients=10, clients_per_round=5)

    # Execute
    line = federation_mismatch(found, config)

    # Assert
    assert line is not None
    assert "\n" not in line
    assert f"has {found} nodes" in line
    assert "num-clients=10" in line
    assert "--federation-config num-supernodes=10" in line
    assert f"set num-clients={found}" in line


def test_no_nodes_does_not_suggest_zero_clients() -> None:
    # Execute
    line = federation_mismatch(0, _config(num_clients=4, clients_per_round=2))

    # Assert
    assert line is not None
    assert "num-clients=0" not in line
    assert "num-supernodes=4" in line


def test_flower_runtime_env_is_named() -> None:
    # Prepare: what flwr's dependency installer sets after `uv sync` into a per-run env.
    environ = {"VIRTUAL_ENV": "/home/me/.flwr/runtime-envs/2703377518850630963"}

    # Execute
    line = runtime_env_mismatch(environ)

    # Assert
    assert line is not None
    assert "\n" not in line
    assert "/home/me/.flwr/runtime-envs/2703377518850630963" in line
    assert "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in line


@pytest.mark.parametrize("environ", [{}, {"VIRTUAL_ENV": ""},
                                     {"VIRTUAL_ENV": "/work/flowerpress/.venv"},
                                     {"VIRTUAL_ENV": "/srv/runtime-envs"}])
def test_installed_environment_passes(environ: dict[str, str]) -> None:
    assert runtime_env_mismatch(environ) is None
