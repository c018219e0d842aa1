"""Small models for the bundled datasets.

A CNN for 28x28 images (MNIST), a one-hidden-layer MLP for flat features
(scikit-learn digits), and multinomial logistic regression for FedProx's
Synthetic data (the model Li et al. 2020 train on it).
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

Weights = list[NDArray[np.float32]]


class MnistCNN(nn.Module):
    """Two 5x5 convolutions and two dense layers (about 100k parameters).

    A slimmed version of the CNN McMahan et al. use for MNIST in
    "Communication-Efficient Learning of Deep Networks from Decentralized
    Data" (AISTATS 2017), sized for 2-core simulation.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, side: int = 28) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        flat = 32 * (side // 4) * (side // 4)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(flat, 64), nn.ReLU(),
                                  nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.features(x))
        return out


class MLP(nn.Module):
    """One hidden layer of ReLU units."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(),
                                 nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


class LogisticRegression(nn.Module):
    """Multinomial logistic regression (the Synthetic model of FedProx)."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.linear(x.flatten(1))
        return out


MODELS = ("auto", "cnn", "mlp", "logreg")


def build_model(dataset: str, sample_shape: tuple[int, ...], num_classes: int,
                *, seed: int, kind: str = "auto") -> nn.Module:
    """The model for ``dataset``, initialised from ``seed``.

    Parameters
    ----------
    dataset
        The run config's dataset value; with ``kind="auto"`` it decides the
        architecture: logistic regression for Synthetic, the CNN for square
        images, the MLP otherwise.
    sample_shape
        Shape of one input row (without the batch axis).
    num_classes
        Number of output classes.
    seed
        Seeds the initial weights, so every process builds the same model.
    kind
        ``auto``, ``cnn``, ``mlp`` or ``logreg`` (run-config key ``model``).
    """
    if kind not in MODELS:
        raise ValueError(f"model {kind!r} is not known; expected one of {', '.join(MODELS)}")
    image = (len(sample_shape) == 3 and sample_shape[1] == sample_shape[2] >= 8
             and sample_shape[1] % 4 == 0)
    if kind == "auto":
        kind = "logreg" if dataset.startswith("synthetic:") else "cnn" if image else "mlp"
    if kind == "cnn" and not image:
        raise ValueError(f"model 'cnn' needs square images with a side divisible by 4, "
                         f"got samples of shape {sample_shape}")
    # fork_rng keeps the caller's global generator untouched: the seed only
    # affects this initialisation.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "logreg":
            return LogisticRegression(int(np.prod(sample_shape)), num_classes)
        if kind == "cnn":
            return MnistCNN(sample_shape[0], num_classes, sample_shape[1])
        return MLP(int(np.prod(sample_shape)), num_classes)


def get_weights(model: nn.Module) -> Weights:
    """The model's parameters and buffers as float32 arrays, in state_dict order."""
    return [v.detach().cpu().numpy().astype(np.float32, copy=True)
            for v in model.state_dict().values()]


def set_weights(model: nn.Module, weights: Weights) -> None:
    """Load float32 arrays (state_dict order) into ``model``."""
    keys = list(model.state_dict().keys())
    if len(keys) != len(weights):
        raise ValueError(f"model has {len(keys)} tensors, got {len(weights)} arrays")
    state = {k: torch.from_numpy(np.asarray(w, dtype=np.float32).copy())
             for k, w in zip(keys, weights, strict=True)}
    model.load_state_dict(state, strict=True)
