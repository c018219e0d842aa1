"""Shared fixtures: every test that registers a codec stage restores the registry."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from flowerpress.compression import registry


@pytest.fixture
def restore_stage_registry() -> Iterator[None]:
    """Snapshot the stage registry and put it back after the test."""
    by_name = dict(registry._BY_NAME)
    by_wire = dict(registry._BY_WIRE)
    try:
        yield
    finally:
        registry._BY_NAME.clear()
        registry._BY_NAME.update(by_name)
        registry._BY_WIRE.clear()
        registry._BY_WIRE.update(by_wire)
