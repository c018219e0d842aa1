"""Differential privacy for federated updates: clip + Gaussian noise, and accounting.

Client side: :func:`dp_mod` (a Flower mod). Server side: :class:`ServerPrivacy`.
Spec strings: :func:`parse_dp`. See docs/privacy.md for the trust model.
"""

from flowerpress.privacy.accounting import (
    CONFIG_CLIP,
    CONFIG_DP,
    METRIC_CLIP_INDICATOR,
    ServerPrivacy,
    epsilon_after,
    noise_multiplier_for,
)
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
from flowerpress.privacy.settings import DpSettings, parse_dp

__all__ = [
    "CONFIG_CLIP",
    "CONFIG_DP",
    "METRIC_CLIP_INDICATOR",
    "DevicePolicy",
    "DpSettings",
    "ServerPrivacy",
    "adaptive_update_noise",
    "add_gaussian_noise",
    "clip_inplace",
    "clip_update",
    "dp_mod",
    "epsilon_after",
    "l2_norm",
    "noise_multiplier_for",
    "parse_dp",
    "secure_generator",
    "seeded_generator",
]
