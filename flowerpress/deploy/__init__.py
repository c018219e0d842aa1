"""Running flowerpress on real devices: credentials, device data, local deployments.

* :mod:`flowerpress.deploy.certs` -- CA, SuperLink TLS identity and SuperNode keys
  (``flowerpress certs``, ``flowerpress certs add-node``).
* :mod:`flowerpress.deploy.data` -- a device's ``data-path=/path/to/data.npz``.
* :mod:`flowerpress.deploy.cache` -- a device's validated data kept on disk between
  ClientApp processes.
* :mod:`flowerpress.deploy.check` -- ``flowerpress device check``.
* :mod:`flowerpress.deploy.local` -- start/stop a SuperLink and SuperNodes as local
  processes (used by the end-to-end test and the latency benchmark).
"""

from __future__ import annotations

import importlib
from typing import Any

# Imported on first use: a device reading its data file must not load the
# certificate tooling (cryptography) it never needs.
_LAZY = {
    "CertError": "flowerpress.deploy.certs",
    "DeploymentCredentials": "flowerpress.deploy.certs",
    "generate_credentials": "flowerpress.deploy.certs",
    "add_node_keys": "flowerpress.deploy.certs",
    "DeviceCache": "flowerpress.deploy.cache",
    "check_device": "flowerpress.deploy.check",
    "DeviceDataError": "flowerpress.deploy.data",
    "has_device_data": "flowerpress.deploy.data",
    "load_device_data": "flowerpress.deploy.data",
}

__all__ = [
    "CertError",
    "DeploymentCredentials",
    "DeviceCache",
    "DeviceDataError",
    "add_node_keys",
    "check_device",
    "generate_credentials",
    "has_device_data",
    "load_device_data",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'flowerpress.deploy' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
