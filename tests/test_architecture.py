"""The layers of ARCHITECTURE.md hold: who imports whom, and what a device loads."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from flowerpress.testing import modules_loaded

PACKAGE = Path(__file__).resolve().parents[1] / "flowerpress"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Every flowerpress module's flowerpress imports, lazy ones (inside functions) included."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
        graph[name] = {m for m in found if m.startswith("flowerpress")}
    return graph


def _violations(source: str, forbidden: tuple[str, ...]) -> list[str]:
    out = []
    for module, targets in _imports().items():
        if module == source or module.startswith(source + "."):
            out += [f"{module} -> {t}" for t in sorted(targets)
                    if any(t == f or t.startswith(f + ".") for f in forbidden)]
    return out


@pytest.mark.parametrize(("source", "forbidden"), [
    # The two apps never import each other: what both need is in the protocol or below.
    ("flowerpress.client", ("flowerpress.server",)),
    ("flowerpress.server", ("flowerpress.client",)),
    # Nothing a device runs depends on simulation-only code.
    ("flowerpress.client", ("flowerpress.simulations",)),
    ("flowerpress.protocol", ("flowerpress.simulations", "flowerpress.server",
                              "flowerpress.client")),
    # The extension points sit below the protocol and the apps.
    ("flowerpress.tasks", ("flowerpress.server", "flowerpress.client", "flowerpress.protocol",
                           "flowerpress.simulations", "flowerpress.strategies")),
    ("flowerpress.strategies", ("flowerpress.server", "flowerpress.client",
                                "flowerpress.protocol", "flowerpress.simulations",
                                "flowerpress.tasks")),
    ("flowerpress.compression", ("flowerpress.server", "flowerpress.client",
                                 "flowerpress.protocol", "flowerpress.simulations",
                                 "flowerpress.tasks", "flowerpress.privacy")),
    ("flowerpress.privacy", ("flowerpress.server", "flowerpress.client",
                             "flowerpress.simulations", "flowerpress.tasks",
                             "flowerpress.compression")),
    # Experiment tracking watches a run from outside; nothing in a run imports it.
    ("flowerpress.server", ("flowerpress.tracking", "mlflow", "tensorboard")),
    ("flowerpress.client", ("flowerpress.tracking", "mlflow", "tensorboard")),
    ("flowerpress.simulations", ("flowerpress.tracking", "mlflow", "tensorboard")),
])
def test_layers(source: str, forbidden: tuple[str, ...]) -> None:
    assert _violations(source, forbidden) == []


def test_device_import_is_lean() -> None:
    # Prepare: a fresh interpreter, as a SuperNode starts a ClientApp process
    heavy = ["dp_accounting", "scipy", "datasets", "sklearn", "matplotlib", "ray", "mlflow",
             "tensorboard",
             "flowerpress.server", "flowerpress.simulations", "flowerpress.strategies"]
    # Execute
    _, loaded = modules_loaded("import flowerpress.client.app", heavy, timeout=120)
    # Assert
    assert loaded == []


def test_ci_runs_the_slow_tests_that_make_test_leaves_out() -> None:
    # Prepare
    root = Path(__file__).resolve().parents[1]
    ci = (root / ".ci" / "run").read_text(encoding="utf-8").split()
    makefile = (root / "Makefile").read_text(encoding="utf-8")
    # Assert: `make test` deselects `slow`, `make test-slow` selects it, CI runs both
    assert '-m "not slow"' in makefile.split("\ntest:", 1)[1].split("\n\n", 1)[0]
    assert "-m slow" in makefile.split("\ntest-slow:", 1)[1].split("\n\n", 1)[0]
    assert [ci[i + 1] for i, word in enumerate(ci[:-1]) if word == "make"] == ["test", "test-slow"]
