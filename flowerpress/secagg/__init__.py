"""Secure aggregation (SecAgg+) of compressed updates, with distributed discrete Gaussian DP.

* :mod:`~flowerpress.secagg.core`: the protocol, pure (device and server sessions);
* :mod:`~flowerpress.secagg.crypto`, :mod:`~flowerpress.secagg.shamir`,
  :mod:`~flowerpress.secagg.graph`: its primitives;
* :mod:`~flowerpress.secagg.encoding`: clipping, rand-k on a shared support,
  random rotation, stochastic rounding modulo ``2**bits``, the discrete Gaussian,
  bit packing;
* :mod:`~flowerpress.secagg.settings`: the ``secagg`` run-config key;
* :mod:`~flowerpress.secagg.mod`: the device's Flower mod ``secagg_mod``;
* :mod:`~flowerpress.secagg.accounting`: the server's accountant (imports dp_accounting).

See docs/privacy.md, "Secure aggregation", for the trust model.
"""

from flowerpress.secagg.core import SecAggAbort, SecAggViolation

__all__ = ["SecAggAbort", "SecAggViolation"]
