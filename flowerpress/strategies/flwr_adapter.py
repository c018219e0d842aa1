"""Run one of Flower's own strategies (``flwr.serverapp.strategy``) on decoded updates.

flowerpress decodes compressed client updates on the server, so a Flower
strategy never sees the wire payloads. This adapter rebuilds, per update, the
reply a plain Flower ClientApp would have sent (an ``ArrayRecord`` with the
client's weights, ``global + delta``, and a ``MetricRecord`` with the reply's
validated metrics and ``"num-examples"`` set to the server's weight) and
hands the round's replies to the Flower strategy's ``aggregate_train``.

Trade-off: the adapter is a batch rule. It keeps every decoded reply of the
round, so memory is O(clients x model) even for rules such as FedAvg that
flowerpress's own built-ins fold in O(model). Use the built-ins for large
cohorts; use ``flwr:NAME`` to compare against Flower's reference code or to
reach a rule flowerpress does not ship.

Flower requires every reply of a round to carry the same metric keys, so the
adapter forwards the keys that all of the round's updates share. Rules that
read a metric (``QFedAvg``'s ``train_loss_key``, a ``weighted_by_key`` other
than ``"num-examples"``) get it when the clients send it (flowerpress's
bundled tasks send ``"train-loss"``, so ``flwr:QFedAvg:train_loss_key=train-loss``);
without it, e.g. under differential privacy, :meth:`FlwrStrategy.aggregate`
raises a ``ValueError`` naming the key. Wrappers that take another strategy
(the DP wrappers) cannot be built from a spec.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import numpy as np

from flowerpress.strategies.base import BatchStrategy, ClientUpdate, ConfigValue, NDArray

_NODE_COUNT_ATTRS = ("min_available_nodes", "min_train_nodes")
_WEIGHT_KEY = "num-examples"
"""The metric under which the adapter passes the server's weight of an update."""
_METRIC_KEY_ATTRS = ("weighted_by_key", "train_loss_key")
"""Flower strategy attributes that name a metric the strategy reads from each reply."""
_FLWR_STATE_ATTRS = ("current_arrays", "m_t", "v_t", "momentum_vector")
"""Attributes in which Flower's strategies keep state between rounds (flwr 1.x).

``FedAvgM``: ``momentum_vector`` (a list of arrays) and ``current_arrays`` (an
``ArrayRecord``); ``FedAdagrad``/``FedAdam``/``FedYogi``: ``m_t``, ``v_t`` and
``current_arrays`` (dicts of arrays). ``None`` before the first round.
"""
_WEIGHTED_MEAN_RULES = ("FedAvg", "FedProx", "FedAvgM", "FedAdagrad", "FedAdam", "FedYogi")
"""Flower strategies whose ``aggregate_train`` is (a server step on) FedAvg's weighted mean.

Checked against flwr 1.x: FedAvg and FedProx return
``aggregate_arrayrecords(replies, weighted_by_key)``, the ``weighted_by_key``
weighted mean of the client models; FedAvgM and the FedOpt family call
FedAvg's ``aggregate_train`` and step from its result and the current global.
"""


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


def is_weighted_mean(strategy: Any) -> bool:
    """Return True if ``strategy``'s aggregation is (a server step on) the weighted mean.

    Only Flower's own FedAvg-family classes (not subclasses, which may
    override ``aggregate_train``) weighted by ``"num-examples"``, the
    server's weight, qualify. Anything else, including the same classes
    weighted by a client-reported metric, is treated as not a weighted sum.

    Parameters
    ----------
    strategy : flwr.serverapp.strategy.Strategy
        The Flower strategy.
    """
    from flwr.serverapp import strategy as flwr_strategies

    exact = any(type(strategy) is getattr(flwr_strategies, n, None) for n in _WEIGHTED_MEAN_RULES)
    return exact and getattr(strategy, "weighted_by_key", None) == _WEIGHT_KEY


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
    :attr:`weighted_sum` is ``False``: the adapter cannot vouch for an
    arbitrary Flower strategy. :meth:`wrap` (what ``flwr:NAME`` uses)
    returns a :class:`FlwrWeightedMean`, whose flag is ``True``, for
    Flower's FedAvg family weighted by ``"num-examples"``.

    Memory is O(clients x model): every reply of the round is held until
    :meth:`result`. If the round's weights sum to zero the global model is
    returned unchanged (Flower would divide by zero). :meth:`state_dict`
    holds the server-side state Flower's strategies keep in public attributes
    (:data:`_FLWR_STATE_ATTRS`: FedAvgM's momentum, the FedOpt family's
    moments, the arrays they step from), so a resumed run continues them.
    """

    weighted_sum: ClassVar[bool] = False

    def __init__(self, strategy: Any) -> None:
        from flwr.serverapp.strategy import Strategy as FlowerStrategy

        if not isinstance(strategy, FlowerStrategy):
            raise TypeError(
                f"strategy must be a flwr.serverapp.strategy.Strategy, got {type(strategy)!r}"
            )
        self.strategy = strategy

    @classmethod
    def wrap(cls, strategy: Any) -> FlwrStrategy:
        """Return the adapter whose :attr:`weighted_sum` is right for ``strategy``.

        A :class:`FlwrWeightedMean` if :func:`is_weighted_mean` holds, else a
        plain :class:`FlwrStrategy`.
        """
        if is_weighted_mean(strategy):
            return FlwrWeightedMean(strategy)
        return FlwrStrategy(strategy)

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

    def state_dict(self) -> dict[str, Any]:
        """Return the Flower strategy's state attributes as arrays (``None`` where unset)."""
        from flwr.app import ArrayRecord

        state: dict[str, Any] = {}
        for attr in _FLWR_STATE_ATTRS:
            if not hasattr(self.strategy, attr):
                continue
            value = getattr(self.strategy, attr)
            if value is None:
                state[attr] = None
            elif isinstance(value, ArrayRecord):
                state[attr] = {"record": {k: np.array(a.numpy()) for k, a in value.items()}}
            elif isinstance(value, dict):
                state[attr] = {"dict": {str(k): np.array(v) for k, v in value.items()}}
            else:
                state[attr] = {"list": [np.array(v) for v in value]}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` into the Flower strategy.

        Raises
        ------
        ValueError
            If ``state`` names an attribute this Flower strategy does not have.
        """
        from flwr.app import Array, ArrayRecord

        name = type(self.strategy).__name__
        for attr, value in state.items():
            if attr not in _FLWR_STATE_ATTRS or not hasattr(self.strategy, attr):
                raise ValueError(f"flwr:{name} has no state attribute {attr!r}")
            if value is None:
                restored: Any = None
            elif "record" in value:
                restored = ArrayRecord({k: Array(np.asarray(v))
                                        for k, v in value["record"].items()})
            elif "dict" in value:
                restored = {k: np.asarray(v) for k, v in value["dict"].items()}
            else:
                restored = [np.asarray(v) for v in value["list"]]
            setattr(self.strategy, attr, restored)

    def client_config(self, server_round: int) -> dict[str, ConfigValue]:
        """Forward Flower FedProx's ``proximal_mu`` as ``"proximal-mu"``."""
        del server_round
        mu = getattr(self.strategy, "proximal_mu", None)
        return {} if mu is None else {"proximal-mu": float(mu)}

    def aggregate(
        self, global_weights: list[NDArray], updates: list[ClientUpdate]
    ) -> list[NDArray]:
        """Build one Flower reply per update and call ``aggregate_train``.

        Raises
        ------
        ValueError
            If the Flower strategy reads a metric (``weighted_by_key``,
            ``train_loss_key``) that an update lacks; the message names the
            key and the node.
        """
        from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict

        if sum(u.weight for u in updates) <= 0.0:
            return [g.copy() for g in global_weights]
        name = type(self.strategy).__name__
        for attr in _METRIC_KEY_ATTRS:
            needed = getattr(self.strategy, attr, None)
            if isinstance(needed, str) and needed != _WEIGHT_KEY:
                for update in updates:
                    try:
                        update.require_metric(needed)
                    except ValueError as exc:
                        raise ValueError(f"flwr:{name} ({attr}={needed!r}): {exc}") from None
        # Flower rejects a round whose replies carry different metric keys.
        shared = sorted(set.intersection(*(set(u.metrics) for u in updates)) - {_WEIGHT_KEY})
        key = getattr(self.strategy, "arrayrecord_key", "arrays")
        replies = []
        with _task_identity():
            for update in updates:
                local = [g + d for g, d in zip(global_weights, update.delta, strict=True)]
                metrics: dict[str, int | float | list[int] | list[float]] = {
                    k: float(update.metrics[k]) for k in shared
                }
                metrics[_WEIGHT_KEY] = update.weight
                content = RecordDict({key: ArrayRecord(local), "metrics": MetricRecord(metrics)})
                instruction = Message(
                    RecordDict(), dst_node_id=update.node_id, message_type=MessageType.TRAIN
                )
                replies.append(Message(content, reply_to=instruction))
        arrays, _ = self.strategy.aggregate_train(self.server_round, replies)
        if arrays is None:
            return [g.copy() for g in global_weights]
        out = [np.asarray(a, dtype=np.float32) for a in arrays.to_numpy_ndarrays()]
        if len(out) != len(global_weights):
            raise ValueError(f"{name} returned {len(out)} arrays, expected {len(global_weights)}")
        return out


class FlwrWeightedMean(FlwrStrategy):
    """The adapter for Flower's FedAvg family: a weighted mean, so :attr:`weighted_sum` is True.

    McMahan et al., "Communication-Efficient Learning of Deep Networks from
    Decentralized Data", AISTATS 2017 (FedAvg, FedProx's aggregation), and
    the server optimizers built on that mean (FedAvgM: Hsu et al. 2019;
    FedAdagrad, FedAdam, FedYogi: Reddi et al. 2021), as Flower implements
    them. Built by :meth:`FlwrStrategy.wrap`.

    Parameters
    ----------
    strategy : flwr.serverapp.strategy.Strategy
        One of Flower's ``FedAvg``, ``FedProx``, ``FedAvgM``, ``FedAdagrad``,
        ``FedAdam``, ``FedYogi`` (exactly, not a subclass) with
        ``weighted_by_key="num-examples"``.

    Raises
    ------
    TypeError
        If :func:`is_weighted_mean` does not hold for ``strategy``.
    """

    weighted_sum: ClassVar[bool] = True

    def __init__(self, strategy: Any) -> None:
        super().__init__(strategy)
        if not is_weighted_mean(strategy):
            raise TypeError(
                f"{type(strategy).__name__} is not one of Flower's "
                f"{', '.join(_WEIGHTED_MEAN_RULES)} weighted by {_WEIGHT_KEY!r}; "
                "wrap it in FlwrStrategy"
            )
