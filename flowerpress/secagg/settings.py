"""The ``secagg`` run-config key: ``off``, or ``on[:threshold=T,bits=B,clip=C,noise=Z,degree=K]``.

* ``threshold`` (0.5, 1], default 0.7: the fraction of the cohort (and of every
  device's neighbourhood) that must survive to unmask. Up to ``1 - T`` of the
  cohort may drop out after masking; fewer survivors skip the round.

A minimum cohort: ``clients-per-round`` must be large enough that every decoded
sum adds at least :data:`MIN_SUMMANDS` (3) devices, ``ceil(T * m) >= 3``
(:func:`min_cohort`: 3 at the default threshold, 4 at ``T <= 2/3``); below it the
run is refused in one line (:func:`refusal`).
* ``bits`` [2, 62], default 16: bits per coordinate of the masked vector. The
  codec ``q:B`` sets it too (they must agree if both are given).
* ``clip`` > 0, default 1.0: the L2 norm every device clips its update to.
* ``noise`` >= 0, default 0: noise multiplier of the *sum* (discrete Gaussian
  of standard deviation ``noise * clip`` in total, added by the devices in
  shares); 0 turns distributed DP off.
* ``degree`` >= 0, default 0: neighbours per device in SecAgg+'s graph (0:
  complete graph up to 20 devices, then ``O(log n)``).

The codecs it serves: ``none``, ``q:B``, ``randk:F`` and ``randk:F+q:B``
(rand-k on a support the server draws for the whole cohort). Strategies must
aggregate by a weighted sum (``Strategy.weighted_sum``): the server only ever
sees the sum. The ``dp`` key must be ``off``: this mode brings its own noise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_BITS = 16
#: The fewest devices a decoded sum may add: below three a sum reveals an individual update
#: (one summand is the update, two give each device the other's).
MIN_SUMMANDS = 3


@dataclass(frozen=True)
class SecAggSettings:
    """Parsed ``secagg`` settings (one frozen value, checked at construction)."""

    threshold: float = 0.7  # survivors needed, as a fraction of the cohort
    bits: int = DEFAULT_BITS  # bits per coordinate of the masked vector
    clip: float = 1.0  # L2 clip of each device's update
    noise: float = 0.0  # noise multiplier of the sum (0: no DP)
    degree: int = 0  # neighbours in the communication graph (0: automatic)
    bits_given: bool = False  # `bits` was set explicitly in the spec

    def __post_init__(self) -> None:
        if not 0.5 < self.threshold <= 1.0:
            raise ValueError(f"secagg threshold={self.threshold} must be in (0.5, 1]")
        if not 2 <= self.bits <= 62:
            raise ValueError(f"secagg bits={self.bits} must be in [2, 62]")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"secagg clip={self.clip} must be a finite number > 0")
        if not (math.isfinite(self.noise) and self.noise >= 0):
            raise ValueError(f"secagg noise={self.noise} must be a finite number >= 0")
        if self.degree < 0:
            raise ValueError(f"secagg degree={self.degree} must be >= 0")

    def min_summands(self, cohort: int) -> int:
        """The fewest survivors a completed round of ``cohort`` devices sums."""
        return max(1, min(cohort, math.ceil(self.threshold * cohort - 1e-9)))

    def spec(self) -> str:
        """The canonical spec string (what the server sends devices)."""
        return (f"on:threshold={self.threshold!r},bits={self.bits},clip={self.clip!r},"
                f"noise={self.noise!r},degree={self.degree}")


def parse_secagg(spec: str) -> SecAggSettings | None:
    """``None`` for ``off``; else the settings.

    Raises
    ------
    ValueError
        One line naming the bad part and what is accepted.
    """
    text = spec.strip()
    if text in ("", "off"):
        return None
    head, _, args = text.partition(":")
    if head != "on":
        raise ValueError(f"secagg={spec!r}: expected off or on[:threshold=T,bits=B,clip=C,"
                         "noise=Z,degree=K]")
    values: dict[str, float | int | bool] = {}
    for part in filter(None, (a.strip() for a in args.split(","))):
        key, eq, raw = part.partition("=")
        try:
            if key in ("bits", "degree") and eq:
                values[key] = int(raw)
            elif key in ("threshold", "clip", "noise") and eq:
                values[key] = float(raw)
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"secagg: {part!r} is not allowed; expected threshold=T, bits=B, "
                             "clip=C, noise=Z or degree=K") from None
    if "bits" in values:
        values["bits_given"] = True
    return SecAggSettings(**values)  # type: ignore[arg-type]


def codec_of(compression: str) -> tuple[int | None, float | None]:
    """``(bits, randk_fraction)`` of a codec spec secure aggregation can serve.

    Raises
    ------
    ValueError
        Any other codec: one line naming what is served.
    """
    stages = [s.strip() for s in compression.strip().split("+") if s.strip()]
    bits: int | None = None
    fraction: float | None = None
    ok = True
    if stages in ([], ["none"]):
        return None, None
    try:
        for i, stage in enumerate(stages):
            name, _, arg = stage.partition(":")
            if name == "q" and i == len(stages) - 1:
                bits = int(arg)
            elif name == "randk" and i == 0:
                fraction = float(arg.split(",")[0])
                if not 0 < fraction <= 1:
                    ok = False
            else:
                ok = False
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"secagg serves compression none, q:B, randk:F or randk:F+q:B (the "
                         f"same support on every device), not {compression!r}")
    return bits, fraction


def min_cohort(settings: SecAggSettings) -> int:
    """The smallest ``clients-per-round`` whose every decoded sum adds :data:`MIN_SUMMANDS`
    devices (3 at the default threshold 0.7, 4 at thresholds up to 2/3)."""
    cohort = MIN_SUMMANDS
    while settings.min_summands(cohort) < MIN_SUMMANDS:
        cohort += 1
    return cohort


def refusal(settings: SecAggSettings, *, compression: str, dp: str,
            weighted_sum: bool, strategy: str, clients_per_round: int | None = None
            ) -> str | None:
    """One line saying why this run cannot use secure aggregation, or None.

    ``clients_per_round`` (when given) must be large enough that every sum the
    server can decode adds at least :data:`MIN_SUMMANDS` devices
    (:meth:`SecAggSettings.min_summands`): with one summand the "sum" is that
    device's update, with two each device learns the other's by subtracting
    its own (Bonawitz et al. 2017 assume a threshold of several honest users).
    """
    if clients_per_round is not None and settings.min_summands(
            clients_per_round) < MIN_SUMMANDS:
        return (f"clients-per-round={clients_per_round} is below secure aggregation's "
                f"minimum cohort of {min_cohort(settings)} at threshold={settings.threshold} "
                f"(a decoded sum must add at least {MIN_SUMMANDS} devices)")
    if not weighted_sum:
        return (f"secagg needs a strategy that aggregates by a weighted sum; {strategy} is not "
                "one (the server only sees the sum)")
    if dp.strip() not in ("", "off"):
        return ("secagg brings its own distributed discrete Gaussian noise: set dp=off and "
                "secagg=on:...,noise=Z")
    try:
        bits, _ = codec_of(compression)
    except ValueError as exc:
        return str(exc)
    if bits is not None and settings.bits_given and bits != settings.bits:
        return f"secagg bits={settings.bits} and compression q:{bits} disagree"
    if bits is not None and not 2 <= bits <= 62:
        return f"secagg needs q:B with B in [2, 62], not q:{bits}"
    return None


def effective(settings: SecAggSettings, compression: str) -> tuple[SecAggSettings, float | None]:
    """The settings with the codec's bits applied, and the rand-k fraction."""
    bits, fraction = codec_of(compression)
    if bits is not None:
        settings = SecAggSettings(threshold=settings.threshold, bits=bits, clip=settings.clip,
                                  noise=settings.noise, degree=settings.degree, bits_given=True)
    return settings, fraction


def refusal_of_config(config: Mapping[str, object]) -> str | None:
    """:func:`refusal` for a validated run config (builds its strategy to ask ``weighted_sum``)."""
    from flowerpress.strategies import build_strategy

    settings = parse_secagg(str(config["secagg"]))
    if settings is None:
        return None
    strategy = str(config["strategy"])
    return refusal(settings, compression=str(config["compression"]), dp=str(config["dp"]),
                   weighted_sum=bool(build_strategy(strategy).weighted_sum), strategy=strategy,
                   clients_per_round=int(str(config["clients-per-round"])))
