"""Differential privacy for federated updates: clip + Gaussian noise, and accounting.

Client side: :func:`dp_mod` (a Flower mod). Server side: :class:`ServerPrivacy`.
Spec strings: :func:`parse_dp`. Extension points: :mod:`flowerpress.privacy.registry`.
See docs/privacy.md for the trust model.

The server-side accounting (``dp_accounting``, ``scipy``: ~0.7 s to import) is loaded
lazily on first access to one of its names (PEP 562), so a device that imports
:func:`dp_mod` never loads it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from flowerpress.privacy.keys import CONFIG_CLIP, CONFIG_DP, METRIC_CLIP_INDICATOR
from flowerpress.privacy.mechanisms import (
    adaptive_update_noise,
    add_gaussian_noise,
    clip_inplace,
    clip_update,
    l2_norm,
    secure_generator,
    seeded_generator,
)
from flowerpress.privacy.mod import DevicePolicy, dp_mod
from flowerpress.privacy.registry import (
    Accountant,
    ClipRule,
    DpMechanism,
    GaussianRelease,
    available_accountants,
    available_clippings,
    available_mechanisms,
    get_clipping,
    get_mechanism,
    make_accountant,
    register_accountant,
    register_clipping,
    register_mechanism,
)
from flowerpress.privacy.sampling import sample_cohort
from flowerpress.privacy.settings import DpSettings, parse_dp

if TYPE_CHECKING:
    from flowerpress.privacy.accounting import ServerPrivacy, epsilon_after, noise_multiplier_for

_LAZY = {
    "ServerPrivacy": "flowerpress.privacy.accounting",
    "epsilon_after": "flowerpress.privacy.accounting",
    "noise_multiplier_for": "flowerpress.privacy.accounting",
}


def __getattr__(name: str) -> Any:
    """Import the server-side accounting on first use (PEP 562)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "CONFIG_CLIP",
    "CONFIG_DP",
    "METRIC_CLIP_INDICATOR",
    "Accountant",
    "ClipRule",
    "DevicePolicy",
    "DpMechanism",
    "DpSettings",
    "GaussianRelease",
    "ServerPrivacy",
    "adaptive_update_noise",
    "add_gaussian_noise",
    "available_accountants",
    "available_clippings",
    "available_mechanisms",
    "clip_inplace",
    "clip_update",
    "dp_mod",
    "epsilon_after",
    "get_clipping",
    "get_mechanism",
    "l2_norm",
    "make_accountant",
    "noise_multiplier_for",
    "parse_dp",
    "register_accountant",
    "register_clipping",
    "register_mechanism",
    "sample_cohort",
    "secure_generator",
    "seeded_generator",
]
