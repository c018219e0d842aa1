"""Tests for flowerpress.deploy.cache: a device's data kept on disk between messages."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest

from flowerpress.deploy import cache as cache_module
from flowerpress.deploy.cache import DeviceCache, cache_key, device_cache
from flowerpress.deploy.data import load_device_data, save_device_data


def _arrays(n: int = 12) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.random((n, 4), dtype=np.float32), np.arange(n, dtype=np.int64) % 3


def test_put_then_get_returns_the_arrays_and_meta(tmp_path: Path) -> None:
    # Prepare
    cache = DeviceCache(tmp_path / "cache")
    x, y = _arrays()

    # Execute
    miss = cache.get("k1")
    written = cache.put("k1", x, y, {"num_classes": 3})
    hit = cache.get("k1")

    # Assert: no temporary file is left next to the entry
    assert miss is None and written == cache.path("k1")
    assert hit is not None and hit.meta == {"num_classes": 3}
    np.testing.assert_array_equal(hit.x, x)
    np.testing.assert_array_equal(hit.y, y)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["k1.npz"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "empty", "other-key"])
def test_damaged_entry_is_ignored_logged_once_and_removed(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare
    cache = DeviceCache(tmp_path)
    x, y = _arrays(200)
    path = cache.put("k1", x, y)
    assert path is not None
    raw = bytearray(path.read_bytes())
    if damage == "flip":  # inside x's data: only the zip CRC can tell
        raw[len(raw) // 3] ^= 0xFF
        path.write_bytes(bytes(raw))
    elif damage == "truncate":
        path.write_bytes(bytes(raw[: len(raw) // 2]))
    elif damage == "garbage":
        path.write_bytes(b"not an archive at all")
    elif damage == "empty":
        path.write_bytes(b"")
    else:  # a valid entry written for another key, renamed
        other = cache.put("k2", x, y)
        assert other is not None
        os.replace(other, path)

    # Execute
    with caplog.at_level(logging.WARNING, logger=cache_module.__name__):
        got = cache.get("k1")

    # Assert
    assert got is None
    assert not path.exists()
    assert len(caplog.records) == 1 and "\n" not in caplog.records[0].getMessage()


def test_unwritable_directory_costs_only_speed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: the cache "directory" is a file
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    cache = DeviceCache(blocker / "cache")
    x, y = _arrays()

    # Execute
    with caplog.at_level(logging.WARNING, logger=cache_module.__name__):
        written = cache.put("k1", x, y)

    # Assert
    assert written is None and cache.get("k1") is None
    assert len(caplog.records) == 1


def test_old_entries_are_pruned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    monkeypatch.setattr(cache_module, "MAX_ENTRIES", 3)
    cache = DeviceCache(tmp_path)
    x, y = _arrays()

    # Execute
    for i in range(5):
        path = cache.put(f"k{i}", x, y)
        assert path is not None
        os.utime(path, ns=(i * 10**9, i * 10**9))  # distinct write times

    # Assert
    assert sorted(p.stem for p in cache.entries()) == ["k2", "k3", "k4"]


def test_cache_key_depends_on_every_part() -> None:
    assert cache_key("a", 1) == cache_key("a", 1)
    assert len({cache_key("a", 1), cache_key("a", 2), cache_key("b", 1), cache_key("a")}) == 4


def test_where_the_cache_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Explicit cache-dir wins; a SuperNode's ClientApp process uses $FLWR_HOME; else none
    explicit = device_cache({"cache-dir": str(tmp_path / "c")})
    assert explicit is not None and explicit.directory == tmp_path / "c"
    monkeypatch.setattr("sys.argv", ["/venv/bin/flwr-clientapp", "--token", "t"])
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    default = device_cache({})
    assert default is not None and default.directory == tmp_path / "home" / "flowerpress-cache"
    monkeypatch.setattr("sys.argv", ["pytest"])
    assert device_cache({}) is None


# --- the device data file through the cache ------------------------------------------


def test_device_file_is_validated_once_then_read_from_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    x, y = _arrays()
    path = save_device_data(tmp_path / "d.npz", x * 255, y)
    config = {"data-path": str(path), "cache-dir": str(tmp_path / "cache")}
    first = load_device_data(config)
    validations: list[Path] = []
    from flowerpress.deploy import data as data_module

    original = data_module._load_validated
    monkeypatch.setattr(data_module, "_load_validated",
                        lambda p: validations.append(p) or original(p))

    # Execute
    second = load_device_data(config)

    # Assert: the same arrays, no second validation
    assert validations == []
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype


def test_changed_device_file_is_loaded_again(tmp_path: Path) -> None:
    # Prepare
    x, y = _arrays()
    path = save_device_data(tmp_path / "d.npz", x, y)
    config = {"data-path": str(path), "cache-dir": str(tmp_path / "cache")}
    load_device_data(config)

    # Execute: the operator replaces the file
    save_device_data(path, x[:5] + 1, y[:5])
    got_x, got_y = load_device_data(config)

    # Assert
    np.testing.assert_array_equal(got_x, x[:5] + 1)
    np.testing.assert_array_equal(got_y, y[:5])
    assert len(DeviceCache(tmp_path / "cache").entries()) == 2


def test_corrupted_cache_falls_back_to_the_file(tmp_path: Path) -> None:
    # Prepare
    x, y = _arrays()
    path = save_device_data(tmp_path / "d.npz", x, y)
    config = {"data-path": str(path), "cache-dir": str(tmp_path / "cache")}
    load_device_data(config)
    (entry,) = DeviceCache(tmp_path / "cache").entries()
    entry.write_bytes(entry.read_bytes()[:100])

    # Execute
    got_x, _ = load_device_data(config)

    # Assert: reloaded from the source and cached again
    np.testing.assert_array_equal(got_x, x)
    (again,) = DeviceCache(tmp_path / "cache").entries()
    assert again.stat().st_size > 100
