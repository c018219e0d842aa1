"""A device's log file: what flowerpress's ClientApp did with each message, on disk.

A SuperNode starts a fresh ClientApp process for every message, and its output
goes wherever the SuperNode's goes (the journal, under systemd). The node
config's ``log-file`` names a file the ClientApp appends to instead, one line per
message plus any problem (a bad data file, a server of another message format,
a plug-in that fails to import)::

    flower-supernode ... --node-config "data-path='/home/pi/data.npz' \\
        log-file='/home/pi/flowerpress/device.log'"

    2026-12-07 16:31:14,059 INFO flowerpress.client.mods: node 8914019175725472353,
        run 1428703843083722911, train message (round 1): replied in 2.28 s (32.3 s
        after the server sent it), ok

Flower's own lines (connections, heartbeats, task tokens) stay in the
SuperNode's output. ``flowerpress device check`` checks that the file can be
written.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

__all__ = ["LOG_FILE_KEY", "device_log_path", "install_device_log", "remove_device_logs"]

log = logging.getLogger(__name__)

#: Node-config key naming the device's log file.
LOG_FILE_KEY = "log-file"
#: Loggers whose lines go to the file: flowerpress's (INFO and up) and Flower's
#: inside the ClientApp process.
_LOGGERS = ("flowerpress", "flwr")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Files this process logs to (a ClientApp process may serve several messages in a
#: simulation; a SuperNode's serves one).
_INSTALLED: dict[Path, logging.Handler] = {}
_FAILED: set[Path] = set()
_LEVELS: dict[str, int] = {}  # the loggers' levels before the first install
_RESORTED: set[str] = set()  # loggers given logging.lastResort (they had no handler)


def device_log_path(node_config: Mapping[str, object]) -> Path | None:
    """The node config's ``log-file`` as a path, or None when it is unset or empty.

    Raises
    ------
    ValueError
        ``log-file`` is set to something other than a string.
    """
    raw = node_config.get(LOG_FILE_KEY)
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise ValueError(f"{LOG_FILE_KEY}: expected a quoted path, got {raw!r}")
    text = raw.strip()
    return Path(text).expanduser() if text else None


def install_device_log(path: Path) -> bool:
    """Append this process's flowerpress (and Flower) log lines to ``path``, once.

    Returns whether the file is being written; a file that cannot be opened is
    one warning per process (on the SuperNode's output) and nothing else.
    """
    path = path.absolute()
    if path in _INSTALLED:
        return True
    if path in _FAILED:
        return False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    except OSError as exc:
        _FAILED.add(path)
        log.warning("flowerpress: cannot write the device log %s (%s); logging to the "
                    "SuperNode's output only", path, exc.strerror or exc)
        return False
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler.addFilter(lambda record: bool(record.getMessage().strip()))  # Flower's blank lines
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        _LEVELS.setdefault(name, logger.level)
        if not logger.hasHandlers() and logging.lastResort is not None:
            # Warnings reached the SuperNode's output through logging's last resort
            # (stderr): they still do, the file has them too.
            logger.addHandler(logging.lastResort)
            _RESORTED.add(name)
        logger.addHandler(handler)
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
    _INSTALLED[path] = handler
    return True


def remove_device_logs() -> None:
    """Detach and close every device log this process installed; restore the levels."""
    for handler in _INSTALLED.values():
        for name in _LOGGERS:
            logging.getLogger(name).removeHandler(handler)
        handler.close()
    for name, level in _LEVELS.items():
        logging.getLogger(name).setLevel(level)
    for name in _RESORTED:
        if logging.lastResort is not None:
            logging.getLogger(name).removeHandler(logging.lastResort)
    _RESORTED.clear()
    _INSTALLED.clear()
    _FAILED.clear()
    _LEVELS.clear()
