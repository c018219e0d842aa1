"""Tasks: what a federation learns (a model, a node's data, training, evaluation).

:class:`Task` is the interface; :class:`TorchClassifierTask` a ready base for
a PyTorch classifier; the bundled ``mnist``, ``digits``, ``synthetic`` and
``hub`` tasks are registered exactly as a user's would be
(:func:`register_task`), and ``task=package.module:Class`` names any other.
"""

from flowerpress.tasks.base import (
    Evaluation,
    Task,
    TaskError,
    TrainContext,
    TrainResult,
    Weights,
)
from flowerpress.tasks.classifier import TorchClassifierTask
from flowerpress.tasks.data import Split
from flowerpress.tasks.registry import available_tasks, build_task, register_task, task_spec

__all__ = [
    "Evaluation",
    "Split",
    "Task",
    "TaskError",
    "TorchClassifierTask",
    "TrainContext",
    "TrainResult",
    "Weights",
    "available_tasks",
    "build_task",
    "register_task",
    "task_spec",
]
