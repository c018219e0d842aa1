"""Suite-wide ordering: the long end-to-end files start first.

``make test`` runs ``pytest -n 2 --dist loadfile --no-loadscope-reorder``: each
file runs whole on one worker, in the order collected. Putting the files that
start Flower's engine or a deployment first lets their waiting (start-up,
round timeouts, SuperNode polling) overlap with each other and with the
in-process tests, instead of forming a tail at the end of the run. The order
is by each file's measured duration (docs/benchmarks.md, "Test suite time");
a file not listed keeps its place after them. (Tests marked ``slow`` run
in ``make test-slow``, which CI runs after ``make test``.)
"""

from __future__ import annotations

import pytest

#: Longest first (seconds on a quiet 2-core machine, 2026-12-08).
LONG_FILES = (
    "tests/simulations/test_composition.py",  # the composition matrix, ~28 runs
    "tests/deploy/test_e2e_superlink.py",  # TLS deployment, ServerApp kill and resume
    "tests/deploy/test_e2e_own_task.py",
    "tests/test_sweep.py",
    "tests/test_cli_resume.py",
    "tests/test_flwr_run.py",
    "tests/simulations/test_resume_sigkill.py",
    "tests/examples/test_own_task.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {path: i for i, path in enumerate(LONG_FILES)}

    def key(item: pytest.Item) -> int:
        return rank.get(item.nodeid.split("::", 1)[0], len(LONG_FILES))

    items.sort(key=key)  # stable: a file's tests keep their order
