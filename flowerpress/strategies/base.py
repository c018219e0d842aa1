"""The aggregation interface: a streaming form and a batch form.

A strategy implements the aggregation math only. The server owns the round
loop (sampling, messaging, decoding, validation, privacy accounting, the
ledger) and drives a strategy through four calls per round::

    strategy.begin_round(server_round, global_weights)
    for delta, weight, client_id in decoded_updates:     # as replies arrive
        strategy.add(delta, weight, client_id)
    new_global = strategy.result()

``delta`` is the client's local weights minus the global weights, already
decoded and validated by the server (shapes match the global model, values
finite). Weights travel as ``list[np.ndarray]`` in the model's
``state_dict`` order.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

NDArray: TypeAlias = npt.NDArray[Any]
"""One array of a model's weights (float32 on the wire)."""

ConfigValue: TypeAlias = int | float | str | bool
"""A value that a strategy may put into the clients' train config."""


class StrategyError(ValueError):
    """A strategy spec names something that does not exist or has a bad argument."""


class Strategy(ABC):
    """A server-side aggregation rule in streaming form.

    Subclasses fold each update into O(model) state as it arrives, so memory
    does not grow with the number of clients. Rules that need every update at
    once (median, Krum) subclass :class:`BatchStrategy` instead.

    Methods to implement: :meth:`begin_round`, :meth:`add` and :meth:`result`.
    Optional: :meth:`client_config` (keys sent to clients with the train
    instruction) and :meth:`state_dict` / :meth:`load_state_dict` (server-side
    state such as momentum, so a run can resume).

    Constructor arguments are what a spec string ``NAME:ARG=VALUE,...`` can
    set; give them type annotations ``int``, ``float``, ``bool`` or ``str``
    (optionally ``| None``) and defaults.
    """

    @abstractmethod
    def begin_round(self, server_round: int, global_weights: Sequence[NDArray]) -> None:
        """Start a round from the current global weights.

        Parameters
        ----------
        server_round : int
            The round number, starting at 1.
        global_weights : Sequence[NDArray]
            The global model broadcast in this round. The strategy may keep a
            reference; the server does not mutate it afterwards.
        """

    @abstractmethod
    def add(self, delta: Sequence[NDArray], weight: float, client_id: int) -> None:
        """Fold one decoded client update into the round.

        Parameters
        ----------
        delta : Sequence[NDArray]
            Client local weights minus the global weights of this round.
        weight : float
            Non-negative weight of the update (usually the number of examples).
        client_id : int
            The sending node's id (lets a rule track clients; most ignore it).
        """

    @abstractmethod
    def result(self) -> list[NDArray]:
        """Return the new global weights; the global unchanged if nothing was added."""

    def client_config(self, server_round: int) -> dict[str, ConfigValue]:
        """Return extra keys for the clients' train config in ``server_round``.

        The default sends nothing. FedProx, for instance, sends
        ``{"proximal-mu": mu}``.
        """
        del server_round
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Return the server-side state (e.g. optimizer moments); arrays allowed."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore state returned by :meth:`state_dict`.

        Raises
        ------
        ValueError
            If ``state`` does not belong to this strategy.
        """
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state; got keys {sorted(state)}")


def _as_float32_list(arrays: Sequence[NDArray]) -> list[NDArray]:
    return [np.asarray(a, dtype=np.float32) for a in arrays]


def check_weight(weight: float) -> float:
    """Return ``weight`` as a float or raise ``ValueError`` if negative or not finite."""
    w = float(weight)
    if not math.isfinite(w) or w < 0.0:
        raise ValueError(f"weight must be finite and >= 0, got {weight!r}")
    return w


def check_delta(delta: Sequence[NDArray], global_weights: Sequence[NDArray]) -> None:
    """Raise ``ValueError`` unless ``delta`` has the global model's layout."""
    if len(delta) != len(global_weights):
        raise ValueError(
            f"delta has {len(delta)} arrays, expected {len(global_weights)} (the global model's)"
        )
    for i, (d, g) in enumerate(zip(delta, global_weights, strict=True)):
        if np.shape(d) != np.shape(g):
            raise ValueError(f"delta[{i}] has shape {np.shape(d)}, expected {np.shape(g)}")


class _RoundMixin:
    """Round bookkeeping shared by the streaming and batch bases."""

    _round: int | None = None
    _global: list[NDArray] | None = None
    _result: list[NDArray] | None = None

    def _start(self, server_round: int, global_weights: Sequence[NDArray]) -> None:
        self._round = int(server_round)
        self._global = _as_float32_list(global_weights)
        self._result = None

    def _require_round(self, action: str) -> tuple[int, list[NDArray]]:
        if self._round is None or self._global is None:
            raise RuntimeError(f"{type(self).__name__}.{action}() called before begin_round()")
        if self._result is not None and action == "add":
            raise RuntimeError(
                f"{type(self).__name__}.add() called after result() in round {self._round}"
            )
        return self._round, self._global


class MeanStrategy(_RoundMixin, Strategy):
    """Streaming base: a running weighted mean of the deltas, then a server step.

    ``add`` folds each update into a float64 running sum (memory O(model));
    ``result`` hands the weighted mean delta to :meth:`step`, once per round
    (later calls return the same weights, so a server optimizer never steps
    twice). Subclasses override :meth:`step`; the default is FedAvg's
    ``global + mean_delta``. If nothing (or only zero weight) was added, the
    global weights come back unchanged and :meth:`step` is not called.
    """

    def begin_round(self, server_round: int, global_weights: Sequence[NDArray]) -> None:
        """Start a round: reset the running sum."""
        self._start(server_round, global_weights)
        self._sum: list[NDArray] | None = None
        self._total_weight = 0.0
        self._count = 0

    def add(self, delta: Sequence[NDArray], weight: float, client_id: int) -> None:
        """Fold ``weight * delta`` into the running sum."""
        _, global_weights = self._require_round("add")
        check_delta(delta, global_weights)
        w = check_weight(weight)
        if self._sum is None:
            self._sum = [np.zeros(np.shape(g), dtype=np.float64) for g in global_weights]
        for acc, d in zip(self._sum, delta, strict=True):
            acc += w * np.asarray(d, dtype=np.float64)
        self._total_weight += w
        self._count += 1

    def result(self) -> list[NDArray]:
        """Return the new global weights (computed once per round)."""
        server_round, global_weights = self._require_round("result")
        if self._result is None:
            if self._sum is None or self._total_weight <= 0.0:
                self._result = [g.copy() for g in global_weights]
            else:
                mean = [acc / self._total_weight for acc in self._sum]
                new = self.step(server_round, global_weights, mean)
                self._result = _as_float32_list(new)
        return [r.copy() for r in self._result]

    def step(
        self, server_round: int, global_weights: list[NDArray], mean_delta: list[NDArray]
    ) -> list[NDArray]:
        """Turn the weighted mean delta into new global weights (FedAvg: add it).

        Parameters
        ----------
        server_round : int
            The current round.
        global_weights : list[NDArray]
            This round's global weights (float32).
        mean_delta : list[NDArray]
            ``sum_k w_k delta_k / sum_k w_k`` in float64.
        """
        del server_round
        return [g + d for g, d in zip(global_weights, mean_delta, strict=True)]


class BatchStrategy(_RoundMixin, Strategy):
    """Batch base: collect a round's updates, aggregate them all at once.

    For rules that need every update together (coordinate-wise median,
    trimmed mean, Krum). Memory is O(clients x model): the deltas passed to
    :meth:`add` are kept by reference until the round ends, so callers must
    not mutate them afterwards. Subclasses implement :meth:`aggregate`, which
    is called once per round with at least one update.
    """

    def begin_round(self, server_round: int, global_weights: Sequence[NDArray]) -> None:
        """Start a round: drop the previous round's updates."""
        self._start(server_round, global_weights)
        self._deltas: list[list[NDArray]] = []
        self._weights: list[float] = []
        self._client_ids: list[int] = []

    def add(self, delta: Sequence[NDArray], weight: float, client_id: int) -> None:
        """Keep the update for :meth:`aggregate`."""
        _, global_weights = self._require_round("add")
        check_delta(delta, global_weights)
        self._weights.append(check_weight(weight))
        self._deltas.append(_as_float32_list(delta))
        self._client_ids.append(int(client_id))

    def result(self) -> list[NDArray]:
        """Return the new global weights (computed once per round)."""
        _, global_weights = self._require_round("result")
        if self._result is None:
            if not self._deltas:
                self._result = [g.copy() for g in global_weights]
            else:
                new = self.aggregate(global_weights, self._deltas, self._weights, self._client_ids)
                try:
                    check_delta(new, global_weights)
                except ValueError as exc:
                    raise ValueError(
                        f"{type(self).__name__}.aggregate() returned bad weights: {exc}"
                    ) from None
                self._result = _as_float32_list(new)
            # The updates are no longer needed; free O(clients x model) memory.
            self._deltas, self._weights, self._client_ids = [], [], []
        return [r.copy() for r in self._result]

    @property
    def server_round(self) -> int:
        """The round started by the last :meth:`begin_round`."""
        server_round, _ = self._require_round("server_round")
        return server_round

    @abstractmethod
    def aggregate(
        self,
        global_weights: list[NDArray],
        deltas: list[list[NDArray]],
        weights: list[float],
        client_ids: list[int],
    ) -> list[NDArray]:
        """Return the new global weights from all of a round's updates.

        Parameters
        ----------
        global_weights : list[NDArray]
            This round's global weights (float32).
        deltas : list[list[NDArray]]
            One float32 delta per client, in arrival order (at least one).
        weights : list[float]
            The clients' weights, aligned with ``deltas``.
        client_ids : list[int]
            The clients' node ids, aligned with ``deltas``.
        """
