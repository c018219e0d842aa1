"""Tests for flowerpress.deploy.data: the data-path=...npz device data format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flowerpress.deploy.data import (
    DeviceDataError,
    check_device_file,
    has_device_data,
    load_device_data,
    save_device_data,
)


def test_loads_x_as_float32_and_y_as_int64(tmp_path: Path) -> None:
    # Prepare
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, size=(6, 8, 8), dtype=np.uint8)
    y = np.array([0, 1, 2, 3, 4, 9], dtype=np.int32)
    path = tmp_path / "device.npz"
    np.savez(path, x=x, y=y)

    # Execute
    got_x, got_y = load_device_data({"data-path": str(path), "partition-id": 0})

    # Assert
    assert got_x.dtype == np.float32 and got_y.dtype == np.int64
    np.testing.assert_array_equal(got_x, x.astype(np.float32))
    np.testing.assert_array_equal(got_y, y)


def test_save_then_load_roundtrip(tmp_path: Path) -> None:
    # Prepare
    x = np.linspace(0, 1, 20, dtype=np.float64).reshape(5, 4)
    y = np.arange(5)

    # Execute
    path = save_device_data(tmp_path / "d", x, y)
    got_x, got_y = load_device_data({"data-path": str(path)})

    # Assert
    assert path.name == "d.npz"
    np.testing.assert_allclose(got_x, x.astype(np.float32))
    np.testing.assert_array_equal(got_y, y)


def test_has_device_data() -> None:
    assert has_device_data({"data-path": "/d.npz"})
    assert not has_device_data({"data-path": "  "})
    assert not has_device_data({"partition-id": 3, "num-partitions": 10})


def _write(path: Path, **arrays: object) -> Path:
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


@pytest.mark.parametrize(
    ("arrays", "problem"),
    [
        ({"x": np.zeros((3, 2))}, "missing array"),
        ({"x": np.zeros((3, 2)), "y": np.zeros(3, dtype=np.float32)}, "'y' has dtype"),
        ({"x": np.array([["a"], ["b"]]), "y": np.zeros(2, dtype=int)}, "'x' has dtype"),
        ({"x": np.zeros(3), "y": np.zeros(3, dtype=int)}, "'x' has shape"),
        ({"x": np.zeros((3, 2)), "y": np.zeros((3, 1), dtype=int)}, "'y' has shape"),
        ({"x": np.zeros((3, 2)), "y": np.zeros(4, dtype=int)}, "3 rows"),
        ({"x": np.zeros((0, 2)), "y": np.zeros(0, dtype=int)}, "no examples"),
        ({"x": np.full((2, 2), np.nan), "y": np.zeros(2, dtype=int)}, "NaN"),
        ({"x": np.zeros((2, 2)), "y": np.array([0, -1])}, "negative label"),
    ],
)
def test_malformed_file_names_path_and_format(
    tmp_path: Path, arrays: dict[str, object], problem: str
) -> None:
    # Prepare
    path = _write(tmp_path / "bad.npz", **arrays)

    # Execute
    with pytest.raises(DeviceDataError) as info:
        load_device_data({"data-path": str(path)})

    # Assert
    message = str(info.value)
    assert problem in message
    assert str(path) in message and "expected an .npz file" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("name", "content"),
    [("missing.npz", None), ("garbage.npz", b"not a zip file"), ("array.npy", "npy")],
)
def test_unreadable_file_is_one_clear_line(tmp_path: Path, name: str, content: object) -> None:
    # Prepare
    path = tmp_path / name
    if content == "npy":
        np.save(path, np.zeros(3))
    elif isinstance(content, bytes):
        path.write_bytes(content)

    # Execute
    with pytest.raises(DeviceDataError) as info:
        load_device_data({"data-path": str(path)})

    # Assert
    message = str(info.value)
    assert str(path) in message and "'x'" in message and "'y'" in message
    assert "\n" not in message
    assert isinstance(info.value, ValueError)


def test_pickled_object_arrays_are_refused(tmp_path: Path) -> None:
    # Prepare: object arrays need pickle, which must never be loaded from a device file
    path = tmp_path / "obj.npz"
    np.savez(path, x=np.array([{"a": 1}], dtype=object), y=np.zeros(1, dtype=int))

    # Execute / Assert
    with pytest.raises(DeviceDataError, match="holds Python objects") as info:
        load_device_data({"data-path": str(path)})
    assert "allow_pickle" not in str(info.value) and "pickle.load" not in str(info.value)


@pytest.mark.parametrize("content", [b"x,y\n0.5,1\n", b"", b"\x00\x01\x02binary"])
def test_non_archive_never_suggests_unsafe_loading(tmp_path: Path, content: bytes) -> None:
    # Prepare: e.g. a CSV saved under the .npz name (NumPy would suggest allow_pickle=True)
    path = tmp_path / "data.npz"
    path.write_bytes(content)

    # Execute
    with pytest.raises(DeviceDataError) as info:
        load_device_data({"data-path": str(path)})

    # Assert
    message = str(info.value)
    assert "not an .npz archive" in message and str(path) in message
    assert "pickle" not in message and "\n" not in message


def test_check_device_file_lists_every_problem(tmp_path: Path) -> None:
    # Prepare
    path = _write(tmp_path / "bad.npz", x=np.full(3, np.nan), y=np.array([0.5, 1.0]))

    # Execute
    problems = check_device_file(path)

    # Assert
    assert len(problems) == 4  # y dtype, x shape, row count, NaN
    assert all("\n" not in p for p in problems)
    assert check_device_file(save_device_data(tmp_path / "ok.npz", np.ones((2, 3)), [0, 1])) == []


def test_missing_key_names_the_key() -> None:
    with pytest.raises(DeviceDataError, match="'data-path'"):
        load_device_data({"partition-id": 3})
