"""Floating-point operations of local training, counted with PyTorch's own FLOP formulas.

A device reports the FLOPs of the training it actually did (issue 23), and the
server bounds that claim by the same count for the largest plausible partition.
Counting every step would slow training down, so one training step (forward,
loss, backward) is counted once per ``(model, batch shape)`` and multiplied by
the batches actually run.

The count is PyTorch's: the formulas of :mod:`torch.utils.flop_counter`
(``flop_registry``: matrix multiplications, convolutions, attention kernels,
forward and backward), applied to every operator a step dispatches, with
operators outside the registry decomposed first, as
:class:`~torch.utils.flop_counter.FlopCounterMode` does. Elementwise
operations, the loss, pooling and the optimizer step are not counted (a few
percent at most for the bundled models, whose cost is their dense and
convolutional layers).

How the step is run, and why:

- **On two examples, scaled to the batch.** The step runs for real on a zero
  batch of two examples (two, not one, so that BatchNorm trains), on the
  model's device, with mkldnn's fused kernels off so that recurrent layers
  decompose into the matrix products the registry counts. Its count times
  ``batch / 2`` is the batch's: every registry formula is linear in the batch
  for layers whose cost is per example (dense, convolutional, recurrent,
  attention within an example). Weights are shared, not copied; gradients,
  BatchNorm statistics and the random generators are left as they were.
- **Not on the ``meta`` device, not under ``FlopCounterMode``.** Both run
  Python kernels wrapped to disable TorchDynamo, and the first call imports
  ``torch._dynamo`` (about 800 modules): 1.9 CPU seconds and 75-80 MiB in every
  process that counts, every server and every simulated or real device. The
  dispatch mode here counts with the same registry without that import.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

#: The loss of one training step, given the logits and the labels.
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: Examples a step is counted on (scaled to the batch).
TRACE_EXAMPLES = 2

# model -> {(sample shape, loss id): FLOPs of one step on TRACE_EXAMPLES examples}; weak,
# so a dropped model is forgotten.
_STEPS: weakref.WeakKeyDictionary[nn.Module, dict[tuple[tuple[int, ...], int], int]] = (
    weakref.WeakKeyDictionary())


class _CountFlops(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Adds up PyTorch's registered FLOP formulas over every operator dispatched."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # TorchDispatchMode wraps __torch_dispatch__ to disable TorchDynamo, which
        # imports it on the first call; nothing is compiled under this mode.
        return False

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        from torch.utils.flop_counter import flop_registry

        self.registry: dict[Any, Any] = flop_registry
        self.total = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        formula = self.registry.get(func._overloadpacket)
        if formula is None and func is not torch.ops.prim.device.default:
            with self:  # as FlopCounterMode: count what an unregistered operator is made of
                decomposed = func.decompose(*args, **kwargs)
            if decomposed is not NotImplemented:
                return decomposed
        out = func(*args, **kwargs)
        if formula is not None:
            self.total += int(formula(*args, **kwargs, out_val=out))
        return out


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _trace_step(model: nn.Module, sample_shape: tuple[int, ...], loss_fn: LossFn) -> int:
    """FLOPs of one training step on :data:`TRACE_EXAMPLES` examples of ``sample_shape``."""
    from torch.func import functional_call

    device = _device(model)
    # Shared storage, fresh leaves: backward fills their .grad, not the model's.
    params = {name: p.detach().requires_grad_(p.requires_grad)
              for name, p in model.named_parameters()}
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    x = torch.zeros((TRACE_EXAMPLES, *sample_shape), device=device)
    y = torch.zeros(TRACE_EXAMPLES, dtype=torch.long, device=device)
    was_training = model.training
    model.train()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # mkldnn.flags warns about TF32 on CPU builds
            with torch.backends.mkldnn.flags(enabled=False), \
                    torch.random.fork_rng(devices=[]), _CountFlops() as counter:
                loss = loss_fn(functional_call(model, {**params, **buffers}, (x,)), y)
                loss.backward()  # type: ignore[no-untyped-call]
    finally:
        model.train(was_training)
    return int(counter.total)


def training_step_flops(model: nn.Module, batch_shape: tuple[int, ...], *,
                        loss_fn: LossFn | None = None) -> int:
    """FLOPs of one SGD step of ``model`` on a batch of ``batch_shape`` (counted once).

    Parameters
    ----------
    model
        The model (only its structure and shapes are used).
    batch_shape
        The input batch's shape, batch axis first, e.g. ``(16, 1, 28, 28)``.
    loss_fn
        The training loss (cross-entropy by default).

    Notes
    -----
    Run on a zero batch of two examples and scaled to ``batch_shape[0]`` (see
    the module's notes).
    """
    loss = loss_fn or nn.functional.cross_entropy
    key = (tuple(int(d) for d in batch_shape[1:]), id(loss))
    cache = _STEPS.setdefault(model, {})
    if key not in cache:
        cache[key] = _trace_step(model, key[0], loss)
    return round(cache[key] * int(batch_shape[0]) / TRACE_EXAMPLES)


def training_flops(model: nn.Module, sample_shape: tuple[int, ...], *, num_examples: int,
                   batch_size: int, epochs: int, loss_fn: LossFn | None = None) -> int:
    """FLOPs of ``epochs`` passes of mini-batch SGD over ``num_examples`` examples.

    Each pass runs ``num_examples // batch_size`` full batches and one partial
    batch of the rest (as :func:`flowerpress.tasks.training.train` does); each
    batch shape is counted once (:func:`training_step_flops`).
    """
    if num_examples <= 0 or epochs <= 0:
        return 0
    full, rest = divmod(int(num_examples), int(batch_size))
    per_epoch = 0
    if full:
        per_epoch += full * training_step_flops(model, (batch_size, *sample_shape),
                                                loss_fn=loss_fn)
    if rest:
        per_epoch += training_step_flops(model, (rest, *sample_shape), loss_fn=loss_fn)
    return int(epochs) * per_epoch


def forward_flops(model: nn.Module, sample_shape: tuple[int, ...]) -> int:
    """FLOPs of one example's forward pass (inference), run on one zero example."""
    from torch.func import functional_call

    state = dict((*model.named_parameters(), *model.named_buffers()))
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False), \
                    _CountFlops() as counter:
                functional_call(model, state,
                                (torch.zeros((1, *sample_shape), device=_device(model)),))
    finally:
        model.train(was_training)
    return int(counter.total)
