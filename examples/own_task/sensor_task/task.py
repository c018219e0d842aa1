"""A 1-D convolutional activity classifier on a device's accelerometer windows.

Nothing here is bundled with flowerpress: the model, the data and where it
comes from are the user's. On a real device the node config names a file
(``data-path=/data/windows.npz`` with ``x`` of shape (n, 3, 64) and labels
``y``); in a simulation each node generates its own windows from its
``partition-id`` (a different sensor placement per device).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from torch import nn

from flowerpress import TaskError, TorchClassifierTask

ACTIVITIES = 4  # still, walk, run, cycle
CHANNELS, LENGTH = 3, 64


def sensor_windows(n: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` windows of 3-axis signals whose dominant frequency encodes the activity."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, ACTIVITIES, n)
    t = np.arange(LENGTH) / LENGTH
    gain = rng.uniform(0.5, 1.5, (1, CHANNELS, 1))  # this device's sensor placement
    phase = rng.uniform(0, 2 * np.pi, (n, CHANNELS, 1))
    freq = (1 + 2 * y)[:, None, None]
    x = gain * np.sin(2 * np.pi * freq * t + phase) + 0.3 * rng.normal(size=(n, CHANNELS, LENGTH))
    return x.astype(np.float32), y.astype(np.int64)


class SensorTask(TorchClassifierTask):
    """Conv1d activity classifier; local SGD comes from ``TorchClassifierTask``."""

    def __init__(self, *, windows: int = 64, local_epochs: int = 2, lr: float = 0.1,
                 seed: int = 0) -> None:
        super().__init__(local_epochs=local_epochs, batch_size=16, lr=lr, seed=seed)
        self.windows = windows

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Conv1d(CHANNELS, 16, 5, padding=2), nn.ReLU(),
                             nn.AdaptiveAvgPool1d(8), nn.Flatten(), nn.Linear(16 * 8, ACTIVITIES))

    def load_data(self, node_config: Mapping[str, bool | int | float | str]
                  ) -> tuple[np.ndarray, np.ndarray]:
        path = node_config.get("data-path")
        if isinstance(path, str) and path:
            with np.load(path, allow_pickle=False) as archive:
                return archive["x"].astype(np.float32), archive["y"].astype(np.int64)
        pid = node_config.get("partition-id")
        if not isinstance(pid, int):
            raise TaskError("node config needs data-path=FILE.npz or partition-id=I")
        return sensor_windows(self.windows, seed=1000 + pid)
    # No central_data(): the server has no test set, so the nodes evaluate.
