"""FLOPs of local training: PyTorch's FLOP formulas, counted once per model, times the batches."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from flowerpress.tasks import TorchClassifierTask, TrainContext
from flowerpress.tasks import flops as flops_module
from flowerpress.tasks.base import Scalar
from flowerpress.tasks.bundled import Digits
from flowerpress.tasks.flops import forward_flops, training_flops, training_step_flops
from flowerpress.testing import modules_loaded


def _model() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                             nn.Dropout(0.5), nn.Linear(4 * 6 * 6, 10))


def test_the_count_is_flop_counter_modes_on_a_real_step_and_touches_nothing() -> None:
    # Prepare: a real step counted on the CPU
    model, real = _model(), _model()
    x, y = torch.randn(5, 1, 8, 8), torch.randint(0, 10, (5,))
    with FlopCounterMode(display=False) as counter:
        nn.functional.cross_entropy(real(x), y).backward()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.random.get_rng_state()
    # Execute
    counted = training_step_flops(model, (5, 1, 8, 8))
    # Assert: the same count; weights, BatchNorm statistics, gradients and RNG untouched
    assert counted == counter.get_total_flops() > 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(rng, torch.random.get_rng_state())


def test_a_round_is_one_count_per_batch_shape_times_the_batches_run(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: count the traces
    traced: list[tuple[int, ...]] = []
    original = flops_module._trace_step

    def spy(model: nn.Module, shape: tuple[int, ...], loss: object) -> int:
        traced.append(shape)
        return original(model, shape, loss)  # type: ignore[arg-type]

    monkeypatch.setattr(flops_module, "_trace_step", spy)
    model = _model()
    # Execute: 3 epochs over 37 examples in batches of 16 (two full, one of 5), twice
    total = training_flops(model, (1, 8, 8), num_examples=37, batch_size=16, epochs=3)
    again = training_flops(model, (1, 8, 8), num_examples=37, batch_size=16, epochs=3)
    # Assert
    full, rest = training_step_flops(model, (16, 1, 8, 8)), training_step_flops(model,
                                                                                 (5, 1, 8, 8))
    assert total == again == 3 * (2 * full + rest)
    assert traced == [(1, 8, 8)]  # one step traced, scaled to both batch sizes
    assert forward_flops(model, (1, 8, 8)) > 0


class _Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.rnn, self.head = nn.Embedding(50, 16), nn.LSTM(16, 16), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.rnn(self.embed(x.long()).transpose(0, 1))
        return self.head(hidden[-1])  # type: ignore[no-any-return]


@pytest.mark.parametrize("make, sample", [
    (_model, (1, 8, 8)),
    (_Recurrent, (7,)),  # mkldnn's fused LSTM kernel would hide its matrix products
    (lambda: nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), (5, 16)),
], ids=["cnn-batchnorm-dropout", "lstm", "attention"])
def test_a_batch_counts_what_flop_counter_mode_counts_on_the_whole_batch(
        make: type[nn.Module], sample: tuple[int, ...]) -> None:
    # Prepare: PyTorch's own counter over a whole batch of 16, on the meta device
    model = make()
    batch = torch.zeros((16, *sample), device="meta")
    state = {k: torch.zeros_like(v, device="meta").requires_grad_(v.requires_grad)
             for k, v in (*model.named_parameters(), *model.named_buffers())}
    with FlopCounterMode(display=False) as counter:
        out = torch.func.functional_call(model, state, (batch,))
        out = out.flatten(1)[:, :10] if out.dim() > 2 else out
        nn.functional.cross_entropy(out, torch.zeros(16, dtype=torch.long,
                                                     device="meta")).backward()
    # Execute
    counted = training_step_flops(model, (16, *sample),
                                  loss_fn=lambda o, y: nn.functional.cross_entropy(
                                      o.flatten(1)[:, :10] if o.dim() > 2 else o, y))
    # Assert
    assert counted == counter.get_total_flops() > 0


def test_counting_does_not_import_torch_dynamo() -> None:
    # Execute: a fresh interpreter counts a convolutional model's step
    _, loaded = modules_loaded(
        "from torch import nn; from flowerpress.tasks.flops import training_step_flops as f; "
        "m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10)); "
        "assert f(m, (32, 1, 8, 8)) > 0", ["torch._dynamo"], timeout=120)
    # Assert: 800 modules and 75-80 MiB a process does not pay
    assert loaded == []


class _Tiny(TorchClassifierTask):
    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))

    def load_data(self, node_config: Mapping[str, Scalar]) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(0)
        return rng.normal(size=(21, 6)).astype(np.float32), rng.integers(0, 3, 21)


def test_a_classifier_task_reports_the_flops_of_its_training() -> None:
    # Prepare
    task = _Tiny(local_epochs=2, batch_size=8)
    data = task.load_data({})
    assert task.train_flops(21) is None  # no shape known before it sees data
    # Execute
    result = task.train(task.initial_weights(), data, TrainContext(server_round=1, seed=0))
    # Assert: what the server's bound and a declaring device read is the same count
    assert result.flops is not None and result.flops > 0
    assert result.flops == task.train_flops(21) == training_flops(
        task.model, (6,), num_examples=21, batch_size=8, epochs=2)
    assert task.sample_shape() == (6,)
    assert Digits().sample_shape() == (64,)  # the bundled tasks know it without data
