"""The task interface: what a federation learns.

A task owns the model and the data; flowerpress owns the loop (sampling,
messaging, compression, privacy, validation, accounting). It is the
federated counterpart of FedJAX's ``FederatedAlgorithm(init, apply)`` and of
the ``initial_arrays`` / ``evaluate_fn`` a Flower ``Strategy.start`` takes:

* both sides: :meth:`Task.initial_weights` (the server starts from them; a
  device needs only the shapes it receives);
* a device: :meth:`Task.load_data` (this node's data, loaded once per
  process and cached by the ClientApp), :meth:`Task.train` and
  :meth:`Task.evaluate` (federated evaluation);
* the server: :meth:`Task.central_data` (a held-out set, or ``None`` when a
  real federation has none: then the server evaluates on the nodes).

Weights travel as ``list[np.ndarray]`` (float32) in a fixed order, e.g. a
torch ``state_dict``'s.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from numpy.typing import NDArray

Scalar = bool | int | float | str
Weights = list[NDArray[np.float32]]


class TaskError(ValueError):
    """A task spec, its arguments or a node's data are not usable."""


@dataclass(frozen=True)
class TrainContext:
    """What a device knows about the round it trains in.

    Attributes
    ----------
    server_round : int
        The round, from 1.
    seed : int
        A seed for this node and round, split from the run's root seed: use it
        for every random choice in training (shuffling, dropout), so runs repeat.
    config : Mapping[str, Scalar]
        The strategy's keys for this round (e.g. FedProx's ``proximal-mu``).
    mask : list of bool arrays or None
        The server's pruning mask (run-config ``prune``), one array per tensor of
        the received weights, True where a weight is kept; None without pruning.
        The received weights are already zero where it is False. A task keeps
        them zero while it trains (re-apply the mask after every optimizer step,
        as the bundled tasks do); the ClientApp zeroes them in the returned
        weights in any case, and only the kept coordinates are uploaded.
    """

    server_round: int
    seed: int
    config: Mapping[str, Scalar] = field(default_factory=dict)
    mask: list[NDArray[np.bool_]] | None = None


@dataclass(frozen=True)
class TrainResult:
    """What local training produced.

    Attributes
    ----------
    weights : list of float32 arrays
        The local model after training, in the order of the received weights.
    num_examples : int
        Examples trained on (the aggregation weight; the server caps it).
    metrics : Mapping[str, float]
        Finite numbers for the server and the strategy, e.g. ``train-loss`` and
        ``local-steps`` (FedNova needs the latter).
    flops : float or None
        Floating-point operations this training actually spent (reported to
        the server for its compute columns, never used for aggregation).
        ``None``: the ClientApp asks :meth:`Task.train_flops` instead.
        :class:`~flowerpress.tasks.TorchClassifierTask` counts them with
        PyTorch's FLOP counter (:mod:`flowerpress.tasks.flops`).
    """

    weights: Weights
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    flops: float | None = None


@dataclass(frozen=True)
class Evaluation:
    """A model's quality on one data set.

    ``loss`` is required; ``accuracy`` (in [0, 1]) and further metrics (such as
    ``f1_macro``) are optional.
    """

    num_examples: int
    loss: float
    accuracy: float | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)


class Task(ABC):
    """What a federation learns: initial weights, local training, evaluation.

    Subclass it (or :class:`flowerpress.tasks.TorchClassifierTask` for a torch
    classifier) and name it in the run config as ``task=package.module:Class``
    (constructor arguments as ``:arg=value,...``), register it with
    :func:`flowerpress.tasks.register_task`, or pass an instance to
    :func:`flowerpress.server_app` / :func:`flowerpress.client_app`.

    The run-config keys only a task reads (``dataset``, ``partition``,
    ``model``, ``local-epochs``, ``batch-size``, ``lr``:
    :data:`flowerpress.config.TASK_KEYS`) reach a task named in the run config
    only if it lists them in :attr:`run_config_keys`; a run config that sets
    another of them to a non-default value is refused, and results.json
    records only those the task took.
    """

    #: The run-config keys :meth:`from_run_config` reads, e.g. ``{"lr",
    #: "local-epochs"}``. None by default: the constructor's (or the spec's)
    #: values rule, and a run config may not pretend to set them.
    run_config_keys: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Scalar], **kwargs: Any) -> Task:
        """Build the task from the spec's arguments and the run-config keys it takes.

        The default passes each key of :attr:`run_config_keys` that the run
        config holds as the constructor argument of the same name (``-`` as
        ``_``: ``local-epochs`` -> ``local_epochs``); the spec's arguments win.
        The bundled tasks override it (``num-clients`` -> ``num_partitions``).
        """
        taken = {key.replace("-", "_"): run_config[key]
                 for key in sorted(cls.run_config_keys) if key in run_config}
        return cls(**{**taken, **kwargs})

    def hyperparameters(self) -> Mapping[str, Scalar]:
        """The values this task trains with, recorded in results.json (``summary.task``).

        Keys as in the run config (``lr``, ``batch-size``, ...). The default
        reports none; :class:`~flowerpress.tasks.TorchClassifierTask` reports
        its ``local-epochs``, ``batch-size``, ``lr`` and ``seed``.
        """
        return {}

    @abstractmethod
    def initial_weights(self) -> Weights:
        """The model's initial weights (the same on every call: seed them)."""

    @abstractmethod
    def load_data(self, node_config: Mapping[str, Scalar]) -> Any:
        """This node's training data, from its node config (e.g. ``data-path``).

        Raises
        ------
        TaskError
            One line naming the node-config key and what it must hold.
        """

    @abstractmethod
    def train(self, weights: Weights, data: Any, context: TrainContext) -> TrainResult:
        """Train from ``weights`` on ``data``; return the local weights."""

    @abstractmethod
    def evaluate(self, weights: Weights, data: Any) -> Evaluation:
        """Evaluate ``weights`` on ``data`` (a node's data or :meth:`central_data`)."""

    def train_flops(self, num_examples: int) -> float | None:
        """Floating-point operations one round of local training spends on ``num_examples``.

        Optional (the default is ``None``: unknown). Two readers:

        * a device whose :meth:`train` returned ``TrainResult.flops=None``
          reports this value for the examples it trained on (a task that
          knows its cost declares it here instead of counting);
        * the server bounds what any device reports by a multiple of this
          value for the largest plausible partition (``max-client-weight``
          examples), :func:`flowerpress.protocol.compute_bounds`; without it
          the bound comes from the model's parameter count alone.

        Reporting only: nothing is aggregated or refused by it.
        """
        del num_examples
        return None

    def central_data(self) -> Any | None:
        """A server-side test set for central evaluation, or ``None`` (the default).

        With ``None`` the server asks the round's nodes to evaluate the new
        global model and reports their example-weighted metrics.
        """
        return None

    def data_key(self, node_config: Mapping[str, Scalar]) -> Hashable:
        """Key under which a node's loaded data is cached between messages."""
        return tuple(sorted(node_config.items()))
