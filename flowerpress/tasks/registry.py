"""The task registry and the run-config key ``task``.

``task`` takes a registered name or ``package.module:Class`` with
``:arg=value,...`` (the grammar of :mod:`flowerpress.registry`); empty means
the bundled task of the ``dataset`` key (``mnist``, ``digits``,
``synthetic:A,B``, ``hub:NAME``), so every older run config still works.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flowerpress.registry import Registry
from flowerpress.tasks.base import Scalar, Task, TaskError
from flowerpress.tasks.bundled import BundledTask, Digits, Hub, Mnist, Synthetic

TASKS: Registry[Task] = Registry("task", Task, error=TaskError)  # type: ignore[type-abstract]


def register_task(name: str, cls: type[Task], *, force: bool = False) -> None:
    """Make ``cls`` selectable as ``task=NAME[:ARG=VALUE,...]`` (duplicates refused)."""
    TASKS.register(name, cls, force=force)


def available_tasks() -> list[str]:
    """The registered task names, sorted."""
    return TASKS.names()


def task_spec(run_config: Mapping[str, Scalar]) -> str:
    """The task spec a run config names (``task``, else the bundled ``dataset``)."""
    spec = str(run_config.get("task", "") or "").strip()
    return spec or "bundled"


def task_name(task: Task) -> str:
    """A task object's ``module:Class``, as a spec names it (for messages and results)."""
    cls = type(task)
    return f"{cls.__module__}:{cls.__qualname__}"


def build_task(spec: str, run_config: Mapping[str, Scalar] | None = None) -> Task:
    """Build the task ``spec`` names, letting it read the run config.

    Raises
    ------
    TaskError
        One line naming the known tasks or the allowed arguments.
    """
    config = dict(run_config or {})

    def factory(cls: type[Task], kwargs: dict[str, Any]) -> Task:
        return cls.from_run_config(config, **kwargs)

    return TASKS.build(spec, factory)


for _name, _cls in (("bundled", BundledTask), ("mnist", Mnist), ("digits", Digits),
                    ("synthetic", Synthetic), ("hub", Hub)):
    register_task(_name, _cls)
