"""Clipping and Gaussian noise on updates (lists of numpy arrays).

Every sampling function takes a ``numpy.random.Generator``; nothing here touches a
global RNG. See docs/privacy.md for the floating-point caveats (Mironov 2012).
"""

from __future__ import annotations

import importlib
import math
import secrets
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from flowerpress.privacy.registry import (
    ClipRule,
    DpMechanism,
    register_clipping,
    register_mechanism,
)

if TYPE_CHECKING:
    from flowerpress.privacy.settings import DpSettings

Update = list[NDArray[np.floating]]

# Holohan & Braghin 2021 ("Secure Random Sampling in Differential Privacy", ESORICS):
# the sum of several independent floating-point Gaussian samples fills the float grid
# densely enough to defeat the Mironov-style "which outputs are reachable" attack on a
# single sample. Opacus' secure mode uses the same construction with 4 draws.
SECURE_GAUSSIAN_DRAWS = 4

#: The server's DP update bound ``C + sigma (sqrt(d) + t)`` (:func:`dp_update_bound`):
#: a Gaussian vector's norm exceeds ``sigma (sqrt(d) + t)`` with probability at most
#: ``exp(-t^2/2)`` (Gaussian concentration of the 1-Lipschitz norm around its mean,
#: which is below ``sigma sqrt(d)``; Boucheron, Lugosi & Massart 2013, Thm 5.6).
#: ``t = 20``: ``exp(-200) = 1.4e-87``; ``t = 14`` would already give ``3e-43``,
#: the spare ``6 sigma`` absorbs the float32 rounding of the reply.
DP_NOISE_TAIL = 20.0

# Stream ids of the seeded generator, so update noise and count noise never share draws.
STREAM_UPDATE_NOISE = 0
STREAM_COUNT_NOISE = 1


def l2_norm(update: Sequence[NDArray[np.floating]]) -> float:
    """Return the global L2 norm of an update, computed in float64.

    Returns ``inf`` or ``nan`` if any value is not finite.
    """
    total = 0.0
    for array in update:
        flat = np.asarray(array, dtype=np.float64).ravel()
        total += float(np.dot(flat, flat))
    if math.isinf(total) and all(np.all(np.isfinite(a)) for a in update):
        # Finite but the squares overflow float64: rescale by the largest magnitude.
        scale = max(float(np.max(np.abs(a), initial=0.0)) for a in update)
        return scale * l2_norm([np.asarray(a, dtype=np.float64) / scale for a in update])
    return math.sqrt(total)


def _clip_factor(norm: float, clip: float, eps: float) -> float:
    """Scale factor that brings ``norm`` to at most ``clip`` after rounding."""
    # Each (normal) element rounds with relative error <= eps/2, so the norm of the
    # rounded result is <= (1 + eps/2) * exact; shaving 4 eps keeps the bound.
    return (clip / norm) * (1.0 - 4.0 * eps)


def _check_clip(clip: float) -> None:
    if not (math.isfinite(clip) and clip > 0.0):
        raise ValueError(f"clip must be a finite number > 0, got {clip!r}")


def clip_inplace(update: Sequence[NDArray[np.floating]], *, clip: float) -> float:
    """Scale ``update`` in place so its global L2 norm is at most ``clip``.

    Non-finite updates (a diverged client) are replaced by zeros: refusing them would
    release a bit derived from the un-noised update, zeroing keeps the norm bound.

    Parameters
    ----------
    update : sequence of floating-point arrays
        Modified in place.
    clip : float
        L2 bound C > 0.

    Returns
    -------
    float
        The norm before clipping (``inf``/``nan`` if it was not finite). This value is
        derived from the raw update: it must never leave the client un-noised.
    """
    _check_clip(clip)
    for array in update:
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"clip: update arrays must be floating point, got {array.dtype}")
    norm = l2_norm(update)
    if not math.isfinite(norm):
        for array in update:
            array[...] = 0.0
        return norm
    if norm <= clip:
        return norm
    factor = _clip_factor(norm, clip, max(float(np.finfo(a.dtype).eps) for a in update))
    # Scale in float64 and round once; rounding into the subnormal range can still push
    # the norm over C (absolute, not relative, error), so check and shrink if needed.
    for _ in range(64):
        scaled = [np.asarray(a, dtype=np.float64) * factor for a in update]
        rounded = [s.astype(a.dtype) for s, a in zip(scaled, update, strict=True)]
        if l2_norm(rounded) <= clip:
            break
        factor *= 0.5
    else:  # pragma: no cover - needs a clip below the dtype's resolution
        rounded = [np.zeros_like(a) for a in update]
    for array, value in zip(update, rounded, strict=True):
        array[...] = value
    return norm


def clip_update(
    update: Sequence[NDArray[np.floating]], *, clip: float
) -> tuple[list[NDArray[np.float64]], float]:
    """Return a float64 copy of ``update`` clipped to L2 norm ``clip``, and the raw norm.

    See :func:`clip_inplace` for the handling of non-finite input.
    """
    copied = [np.array(a, dtype=np.float64, copy=True) for a in update]
    norm = clip_inplace(copied, clip=clip)
    return copied, norm


def dp_update_bound(*, clip: float, noise_std: float, elements: int,
                    tail: float = DP_NOISE_TAIL) -> float:
    """The server's bound on a DP update: ``C + sigma (sqrt(d) + tail)``.

    An honest device sends ``x + N`` with ``||x|| <= C`` (its own clip) and
    ``N ~ N(0, sigma^2 I_d)``; ``||x + N|| <= C + ||N||`` and ``||N||`` exceeds
    ``sigma (sqrt(d) + t)`` with probability at most ``exp(-t^2 / 2)``. So the
    server can clip every accepted update to this bound, whatever a device
    claims, and the bound binds on an honest update only on that event.

    Parameters
    ----------
    clip
        The clip ``C`` the round's devices were sent (> 0).
    noise_std
        Std ``sigma`` of the noise one honest device adds per coordinate (>= 0).
    elements
        The model's element count ``d`` (>= 1).
    tail
        ``t``; the default 20 puts the failure probability at ``exp(-200)``.

    Raises
    ------
    ValueError
        A parameter outside its range (named).
    """
    if not (math.isfinite(clip) and clip > 0.0):
        raise ValueError(f"clip must be a finite number > 0, got {clip!r}")
    if not (math.isfinite(noise_std) and noise_std >= 0.0):
        raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std!r}")
    if isinstance(elements, bool) or not isinstance(elements, int) or elements < 1:
        raise ValueError(f"elements must be an int >= 1, got {elements!r}")
    if not (math.isfinite(tail) and tail >= 0.0):
        raise ValueError(f"tail must be a finite number >= 0, got {tail!r}")
    return clip + noise_std * (math.sqrt(elements) + tail)


def gaussian_like(
    shape: tuple[int, ...], *, std: float, rng: np.random.Generator
) -> NDArray[np.float64]:
    """Draw N(0, std^2) noise as the scaled sum of several standard normal draws.

    ``sum_{i<k} N_i * std / sqrt(k)`` with ``k = SECURE_GAUSSIAN_DRAWS`` has exactly
    variance ``std^2``; see Holohan & Braghin 2021 for why summing helps against
    floating-point attacks.
    """
    if not (math.isfinite(std) and std >= 0.0):
        raise ValueError(f"noise std must be a finite number >= 0, got {std!r}")
    total = np.zeros(shape, dtype=np.float64)
    for _ in range(SECURE_GAUSSIAN_DRAWS):
        total += rng.standard_normal(shape)
    total *= std / math.sqrt(SECURE_GAUSSIAN_DRAWS)
    return total


def add_gaussian_noise(
    update: Sequence[NDArray[np.floating]], *, std: float, rng: np.random.Generator
) -> list[NDArray[np.float64]]:
    """Return ``update + N(0, std^2 I)`` as new float64 arrays (input untouched).

    Parameters
    ----------
    update : sequence of arrays
        The clipped update.
    std : float
        Noise standard deviation (>= 0), e.g. ``z * C`` or ``z * C / sqrt(m)``.
    rng : numpy.random.Generator
        Source of randomness; see :func:`make_generator`.
    """
    return [
        np.asarray(a, dtype=np.float64) + gaussian_like(np.shape(a), std=std, rng=rng)
        for a in update
    ]


def opendp_gaussian(values: NDArray[np.floating], *, std: float) -> NDArray[np.float64]:
    """Return ``values + N(0, std^2)`` per coordinate from OpenDP's sampler (``rng=opendp``).

    OpenDP's ``make_gaussian`` samples the noise exactly and rounds ``value + noise`` to
    a float once, closing the floating-point gap of Mironov 2012 / Jin et al. 2022 for
    the returned values (Canonne, Kamath & Steinke 2020 and the OpenDP Library's
    proofs). It is about 1,000-2,000x slower than numpy (``benchmarks/dp_sampler.py``),
    so it suits small models only. The input must already be clipped; this function
    does not bound sensitivity. Enables OpenDP's ``contrib`` feature flag.

    Raises
    ------
    ValueError
        ``opendp`` is not installed.
    """
    if not (math.isfinite(std) and std >= 0.0):
        raise ValueError(f"noise std must be a finite number >= 0, got {std!r}")
    try:
        dp = importlib.import_module("opendp.prelude")
    except ImportError:
        raise ValueError("rng=opendp needs the opendp package (pip install opendp)") from None
    flat = np.asarray(values, dtype=np.float64).ravel()
    if std == 0.0 or flat.size == 0:
        return flat.copy().reshape(np.shape(values))
    dp.enable_features("contrib")
    measurement = dp.m.make_gaussian(
        dp.vector_domain(dp.atom_domain(T=float, nan=False)), dp.l2_distance(T=float), scale=std
    )
    return np.asarray(measurement(flat.tolist()), dtype=np.float64).reshape(np.shape(values))


def secure_generator() -> np.random.Generator:
    """Return a fresh generator keyed with 256 bits from the OS CSPRNG (``secrets``).

    A fresh key per call (per message): nothing about it is known to the server. The bit
    generator is Philox4x64-10 (Salmon et al. 2011, "Parallel Random Numbers: As Easy as
    1, 2, 3"), a counter-based generator built from a reduced-round block cipher. It is
    *not* a proven cryptographic PRNG; it was chosen over OpenDP's sampler on speed
    (``benchmarks/dp_sampler.py``) and over PCG64DXSM because its output is a keyed
    bijection of a counter with no linear state to solve for. See docs/privacy.md.
    """
    return np.random.Generator(np.random.Philox(np.random.SeedSequence(secrets.randbits(256))))


def seeded_generator(
    *, seed: int, client_id: int, server_round: int, stream: int
) -> np.random.Generator:
    """Return the reproducible generator for one client, round and stream.

    ``np.random.default_rng([seed, client_id, server_round, stream])``: independent
    streams split from one root seed. Anyone who knows these four numbers can recompute
    the noise, so this is for simulations only.
    """
    for name, value in (
        ("seed", seed),
        ("client_id", client_id),
        ("server_round", server_round),
        ("stream", stream),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"seeded rng: {name} must be an int >= 0, got {value!r}")
    return np.random.default_rng([seed, client_id, server_round, stream])


def adaptive_update_noise(noise: float, count_noise: float) -> float:
    """Noise multiplier of the update when the clip count also spends budget.

    Andrew et al. 2021, Theorem 1: releasing the update with multiplier z_Delta and the
    clip-indicator sum with std sigma_b is as private as one Gaussian mechanism with
    multiplier z when ``z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)``.
    """
    if not (2.0 * count_noise > noise > 0.0):
        raise ValueError(
            f"count-noise must be > noise/2 = {noise / 2:g}, got count-noise={count_noise!r}"
        )
    return float((noise**-2 - (2.0 * count_noise) ** -2) ** -0.5)


# -- built-in mechanisms and clipping rules (registered like a user's) --------------------


class DistributedDp(DpMechanism):
    """Distributed DP-FedAvg: each of the ``m`` devices adds ``z*C/sqrt(m)``.

    The sum of the cohort's updates carries ``z*C`` (McMahan et al. 2018 with the noise
    split across devices, as in Kairouz et al. 2021, "The Distributed Discrete Gaussian
    Mechanism for Federated Learning with Secure Aggregation").
    """

    trust_model = (
        "distributed: the aggregate carries noise z*C, which protects a client against "
        "anyone who sees only the models; the server sees each update with only "
        "z*C/sqrt(m), so it must be honest until secure aggregation exists"
    )
    per_update = False

    def device_noise_multiplier(self, noise: float, *, cohort_size: int) -> float:
        """``noise / sqrt(cohort_size)``."""
        if isinstance(cohort_size, bool) or not isinstance(cohort_size, int) or cohort_size < 1:
            raise ValueError(f"cohort_size must be an int >= 1, got {cohort_size!r}")
        return noise / math.sqrt(cohort_size)


class LocalDp(DpMechanism):
    """Local DP: every update carries ``z*C`` on its own (no trust in anyone)."""

    trust_model = (
        "local: each update carries noise z*C and is differentially private on its own, "
        "also against the server"
    )
    per_update = True

    def device_noise_multiplier(self, noise: float, *, cohort_size: int) -> float:
        """``noise``, whatever the cohort."""
        return noise


class FixedClip(ClipRule):
    """A constant clip norm C."""

    releases_indicator = False

    def update_noise_multiplier(self, settings: DpSettings) -> float:
        """``z``."""
        return settings.noise

    def next_clip(self, clip: float, indicators: Sequence[float], settings: DpSettings) -> float:
        """``clip``."""
        return clip


class AdaptiveClip(ClipRule):
    """Adaptive clipping of Andrew et al. 2021, "Differentially Private Learning with
    Adaptive Clipping" (NeurIPS), Algorithm 1: ``C <- C exp(-eta (b - q))``."""

    releases_indicator = True

    def update_noise_multiplier(self, settings: DpSettings) -> float:
        """``(z^-2 - (2 sigma_b)^-2)^-1/2`` (Theorem 1)."""
        if settings.count_noise is None:
            raise ValueError("dp: adaptive clipping needs count-noise resolved")
        return adaptive_update_noise(settings.noise, settings.count_noise)

    def next_clip(self, clip: float, indicators: Sequence[float], settings: DpSettings) -> float:
        """Geometric update towards the target quantile."""
        if not indicators or settings.quantile is None:
            return clip
        # The noised fraction is clamped to [0, 1], the range of the true one:
        # post-processing (DP holds), and one device's hostile indicator can move
        # the clip by at most a factor exp(clip_lr) per round, never to 0 or inf.
        fraction = min(1.0, max(0.0, math.fsum(indicators) / len(indicators)))
        return clip * math.exp(-settings.clip_lr * (fraction - settings.quantile))


register_mechanism("distributed", DistributedDp)
register_mechanism("local", LocalDp)
register_clipping("fixed", FixedClip)
register_clipping("adaptive", AdaptiveClip)
