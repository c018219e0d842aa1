"""The run-config schema: one set of keys for flwr run, the CLI and Python."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from flowerpress.config import DEFAULTS, ConfigError, load_toml, parse_assignments, validate

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_match_the_flower_app_config() -> None:
    # Prepare
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    # Assert
    assert pyproject["tool"]["flwr"]["app"]["config"] == DEFAULTS


def test_strings_are_typed() -> None:
    # Execute
    config = validate({"rounds": "3", "lr": "0.1", "dataset": "digits"})
    # Assert
    assert config["rounds"] == 3 and config["lr"] == 0.1 and config["dataset"] == "digits"


@pytest.mark.parametrize(("values", "message"), [
    ({"rounds": "abc"}, "rounds='abc' is not allowed"),
    ({"rounds": "0"}, "must be >= 1"),
    ({"lr": "nan"}, "finite"),
    ({"bogus": "1"}, "unknown key 'bogus'"),
    ({"partition": "dirichlet:-1"}, "partition="),
    ({"dataset": "cifar"}, "dataset='cifar' is not allowed"),
    ({"clients-per-round": "60"}, "must be <= num-clients"),
    ({"compression": "q:99"}, "compression='q:99' is not allowed"),
    ({"strategy": "nope"}, "strategy='nope' is not allowed"),
    ({"dp": "local:clip=-1,noise=1"}, "dp="),
])
def test_bad_values_name_the_key(values: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        validate(values)
    assert "\n" not in str(info.value)


def test_unknown_keys_are_ignored_for_flower_run_config() -> None:
    assert "other" not in validate({"other": 1}, strict=False)


def test_assignments_and_toml(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "run.toml"
    path.write_text('rounds = 4\ndataset = "digits"\n')
    # Execute / Assert
    assert parse_assignments(["a=b=c"]) == {"a": "b=c"}
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_assignments(["novalue"])
    assert load_toml(path) == {"rounds": 4, "dataset": "digits"}
    with pytest.raises(ConfigError, match="not found"):
        load_toml(tmp_path / "missing.toml")
