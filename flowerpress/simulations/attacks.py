"""Simulated Byzantine clients for robustness experiments.

A spec string selects the attack (run-config key ``attack``)::

    none
    signflip:fraction=0.2,scale=10     send -scale * (honest delta)
    noise:fraction=0.2,std=1.0         send pure Gaussian noise N(0, std^2)

The malicious set is deterministic: the first ``round_half_up(fraction *
num_partitions)`` partition ids. A malicious client replaces its delta with
:meth:`Attack.apply` right after local training, before privacy and
compression, so the attack goes through the same pipeline as honest updates.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from flowerpress.tasks.base import (
    Evaluation,
    Scalar,
    Task,
    TrainContext,
    TrainResult,
    Weights,
)

NDArray = npt.NDArray[Any]


def _check_fraction(fraction: float) -> None:
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")


@dataclass(frozen=True)
class Attack(ABC):
    """A model-poisoning behaviour shared by a deterministic fraction of clients.

    Parameters
    ----------
    fraction : float
        Share of partitions that are malicious, in ``[0, 1]``.
    """

    name: ClassVar[str]
    fraction: float = 0.2

    def __post_init__(self) -> None:
        _check_fraction(self.fraction)

    def num_malicious(self, num_partitions: int) -> int:
        """Return how many of ``num_partitions`` partitions are malicious (rounded half up)."""
        if num_partitions < 1:
            raise ValueError(f"num_partitions must be >= 1, got {num_partitions!r}")
        # The epsilon absorbs binary rounding (0.15 * 10 == 1.4999999999999998).
        return min(num_partitions, math.floor(self.fraction * num_partitions + 0.5 + 1e-9))

    def is_malicious(self, partition_id: int, num_partitions: int) -> bool:
        """Return whether ``partition_id`` is one of the first ``num_malicious`` partitions."""
        if not 0 <= partition_id < num_partitions:
            raise ValueError(f"partition_id must be in [0, {num_partitions}), got {partition_id!r}")
        return partition_id < self.num_malicious(num_partitions)

    @abstractmethod
    def apply(self, delta: list[NDArray], *, rng: np.random.Generator) -> list[NDArray]:
        """Return the malicious delta that replaces the honest ``delta`` (float32)."""


@dataclass(frozen=True)
class SignFlip(Attack):
    """Sign-flipping attack: send ``-scale`` times the honest update.

    A standard model-poisoning baseline for Byzantine-robust aggregation, used
    e.g. by Li et al., "RSA: Byzantine-Robust Stochastic Aggregation Methods
    for Distributed Learning from Heterogeneous Datasets", AAAI 2019,
    https://arxiv.org/abs/1811.03761, and Karimireddy et al., "Learning from
    History for Byzantine Robust Optimization", ICML 2021.

    Parameters
    ----------
    fraction : float
        Share of malicious partitions, in ``[0, 1]``.
    scale : float
        Magnitude of the flipped update, ``> 0``.
    """

    name: ClassVar[str] = "signflip"
    scale: float = 10.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not math.isfinite(self.scale) or self.scale <= 0.0:
            raise ValueError(f"scale must be finite and > 0, got {self.scale!r}")

    def apply(self, delta: list[NDArray], *, rng: np.random.Generator) -> list[NDArray]:
        """Return ``-scale * delta`` (``rng`` is unused: the attack is deterministic)."""
        del rng
        return [(-self.scale * np.asarray(d, dtype=np.float32)).astype(np.float32) for d in delta]


@dataclass(frozen=True)
class GaussianNoise(Attack):
    """Gaussian attack: send noise ``N(0, std^2)`` of the update's shape instead of the update.

    The "Gaussian Byzantine" workers of Blanchard et al., "Machine Learning
    with Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017,
    https://papers.nips.cc/paper/6617.

    Parameters
    ----------
    fraction : float
        Share of malicious partitions, in ``[0, 1]``.
    std : float
        Standard deviation of the noise, ``> 0``.
    """

    name: ClassVar[str] = "noise"
    std: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not math.isfinite(self.std) or self.std <= 0.0:
            raise ValueError(f"std must be finite and > 0, got {self.std!r}")

    def apply(self, delta: list[NDArray], *, rng: np.random.Generator) -> list[NDArray]:
        """Return fresh Gaussian noise drawn from ``rng``, one array per layer."""
        return [rng.normal(0.0, self.std, size=np.shape(d)).astype(np.float32) for d in delta]


_ATTACKS: dict[str, type[Attack]] = {cls.name: cls for cls in (SignFlip, GaussianNoise)}
_ARGS: dict[str, tuple[str, ...]] = {
    "signflip": ("fraction", "scale"),
    "noise": ("fraction", "std"),
}


def parse_attack(spec: str) -> Attack | None:
    """Parse an attack spec; ``"none"`` (or empty) means no attack.

    Parameters
    ----------
    spec : str
        ``none``, ``signflip[:fraction=F,scale=S]`` or ``noise[:fraction=F,std=S]``.

    Raises
    ------
    ValueError
        One line naming the known attacks or the allowed arguments.
    """
    text = spec.strip()
    name, _, args = text.partition(":")
    name = name.strip().lower()
    if name in ("", "none"):
        if args.strip():
            raise ValueError(f"attack {spec!r}: 'none' takes no arguments")
        return None
    cls = _ATTACKS.get(name)
    if cls is None:
        raise ValueError(f"unknown attack {name!r}; available: none, {', '.join(sorted(_ATTACKS))}")
    allowed = _ARGS[name]
    kwargs: dict[str, float] = {}
    for item in filter(None, (a.strip() for a in args.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in allowed:
            raise ValueError(
                f"attack {spec!r}: bad argument {item!r}; allowed: {', '.join(allowed)}"
            )
        try:
            kwargs[key] = float(value)
        except ValueError:
            raise ValueError(f"attack {spec!r}: {key}={value.strip()!r} is not a number") from None
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise ValueError(f"attack {spec!r}: {exc}") from None


@dataclass(frozen=True)
class _NodeData:
    """A node's data with the partition it holds (decides whether it attacks)."""

    inner: Any
    partition_id: int
    num_partitions: int


class AttackedTask(Task):
    """A task whose malicious partitions replace their update with an attack's.

    Used only by simulations (:mod:`flowerpress.simulations.app`): a device's
    ClientApp never wraps its task. The malicious delta is applied right
    after local training, before privacy and compression, so it travels the
    same path as an honest update.

    Parameters
    ----------
    inner : Task
        The honest task.
    attack : Attack
        What the malicious partitions send.
    """

    def __init__(self, inner: Task, attack: Attack) -> None:
        self.inner = inner
        self.attack = attack

    def initial_weights(self) -> Weights:
        """The inner task's."""
        return self.inner.initial_weights()

    def load_data(self, node_config: Mapping[str, Scalar]) -> _NodeData:
        """The inner task's data and the node's partition id (-1 when it has none)."""
        pid, n = node_config.get("partition-id"), node_config.get("num-partitions")
        inner = self.inner.load_data(node_config)
        if isinstance(pid, int) and isinstance(n, int) and 0 <= pid < n:
            return _NodeData(inner, pid, n)
        return _NodeData(inner, -1, 0)

    def train(self, weights: Weights, data: Any, context: TrainContext) -> TrainResult:
        """Honest training, then the attack's delta on malicious partitions."""
        node = data if isinstance(data, _NodeData) else _NodeData(data, -1, 0)
        result = self.inner.train(weights, node.inner, context)
        if node.num_partitions == 0 or not self.attack.is_malicious(node.partition_id,
                                                                    node.num_partitions):
            return result
        rng = np.random.default_rng([context.seed, 7])
        delta = [np.asarray(w, dtype=np.float32) - g
                 for w, g in zip(result.weights, weights, strict=True)]
        delta = self.attack.apply(delta, rng=rng)
        attacked = [(g + d).astype(np.float32) for g, d in zip(weights, delta, strict=True)]
        return TrainResult(attacked, result.num_examples, result.metrics, flops=result.flops)

    def train_flops(self, num_examples: int) -> float | None:
        """The inner task's."""
        return self.inner.train_flops(num_examples)

    def evaluate(self, weights: Weights, data: Any) -> Evaluation:
        """The inner task's (attackers evaluate honestly)."""
        inner = data.inner if isinstance(data, _NodeData) else data
        return self.inner.evaluate(weights, inner)

    def central_data(self) -> Any | None:
        """The inner task's."""
        return self.inner.central_data()


def with_attack(task: Task, run_config: Mapping[str, Scalar]) -> Task:
    """``task`` wrapped with the run config's ``attack`` (unchanged for ``none``)."""
    attack = parse_attack(str(run_config.get("attack", "none")))
    return task if attack is None else AttackedTask(task, attack)
