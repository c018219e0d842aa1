"""What a device turns its update into before masking, and what the server makes of the sum.

Device (:func:`encode_update`)::

    delta -> flatten -> [rand-k on the cohort's shared support, scaled d/k]
          -> clip to L2 norm C -> random rotation (randomized Hadamard)
          -> scale by 1/gamma -> randomized rounding to integers
             (conditional on the rounded norm, with DP)
          -> [+ discrete Gaussian noise, this device's 1/m share]
          -> modulo 2**bits

Server (:func:`decode_sum`): centre the modular sum in
``[-2**(bits-1), 2**(bits-1))``, multiply by gamma, rotate back, divide by the
number of summands, scatter onto the support.

The rotation flattens the vector (each coordinate of ``H D x / sqrt(d)`` is
sub-Gaussian with parameter ``||x|| / sqrt(d)``), which is what lets a few bits
per coordinate carry the sum without wrapping around (Kairouz, Liu and
Steinke, ICML 2021, "The distributed discrete Gaussian mechanism for federated
learning with secure aggregation"). :class:`EncodingPlan` fixes gamma from the
public round parameters so that the sum of ``n`` devices wraps around in any
coordinate with probability at most ``beta_mod`` (a union bound over the
coordinates of sub-Gaussian tails); devices and server compute the same plan.

Randomness is injected: rounding takes a NumPy generator; the discrete
Gaussian takes a :class:`random.Random`-like source whose default is the OS
CSPRNG (:class:`random.SystemRandom`), so the noise is not reproducible by the
server.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from numpy.typing import NDArray

#: Probability bound on a modular wrap-around anywhere in the sum (utility, not privacy).
BETA_MOD = 1e-4
#: exp(-1/2): the conditional-rounding parameter of Kairouz et al. (each try succeeds
#: with probability >= 1 - beta).
BETA_ROUND = math.exp(-0.5)
MAX_ROUNDING_TRIES = 1000


def next_pow2(n: int) -> int:
    """The smallest power of two >= n."""
    return 1 << max(0, (n - 1).bit_length())


def randk_support(d: int, fraction: float, seed: int) -> NDArray[np.int64]:
    """The sorted coordinates every device of the round keeps (the server sends ``seed``)."""
    k = max(1, min(d, math.ceil(fraction * d)))
    rng = np.random.default_rng([seed, 0x5EC])
    return np.sort(rng.choice(d, size=k, replace=False)).astype(np.int64)


def rotation_signs(d_pad: int, seed: int) -> NDArray[np.float64]:
    """The public random signs D of the randomized Hadamard transform."""
    rng = np.random.default_rng([seed, 0xD1A6])
    return rng.choice(np.array([-1.0, 1.0]), size=d_pad)


def fwht(x: NDArray[np.float64]) -> NDArray[np.float64]:
    """Orthonormal Walsh-Hadamard transform (its own inverse); ``len(x)`` a power of two."""
    y = np.array(x, dtype=np.float64)
    n = y.shape[0]
    h = 1
    while h < n:
        y = y.reshape(-1, 2, h)
        a, b = y[:, 0, :].copy(), y[:, 1, :].copy()
        y[:, 0, :], y[:, 1, :] = a + b, a - b
        y = y.reshape(n)
        h *= 2
    return y / math.sqrt(n)


def rounded_norm_bound(c_scaled: float, d: int, beta: float = BETA_ROUND) -> float:
    """L2 bound after conditional randomized rounding (Kairouz et al. 2021, Theorem 2)."""
    sq = c_scaled ** 2 + d / 4 + math.sqrt(2 * math.log(1 / beta)) * (c_scaled + math.sqrt(d) / 2)
    return math.sqrt(min(sq, (c_scaled + math.sqrt(d)) ** 2))


@dataclass(frozen=True)
class EncodingPlan:
    """Everything both sides derive from the round's public parameters.

    Attributes
    ----------
    dim : int
        Elements of the model.
    support : NDArray[np.int64] or None
        rand-k's shared coordinates (None: all of them).
    padded : int
        The rotated length: the kept coordinates padded to a power of two. The
        masked vector has this many ``bits``-bit words.
    bits : int
        Bits per coordinate of the masked vector.
    clip : float
        L2 clip of what a device sends.
    gamma : float
        Granularity: one integer step is ``gamma`` in the rotated space.
    cohort : int
        Devices asked (the most that can be summed).
    min_summands : int
        The fewest devices a completed round sums (the SecAgg threshold); each
        device adds ``1 / min_summands`` of the target noise variance.
    noise : float
        Target noise multiplier of the sum (std ``noise * clip``); 0: no DP.
    local_variance : Fraction
        Each device's discrete Gaussian variance in integer units (0: none).
    norm_bound : float
        L2 bound of one device's rounded vector (the sensitivity), integer units.
    seed : int
        The round's public seed (rotation, support).
    """

    dim: int
    support: NDArray[np.int64] | None
    padded: int
    bits: int
    clip: float
    gamma: float
    cohort: int
    min_summands: int
    noise: float
    local_variance: Fraction
    norm_bound: float
    seed: int

    @property
    def kept(self) -> int:
        """Coordinates kept before padding."""
        return self.dim if self.support is None else int(self.support.size)


def make_plan(*, dim: int, bits: int, clip: float, noise: float, cohort: int,
              min_summands: int, seed: int, randk: float | None = None,
              beta_mod: float = BETA_MOD) -> EncodingPlan:
    """The encoding of one round, identical on every device and the server.

    gamma makes the sum of ``cohort`` devices stay inside ``(-2**(bits-1),
    2**(bits-1))`` in every coordinate with probability >= ``1 - beta_mod``.
    The sum's coordinate is sub-Gaussian with parameter squared
    ``s**2 = (cohort * c)**2 / d + cohort / 4 + cohort * sigma_local**2``
    (signal: ``||sum x_i|| <= cohort * c`` after rotation, worst case aligned;
    rounding errors: bounded in an interval of width 1, mean 0; noise: the
    discrete Gaussian is sub-Gaussian), with ``c = clip / gamma`` and
    ``sigma_local**2 = (noise * c)**2 / min_summands``; the union bound over
    ``d`` coordinates asks ``2 d exp(-r**2 / (2 s**2)) <= beta_mod``.

    Raises
    ------
    ValueError
        ``bits`` is too small for this cohort (names the bound).
    """
    if not 2 <= bits <= 62:
        raise ValueError(f"bits={bits} must be in [2, 62]")
    if not (clip > 0 and math.isfinite(clip)):
        raise ValueError(f"clip={clip} must be a finite number > 0")
    if noise < 0 or not math.isfinite(noise):
        raise ValueError(f"noise={noise} must be a finite number >= 0")
    if not 1 <= min_summands <= cohort:
        raise ValueError(f"min_summands={min_summands} must be in [1, cohort={cohort}]")
    support = None if randk is None else randk_support(dim, randk, seed)
    kept = dim if support is None else int(support.size)
    padded = next_pow2(kept)
    r = (1 << (bits - 1)) - 1
    budget = r * r / (2 * math.log(2 * padded / beta_mod)) - cohort / 4
    per_c2 = cohort * cohort / padded + cohort * noise * noise / min_summands
    if budget <= 0 or budget / per_c2 < 1.0:
        raise ValueError(f"bits={bits} is too few for a cohort of {cohort} (the sum would "
                         "wrap around); raise bits")
    c_scaled = math.sqrt(budget / per_c2)
    variance = Fraction(0)
    if noise > 0:
        var = (noise * c_scaled) ** 2 / min_summands
        variance = Fraction(math.ceil(var * 1024), 1024)  # rounded up: never less noise
        if variance < Fraction(1, 4):
            raise ValueError("the per-device noise is below 1/2 integer step; raise bits")
    bound = rounded_norm_bound(c_scaled, padded) if noise > 0 else math.inf
    return EncodingPlan(dim=dim, support=support, padded=padded, bits=bits, clip=clip,
                        gamma=clip / c_scaled, cohort=cohort, min_summands=min_summands,
                        noise=noise, local_variance=variance, norm_bound=bound, seed=seed)


# --- the discrete Gaussian (Canonne, Kamath and Steinke, NeurIPS 2020) ----------------


def _bernoulli(p: Fraction, rng: random.Random) -> bool:
    return rng.randrange(p.denominator) < p.numerator


def _bernoulli_exp_le1(gamma: Fraction, rng: random.Random) -> bool:
    k = 1
    while _bernoulli(gamma / k, rng):
        k += 1
    return k % 2 == 1


def bernoulli_exp(gamma: Fraction, rng: random.Random) -> bool:
    """True with probability exp(-gamma), gamma >= 0 rational; exact (CKS 2020, Alg. 1)."""
    while gamma > 1:
        if not _bernoulli_exp_le1(Fraction(1), rng):
            return False
        gamma -= 1
    return _bernoulli_exp_le1(gamma, rng)


def discrete_laplace(t: int, rng: random.Random) -> int:
    """A sample of the discrete Laplace with scale t (CKS 2020, Algorithm 2, s = 1)."""
    while True:
        u = rng.randrange(t)
        if not bernoulli_exp(Fraction(u, t), rng):
            continue
        v = 0
        while bernoulli_exp(Fraction(1), rng):
            v += 1
        x = u + t * v
        negative = _bernoulli(Fraction(1, 2), rng)
        if negative and x == 0:
            continue
        return -x if negative else x


def discrete_gaussian(variance: Fraction, rng: random.Random) -> int:
    """An exact sample of N_Z(0, variance) by rejection from the discrete Laplace (Alg. 3)."""
    if variance <= 0:
        return 0
    t = math.isqrt(variance.numerator // variance.denominator) + 1
    while True:
        y = discrete_laplace(t, rng)
        gap = abs(y) - variance / t
        if bernoulli_exp(gap * gap / (2 * variance), rng):
            return y


def discrete_gaussian_vector(variance: Fraction, size: int,
                             rng: random.Random | None = None) -> NDArray[np.int64]:
    """``size`` independent exact N_Z(0, variance) samples; default source: the OS CSPRNG."""
    source = rng if rng is not None else random.SystemRandom()
    return np.array([discrete_gaussian(variance, source) for _ in range(size)], dtype=np.int64)


# --- encode / decode --------------------------------------------------------------------


def _randomized_round(x: NDArray[np.float64], rng: np.random.Generator) -> NDArray[np.int64]:
    low = np.floor(x)
    return (low + (rng.random(x.shape) < (x - low))).astype(np.int64)


def encode_update(flat: NDArray[np.float64], plan: EncodingPlan, *,
                  rng: np.random.Generator, noise_rng: random.Random | None = None
                  ) -> tuple[NDArray[np.uint64], float]:
    """One device's update as ``plan.padded`` words modulo ``2**bits``, and its pre-clip norm.

    Parameters
    ----------
    flat
        The flattened delta (``plan.dim`` elements).
    rng
        Stochastic rounding.
    noise_rng
        The discrete Gaussian's source (default: the OS CSPRNG).

    Raises
    ------
    ValueError
        Wrong length or non-finite values; conditional rounding failed
        ``MAX_ROUNDING_TRIES`` times (probability below ``BETA_ROUND ** 1000``).
    """
    x = np.asarray(flat, dtype=np.float64)
    if x.shape != (plan.dim,):
        raise ValueError(f"update has {x.size} values, the round expects {plan.dim}")
    if not np.isfinite(x).all():
        raise ValueError("update holds NaN or Inf (local training diverged?)")
    if plan.support is not None:
        x = x[plan.support] * (plan.dim / plan.kept)  # unbiased rand-k
    norm = float(np.linalg.norm(x))
    if norm > plan.clip:
        x = x * (plan.clip / norm)
    padded = np.zeros(plan.padded)
    padded[: x.size] = x
    rotated = fwht(padded * rotation_signs(plan.padded, plan.seed)) / plan.gamma
    for _ in range(MAX_ROUNDING_TRIES):
        ints = _randomized_round(rotated, rng)
        if plan.noise == 0 or float(np.linalg.norm(ints)) <= plan.norm_bound:
            break
    else:
        raise ValueError("conditional rounding did not meet the norm bound")
    if plan.local_variance > 0:
        ints = ints + discrete_gaussian_vector(plan.local_variance, plan.padded, noise_rng)
    return to_modular(ints, plan.bits), norm


def to_modular(ints: NDArray[np.int64], bits: int) -> NDArray[np.uint64]:
    """Signed integers as words modulo ``2**bits``."""
    return (np.asarray(ints, dtype=np.int64).astype(np.uint64)
            & np.uint64((1 << bits) - 1))


def from_modular(words: NDArray[np.uint64], bits: int) -> NDArray[np.int64]:
    """Words modulo ``2**bits`` as signed integers in ``[-2**(bits-1), 2**(bits-1))``."""
    w = np.asarray(words, dtype=np.uint64).astype(np.int64)
    return np.where(w >= 1 << (bits - 1), w - (1 << bits), w)


def decode_sum(words: NDArray[np.uint64], plan: EncodingPlan, summands: int
               ) -> NDArray[np.float64]:
    """The mean of ``summands`` updates from their modular sum (``plan.dim`` floats)."""
    ints = from_modular(words, plan.bits).astype(np.float64)
    x = fwht(ints * plan.gamma) * rotation_signs(plan.padded, plan.seed)
    mean = x[: plan.kept] / summands
    if plan.support is None:
        return mean
    out = np.zeros(plan.dim)
    out[plan.support] = mean
    return out


# --- bit packing ---------------------------------------------------------------------------


def pack_words(words: NDArray[np.uint64], bits: int) -> bytes:
    """``bits`` bits per word, little-endian bit order: ``ceil(len * bits / 8)`` bytes."""
    w = np.asarray(words, dtype=np.uint64)
    shifts = np.arange(bits, dtype=np.uint64)
    bitmat = ((w[:, None] >> shifts) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bitmat.reshape(-1), bitorder="little").tobytes()


#: Words unpacked at a time by :func:`unpack_words` (bounds its temporaries).
_UNPACK_WORDS = 1024


def unpack_words(data: bytes, bits: int, length: int) -> NDArray[np.uint64]:
    """Inverse of :func:`pack_words`; ValueError unless ``data`` has exactly the right size."""
    expected = (length * bits + 7) // 8
    if len(data) != expected:
        raise ValueError(f"packed vector has {len(data)} bytes, expected {expected}")
    # A chunk of words at a time (a multiple of 8, so every chunk starts on a byte), one
    # bit plane at a time: unpacking all at once held 16 bytes per bit of the vector (70x
    # the model at 16 bits); this holds the output and about 32 KB or 1/64 of it.
    raw = np.frombuffer(data, dtype=np.uint8)
    out: NDArray[np.uint64] = np.zeros(length, dtype=np.uint64)
    step = max(_UNPACK_WORDS, length // 64 // 8 * 8)  # temporaries at most 1/64 of the output
    plane = np.empty(step, dtype=np.uint64)
    for lo in range(0, length, step):
        n = min(step, length - lo)
        flat = np.unpackbits(raw[lo * bits // 8:((lo + n) * bits + 7) // 8], bitorder="little")
        planes = flat[: n * bits].reshape(n, bits)
        chunk, buf = out[lo:lo + n], plane[:n]
        for k in range(bits):
            np.left_shift(planes[:, k], np.uint64(k), out=buf, dtype=np.uint64)
            np.bitwise_or(chunk, buf, out=chunk)
    return out
