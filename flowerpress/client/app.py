"""flowerpress's ClientApp: a task's local training and evaluation behind Flower's mods.

:func:`client_app` builds a Flower ``ClientApp`` from a task::

    app = client_app(MyTask())          # or client_app() to read `task` from the run config

The app itself only trains and evaluates; what happens to the reply on its
way out (privacy noise, compression) is done by Flower mods
(:func:`~flowerpress.client.mods.compression_mod`,
:func:`~flowerpress.privacy.dp_mod`), which work on any ClientApp that
replies with an ArrayRecord of weights. Outermost,
:func:`~flowerpress.client.mods.plugins_mod` imports the run config's
``plugins`` modules on this node (Flower ships a loaded ClientApp to its
workers, so the user's app module never runs there).

A node's data is loaded once per process and kept in memory (Flower's
simulation engine reuses a process for many messages). A SuperNode starts a
fresh process per message instead: there the bundled tasks and
:func:`flowerpress.deploy.data.load_device_data` keep a node's validated data in
the device cache on disk (:mod:`flowerpress.deploy.cache`), and the task is
built from the run config without loading any data.

A task that cannot run on this node (a missing or malformed data file, a bad
``task`` spec: :class:`~flowerpress.tasks.TaskError`) is one log line and an
error reply naming the problem, never a traceback per message.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from flwr.common.constant import ErrorCode

from flowerpress import protocol
from flowerpress.client.mods import device_log_mod, make_compression_mod, plugins_mod
from flowerpress.compression.mask import apply_mask_inplace
from flowerpress.privacy.mod import dp_mod
from flowerpress.secagg.mod import secagg_mod
from flowerpress.tasks.base import Scalar, Task, TaskError, TrainContext, Weights

log = logging.getLogger(__name__)

#: Turns the task a run config names into the one this app runs (simulations
#: wrap it with simulated attacks; devices never do).
TaskWrapper = Callable[[Task, Mapping[str, Scalar]], Task]

_TASKS: dict[Hashable, Task] = {}
_DATA: dict[Hashable, Any] = {}
#: id(task) -> (task, its initial weights): the anchor of the history download.
_INITIAL: dict[Hashable, tuple[Task, Weights]] = {}
_CACHE_LIMIT = 8


def _remember(cache: dict[Hashable, Any], key: Hashable, value: Any) -> Any:
    if len(cache) >= _CACHE_LIMIT:
        cache.pop(next(iter(cache)))
    cache[key] = value
    return value


def partition_of(context: Context) -> tuple[int, int]:
    """This node's ``(partition-id, num-partitions)``, or ``(-1, 0)`` if unset."""
    pid = context.node_config.get(protocol.PARTITION_ID)
    n = context.node_config.get(protocol.NUM_PARTITIONS)
    if isinstance(pid, int) and isinstance(n, int):
        return pid, n
    return -1, 0


def node_seed(seed: int, context: Context, server_round: int) -> int:
    """A seed for this node and round, split from the run's root seed."""
    pid, _ = partition_of(context)
    stream = pid if pid >= 0 else context.node_id
    state = np.random.SeedSequence([abs(seed), abs(stream), abs(server_round)]
                                   ).generate_state(2, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))


def received_weights(msg: Message) -> Weights:
    """The global weights the message carries (ArrayRecord ``arrays``), as float32."""
    record = msg.content.array_records.get(protocol.ARRAYS)
    if record is None:
        raise ValueError(f"message has no ArrayRecord {protocol.ARRAYS!r}; expected the "
                         "global model")
    return [np.asarray(a, dtype=np.float32) for a in record.to_numpy_ndarrays()]


def node_data(task: Task, context: Context) -> Any:
    """This node's data for ``task``: loaded once per process, then from memory."""
    config = dict(context.node_config)
    key = (id(task), task.data_key(config))
    if key not in _DATA:
        _remember(_DATA, key, task.load_data(config))
    return _DATA[key]


def _task_error_reply(msg: Message, exc: TaskError) -> Message:
    """One log line and an error reply for a task that cannot run on this node."""
    reason = " ".join(str(exc).split()) or type(exc).__name__
    log.error("flowerpress ClientApp: %s", reason)
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                         reason=f"{type(exc).__name__}: {reason}"), reply_to=msg)


def client_app(task: Task | None = None, *, wrap: TaskWrapper | None = None,
               mods: bool = True, outer_mods: Sequence[Mod] = ()) -> ClientApp:
    """A Flower ClientApp that trains and evaluates ``task`` on the node's data.

    Parameters
    ----------
    task
        The task; ``None`` builds it from the run config's ``task`` key (or the
        bundled ``dataset``) on first use.
    wrap
        Applied to a task built from the run config (simulations use it for
        attacks).
    mods
        Install flowerpress's mods, outer to inner ``compression_mod, dp_mod,
        secagg_mod``: the broadcast is decoded first and the update encoded
        last, so it is clipped and noised before it is compressed
        (``secagg_mod`` acts only on secure-aggregation rounds). The
        compression mod gets the task's ``initial_weights`` (built once per
        task), so a first history download can be a difference from them.
    outer_mods
        Further Flower mods placed outside flowerpress's.

    Whatever ``mods`` says, :func:`~flowerpress.client.mods.device_log_mod` comes
    first (one line per message in the node config's ``log-file``, if set),
    then :func:`~flowerpress.client.mods.plugins_mod`: it imports the run
    config's ``plugins`` modules (once per process) before any spec (task,
    codec, DP mechanism) is parsed.
    """

    def resolve(context: Context) -> Task:
        if task is not None:
            return task
        config = dict(context.run_config)
        if wrap is None and str(config.get("attack", "none")).strip() not in ("", "none"):
            raise TaskError("attack is simulation-only: `flowerpress simulate` runs it; this "
                             "ClientApp trains honestly (set attack=none)")
        key = tuple(sorted(config.items()))
        cached = _TASKS.get(key)
        if cached is None:
            from flowerpress.tasks.registry import build_task, task_spec

            built = build_task(task_spec(config), config)
            cached = _remember(_TASKS, key, built if wrap is None else wrap(built, config))
        return cached

    def initial_weights(context: Context) -> Weights:
        current = resolve(context)
        cached = _INITIAL.get(id(current))
        if cached is None or cached[0] is not current:
            weights = [np.asarray(w, dtype=np.float32) for w in current.initial_weights()]
            cached = _remember(_INITIAL, id(current), (current, weights))
        return cached[1]

    compression = make_compression_mod(initial_weights=initial_weights)
    app = ClientApp(mods=[device_log_mod, plugins_mod, *outer_mods,
                          *([compression, dp_mod, secagg_mod] if mods else [])])

    @app.query()
    def hello(msg: Message, context: Context) -> Message:
        """Tell the server which partition this node holds (for reproducible sampling)."""
        config = msg.content.config_records.get(protocol.CONFIG) if msg.has_content() else None
        if config is not None and protocol.FORMAT_KEY in config:
            mismatch = protocol.format_mismatch(config.get(protocol.FORMAT_KEY),
                                                config.get(protocol.VERSION_KEY),
                                                side="the server")
            if mismatch is not None:  # the server excludes this node; say why here too
                log.error("flowerpress: %s", mismatch)
        pid, n = partition_of(context)
        return protocol.query_reply(msg, partition_id=pid, num_partitions=n)

    @app.train()
    def train_handler(msg: Message, context: Context) -> Message:
        """Train the received global model on local data for one round."""
        try:
            instruction = protocol.TrainInstruction.from_message(msg)
            current = resolve(context)
            data = node_data(current, context)
            received = received_weights(msg)
            try:
                mask = protocol.prune_mask_of(msg, received)
            except ValueError as exc:
                raise TaskError(f"the server's pruning mask: {exc}") from None
            if mask is not None:  # the masked model (its pruned weights zero whatever
                received = [np.where(m, w, np.float32(0.0))  # a lossy download decoded)
                            for w, m in zip(received, mask, strict=True)]
            result = current.train(received, data, TrainContext(
                server_round=instruction.server_round,
                seed=node_seed(instruction.seed, context, instruction.server_round),
                config=instruction.extra, mask=mask))
            if len(result.weights) != len(received) or any(
                    np.shape(w) != g.shape
                    for w, g in zip(result.weights, received, strict=True)):
                raise TaskError(f"{type(current).__name__}.train returned weights whose "
                                "shapes differ from the received model's")
            # The FLOPs the task counted, or declares (Task.train_flops); compression_mod
            # packs them into the reply's claim (never under DP or secure aggregation).
            flops = result.flops if result.flops is not None else current.train_flops(
                result.num_examples)
        except TaskError as exc:
            return _task_error_reply(msg, exc)
        weights = [np.array(w, dtype=np.float32) for w in result.weights]
        if mask is not None:  # pruned weights stay zero, whatever the task did
            apply_mask_inplace(weights, mask)
        return protocol.train_reply(msg, weights, num_examples=result.num_examples,
                                    metrics=result.metrics, flops=flops)

    @app.evaluate()
    def evaluate_handler(msg: Message, context: Context) -> Message:
        """Evaluate the received global model on local data."""
        try:
            current = resolve(context)
            res = current.evaluate(received_weights(msg), node_data(current, context))
        except TaskError as exc:
            return _task_error_reply(msg, exc)
        return protocol.eval_reply(msg, num_examples=res.num_examples, loss=res.loss,
                                   accuracy=res.accuracy, metrics=res.metrics)

    return app


#: The app ``flwr run`` loads (``[tool.flwr.app.components]``): the task comes
#: from the run config.
app = client_app()
