"""The ``dp`` spec string and the frozen settings it parses into.

Grammar (the same in run config, CLI and Python)::

    dp := "off" | MODE ":" ARG ("," ARG)*
    MODE := a registered DP mechanism ("distributed", "local", or a user's,
            see flowerpress.privacy.registry.register_mechanism)
    ARG := KEY "=" VALUE

Required keys: ``clip`` (L2 clip norm C > 0) and ``noise`` (noise multiplier z > 0).
Optional keys: ``quantile`` (turns on adaptive clipping, target quantile in (0, 1)),
``clip-lr`` (adaptive clipping learning rate, default 0.2), ``count-noise`` (std of the
noise on the clip-indicator count, default chosen by the server), ``rng`` (``secure``
default; ``opendp`` for OpenDP's floating-point-safe sampler, slow, small models only;
or ``seeded`` for reproducible simulations, which is not private),
``clipping`` (a registered clipping rule; default ``adaptive`` with ``quantile``, else
``fixed``), ``honest`` (the fraction of each cohort assumed to add its noise, in (0, 1],
default 1; distributed noise is sized so that this fraction alone carries it).

Example: ``distributed:clip=1.0,noise=1.0,quantile=0.5,clip-lr=0.2,rng=seeded,honest=0.8``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

# Registers the built-in mechanisms and clipping rules (numpy only, device-safe).
import flowerpress.privacy.mechanisms  # noqa: F401
from flowerpress.privacy.registry import (
    available_clippings,
    available_mechanisms,
    get_clipping,
    get_mechanism,
)

Mode = str  # a registered DP mechanism name
RngMode = Literal["secure", "seeded", "opendp"]

RNG_MODES: tuple[RngMode, ...] = ("secure", "seeded", "opendp")
_KEYS = ("clip", "noise", "quantile", "clip-lr", "count-noise", "rng", "clipping", "honest")

DEFAULT_CLIP_LR = 0.2  # Andrew et al. 2021 use eta_C = 0.2 in their experiments.


def _positive_finite(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"dp: {name} must be a finite number > 0, got {value!r}")


@dataclass(frozen=True)
class DpSettings:
    """Client-level differential privacy for federated updates (DP-FedAvg).

    Implements the Gaussian mechanism on L2-clipped client updates of McMahan et al.
    2018, "Learning Differentially Private Recurrent Language Models" (ICLR), with the
    optional adaptive clipping of Andrew et al. 2021, "Differentially Private Learning
    with Adaptive Clipping" (NeurIPS).

    Parameters
    ----------
    mode : str
        A registered mechanism. ``distributed``: each of the m sampled clients adds std
        ``z*C/sqrt(m)`` so the sum carries std ``z*C``. ``local``: every update carries
        std ``z*C`` on its own.
    clip : float
        L2 norm bound C on the whole update (initial value when adaptive).
    noise : float
        Noise multiplier z: noise std divided by the clip. With adaptive clipping this is
        the *effective* multiplier of update and clip-count release together.
    quantile : float or None
        Target quantile of update norms for adaptive clipping; ``None`` = fixed clip.
    clip_lr : float
        Geometric learning rate eta_C of the adaptive clip.
    count_noise : float or None
        Std sigma_b of the noise on the clip-indicator sum; ``None`` lets the server pick
        ``max(clients_per_round / 20, noise)`` (Andrew et al. suggest m/20).
    rng : {"secure", "seeded", "opendp"}
        ``secure`` draws noise from a generator keyed with OS entropy (deployment);
        ``opendp`` from OpenDP's exact, floating-point-safe sampler (small models);
        ``seeded`` derives it from the run seed (reproducible simulations only; the
        accountant reports epsilon = infinity).
    clipping : str
        A registered clipping rule; ``""`` resolves to ``adaptive`` when ``quantile``
        is set, else ``fixed``.
    honest : float
        Fraction ``h`` of each cohort assumed to add its noise (in (0, 1]). With a
        mechanism that splits the noise (``distributed``), each device adds
        ``1/sqrt(H)`` of it, ``H = ceil(h c)`` of a cohort of ``c``, so any ``H``
        honest devices carry the whole noise whatever the other ``c - H`` send;
        the accountant assumes only ``H`` noise shares in every sum (Kairouz, Liu
        & Steinke 2021, "The Distributed Discrete Gaussian Mechanism for Federated
        Learning with Secure Aggregation", size the noise for dropouts the same way).
        Refused (``< 1``) with a per-update mechanism (``local``), where one device's
        noise never depends on another's.
    """

    # Tuned every run.
    mode: Mode
    clip: float
    noise: float
    # Adaptive clipping (off unless quantile is set).
    quantile: float | None = None
    clip_lr: float = DEFAULT_CLIP_LR
    count_noise: float | None = None
    # Randomness source.
    rng: RngMode = "secure"
    # Clip schedule (resolved at construction).
    clipping: str = ""
    # Trust: the fraction of each cohort that adds its noise.
    honest: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in available_mechanisms():
            raise ValueError(
                f"dp: mode must be one of {', '.join(available_mechanisms())}, got {self.mode!r}"
            )
        if not self.clipping:
            object.__setattr__(self, "clipping", "fixed" if self.quantile is None else "adaptive")
        if self.clipping not in available_clippings():
            raise ValueError(
                f"dp: clipping must be one of {', '.join(available_clippings())}, "
                f"got {self.clipping!r}"
            )
        if self.clipping == "adaptive" and self.quantile is None:
            raise ValueError("dp: clipping=adaptive needs quantile=<q>")
        _positive_finite("clip", self.clip)
        _positive_finite("noise", self.noise)
        if self.quantile is not None and not (0.0 < self.quantile < 1.0):
            raise ValueError(f"dp: quantile must be in (0, 1), got {self.quantile!r}")
        _positive_finite("clip-lr", self.clip_lr)
        if self.count_noise is not None:
            _positive_finite("count-noise", self.count_noise)
            if self.quantile is not None and 2.0 * self.count_noise <= self.noise:
                raise ValueError(
                    f"dp: count-noise must be > noise/2 = {self.noise / 2:g} so the update "
                    f"keeps a finite noise multiplier, got {self.count_noise!r}"
                )
        if self.rng not in RNG_MODES:
            raise ValueError(f"dp: rng must be one of {', '.join(RNG_MODES)}, got {self.rng!r}")
        if not (math.isfinite(self.honest) and 0.0 < self.honest <= 1.0):
            raise ValueError(f"dp: honest must be in (0, 1], got {self.honest!r}")
        if self.honest < 1.0 and get_mechanism(self.mode).per_update:
            raise ValueError(
                f"dp: honest applies to mechanisms that split the noise across the cohort "
                f"(e.g. distributed); {self.mode} noises every update in full, got "
                f"honest={self.honest!r}"
            )

    def noise_cohort(self, cohort_size: int) -> int:
        """``H = ceil(honest * cohort_size)``: the devices whose noise shares are counted.

        Exact for decimal fractions (``honest=0.8`` of 10 is 8, not 9).
        """
        if isinstance(cohort_size, bool) or not isinstance(cohort_size, int) or cohort_size < 1:
            raise ValueError(f"cohort_size must be an int >= 1, got {cohort_size!r}")
        return max(1, math.ceil(Fraction(repr(self.honest)) * cohort_size))

    @property
    def adaptive(self) -> bool:
        """Whether the clip rule releases a noised clip indicator (adaptive clipping)."""
        return get_clipping(self.clipping).releases_indicator

    def to_spec(self) -> str:
        """Return the canonical spec string; ``parse_dp(s.to_spec()) == s``."""
        args = [f"clip={self.clip!r}", f"noise={self.noise!r}"]
        if self.quantile is not None:
            args += [f"quantile={self.quantile!r}", f"clip-lr={self.clip_lr!r}"]
        elif self.clip_lr != DEFAULT_CLIP_LR:
            args.append(f"clip-lr={self.clip_lr!r}")
        if self.count_noise is not None:
            args.append(f"count-noise={self.count_noise!r}")
        args.append(f"rng={self.rng}")
        if self.clipping != ("fixed" if self.quantile is None else "adaptive"):
            args.append(f"clipping={self.clipping}")
        if self.honest != 1.0:
            args.append(f"honest={self.honest!r}")
        return f"{self.mode}:{','.join(args)}"


def _float(key: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"dp: {key} must be a number, got {text!r}") from None
    return value


def parse_dp(spec: str) -> DpSettings | None:
    """Parse a ``dp`` spec string.

    Parameters
    ----------
    spec : str
        ``"off"`` or e.g. ``"distributed:clip=1.0,noise=1.0"``; see the module docstring.

    Returns
    -------
    DpSettings or None
        ``None`` for ``"off"``.

    Raises
    ------
    ValueError
        One line naming the offending key and what is allowed.
    """
    if not isinstance(spec, str):
        raise ValueError(f"dp: spec must be a string, got {type(spec).__name__}")
    text = spec.strip()
    if text.lower() in ("off", "none", ""):
        return None
    mode, sep, rest = text.partition(":")
    mode = mode.strip().lower()
    if mode not in available_mechanisms():
        raise ValueError(
            f"dp: mode must be off or one of {', '.join(available_mechanisms())} (e.g. "
            f"'distributed:clip=1.0,noise=1.0'), got {mode!r}"
        )
    if not sep or not rest.strip():
        raise ValueError(f"dp: {mode} needs arguments clip=<C>,noise=<z>, got {spec!r}")
    values: dict[str, str] = {}
    for raw in rest.split(","):
        key, eq, value = raw.partition("=")
        key = key.strip().lower().replace("_", "-")
        if not eq:
            raise ValueError(f"dp: argument {raw.strip()!r} must be KEY=VALUE")
        if key not in _KEYS:
            raise ValueError(f"dp: unknown key {key!r}; allowed: {', '.join(_KEYS)}")
        if key in values:
            raise ValueError(f"dp: key {key!r} given twice")
        values[key] = value.strip()
    for required in ("clip", "noise"):
        if required not in values:
            raise ValueError(f"dp: {required} is required for mode {mode}")
    rng = values.get("rng", "secure").lower()
    if rng not in RNG_MODES:
        raise ValueError(f"dp: rng must be one of {', '.join(RNG_MODES)}, got {rng!r}")
    if "quantile" not in values and "count-noise" in values:
        raise ValueError("dp: count-noise needs quantile=<q> (adaptive clipping)")
    return DpSettings(
        mode=mode,  # checked against MODES above
        clip=_float("clip", values["clip"]),
        noise=_float("noise", values["noise"]),
        quantile=_float("quantile", values["quantile"]) if "quantile" in values else None,
        clip_lr=_float("clip-lr", values["clip-lr"]) if "clip-lr" in values else DEFAULT_CLIP_LR,
        count_noise=(
            _float("count-noise", values["count-noise"]) if "count-noise" in values else None
        ),
        rng=rng,  # checked against RNG_MODES above
        clipping=values.get("clipping", "").lower(),
        honest=_float("honest", values["honest"]) if "honest" in values else 1.0,
    )
