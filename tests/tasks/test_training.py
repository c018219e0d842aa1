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


def test_the_step_is_torch_sgds_to_the_bit_and_loads_no_torch_dynamo() -> None:
    # Prepare: a reference loop with torch.optim.SGD, the same batches and proximal term
    from torch import nn

    from flowerpress.testing import modules_loaded

    split = data.load_partition("digits", "iid", 0, 2, 0)
    ours = build_model("digits", tuple(split.x.shape[1:]), 10, seed=0)
    ref = build_model("digits", tuple(split.x.shape[1:]), 10, seed=0)
    settings = TrainSettings(local_epochs=2, batch_size=16, lr=0.1, proximal_mu=0.01)
    anchor = [p.detach().clone() for p in ref.parameters()]
    opt = torch.optim.SGD(ref.parameters(), lr=settings.lr)
    xt, yt, gen = torch.from_numpy(split.x), torch.from_numpy(split.y), torch.Generator()
    gen.manual_seed(3)
    for _ in range(settings.local_epochs):
        order = torch.randperm(len(yt), generator=gen)
        for start in range(0, len(yt), settings.batch_size):
            idx = order[start:start + settings.batch_size]
            opt.zero_grad()
            loss = nn.CrossEntropyLoss()(ref(xt[idx]), yt[idx]) + 0.5 * settings.proximal_mu * sum(
                ((p - a) ** 2).sum() for p, a in zip(ref.parameters(), anchor, strict=True))
            loss.backward()
            opt.step()
    # Execute
    train(ours, split.x, split.y, settings, generator=torch.Generator().manual_seed(3))
    _, loaded = modules_loaded(
        "import torch; from flowerpress.tasks import data; "
        "from flowerpress.tasks.models import build_model; "
        "from flowerpress.tasks.training import TrainSettings, train; "
        "s = data.load_partition('digits', 'iid', 0, 2, 0); "
        "m = build_model('digits', tuple(s.x.shape[1:]), 10, seed=0); "
        "train(m, s.x, s.y, TrainSettings(), generator=torch.Generator().manual_seed(0))",
        ["torch._dynamo"], timeout=120)
    # Assert: the same weights, bit for bit; no TorchDynamo in a device's process
    for a, b in zip(get_weights(ours), get_weights(ref), strict=True):
        np.testing.assert_array_equal(a, b)
    assert loaded == []
