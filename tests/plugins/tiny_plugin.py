"""A user's plug-in module, as `plugins = "tiny_plugin"` names it: three short names.

Importing it registers a codec stage (``half``), a strategy (``plain-mean``) and a
task (``blobs``), the way a user's ``mypkg.codecs`` would. The tests put this
directory on ``sys.path`` (in-process) or ``PYTHONPATH`` (Flower's engine) and
restore the registries afterwards.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import numpy.typing as npt
from torch import nn

from flowerpress.compression import Reader, ValueStage, Writer, register_stage
from flowerpress.strategies import FedAvg, register_strategy
from flowerpress.tasks import TaskError, TorchClassifierTask, register_task

F32 = npt.NDArray[np.float32]
#: How often this module ran in this process (a second import must not run it again).
IMPORTS = [1]


@dataclass(frozen=True)
class Half(ValueStage):
    """``half``: every value as an IEEE float16 (2 bytes)."""

    name: ClassVar[str] = "half"
    wire_id: ClassVar[int | None] = 0x71

    def encode(self, x: F32, w: Writer, *, rng: np.random.Generator,
               need_recon: bool) -> F32 | None:
        del rng
        half = x.astype(np.float16)
        w.raw(half.tobytes())
        return half.astype(np.float32) if need_recon else None

    @classmethod
    def decode(cls, r: Reader, count: int) -> F32:
        data = np.frombuffer(r.raw(2 * count, "half values"), dtype=np.float16)
        out: F32 = data.astype(np.float32)
        return out


class PlainMean(FedAvg):
    """FedAvg under another name: proves a plug-in strategy resolves."""


def _blobs(n: int, seed: int) -> tuple[F32, npt.NDArray[np.int64]]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, 4)).astype(np.float32) + (2.0 * y[:, None] - 1.0)
    return x.astype(np.float32), y.astype(np.int64)


class Blobs(TorchClassifierTask):
    """Two Gaussian blobs in 4-D, logistic regression; takes ``lr`` from the run config."""

    run_config_keys: ClassVar[frozenset[str]] = frozenset({"lr"})

    def __init__(self, *, lr: float = 0.05) -> None:
        super().__init__(local_epochs=1, batch_size=32, lr=lr, seed=0)

    def build_model(self) -> nn.Module:
        return nn.Linear(4, 2)

    def load_data(self, node_config: Mapping[str, bool | int | float | str]
                  ) -> tuple[F32, npt.NDArray[np.int64]]:
        pid = node_config.get("partition-id")
        if not isinstance(pid, int):
            raise TaskError("node config needs partition-id=I")
        return _blobs(64, seed=100 + pid)

    def central_data(self) -> tuple[F32, npt.NDArray[np.int64]]:
        return _blobs(256, seed=7)


register_stage(Half)
register_strategy("plain-mean", PlainMean)
register_task("blobs", Blobs)
