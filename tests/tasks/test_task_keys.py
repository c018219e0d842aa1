"""Only what ran is recorded: task-only run-config keys a task does not take.

``dataset``, ``partition``, ``model``, ``local-epochs``, ``batch-size`` and
``lr`` reach a task only through ``Task.run_config_keys``; set to another value
for a task that does not take them they are refused with one line, and
results.json leaves them out and records the task's own values in ``summary.task``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import numpy as np
import pytest
from torch import nn

from flowerpress.config import DEFAULTS, TASK_KEYS, ConfigError, check_task_keys, validate
from flowerpress.server.results import build_results, task_record
from flowerpress.tasks import TorchClassifierTask
from flowerpress.tasks.registry import TASKS, build_task, register_task


class Fixed(TorchClassifierTask):
    """A user task that sets its own training (batch size 32); takes no run-config key."""

    def __init__(self, *, lr: float = 0.05) -> None:
        super().__init__(local_epochs=1, batch_size=32, lr=lr, seed=0)

    def build_model(self) -> nn.Module:
        return nn.Linear(4, 2)

    def load_data(self, node_config: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(int(node_config.get("partition-id", 0)))
        y = rng.integers(0, 2, 32)
        return (rng.normal(size=(32, 4)) + y[:, None]).astype(np.float32), y

    def central_data(self) -> tuple[np.ndarray, np.ndarray]:
        return self.load_data({"partition-id": 99})


class TakesLr(Fixed):
    """The same task, taking ``lr`` (and only it) from the run config."""

    run_config_keys: ClassVar[frozenset[str]] = frozenset({"lr"})


@pytest.fixture()
def user_tasks() -> Iterator[None]:
    with TASKS.restored():
        register_task("fixed", Fixed)
        register_task("takes-lr", TakesLr)
        yield


@pytest.mark.parametrize(("values", "key"), [
    ({"task": "fixed", "batch-size": "64"}, "batch-size"),
    ({"task": "fixed", "lr": "0.01"}, "lr"),
    ({"task": "takes-lr", "local-epochs": "5"}, "local-epochs"),
    ({"task": "digits", "dataset": "digits"}, "dataset"),
])
def test_a_key_the_task_does_not_take_is_refused(user_tasks: None,
                                                  values: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        validate(values)
    line = str(caught.value)
    assert "\n" not in line and line.startswith(f"{key}=")
    assert f"does not take {key}" in line and repr(values["task"]) in line


@pytest.mark.parametrize("values", [
    {"task": "fixed"},  # defaults everywhere: nothing pretends to be set
    {"task": "fixed", "batch-size": "16", "lr": "0.1"},  # the defaults, written out
    {"task": "takes-lr", "lr": "0.01"},
    {"task": "digits", "partition": "iid", "lr": "0.05", "batch-size": "8"},
    {"dataset": "digits", "model": "mlp", "local-epochs": "1"},  # the bundled task
    {"task": "fixed:lr=0.01"},  # the task's own argument, in its spec
])
def test_keys_the_task_takes_or_defaults_are_accepted(user_tasks: None,
                                                     values: dict[str, str]) -> None:
    validate(values)


def test_a_task_takes_its_declared_keys_from_the_run_config(user_tasks: None) -> None:
    # Execute
    taken = build_task("takes-lr", {**DEFAULTS, "lr": 0.01})
    ignored = build_task("fixed", {**DEFAULTS, "lr": 0.01})
    spec_wins = build_task("takes-lr:lr=0.2", {**DEFAULTS, "lr": 0.01})
    # Assert
    assert isinstance(taken, TakesLr) and taken.lr == 0.01
    assert isinstance(ignored, Fixed) and ignored.lr == 0.05
    assert isinstance(spec_wins, TakesLr) and spec_wins.lr == 0.2


def test_a_task_object_takes_no_key() -> None:
    with pytest.raises(ConfigError, match="takes none of them"):
        check_task_keys({"lr": 0.01}, (), task="mypkg:Fixed")


def test_results_record_only_what_ran() -> None:
    # Prepare
    record = task_record(Fixed(), name="fixed", taken=())
    # Execute
    document = build_results(dict(DEFAULTS), [], model_elements=10, task=record)
    # Assert: no task-only key the task did not take; its own values under task
    assert not set(TASK_KEYS) & set(document["config"])
    assert document["config"]["seed"] == DEFAULTS["seed"]  # the server's sampling, ...
    assert document["summary"]["task"] == {"name": "fixed", "run_config_keys": [],
                                "hyperparameters": {"local-epochs": 1, "batch-size": 32,
                                                    "lr": 0.05, "seed": 0}}


def test_bundled_task_records_every_key_it_took() -> None:
    # Prepare
    config = validate({"dataset": "digits", "batch-size": "8"})
    task = build_task("bundled", config)
    # Execute
    document = build_results(config, [], model_elements=10, task=task_record(
        task, name="bundled", taken=type(task).run_config_keys))
    # Assert
    assert set(TASK_KEYS) <= set(document["config"])
    assert document["summary"]["task"]["hyperparameters"]["batch-size"] == 8


def test_serve_refuses_a_key_a_task_object_ignores_and_records_what_ran() -> None:
    # Prepare
    from flowerpress import client_app, serve, server_app
    from flowerpress.testing import InProcessGrid, server_identity

    task = Fixed()
    refused = validate({"num-clients": 2, "clients-per-round": 2, "rounds": 1,
                        "batch-size": 64})
    config = validate({"num-clients": 2, "clients-per-round": 2, "rounds": 1})
    # Execute / Assert: refused at build time and by serve, before any round
    with pytest.raises(ConfigError, match=r"batch-size=64 is not allowed: task '.*:Fixed'"):
        server_app(task, batch_size=64)
    with server_identity(), pytest.raises(ConfigError, match="does not take batch-size"):
        serve(InProcessGrid(client_app(task), 2, run_config=refused), refused, task=task)
    with server_identity():
        result = serve(InProcessGrid(client_app(task), 2, run_config=config), config,
                       task=task)
    # Assert: the batch size that ran (32) is recorded; the run config's 16 is not
    assert "batch-size" not in result["config"] and "lr" not in result["config"]
    assert result["summary"]["task"]["hyperparameters"]["batch-size"] == 32
    assert result["summary"]["task"]["name"].endswith(":Fixed")
