"""Explicit codec state carried between rounds (error-feedback residuals, warm starts)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
import numpy.typing as npt
from flwr.app import Array, ArrayRecord

__all__ = ["CodecState"]

F32 = npt.NDArray[np.float32]

_KEY = re.compile(r"^(residual|lowrank_q|ef21)\.(\d+)$")


@dataclass(frozen=True)
class CodecState:
    """What a client's codec remembers between rounds, in named slots.

    Following PyTorch's ``PowerSGDState`` the slots are explicit and the state
    is passed in and returned by :meth:`Pipeline.encode` (FedJAX style), never
    hidden in a global.

    Attributes
    ----------
    residuals
        Error-feedback memory, one float32 array per tensor of the update
        (Karimireddy et al. 2019): what previous rounds failed to transmit.
        Empty when the pipeline has no ``ef`` stage.
    lowrank_q
        Warm starts of the structure stage, keyed by tensor position: PowerSGD's
        ``Q`` factors (``cols x rank``, Vogels et al. 2019) for ``lowrank``, or
        whatever a user's structure stage returned as ``StructureEncoding.warm``.
        Empty for stages that keep none.
    estimates
        EF21's per-tensor estimate ``g_i`` of this device's update (Richtarik
        et al., "EF21", NeurIPS 2021): the sum of everything the device has
        sent since the server last agreed on a zero estimate.  Empty without
        the ``ef21`` stage.

    Notes
    -----
    It converts to and from a Flower :class:`flwr.app.ArrayRecord` (keys
    ``residual.<i>``, ``lowrank_q.<i>`` and ``ef21.<i>``) so a ClientApp can keep it in
    ``context.state["flowerpress.codec"]`` between rounds.
    """

    residuals: tuple[F32, ...] = ()
    lowrank_q: Mapping[int, F32] = field(default_factory=lambda: MappingProxyType({}))
    estimates: tuple[F32, ...] = ()

    @classmethod
    def empty(cls) -> CodecState:
        """A state with no residuals and no warm starts (the first round)."""
        return cls()

    @property
    def is_empty(self) -> bool:
        """Whether nothing is remembered."""
        return not self.residuals and not self.lowrank_q and not self.estimates

    def to_record(self) -> ArrayRecord:
        """Serialize into an :class:`~flwr.app.ArrayRecord` (arrays only, no pickle)."""
        arrays: dict[str, Array] = {}
        for i, res in enumerate(self.residuals):
            arrays[f"residual.{i}"] = Array(np.asarray(res, dtype=np.float32, order="C"))
        for i, q in sorted(self.lowrank_q.items()):
            arrays[f"lowrank_q.{i}"] = Array(np.asarray(q, dtype=np.float32, order="C"))
        for i, g in enumerate(self.estimates):
            arrays[f"ef21.{i}"] = Array(np.asarray(g, dtype=np.float32, order="C"))
        return ArrayRecord(array_dict=arrays)

    @classmethod
    def from_record(cls, record: ArrayRecord) -> CodecState:
        """Inverse of :meth:`to_record`; raises ``ValueError`` on unknown or gapped keys."""
        residuals: dict[int, F32] = {}
        lowrank: dict[int, F32] = {}
        estimates: dict[int, F32] = {}
        for key in record:
            match = _KEY.match(key)
            if match is None:
                raise ValueError(
                    f"codec state record: unexpected key {key!r}; "
                    "expected 'residual.<i>', 'lowrank_q.<i>' or 'ef21.<i>'"
                )
            arr = np.asarray(record[key].numpy(), dtype=np.float32)
            slot = {"residual": residuals, "lowrank_q": lowrank}.get(match.group(1), estimates)
            slot[int(match.group(2))] = arr
        if sorted(residuals) != list(range(len(residuals))):
            raise ValueError(
                f"codec state record: residual indices {sorted(residuals)} are not 0..n-1"
            )
        if sorted(estimates) != list(range(len(estimates))):
            raise ValueError(
                f"codec state record: ef21 indices {sorted(estimates)} are not 0..n-1"
            )
        return cls(
            residuals=tuple(residuals[i] for i in range(len(residuals))),
            lowrank_q=MappingProxyType(lowrank),
            estimates=tuple(estimates[i] for i in range(len(estimates))),
        )

    @classmethod
    def from_arrays(
        cls,
        residuals: Sequence[F32] = (),
        lowrank_q: Mapping[int, F32] | None = None,
        estimates: Sequence[F32] = (),
    ) -> CodecState:
        """Build a state from plain arrays (copies nothing)."""
        return cls(tuple(residuals), MappingProxyType(dict(lowrank_q or {})), tuple(estimates))
