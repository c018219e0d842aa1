"""A device's own training data, named by the SuperNode's node config.

A device started with ``flower-supernode --node-config "data-path='/data/local.npz'"``
trains on the arrays in that file. The format is a NumPy ``.npz`` archive holding

* ``x``: features or images, a real-valued array of shape ``(n, ...)`` (float or
  integer pixels; returned as ``float32``), all values finite;
* ``y``: integer class labels ``>= 0``, shape ``(n,)``.

Write one with :func:`save_device_data` (or ``np.savez(path, x=x, y=y)``). The file
is validated once: the validated arrays are kept in the device cache
(:mod:`flowerpress.deploy.cache`) under a hash of the file's content, so the
following messages (each a fresh ClientApp process) read them back without
checking again, and a changed file is validated again. Object (pickled) arrays
are never loaded. Every problem is one line naming the file and the format
(:class:`DeviceDataError`); ``flowerpress device check`` lists them all before a
device joins.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import numpy.typing as npt

from flowerpress.deploy.cache import cache_key, device_cache, file_digest
from flowerpress.tasks.base import TaskError

__all__ = [
    "DATA_PATH_KEY",
    "EXPECTED_FORMAT",
    "DeviceDataError",
    "check_device_file",
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

_ZIP_MAGIC = b"PK\x03\x04"
_NPY_MAGIC = b"\x93NUMPY"
_EMPTY_ZIP = b"PK\x05\x06"


class DeviceDataError(TaskError):
    """The device's data file is missing or does not have the documented format."""


def has_device_data(node_config: Mapping[str, object]) -> bool:
    """Return whether the node config names a device data file (``data-path``)."""
    value = node_config.get(DATA_PATH_KEY)
    return isinstance(value, str) and value.strip() != ""


def data_path(node_config: Mapping[str, object]) -> Path:
    """The ``data-path`` of a node config.

    Raises
    ------
    DeviceDataError
        The key is missing or not a non-empty string (one line, with the fix).
    """
    raw = node_config.get(DATA_PATH_KEY)
    if not isinstance(raw, str) or not raw.strip():
        raise DeviceDataError(
            f"node config has no {DATA_PATH_KEY!r} string (got {raw!r}); set "
            f"flower-supernode --node-config \"{DATA_PATH_KEY}='/path/to/data.npz'\"; "
            f"{EXPECTED_FORMAT}"
        )
    return Path(raw.strip()).expanduser()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _read(path: Path) -> tuple[npt.NDArray[np.generic], npt.NDArray[np.generic]]:
    """The raw ``x`` and ``y`` of a device file; one-line problems as ``ValueError``."""
    if not path.exists():
        raise ValueError("file not found")
    if not path.is_file():
        raise ValueError("not a regular file")
    with path.open("rb") as handle:
        head = handle.read(6)
    if head.startswith(_NPY_MAGIC):
        raise ValueError("a single .npy array, not an .npz archive (save both arrays with "
                         "np.savez(path, x=x, y=y))")
    if not (head.startswith(_ZIP_MAGIC) or head.startswith(_EMPTY_ZIP)):
        # Checked before NumPy sees the file: for anything that is not an archive NumPy
        # suggests loading it with pickle, which a device must never do.
        kind = "empty" if not head else "text" if head.isascii() else "binary"
        raise ValueError(f"not an .npz archive ({kind} content)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in ("x", "y") if k not in archive.files]
            if missing:
                raise ValueError(f"missing array(s) {', '.join(missing)} "
                                 f"(found {archive.files or 'none'})")
            arrays = []
            for name in ("x", "y"):
                try:
                    arrays.append(archive[name])
                except ValueError as exc:
                    if "allow_pickle" in str(exc):
                        raise ValueError(f"{name!r} holds Python objects, which are never "
                                         "loaded (save numeric arrays)") from None
                    raise
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"cannot read ({_first_line(exc)})") from None
    return arrays[0], arrays[1]


def _problems(x: npt.NDArray[np.generic], y: npt.NDArray[np.generic]) -> list[str]:
    """Everything wrong with the arrays of a device file (empty when they are usable)."""
    problems = []
    x_real = x.dtype.kind in "fiu" and x.dtype != np.bool_
    if not x_real:
        problems.append(f"'x' has dtype {x.dtype}, not a real number type")
    y_int = y.dtype.kind in "iu"
    if not y_int:
        problems.append(f"'y' has dtype {y.dtype}, not an integer type")
    if x.ndim < 2:
        problems.append(f"'x' has shape {x.shape}, expected (n, features...)")
    if y.ndim != 1:
        problems.append(f"'y' has shape {y.shape}, expected (n,)")
    if x.ndim >= 1 and y.ndim >= 1 and x.shape[0] != y.shape[0]:
        problems.append(f"'x' has {x.shape[0]} rows but 'y' has {y.shape[0]}")
    elif y.ndim >= 1 and y.shape[0] == 0:
        problems.append("no examples (n == 0)")
    if x_real and x.size and not np.all(np.isfinite(x.astype(np.float32, copy=False))):
        problems.append("'x' contains NaN or infinite values (or values beyond float32)")
    if y_int and y.size and int(y.min()) < 0:
        problems.append(f"'y' contains a negative label ({int(y.min())})")
    return problems


def check_device_file(path: Path | str) -> list[str]:
    """Every problem of a device data file, one line each (empty: the file is usable)."""
    try:
        x, y = _read(Path(path).expanduser())
    except ValueError as exc:
        return [str(exc)]
    return _problems(x, y)


def _fail(path: object, problem: str) -> DeviceDataError:
    return DeviceDataError(f"device data {path}: {problem}; {EXPECTED_FORMAT}")


def _load_validated(path: Path) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    try:
        x, y = _read(path)
    except ValueError as exc:
        raise _fail(path, str(exc)) from None
    problems = _problems(x, y)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise _fail(path, problems[0] + more)
    return x.astype(np.float32, copy=False), y.astype(np.int64, copy=False)


def load_device_data(
    node_config: Mapping[str, object],
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Load ``(x, y)`` from the ``.npz`` file named by ``node_config["data-path"]``.

    The first load validates the file and stores the arrays in the device cache
    (``cache-dir``, see :mod:`flowerpress.deploy.cache`); later loads of the same
    content read them from there.

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
    path = data_path(node_config)
    if not path.is_file():
        raise _fail(path, "file not found" if not path.exists() else "not a regular file")
    cache = device_cache(node_config)
    if cache is None:
        return _load_validated(path)
    try:
        key = cache_key("device-data", file_digest(path))
    except OSError as exc:
        raise _fail(path, f"cannot read ({exc.strerror or _first_line(exc)})") from None
    hit = cache.get(key)
    if hit is not None:
        return hit.x, hit.y
    x, y = _load_validated(path)
    cache.put(key, x, y, {"source": str(path), "sample_shape": list(x.shape[1:])})
    return x, y


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
        _load_validated(target)
    except DeviceDataError:
        target.unlink(missing_ok=True)
        raise
    return target
