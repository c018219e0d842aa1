"""EF21 on the upload: the server's copy of each device's estimate (the ``ef21`` stage).

EF21 (Richtarik, Sokolov and Fatkhullin, NeurIPS 2021) replaces the residual
of classic error feedback by an estimate ``g_i`` of device ``i``'s update that
device and server both hold: the device sends ``c = C(delta_i - g_i)``, both
set ``g_i += c`` and the server aggregates ``g_i``.  Under partial
participation (Fatkhullin et al., "EF21 with Bells & Whistles", 2021; Li and
Li, ICML 2023) only the sampled devices' estimates move.

Both copies must be equal, so each train message names the round of the
device's last accepted reply (``ef21-base``; 0: none held) and each reply
names the estimate it built on (that round, or 0 after a device restarted from
zero).  A claim that matches neither the server's record nor 0 is rejected.
Memory is one float32 model per remembered device, bounded by ``ef21-memory``
MB; the least recently used device is forgotten first and then starts from
zero, which costs accuracy, never a failure.  The estimates are not
checkpointed: a resumed run starts every device from zero the same way.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from flowerpress.protocol import UpdateRejected

Weights = list[NDArray[np.float32]]


@dataclass
class _Estimate:
    server_round: int
    weights: Weights


class UploadEstimates:
    """Per-device EF21 estimates, at most ``budget_bytes`` of float32 arrays.

    Parameters
    ----------
    budget_bytes : int
        Bound on the remembered estimates' bytes (``ef21-memory`` MB); > 0.
    """

    def __init__(self, *, budget_bytes: int) -> None:
        if budget_bytes <= 0:
            raise ValueError(f"budget_bytes must be > 0, got {budget_bytes!r}")
        self.budget_bytes = budget_bytes
        self.devices: OrderedDict[int, _Estimate] = OrderedDict()

    @property
    def nbytes(self) -> int:
        """Bytes held by the remembered estimates."""
        return sum(int(w.nbytes) for e in self.devices.values() for w in e.weights)

    def base(self, node: int) -> int:
        """The round of the estimate held for ``node`` (0: none): the train config's value."""
        held = self.devices.get(node)
        return 0 if held is None else held.server_round

    def combine(self, node: int, claimed: int | None, decoded: Sequence[NDArray[np.float32]]
                ) -> Weights:
        """``g_i + c``: the device's new estimate, from its claim and its decoded payload.

        Raises
        ------
        UpdateRejected
            If the reply has no well-formed claim, or claims an estimate the
            server does not hold, or the sum is not finite.
        """
        if claimed is None:
            raise UpdateRejected("reply has no valid 'ef21' record (ef21-base)")
        if claimed == 0:
            return [np.array(d, dtype=np.float32) for d in decoded]
        held = self.devices.get(node)
        if held is None or held.server_round != claimed:
            raise UpdateRejected(f"reply builds on the ef21 estimate of round {claimed}, "
                                 f"the server holds {0 if held is None else held.server_round}")
        if len(held.weights) != len(decoded) or any(
                g.shape != d.shape for g, d in zip(held.weights, decoded, strict=True)):
            raise UpdateRejected("ef21 estimate and update shapes differ")
        with np.errstate(over="ignore", invalid="ignore"):
            out = [np.add(g, d, dtype=np.float32) for g, d in zip(held.weights, decoded,
                                                                  strict=True)]
        if not all(bool(np.isfinite(o).all()) for o in out):
            raise UpdateRejected("ef21 estimate plus update is not finite")
        return out

    def commit(self, node: int, server_round: int, estimate: Sequence[NDArray[np.float32]]
               ) -> None:
        """Remember ``estimate`` as ``node``'s after its accepted reply of ``server_round``."""
        self.devices.pop(node, None)
        size = sum(int(np.asarray(w).nbytes) for w in estimate)
        if size > self.budget_bytes:
            return  # one model does not fit: the device starts from zero every time
        while self.devices and self.nbytes + size > self.budget_bytes:
            self.devices.popitem(last=False)
        self.devices[node] = _Estimate(server_round,
                                       [np.array(w, dtype=np.float32) for w in estimate])
