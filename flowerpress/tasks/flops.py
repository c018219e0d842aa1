"""Floating-point operations of local training, counted with PyTorch's own FLOP counter.

A device reports the FLOPs of the training it actually did (issue 23). Counting
every step under :class:`torch.utils.flop_counter.FlopCounterMode` would slow
training down, so one training step (forward, loss, backward) is counted once
per ``(model, batch shape)`` and multiplied by the batches actually run. The
step is traced on the ``meta`` device through :func:`torch.func.functional_call`:
no arithmetic is done, and the model's weights, gradients, buffers (BatchNorm
statistics) and the random generators are left untouched.

What is counted is what PyTorch's counter counts: matrix multiplications and
convolutions (and the attention kernels), forward and backward. Elementwise
operations, the loss, pooling and the optimizer step are not counted (a few
percent at most for the bundled models, whose cost is their dense and
convolutional layers).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import nn

#: The loss of one training step, given the logits and the labels.
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# model -> {(batch shape, loss id): FLOPs of one step}; weak, so a dropped model is forgotten.
_STEPS: weakref.WeakKeyDictionary[nn.Module, dict[tuple[tuple[int, ...], int], int]] = (
    weakref.WeakKeyDictionary())


def _trace_step(model: nn.Module, batch_shape: tuple[int, ...], loss_fn: LossFn,
                device: str) -> int:
    from torch.func import functional_call
    from torch.utils.flop_counter import FlopCounterMode

    params = {name: torch.zeros_like(p, device=device).requires_grad_(p.requires_grad)
              for name, p in model.named_parameters()}
    buffers = {name: torch.zeros_like(b, device=device) for name, b in model.named_buffers()}
    x = torch.zeros(batch_shape, device=device)
    y = torch.zeros(batch_shape[0], dtype=torch.long, device=device)
    was_training = model.training
    model.train()
    try:
        with torch.random.fork_rng(devices=[]), FlopCounterMode(display=False) as counter:
            loss = loss_fn(functional_call(model, {**params, **buffers}, (x,)), y)
            loss.backward()  # type: ignore[no-untyped-call]
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


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
    Traced on the ``meta`` device; a model that cannot run there (it reads a
    value, ``.item()``) is traced on a zero batch on the CPU instead.
    """
    loss = loss_fn or nn.functional.cross_entropy
    key = (tuple(int(d) for d in batch_shape), id(loss))
    cache = _STEPS.setdefault(model, {})
    if key not in cache:
        try:
            cache[key] = _trace_step(model, key[0], loss, "meta")
        except (NotImplementedError, RuntimeError):
            cache[key] = _trace_step(model, key[0], loss, "cpu")
    return cache[key]


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
    """FLOPs of one example's forward pass (inference), traced on the ``meta`` device."""
    from torch.func import functional_call
    from torch.utils.flop_counter import FlopCounterMode

    state = {name: torch.empty_like(t, device="meta")
             for name, t in (*model.named_parameters(), *model.named_buffers())}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            functional_call(model, state, (torch.zeros((1, *sample_shape), device="meta"),))
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())

