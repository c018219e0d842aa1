"""flowerpress: federated learning on Flower with compressed, private updates.

The public API, for a user's own model and data::

    from flowerpress import TorchClassifierTask, client_app, server_app

    class MyTask(TorchClassifierTask):
        def build_model(self): ...                     # a torch.nn.Module
        def load_data(self, node_config): ...          # (x, y) of this node

    server = server_app(MyTask(), strategy="fedavg", compression="q:8+ef", rounds=20)
    client = client_app(MyTask())

``server`` and ``client`` are Flower's own ``ServerApp`` and ``ClientApp``
(name them in ``[tool.flwr.app.components]``); the run config ``flwr run``
passes overrides the keyword settings. Extension points, each a small
interface with a registry that refuses duplicates: :class:`Task`
(:func:`register_task`), :class:`Strategy` (:func:`register_strategy`),
codec stages (:mod:`flowerpress.compression`), DP mechanisms
(:mod:`flowerpress.privacy`).

Names are imported on first use, so a device that imports
``flowerpress.client`` loads nothing of the server.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.3.0"

_EXPORTS = {
    "server_app": "flowerpress.server.app",
    "serve": "flowerpress.server.app",
    "client_app": "flowerpress.client.app",
    "compression_mod": "flowerpress.client.mods",
    "make_compression_mod": "flowerpress.client.mods",
    "dp_mod": "flowerpress.privacy.mod",
    "Task": "flowerpress.tasks.base",
    "TaskError": "flowerpress.tasks.base",
    "TrainContext": "flowerpress.tasks.base",
    "TrainResult": "flowerpress.tasks.base",
    "Evaluation": "flowerpress.tasks.base",
    "TorchClassifierTask": "flowerpress.tasks.classifier",
    "register_task": "flowerpress.tasks.registry",
    "build_task": "flowerpress.tasks.registry",
    "Strategy": "flowerpress.strategies.base",
    "MeanStrategy": "flowerpress.strategies.base",
    "BatchStrategy": "flowerpress.strategies.base",
    "ClientUpdate": "flowerpress.strategies.base",
    "register_strategy": "flowerpress.strategies.registry",
    "build_strategy": "flowerpress.strategies.registry",
    "ConfigError": "flowerpress.config",
    "validate_config": "flowerpress.config",
}

__all__ = [
    "BatchStrategy",
    "ClientUpdate",
    "ConfigError",
    "Evaluation",
    "MeanStrategy",
    "Strategy",
    "Task",
    "TaskError",
    "TorchClassifierTask",
    "TrainContext",
    "TrainResult",
    "build_strategy",
    "build_task",
    "client_app",
    "compression_mod",
    "dp_mod",
    "make_compression_mod",
    "register_strategy",
    "register_task",
    "serve",
    "server_app",
    "validate_config",
]

if TYPE_CHECKING:
    from flowerpress.client.app import client_app
    from flowerpress.client.mods import compression_mod, make_compression_mod
    from flowerpress.config import ConfigError
    from flowerpress.config import validate as validate_config
    from flowerpress.privacy.mod import dp_mod
    from flowerpress.server.app import serve, server_app
    from flowerpress.strategies.base import BatchStrategy, ClientUpdate, MeanStrategy, Strategy
    from flowerpress.strategies.registry import build_strategy, register_strategy
    from flowerpress.tasks.base import Evaluation, Task, TaskError, TrainContext, TrainResult
    from flowerpress.tasks.classifier import TorchClassifierTask
    from flowerpress.tasks.registry import build_task, register_task


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'flowerpress' has no attribute {name!r}")
    attr = "validate" if name == "validate_config" else name
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
