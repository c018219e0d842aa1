"""A ready task for a PyTorch classifier: bring a model and your data, nothing else.

Local training is plain mini-batch SGD with cross-entropy for a number of
local epochs, as in FedAvg (McMahan et al., AISTATS 2017), with FedProx's
proximal term when the strategy asks for it (Li et al., MLSys 2020).
Evaluation reports loss, accuracy and macro-F1. Training reports the FLOPs it
spent, counted with PyTorch's FLOP counter once per batch shape
(:mod:`flowerpress.tasks.flops`).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from flowerpress.tasks.base import (
    Evaluation,
    Scalar,
    Task,
    TaskError,
    TrainContext,
    TrainResult,
    Weights,
)
from flowerpress.tasks.data import Split
from flowerpress.tasks.flops import training_flops
from flowerpress.tasks.models import get_weights, set_weights
from flowerpress.tasks.training import TrainSettings, evaluate, train


def as_split(data: Any, what: str) -> Split:
    """``data`` as a :class:`Split`: a Split or an ``(x, y)`` pair of arrays."""
    if isinstance(data, Split):
        return data
    if isinstance(data, tuple) and len(data) == 2:
        x = np.asarray(data[0], dtype=np.float32)
        y = np.asarray(data[1], dtype=np.int64)
        if x.ndim < 1 or y.ndim != 1 or len(x) != len(y):
            raise TaskError(f"{what}: x has shape {x.shape} and y {y.shape}; expected "
                            "(n, ...) features and (n,) integer labels")
        return Split(x, y)
    raise TaskError(f"{what}: expected (x, y) arrays or a Split, got {type(data).__name__}")


def torch_generator(seed: int) -> torch.Generator:
    """A torch generator seeded from a non-negative integer."""
    return torch.Generator().manual_seed(int(seed) & ((1 << 63) - 1))


class TorchClassifierTask(Task):
    """A PyTorch classifier trained with local SGD.

    Subclasses implement :meth:`build_model` and :meth:`load_data` (returning
    ``(x, y)`` arrays: float features, integer labels) and optionally
    :meth:`central_data` (the same form).

    Parameters
    ----------
    local_epochs : int
        Passes over the node's data per round.
    batch_size : int
        Mini-batch size.
    lr : float
        SGD learning rate.
    seed : int
        Seeds the initial weights.
    """

    def __init__(self, *, local_epochs: int = 1, batch_size: int = 32, lr: float = 0.05,
                 seed: int = 0) -> None:
        if local_epochs < 1:
            raise ValueError(f"local_epochs must be >= 1, got {local_epochs!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
        self.local_epochs = local_epochs
        self.batch_size = batch_size
        self.lr = lr
        self.seed = seed
        self._model: nn.Module | None = None
        self._sample_shape: tuple[int, ...] | None = None

    @abstractmethod
    def build_model(self) -> nn.Module:
        """A fresh model (its initial weights are seeded by :meth:`initial_weights`)."""

    @property
    def model(self) -> nn.Module:
        """The model this process trains and evaluates in (built once)."""
        if self._model is None:
            self._model = self._seeded_model()
        return self._model

    def _seeded_model(self) -> nn.Module:
        # fork_rng keeps the caller's global generator untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return self.build_model()

    def initial_weights(self) -> Weights:
        """The seeded model's ``state_dict`` as float32 arrays."""
        return get_weights(self._seeded_model())

    def hyperparameters(self) -> Mapping[str, Scalar]:
        """``local-epochs``, ``batch-size``, ``lr`` and ``seed`` (of the initial weights)."""
        return {"local-epochs": self.local_epochs, "batch-size": self.batch_size,
                "lr": self.lr, "seed": self.seed}

    def train(self, weights: Weights, data: Any, context: TrainContext) -> TrainResult:
        """SGD for ``local_epochs`` from ``weights``; metrics train-loss and local-steps."""
        split = as_split(data, "training data")
        torch.set_num_threads(1)  # simulated nodes share the machine's cores
        model = self.model
        set_weights(model, weights)
        mu = context.config.get("proximal-mu", 0.0)
        settings = TrainSettings(local_epochs=self.local_epochs, batch_size=self.batch_size,
                                 lr=self.lr,
                                 proximal_mu=float(mu) if isinstance(mu, int | float) else 0.0)
        loss = train(model, split.x, split.y, settings, generator=torch_generator(context.seed),
                     mask=context.mask)
        steps = self.local_epochs * math.ceil(len(split) / self.batch_size)
        self._sample_shape = tuple(int(d) for d in split.x.shape[1:])
        flops = training_flops(model, self._sample_shape, num_examples=len(split),
                               batch_size=self.batch_size, epochs=self.local_epochs)
        return TrainResult(get_weights(model), len(split),
                           {"train-loss": float(loss), "local-steps": float(steps)},
                           flops=float(flops))

    def sample_shape(self) -> tuple[int, ...] | None:
        """The shape of one input example (no batch axis), or ``None`` if not known yet.

        The shape of the data this task last trained on, else of
        :meth:`central_data`'s features. Subclasses that know it without data
        (the bundled tasks) override it; the server's FLOP bound and
        ``flowerpress export`` use it.
        """
        if self._sample_shape is None:
            central = self.central_data()
            if central is not None:
                x = as_split(central, "central data").x
                self._sample_shape = tuple(int(d) for d in x.shape[1:])
        return self._sample_shape

    def train_flops(self, num_examples: int) -> float | None:
        """FLOPs of ``local_epochs`` passes of SGD over ``num_examples`` examples.

        Counted with PyTorch's FLOP counter on this task's model (one step per
        batch shape, :func:`flowerpress.tasks.flops.training_flops`); ``None``
        while the input shape is unknown (:meth:`sample_shape`).
        """
        shape = self.sample_shape()
        if shape is None:
            return None
        return float(training_flops(self.model, shape, num_examples=int(num_examples),
                                    batch_size=self.batch_size, epochs=self.local_epochs))

    def evaluate(self, weights: Weights, data: Any) -> Evaluation:
        """Loss, accuracy and macro-F1 of ``weights`` on ``data``."""
        split = as_split(data, "evaluation data")
        model = self.model
        set_weights(model, weights)
        res = evaluate(model, split.x, split.y)
        return Evaluation(res.num_examples, res.loss, res.accuracy, {"f1_macro": res.f1_macro})


def run_config_int(run_config: Mapping[str, Scalar], key: str, default: int) -> int:
    """An integer run-config value (the run config is validated by the server)."""
    value = run_config.get(key, default)
    return int(value) if isinstance(value, int | float | str) else default
