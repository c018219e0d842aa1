"""The server's pruning mask: updated on a schedule, applied to the global model, checkpointed.

The server prunes the global model (global magnitude pruning on the cubic
schedule of Zhu and Gupta 2018) and sends the mask with every train message,
as PruneFL (Jiang et al., IEEE TNNLS 2022) and FedDST (Bibikar et al., AAAI
2022) do. A reply carries only the unmasked coordinates; the server validates
it against the vector its own mask gathers (:meth:`Pruner.reference`), never a
size the device claims, and scatters it back (:meth:`Pruner.expand`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from flowerpress.compression.mask import (
    Mask,
    PruneSettings,
    gather,
    magnitude_mask,
    mask_sparsity,
    pack_mask,
    scatter,
)

log = logging.getLogger(__name__)

Weights = list[NDArray[np.float32]]


class Pruner:
    """The mask of one run: None until round ``settings.start``, then only growing.

    Parameters
    ----------
    settings
        The run config's ``prune`` (:func:`flowerpress.compression.mask.parse_prune`).
    """

    def __init__(self, settings: PruneSettings) -> None:
        self.settings = settings
        self.mask: Mask | None = None
        self.target = 0.0  # the schedule's sparsity the mask was built for
        self._packed: bytes | None = None

    def begin_round(self, server_round: int, weights: Sequence[NDArray[np.float32]]) -> Weights:
        """Grow the mask to the round's target sparsity; return the masked global model."""
        target = self.settings.target(server_round)
        if server_round >= self.settings.start and (self.mask is None or target > self.target):
            self.mask = magnitude_mask(weights, target, self.mask)
            self.target = target
            self._packed = None
            log.info("round %s: pruned %.1f%% of the model's weights", server_round,
                     100 * mask_sparsity(self.mask))
        return self.apply(weights)

    def apply(self, weights: Sequence[NDArray[np.float32]]) -> Weights:
        """``weights`` with the pruned coordinates zeroed (a copy; unchanged without a mask)."""
        out = [np.array(w, dtype=np.float32) for w in weights]
        if self.mask is not None:
            for w, m in zip(out, self.mask, strict=True):
                w[~m] = 0.0
        return out

    @property
    def packed(self) -> bytes | None:
        """The mask's wire form (:func:`~flowerpress.compression.mask.pack_mask`), or None."""
        if self.mask is None:
            return None
        if self._packed is None:
            self._packed = pack_mask(self.mask)
        return self._packed

    @property
    def sparsity(self) -> float:
        """The fraction of all the model's weights pruned (0.0 before the first mask)."""
        return 0.0 if self.mask is None else mask_sparsity(self.mask)

    def reference(self, received: Sequence[NDArray[np.float32]]) -> Weights:
        """What a reply must match: the unmasked coordinates of ``received``, one vector."""
        if self.mask is None:
            return list(received)
        return [gather(received, self.mask)]

    def expand(self, delta: Sequence[NDArray[np.float32]]) -> Weights:
        """A validated reply's delta in the model's shapes (zero where pruned)."""
        if self.mask is None:
            return list(delta)
        return scatter(delta[0], self.mask)

    def state_dict(self) -> dict[str, Any]:
        """The mask and its target, for the checkpoint."""
        return {"target": self.target,
                "mask": None if self.mask is None else [m.copy() for m in self.mask]}

    def load_state_dict(self, state: Mapping[str, Any],
                        reference: Sequence[NDArray[np.float32]]) -> None:
        """Restore :meth:`state_dict`; the mask must fit the model ``reference``.

        Raises
        ------
        ValueError
            The mask's tensors do not match the model's shapes.
        """
        target = float(state["target"])
        raw = state["mask"]
        if raw is None:
            self.mask, self.target, self._packed = None, target, None
            return
        if not isinstance(raw, list) or len(raw) != len(reference):
            raise ValueError("the pruning mask does not have one tensor per model tensor")
        mask: Mask = []
        for i, (m, w) in enumerate(zip(raw, reference, strict=True)):
            arr = np.asarray(m)
            if arr.shape != w.shape:
                raise ValueError(f"the pruning mask's tensor {i} has shape {arr.shape}, the "
                                 f"model's {w.shape}")
            mask.append(arr.astype(np.bool_))
        self.mask, self.target, self._packed = mask, target, None
