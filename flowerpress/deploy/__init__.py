"""Running flowerpress on real devices: credentials, device data, local deployments.

* :mod:`flowerpress.deploy.certs` -- CA, SuperLink TLS identity and SuperNode keys
  (``flowerpress certs``).
* :mod:`flowerpress.deploy.data` -- a device's ``data-path=/path/to/data.npz``.
* :mod:`flowerpress.deploy.local` -- start/stop a SuperLink and SuperNodes as local
  processes (used by the end-to-end test and the latency benchmark).
"""

from flowerpress.deploy.certs import CertError, DeploymentCredentials, generate_credentials
from flowerpress.deploy.data import DeviceDataError, has_device_data, load_device_data

__all__ = [
    "CertError",
    "DeploymentCredentials",
    "DeviceDataError",
    "generate_credentials",
    "has_device_data",
    "load_device_data",
]
