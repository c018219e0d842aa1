"""Plug-in aggregation strategies.

A strategy implements the aggregation math only; the server owns the round
loop and hands each validated reply to the strategy as a
:class:`ClientUpdate`. Select one with the run-config key ``strategy`` (see
:func:`build_strategy` for the spec grammar) or register your own with
:func:`register_strategy`.
"""

from flowerpress.strategies.base import (
    BatchStrategy,
    ClientUpdate,
    ConfigValue,
    MeanStrategy,
    NDArray,
    Strategy,
    StrategyError,
)
from flowerpress.strategies.fedavg import FedAvg, FedAvgM, FedProx
from flowerpress.strategies.fedopt import FedAdagrad, FedAdam, FedYogi
from flowerpress.strategies.flwr_adapter import FlwrStrategy
from flowerpress.strategies.registry import (
    available_strategies,
    build_strategy,
    register_strategy,
)
from flowerpress.strategies.robust import Krum, Median, MultiKrum, TrimmedMean

__all__ = [
    "BatchStrategy",
    "ClientUpdate",
    "ConfigValue",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedProx",
    "FedYogi",
    "FlwrStrategy",
    "Krum",
    "MeanStrategy",
    "Median",
    "MultiKrum",
    "NDArray",
    "Strategy",
    "StrategyError",
    "TrimmedMean",
    "available_strategies",
    "build_strategy",
    "register_strategy",
]
