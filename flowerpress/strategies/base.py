"""The aggregation interface: a streaming form and a batch form.

A strategy implements the aggregation math only. The server owns the round
loop (sampling, messaging, decoding, validation, privacy accounting, the
ledger) and drives a strategy through three calls per round::

    strategy.begin_round(server_round, global_weights)
    for update in validated_updates:                     # ClientUpdate, as replies arrive
        strategy.add(update)
    new_global = strategy.result()

A :class:`ClientUpdate` is the whole validated reply: the delta (the
client's local weights minus the global weights, decoded, with the global
model's shapes and finite values), its weight, the sending node and the
reply's metrics. Weights travel as ``list[np.ndarray]`` in the model's
``state_dict`` order.

:attr:`Strategy.weighted_sum` tells the server whether the new global model
is (a server step on) the weighted mean of the deltas. The privacy
accountant needs that bit: differential-privacy accounting of clipped,
noised updates bounds the sensitivity of a weighted sum or mean of them, and
says nothing about a median or about weights that clients report.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, TypeAlias

import numpy as np
import numpy.typing as npt

NDArray: TypeAlias = npt.NDArray[Any]
"""One array of a model's weights (float32 on the wire)."""

FLOAT32_MAX = float(np.finfo(np.float32).max)
_ADD_CHUNK = 1 << 14  # elements folded into the running sum at a time
"""The largest finite float32: state and results are kept within +-FLOAT32_MAX."""


def saturate(arrays: Sequence[NDArray]) -> list[NDArray]:
    """``arrays`` clipped to the finite float32 range, in float64 (NaN stays NaN).

    Server optimizer state (momentum, moments) lives in float64, where a
    finite-but-huge update does not overflow; but a checkpoint or the next
    global model is float32, where it would. Clipping to +-FLOAT32_MAX keeps
    the state and the model finite; honest updates are many orders of
    magnitude below the bound, so it only changes the math for inputs that
    already wrecked the model (bound them with ``max-update-norm``).
    """
    return [np.clip(np.asarray(a, dtype=np.float64), -FLOAT32_MAX, FLOAT32_MAX) for a in arrays]

ConfigValue: TypeAlias = int | float | str | bool
"""A value that a strategy may put into the clients' train config."""


class StrategyError(ValueError):
    """A strategy spec names something that does not exist or has a bad argument."""


@dataclass(frozen=True)
class ClientUpdate:
    """One validated client update, as the server hands it to a strategy.

    The server builds it after validating the reply against the contract
    (``flowerpress.protocol``), so a strategy works on trusted values.

    Attributes
    ----------
    delta : Sequence[NDArray]
        The client's local weights minus this round's global weights:
        float32, the global model's shapes, finite.
    weight : float
        Finite, ``>= 0``: the number of training examples, capped by the
        server; 1 for every client under differential privacy.
    node_id : int
        The sending node.
    metrics : Mapping[str, float]
        The reply's validated metrics (finite numbers), e.g.
        ``"local-steps"`` (local SGD steps this round, sent by the bundled
        tasks) and ``"train-loss"``, plus whatever a user's ClientApp sends.
        Empty under differential privacy: the DP mod withholds metrics
        derived from the private data without noise, which could leak what
        the noise hides.
    """

    delta: Sequence[NDArray]
    weight: float
    node_id: int
    metrics: Mapping[str, float] = field(default_factory=dict)

    def require_metric(self, key: str) -> float:
        """Return ``metrics[key]`` as a float, or raise a ``ValueError`` naming the key.

        Parameters
        ----------
        key : str
            The metric a rule needs, e.g. ``"local-steps"``.

        Raises
        ------
        ValueError
            If the reply has no such metric (the message names the key, the
            node and the keys that are there).
        """
        if key not in self.metrics:
            present = ", ".join(sorted(self.metrics)) or "none"
            raise ValueError(
                f"node {self.node_id} sent no metric {key!r} (its metrics: {present}); "
                "the client must report it, and under differential privacy metrics are withheld"
            )
        return float(self.metrics[key])


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

    Set the class attribute :attr:`weighted_sum` to ``True`` only if
    :meth:`result` is ``sum_k w_k delta_k / sum_k w_k`` with the server's
    weights ``w_k`` (:attr:`ClientUpdate.weight`), or a server step that
    depends on the updates only through that mean.
    """

    weighted_sum: ClassVar[bool] = False
    """True when :meth:`result` is (a server step on) ``sum_k w_k delta_k / sum_k w_k``.

    The server's privacy accounting holds only for such rules: it bounds the
    sensitivity of a weighted sum or mean of clipped updates. Rules that
    select or reorder updates (median, Krum) or that weight them by what
    clients report (FedNova's step counts) leave it ``False``.
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
    def add(self, update: ClientUpdate) -> None:
        """Fold one validated client update into the round.

        Parameters
        ----------
        update : ClientUpdate
            The delta (client local weights minus this round's global
            weights), its weight, the sending node and the reply's metrics.
            A rule that needs a metric reads it with
            :meth:`ClientUpdate.require_metric`, which raises a clear
            ``ValueError`` when it is missing (always, under DP).
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

    :attr:`weighted_sum` is ``True``: the result depends on the updates only
    through ``sum_k w_k delta_k / sum_k w_k``.

    ``add`` folds each update into a float64 running sum (memory O(model));
    ``result`` hands the weighted mean delta to :meth:`step`, once per round
    (later calls return the same weights, so a server optimizer never steps
    twice). Subclasses override :meth:`step`; the default is FedAvg's
    ``global + mean_delta``. If nothing (or only zero weight) was added, the
    global weights come back unchanged and :meth:`step` is not called.
    """

    weighted_sum: ClassVar[bool] = True

    def begin_round(self, server_round: int, global_weights: Sequence[NDArray]) -> None:
        """Start a round: reset the running sum."""
        self._start(server_round, global_weights)
        self._sum: list[NDArray] | None = None
        self._total_weight = 0.0
        self._count = 0

    def add(self, update: ClientUpdate) -> None:
        """Fold ``update.weight * update.delta`` into the running sum."""
        _, global_weights = self._require_round("add")
        check_delta(update.delta, global_weights)
        w = check_weight(update.weight)
        if self._sum is None:
            self._sum = [np.zeros(np.shape(g), dtype=np.float64) for g in global_weights]
        for acc, d in zip(self._sum, update.delta, strict=True):
            # In chunks: the temporary float64 product stays small, whatever the tensor.
            flat_acc, flat_d = acc.reshape(-1), np.asarray(d).reshape(-1)
            for lo in range(0, flat_d.size, _ADD_CHUNK):
                flat_acc[lo:lo + _ADD_CHUNK] += np.multiply(
                    flat_d[lo:lo + _ADD_CHUNK], w, dtype=np.float64)
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
                # float64 -> float32: saturate instead of overflowing to inf.
                self._result = _as_float32_list(saturate(new))
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

    :attr:`weighted_sum` stays ``False`` unless a subclass's
    :meth:`aggregate` is a weighted mean of the deltas.
    """

    def begin_round(self, server_round: int, global_weights: Sequence[NDArray]) -> None:
        """Start a round: drop the previous round's updates."""
        self._start(server_round, global_weights)
        self._updates: list[ClientUpdate] = []

    def add(self, update: ClientUpdate) -> None:
        """Keep the update (delta as float32 arrays) for :meth:`aggregate`."""
        _, global_weights = self._require_round("add")
        check_delta(update.delta, global_weights)
        self._updates.append(
            replace(
                update,
                delta=_as_float32_list(update.delta),
                weight=check_weight(update.weight),
                node_id=int(update.node_id),
            )
        )

    def result(self) -> list[NDArray]:
        """Return the new global weights (computed once per round)."""
        _, global_weights = self._require_round("result")
        if self._result is None:
            if not self._updates:
                self._result = [g.copy() for g in global_weights]
            else:
                new = self.aggregate(global_weights, self._updates)
                try:
                    check_delta(new, global_weights)
                except ValueError as exc:
                    raise ValueError(
                        f"{type(self).__name__}.aggregate() returned bad weights: {exc}"
                    ) from None
                # float32 sums of two huge deltas (a median's middle pair) saturate.
                self._result = _as_float32_list(saturate(new))
            # The updates are no longer needed; free O(clients x model) memory.
            self._updates = []
        return [r.copy() for r in self._result]

    @property
    def server_round(self) -> int:
        """The round started by the last :meth:`begin_round`."""
        server_round, _ = self._require_round("server_round")
        return server_round

    @abstractmethod
    def aggregate(
        self, global_weights: list[NDArray], updates: list[ClientUpdate]
    ) -> list[NDArray]:
        """Return the new global weights from all of a round's updates.

        Parameters
        ----------
        global_weights : list[NDArray]
            This round's global weights (float32).
        updates : list[ClientUpdate]
            The round's updates in arrival order (at least one); each
            ``delta`` is a list of float32 arrays with the global model's
            shapes, each ``weight`` a checked float.
        """
