"""Local training and evaluation."""

from __future__ import annotations

import numpy as np
import torch

from flowerpress.tasks import data
from flowerpress.tasks.models import build_model, get_weights
from flowerpress.tasks.training import TrainSettings, evaluate, train


def test_training_lowers_the_loss() -> None:
    # Prepare
    split = data.load_partition("digits", "iid", 0, 2, 0)
    model = build_model("digits", tuple(split.x.shape[1:]), 10, seed=0)
    before = evaluate(model, split.x, split.y)
    # Execute
    train(model, split.x, split.y, TrainSettings(local_epochs=3, lr=0.1),
          generator=torch.Generator().manual_seed(0))
    after = evaluate(model, split.x, split.y)
    # Assert
    assert after.loss < before.loss - 0.3
    assert after.accuracy > before.accuracy + 0.3


def test_proximal_term_keeps_weights_closer_to_the_start() -> None:
    # Prepare
    split = data.load_partition("digits", "iid", 0, 2, 0)
    plain = build_model("digits", tuple(split.x.shape[1:]), 10, seed=0)
    prox = build_model("digits", tuple(split.x.shape[1:]), 10, seed=0)
    start = get_weights(plain)
    # Execute
    for model, mu in ((plain, 0.0), (prox, 10.0)):
        train(model, split.x, split.y, TrainSettings(local_epochs=2, lr=0.05, proximal_mu=mu),
              generator=torch.Generator().manual_seed(0))

    def dist(w: list[np.ndarray]) -> float:
        return float(sum(np.sum((a - b) ** 2) for a, b in zip(w, start, strict=True)))

    # Assert
    assert dist(get_weights(prox)) < 0.8 * dist(get_weights(plain))


def test_same_generator_same_result() -> None:
    # Prepare
    split = data.load_partition("digits", "iid", 1, 2, 0)
    models = [build_model("digits", tuple(split.x.shape[1:]), 10, seed=3) for _ in range(2)]
    # Execute
    for model in models:
        train(model, split.x, split.y, TrainSettings(), generator=torch.Generator().manual_seed(5))
    # Assert
    for a, b in zip(get_weights(models[0]), get_weights(models[1]), strict=True):
        np.testing.assert_array_equal(a, b)
