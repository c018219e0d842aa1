"""A device's data, validated once and kept on disk between ClientApp processes.

A Flower SuperNode starts a fresh ClientApp process for every message, so a
node's data cached in memory is gone after each reply. This cache keeps the
arrays a task trains on -- a device's ``data-path`` file after validation, or a
bundled dataset's partition -- as one uncompressed ``.npz`` file per entry:

* the entry's name is a hash of what determines the arrays: the content of the
  source file (or the dataset, partition scheme, seed and library versions of a
  partition) and the task's data key, so a changed source is a new entry;
* an entry is written to a temporary file in the same directory and renamed into
  place (``os.replace``), so a reader never sees half an entry;
* reading checks the zip CRC of every array (NumPy reads members through
  ``zipfile``, which verifies it), the format version and the key; anything
  unreadable is logged in one line, removed, and the caller loads the source again.

Where: the node config's ``cache-dir`` (``flower-supernode --node-config
"cache-dir='/var/cache/flowerpress'"``); without it, ``$FLWR_HOME/flowerpress-cache``
(``~/.flwr/flowerpress-cache``) in a SuperNode's ClientApp process (``flwr-clientapp``),
and no disk cache elsewhere (simulations keep their data in memory).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "CACHE_DIR_KEY",
    "CachedArrays",
    "DeviceCache",
    "cache_key",
    "device_cache",
    "file_digest",
]

log = logging.getLogger(__name__)

#: Node-config key naming the cache directory.
CACHE_DIR_KEY = "cache-dir"

#: Bumped whenever what an entry holds (or how a source becomes arrays) changes.
FORMAT_VERSION = 1

#: Entries kept per directory; the oldest written are removed beyond it.
MAX_ENTRIES = 16

_SUFFIX = ".npz"
_CLIENTAPP_COMMAND = "flwr-clientapp"


@dataclass(frozen=True)
class CachedArrays:
    """A cache entry: features, labels and what the producer stored alongside."""

    x: npt.NDArray[np.float32]
    y: npt.NDArray[np.int64]
    # JSON-serializable facts about the arrays (e.g. the dataset's sample shape and
    # number of classes), so a device need not load the whole dataset to learn them.
    meta: Mapping[str, Any] = field(default_factory=dict)


def file_digest(path: Path) -> str:
    """BLAKE2b digest (hex) of a file's content, read in chunks."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, lambda: hashlib.blake2b(digest_size=20)).hexdigest()


def cache_key(*parts: object) -> str:
    """An entry name from what determines its arrays (any ``repr``-able values)."""
    text = json.dumps([FORMAT_VERSION, *(repr(p) for p in parts)])
    return hashlib.blake2b(text.encode(), digest_size=20).hexdigest()


def _in_clientapp_process() -> bool:
    # The test Flower's own exit handler uses to know it runs as a SuperNode's ClientApp.
    return Path(sys.argv[0]).name == _CLIENTAPP_COMMAND if sys.argv else False


def _flwr_home() -> Path:
    # flwr.supercore.utils.get_flwr_home without importing it: $FLWR_HOME or ~/.flwr.
    home = os.environ.get("FLWR_HOME")
    return Path(home).expanduser() if home else Path.home() / ".flwr"


def device_cache(node_config: Mapping[str, object]) -> DeviceCache | None:
    """The cache this node uses (see the module docstring), or ``None`` for none."""
    value = node_config.get(CACHE_DIR_KEY)
    if isinstance(value, str) and value.strip():
        return DeviceCache(Path(value.strip()).expanduser())
    if _in_clientapp_process():
        return DeviceCache(_flwr_home() / "flowerpress-cache")
    return None


class DeviceCache:
    """Arrays by key in one directory (see the module docstring).

    Parameters
    ----------
    directory : Path
        Created on the first write.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def path(self, key: str) -> Path:
        """Where the entry ``key`` is stored."""
        return self.directory / f"{key}{_SUFFIX}"

    def get(self, key: str) -> CachedArrays | None:
        """The entry ``key``, or ``None`` if it is absent or unreadable (then removed)."""
        path = self.path(key)
        try:
            with np.load(path, allow_pickle=False) as archive:
                meta = json.loads(bytes(archive["meta"]).decode("utf-8"))
                if meta.get("format") != FORMAT_VERSION or meta.get("key") != key:
                    raise ValueError("written for another key or format")
                x, y = archive["x"], archive["y"]
        except (FileNotFoundError, NotADirectoryError):  # absent (a bad directory: put says so)
            return None
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            log.warning("device cache: ignoring unreadable entry %s (%s); loading the "
                        "source again", path, str(exc).splitlines()[0] if str(exc) else
                        type(exc).__name__)
            _discard(path)
            return None
        if x.dtype != np.float32 or y.dtype != np.int64 or x.ndim < 1 or y.shape != x.shape[:1]:
            log.warning("device cache: ignoring entry %s with arrays %s %s and %s %s",
                        path, x.dtype, x.shape, y.dtype, y.shape)
            _discard(path)
            return None
        return CachedArrays(x, y, meta.get("meta", {}))

    def put(self, key: str, x: npt.NDArray[np.float32], y: npt.NDArray[np.int64],
            meta: Mapping[str, Any] | None = None) -> Path | None:
        """Store an entry atomically; return its path, or ``None`` if it cannot be written.

        A cache that cannot be written (read-only disk, full disk) only costs speed:
        it is logged in one line and the caller goes on with the arrays it has.
        """
        target = self.path(key)
        header = json.dumps({"format": FORMAT_VERSION, "key": key, "meta": dict(meta or {})})
        tmp_name = ""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=f".{key[:8]}-", suffix=".tmp",
                                            dir=self.directory)
            with os.fdopen(fd, "wb") as handle:
                np.savez(handle, x=np.ascontiguousarray(x, dtype=np.float32),
                         y=np.ascontiguousarray(y, dtype=np.int64),
                         meta=np.frombuffer(header.encode("utf-8"), dtype=np.uint8))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp_name, target)
        except OSError as exc:
            log.warning("device cache: cannot write %s (%s); the data is loaded from its "
                        "source on every message", target, exc.strerror or exc)
            if tmp_name:
                _discard(Path(tmp_name))
            return None
        self._prune()
        return target

    def entries(self) -> list[Path]:
        """The entry files, oldest written first."""
        try:
            found = [p for p in self.directory.iterdir() if p.suffix == _SUFFIX]
        except OSError:
            return []
        return sorted(found, key=_mtime)

    def _prune(self) -> None:
        entries = self.entries()
        for stale in entries[: max(len(entries) - MAX_ENTRIES, 0)]:
            _discard(stale)


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:  # removed meanwhile by another process sharing the directory
        return 0


def _discard(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:  # e.g. a directory in the way: the next put replaces nothing either
        log.warning("device cache: cannot remove %s", path)
