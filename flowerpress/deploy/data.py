"""A device's own training data, named by the SuperNode's node config.

A device started with ``flower-supernode --node-config "data-path=/data/local.npz"``
trains on the arrays in that file. The format is a NumPy ``.npz`` archive holding

* ``x``: features or images, a real-valued array of shape ``(n, ...)`` (float or
  integer pixels; returned as ``float32``), all values finite;
* ``y``: integer class labels ``>= 0``, shape ``(n,)``.

Write one with :func:`save_device_data` (or ``np.savez(path, x=x, y=y)``).
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import numpy.typing as npt

__all__ = [
    "DATA_PATH_KEY",
    "EXPECTED_FORMAT",
    "DeviceDataError",
    "has_device_data",
    "load_device_data",
    "save_device_data",
]

#: Node-config key naming the device's ``.npz`` file.
DATA_PATH_KEY = "data-path"

#: Appended to every error so the operator sees what the file must contain.
EXPECTED_FORMAT = (
    "expected an .npz file with arrays 'x' (real-valued, shape (n, ...)) "
    "and 'y' (integer labels >= 0, shape (n,))"
)


class DeviceDataError(ValueError):
    """The device's data file is missing or does not have the documented format."""


def has_device_data(node_config: Mapping[str, object]) -> bool:
    """Return whether the node config names a device data file (``data-path``)."""
    value = node_config.get(DATA_PATH_KEY)
    return isinstance(value, str) and value.strip() != ""


def _fail(path: object, problem: str) -> DeviceDataError:
    return DeviceDataError(f"device data {path}: {problem}; {EXPECTED_FORMAT}")


def load_device_data(
    node_config: Mapping[str, object],
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Load ``(x, y)`` from the ``.npz`` file named by ``node_config["data-path"]``.

    Parameters
    ----------
    node_config : Mapping[str, object]
        The SuperNode's node config (``context.node_config`` in a ClientApp).

    Returns
    -------
    tuple of ndarray
        ``x`` as ``float32`` with shape ``(n, ...)`` and ``y`` as ``int64`` with
        shape ``(n,)``, ``n >= 1``.

    Raises
    ------
    DeviceDataError
        One line naming the path (or the missing key) and the expected format.
    """
    raw = node_config.get(DATA_PATH_KEY)
    if not isinstance(raw, str) or not raw.strip():
        raise DeviceDataError(
            f"node config has no {DATA_PATH_KEY!r} string (got {raw!r}); set "
            f"flower-supernode --node-config \"{DATA_PATH_KEY}='/path/to/data.npz'\"; "
            f"{EXPECTED_FORMAT}"
        )
    path = Path(raw.strip()).expanduser()
    if not path.is_file():
        raise _fail(path, "file not found")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise _fail(path, "not an .npz archive (a single .npy array?)")
        with loaded as archive:
            missing = [k for k in ("x", "y") if k not in archive.files]
            if missing:
                raise _fail(
                    path, f"missing array(s) {', '.join(missing)} (found {archive.files})"
                )
            x = archive["x"]
            y = archive["y"]
    except DeviceDataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        # np.load raises ValueError for pickled object arrays and unreadable data.
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise _fail(path, f"cannot read ({first_line})") from exc

    if x.dtype.kind not in "fiu" or x.dtype == np.bool_:
        raise _fail(path, f"'x' has dtype {x.dtype}, not a real number type")
    if y.dtype.kind not in "iu":
        raise _fail(path, f"'y' has dtype {y.dtype}, not an integer type")
    if x.ndim < 2:
        raise _fail(path, f"'x' has shape {x.shape}, expected (n, features...)")
    if y.ndim != 1:
        raise _fail(path, f"'y' has shape {y.shape}, expected (n,)")
    if x.shape[0] != y.shape[0]:
        raise _fail(path, f"'x' has {x.shape[0]} rows but 'y' has {y.shape[0]}")
    if y.shape[0] == 0:
        raise _fail(path, "no examples (n == 0)")
    x32 = x.astype(np.float32, copy=False)
    if not np.all(np.isfinite(x32)):
        raise _fail(path, "'x' contains NaN or infinite values")
    if int(y.min()) < 0:
        raise _fail(path, f"'y' contains a negative label ({int(y.min())})")
    return x32, y.astype(np.int64, copy=False)


def save_device_data(path: Path | str, x: npt.ArrayLike, y: npt.ArrayLike) -> Path:
    """Write ``x`` and ``y`` in the device data format and check it loads back.

    Parameters
    ----------
    path : Path or str
        Destination; ``.npz`` is appended by NumPy if missing.
    x, y : array_like
        Features ``(n, ...)`` and integer labels ``(n,)``.

    Returns
    -------
    Path
        The path of the written file.

    Raises
    ------
    DeviceDataError
        If the arrays do not satisfy the format (the file is removed again).
    """
    target = Path(path).expanduser()
    if target.suffix != ".npz":
        target = target.with_name(target.name + ".npz")
    np.savez(target, x=np.asarray(x), y=np.asarray(y))
    try:
        load_device_data({DATA_PATH_KEY: str(target)})
    except DeviceDataError:
        target.unlink(missing_ok=True)
        raise
    return target
