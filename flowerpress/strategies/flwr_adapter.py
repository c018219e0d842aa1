"""Run one of Flower's own strategies (``flwr.serverapp.strategy``) on decoded updates.

flowerpress decodes compressed client updates on the server, so a Flower
strategy never sees the wire payloads. This adapter rebuilds, per update, the
reply a plain Flower ClientApp would have sent (an ``ArrayRecord`` with the
client's weights, ``global + delta``, and a ``MetricRecord``
``{"num-examples": weight}``) and hands the round's replies to the Flower
strategy's ``aggregate_train``.

Trade-off: the adapter is a batch rule. It keeps every decoded reply of the
round, so memory is O(clients x model) even for rules such as FedAvg that
flowerpress's own built-ins fold in O(model). Use the built-ins for large
cohorts; use ``flwr:NAME`` to compare against Flower's reference code or to
reach a rule flowerpress does not ship.

Only strategies whose ``aggregate_train`` needs nothing but the arrays and
the example count work (FedAvg, FedProx, FedAvgM, FedAdagrad, FedAdam,
FedYogi, FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan). Wrappers that
take another strategy (the DP wrappers) cannot be built from a spec, and
QFedAvg needs a training loss in the reply metrics.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from flowerpress.strategies.base import BatchStrategy, ConfigValue, NDArray

_NODE_COUNT_ATTRS = ("min_available_nodes", "min_train_nodes")


class _ConfigureGrid:
    """The smallest stand-in for a Flower ``Grid`` that ``configure_train`` needs.

    Flower strategies remember the current global arrays in
    ``configure_train`` (FedOpt, FedAvgM); calling it is the honest way to
    put them in the same state as under Flower's own loop. The messages it
    builds are discarded: the flowerpress server does the sampling.
    """

    def __init__(self, num_nodes: int) -> None:
        self._num_nodes = num_nodes

    def get_node_ids(self) -> Iterator[int]:
        return iter(range(1, self._num_nodes + 1))


@contextlib.contextmanager
def _task_identity() -> Iterator[None]:
    """Give Flower's ``Message`` constructor a task identity outside a Flower run.

    Inside a ServerApp (simulation or deployment) Flower sets
    ``TaskIdentity``; instruction messages read it. When the adapter is used
    on its own (unit tests, notebooks) placeholders are set for the duration
    and removed afterwards.
    """
    from flwr.supercore.task_identity import TaskIdentity

    identity: Any = TaskIdentity
    missing = []
    for attr in ("run_id", "node_id", "task_id"):
        try:
            getattr(identity, attr)
        except RuntimeError:
            missing.append(attr)
            setattr(identity, attr, 0)
    try:
        yield
    finally:
        for attr in missing:
            setattr(identity, attr, None)


def _required_nodes(strategy: Any) -> int:
    # Flower's sample_nodes() waits forever for min_available_nodes to connect.
    needed = 1
    inner = strategy
    while inner is not None:
        for attr in _NODE_COUNT_ATTRS:
            value = getattr(inner, attr, 0)
            if isinstance(value, int):
                needed = max(needed, value)
        inner = getattr(inner, "strategy", None)
    return needed


class FlwrStrategy(BatchStrategy):
    """Adapter running a ``flwr.serverapp.strategy.Strategy`` as a flowerpress batch rule.

    The aggregation math is Flower's, so the class cites whatever the wrapped
    strategy cites (e.g. ``FedMedian``: Yin et al. 2018). Build it with
    ``build_strategy("flwr:FedMedian")`` or directly with a Flower strategy
    instance.

    Parameters
    ----------
    strategy : flwr.serverapp.strategy.Strategy
        The Flower strategy; its sampling settings are irrelevant here.

    Notes
    -----
    Memory is O(clients x model): every reply of the round is held until
    :meth:`result`. If the round's weights sum to zero the global model is
    returned unchanged (Flower would divide by zero). :meth:`state_dict`
    is empty: Flower strategies keep their moments in private attributes, so
    a resumed run restarts them.
    """

    def __init__(self, strategy: Any) -> None:
        from flwr.serverapp.strategy import Strategy as FlowerStrategy

        if not isinstance(strategy, FlowerStrategy):
            raise TypeError(
                f"strategy must be a flwr.serverapp.strategy.Strategy, got {type(strategy)!r}"
            )
        self.strategy = strategy

    def begin_round(self, server_round: int, global_weights: Sequence[NDArray]) -> None:
        """Start a round and let the Flower strategy see the global arrays."""
        from flwr.app import ArrayRecord, ConfigRecord

        super().begin_round(server_round, global_weights)
        arrays = ArrayRecord([np.asarray(g, dtype=np.float32) for g in global_weights])
        # Flower samples nodes with the global `random` module; keep its state
        # untouched so runs stay reproducible from their own seeds.
        saved = random.getstate()
        # Its "configure_train: Sampled N nodes" log line would describe the
        # stand-in grid, not the clients flowerpress sampled: silence it.
        flwr_logger = logging.getLogger("flwr")
        level = flwr_logger.level
        flwr_logger.setLevel(logging.WARNING)
        try:
            grid: Any = _ConfigureGrid(_required_nodes(self.strategy))
            with _task_identity():
                self.strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
        finally:
            random.setstate(saved)
            flwr_logger.setLevel(level)

    def client_config(self, server_round: int) -> dict[str, ConfigValue]:
        """Forward Flower FedProx's ``proximal_mu`` as ``"proximal-mu"``."""
        del server_round
        mu = getattr(self.strategy, "proximal_mu", None)
        return {} if mu is None else {"proximal-mu": float(mu)}

    def aggregate(
        self,
        global_weights: list[NDArray],
        deltas: list[list[NDArray]],
        weights: list[float],
        client_ids: list[int],
    ) -> list[NDArray]:
        """Build one Flower reply per update and call ``aggregate_train``."""
        from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict

        if sum(weights) <= 0.0:
            return [g.copy() for g in global_weights]
        key = getattr(self.strategy, "arrayrecord_key", "arrays")
        replies = []
        with _task_identity():
            for delta, weight, client_id in zip(deltas, weights, client_ids, strict=True):
                local = [g + d for g, d in zip(global_weights, delta, strict=True)]
                content = RecordDict(
                    {key: ArrayRecord(local), "metrics": MetricRecord({"num-examples": weight})}
                )
                instruction = Message(
                    RecordDict(), dst_node_id=int(client_id), message_type=MessageType.TRAIN
                )
                replies.append(Message(content, reply_to=instruction))
        arrays, _ = self.strategy.aggregate_train(self.server_round, replies)
        if arrays is None:
            return [g.copy() for g in global_weights]
        out = [np.asarray(a, dtype=np.float32) for a in arrays.to_numpy_ndarrays()]
        if len(out) != len(global_weights):
            raise ValueError(
                f"{type(self.strategy).__name__} returned {len(out)} arrays, "
                f"expected {len(global_weights)}"
            )
        return out
