"""Local training and evaluation on a client's own data.

Plain mini-batch SGD over the partition for a number of local epochs, as in
FedAvg (McMahan et al., AISTATS 2017), with FedProx's proximal term
``mu/2 * ||w - w_global||^2`` when ``proximal_mu > 0`` (Li et al., MLSys 2020).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn


@dataclass(frozen=True)
class TrainSettings:
    """What a client needs to train one round; sent in the train ConfigRecord."""

    local_epochs: int = 1  # passes over the partition
    batch_size: int = 32
    lr: float = 0.05
    proximal_mu: float = 0.0  # FedProx; 0 disables the proximal term


@dataclass(frozen=True)
class EvalResult:
    """Metrics of a model on one split."""

    loss: float
    accuracy: float
    f1_macro: float
    num_examples: int


def train(
    model: nn.Module,
    x: NDArray[np.float32],
    y: NDArray[np.int64],
    settings: TrainSettings,
    *,
    generator: torch.Generator,
    mask: list[NDArray[np.bool_]] | None = None,
) -> float:
    """Train ``model`` in place with SGD and return the mean training loss.

    The step is plain SGD, ``p -= lr * grad``: what ``torch.optim.SGD(params,
    lr)`` does with its defaults, written out because constructing any
    ``torch.optim`` optimizer imports TorchDynamo (``add_param_group`` is
    wrapped to disable it): 1.9 CPU seconds and 75-80 MiB in every device
    process, and Flower's subprocess isolation starts one per message.

    Parameters
    ----------
    model
        The model, holding the global weights on entry.
    x, y
        The client's features and labels.
    settings
        Epochs, batch size, learning rate, proximal coefficient.
    generator
        Shuffles the mini-batches; the only source of randomness.
    mask
        A pruning mask in ``state_dict`` order (True: kept): re-applied to the
        parameters after every optimizer step, so pruned weights stay zero
        (Zhu and Gupta 2018; PruneFL, Jiang et al. 2022).
    """
    if len(y) == 0:
        return 0.0
    masks = _parameter_masks(model, mask)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    params = [p for p in model.parameters() if p.requires_grad]
    loss_fn = nn.CrossEntropyLoss()
    anchor = [p.detach().clone() for p in model.parameters()] if settings.proximal_mu > 0 else []
    model.train()
    total, batches = 0.0, 0
    for _ in range(settings.local_epochs):
        order = torch.randperm(len(yt), generator=generator)
        for start in range(0, len(yt), settings.batch_size):
            idx = order[start : start + settings.batch_size]
            for p in params:
                p.grad = None
            loss = loss_fn(model(xt[idx]), yt[idx])
            if anchor:
                prox = sum(((p - a) ** 2).sum() for p, a in
                           zip(model.parameters(), anchor, strict=True))
                loss = loss + 0.5 * settings.proximal_mu * prox
            loss.backward()
            with torch.no_grad():
                for p in params:
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-settings.lr)
            if masks:
                with torch.no_grad():
                    for p, m in masks:
                        p.mul_(m)
            total += float(loss.detach())
            batches += 1
    return total / max(batches, 1)


def _parameter_masks(model: nn.Module, mask: list[NDArray[np.bool_]] | None
                     ) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """(parameter, 0/1 tensor) for each parameter the mask prunes somewhere."""
    if mask is None:
        return []
    names = list(model.state_dict().keys())
    if len(names) != len(mask):
        raise ValueError(f"model has {len(names)} tensors, the mask {len(mask)}")
    params = dict(model.named_parameters())
    out = []
    for name, m in zip(names, mask, strict=True):
        if name in params and not m.all():
            out.append((params[name], torch.from_numpy(m.astype(np.float32))))
    return out


@torch.no_grad()
def evaluate(
    model: nn.Module, x: NDArray[np.float32], y: NDArray[np.int64], *, batch_size: int = 1024
) -> EvalResult:
    """Loss, accuracy and macro-F1 of ``model`` on ``(x, y)``.

    Macro-F1 is reported next to accuracy because with non-IID class skew a
    model can reach good accuracy while ignoring rare classes.
    """
    if len(y) == 0:
        return EvalResult(0.0, 0.0, 0.0, 0)
    model.eval()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    loss_sum, preds = 0.0, []
    for start in range(0, len(yt), batch_size):
        logits = model(xt[start : start + batch_size])
        loss_sum += float(nn.functional.cross_entropy(
            logits, yt[start : start + batch_size], reduction="sum"))
        preds.append(logits.argmax(dim=1))
    pred = torch.cat(preds).numpy()
    return EvalResult(
        loss=loss_sum / len(y),
        accuracy=float((pred == y).mean()),
        f1_macro=macro_f1(y, pred),
        num_examples=len(y),
    )


def macro_f1(y_true: NDArray[np.int64], y_pred: NDArray[np.int64]) -> float:
    """Unweighted mean of per-class F1 over the classes in ``y_true`` or ``y_pred``.

    The same value as scikit-learn's ``f1_score(average="macro", zero_division=0)``,
    without importing scikit-learn on a device (seconds of start-up).
    """
    labels = np.union1d(y_true, y_pred)
    if labels.size == 0:
        return 0.0
    scores = []
    for label in labels:
        t, p = y_true == label, y_pred == label
        tp = int(np.sum(t & p))
        denom = int(np.sum(t)) + int(np.sum(p))
        scores.append(2.0 * tp / denom if denom else 0.0)
    return float(np.mean(scores))
