"""Registry and the ``strategy`` spec parser."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from flowerpress.strategies import (
    ClientUpdate,
    FedAvg,
    FedAvgM,
    FedProx,
    FlwrStrategy,
    MultiKrum,
    NDArray,
    Strategy,
    StrategyError,
    TrimmedMean,
    available_strategies,
    build_strategy,
    register_strategy,
)
from flowerpress.strategies import registry as registry_module

REPO = Path(__file__).resolve().parents[2]
BUILTINS = [
    "fedadagrad",
    "fedadam",
    "fedavg",
    "fedavgm",
    "fedprox",
    "fedyogi",
    "krum",
    "median",
    "multikrum",
    "trimmed-mean",
]


@pytest.fixture
def restore_registry() -> Iterator[None]:
    saved = dict(registry_module._REGISTRY)
    try:
        yield
    finally:
        registry_module._REGISTRY.clear()
        registry_module._REGISTRY.update(saved)


class _Typed(Strategy):
    """A strategy exercising every supported argument type."""

    def __init__(
        self, *, a: int = 1, b: float = 0.5, c: bool = False, d: str = "x", e: int | None = None
    ) -> None:
        self.args = (a, b, c, d, e)

    def begin_round(self, server_round: int, global_weights: Sequence[NDArray]) -> None:
        self.g = list(global_weights)

    def add(self, update: ClientUpdate) -> None:
        pass

    def result(self) -> list[NDArray]:
        return self.g


@dataclass
class _DataclassStrategy(FedAvg):
    """A dataclass-style strategy: fields are the spec arguments."""

    scale: float = 1.0
    name: str = "dc"


def test_builtins_are_registered() -> None:
    assert available_strategies() == BUILTINS


@pytest.mark.parametrize("name", BUILTINS)
def test_every_builtin_builds_with_defaults(name: str) -> None:
    assert isinstance(build_strategy(name), Strategy)


def test_spec_arguments_reach_the_constructor() -> None:
    # Execute
    prox = build_strategy("fedprox:mu=0.3")
    avgm = build_strategy(" fedavgm:lr=0.5, momentum=0.8 ")
    mk = build_strategy("multikrum:f=2,m=none")
    tm = build_strategy("trimmed-mean:beta=0.25")
    # Assert
    assert isinstance(prox, FedProx) and prox.mu == 0.3
    assert isinstance(avgm, FedAvgM) and (avgm.lr, avgm.momentum) == (0.5, 0.8)
    assert isinstance(mk, MultiKrum) and (mk.f, mk.m) == (2, None)
    assert isinstance(tm, TrimmedMean) and tm.beta == 0.25


def test_values_are_converted_per_annotation(restore_registry: None) -> None:
    # Prepare
    register_strategy("typed", _Typed)
    # Execute
    s = build_strategy("typed:a=3,b=2,c=true,d=hello,e=7")
    t = build_strategy("typed:c=0,e=None")
    # Assert
    assert isinstance(s, _Typed) and s.args == (3, 2.0, True, "hello", 7)
    assert isinstance(s.args[1], float)
    assert isinstance(t, _Typed) and t.args == (1, 0.5, False, "x", None)


def test_dataclass_fields_are_spec_arguments(restore_registry: None) -> None:
    # Prepare
    register_strategy("dc", _DataclassStrategy)
    # Execute
    s = build_strategy("dc:scale=3,name=y")
    # Assert
    assert isinstance(s, _DataclassStrategy) and (s.scale, s.name) == (3.0, "y")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nope", r"^unknown strategy 'nope'; available: fedadagrad, fedadam, .*trimmed-mean"),
        ("", "empty strategy spec"),
        ("fedprox:m=1", r"unknown argument 'm'; allowed: mu$"),
        ("fedprox:mu", r"expected ARG=VALUE, got 'mu'; allowed: mu$"),
        ("fedprox:mu=abc", r"argument mu='abc' is not a valid float$"),
        ("fedprox:mu=-1", r"mu must be finite and >= 0"),
        ("fedprox:mu=1,mu=2", "given twice"),
        ("krum:f=1.5", r"argument f='1.5' is not a valid int$"),
        ("multikrum:m=x", "not a valid int or none"),
        ("fedavg:lr=1", r"unknown argument 'lr'; allowed: none$"),
        ("fedadagrad:beta2=0.9", r"allowed: beta1, lr, tau$"),
    ],
)
def test_bad_specs_raise_one_line_strategy_error(spec: str, message: str) -> None:
    with pytest.raises(StrategyError, match=message) as info:
        build_strategy(spec)
    assert isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)


def test_register_refuses_duplicates_unless_forced(restore_registry: None) -> None:
    # Prepare
    register_strategy("mine", _Typed)
    # Execute / Assert
    with pytest.raises(ValueError, match="already registered"):
        register_strategy("mine", FedAvg)
    with pytest.raises(ValueError, match="already registered"):
        register_strategy("fedavg", _Typed)
    register_strategy("mine", FedAvg, force=True)
    assert isinstance(build_strategy("mine"), FedAvg)
    assert "mine" in available_strategies()


@pytest.mark.parametrize("name", ["Bad", "a.b", "a:b", "flwr", "", "-x"])
def test_register_refuses_malformed_names(name: str, restore_registry: None) -> None:
    with pytest.raises(ValueError, match="strategy name"):
        register_strategy(name, FedAvg)


def test_register_refuses_non_strategies(restore_registry: None) -> None:
    with pytest.raises(TypeError, match="Strategy subclass"):
        register_strategy("obj", object)  # type: ignore[arg-type]


def test_import_path_builds_user_class() -> None:
    # Execute
    s = build_strategy("flowerpress.strategies.fedavg:FedProx:mu=0.5")
    # Assert
    assert isinstance(s, FedProx) and s.mu == 0.5


def test_import_path_resolves_against_the_working_directory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: the example lives in the repo, which need not be on sys.path
    monkeypatch.chdir(REPO)
    # Execute
    s = build_strategy("examples.custom_strategy.norm_bounded_mean:NormBoundedMean:max_norm=2")
    # Assert
    assert type(s).__name__ == "NormBoundedMean"
    assert s.max_norm == 2.0  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_pkg.mod:Thing", "cannot import 'no_such_pkg.mod'"),
        ("flowerpress.strategies:Nope", r"has no Strategy subclass 'Nope'; found: .*FedAvg"),
        ("flowerpress.strategies.base:NDArray", "has no Strategy subclass 'NDArray'"),
        ("flowerpress.strategies", "import path needs a class"),
    ],
)
def test_bad_import_paths(spec: str, message: str) -> None:
    with pytest.raises(StrategyError, match=message):
        build_strategy(spec)


def test_flwr_prefix_builds_the_adapter() -> None:
    # Execute
    s = build_strategy("flwr:MultiKrum:num-malicious-nodes=1,num_nodes_to_select=2")
    # Assert
    assert isinstance(s, FlwrStrategy)
    assert (s.strategy.num_malicious_nodes, s.strategy.num_nodes_to_select) == (1, 2)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("flwr:Nope", r"unknown Flower strategy 'Nope' .*available: Bulyan, .*FedMedian"),
        ("flwr:FedMedian:beta=1", r"unknown argument 'beta'; allowed: .*min_train_nodes"),
        (
            "flwr:DifferentialPrivacyServerSideFixedClipping",
            "needs argument\\(s\\) a spec cannot give: strategy",
        ),
    ],
)
def test_bad_flwr_specs(spec: str, message: str) -> None:
    with pytest.raises(StrategyError, match=message):
        build_strategy(spec)


def test_built_strategy_runs_a_round() -> None:
    # Prepare
    s = build_strategy("trimmed-mean:beta=0.2")
    g = [np.zeros(3, np.float32)]
    # Execute
    s.begin_round(1, g)
    for v in (1.0, 2.0, 3.0, 4.0, 100.0):
        s.add(ClientUpdate([np.full(3, v, np.float32)], 1.0, int(v)))
    # Assert
    np.testing.assert_allclose(s.result()[0], 3.0)
