"""Speed of the DP noise samplers on one update: numpy generators vs OpenDP.

Measures, for ``--size`` coordinates (default 1,000,000), the time to draw the noise of
one update and add it to a float32 model, for

- ``pcg64dxsm``: the sampler before this benchmark (PCG64DXSM keyed from ``secrets``,
  4-draw sum of Holohan & Braghin 2021), the baseline of every ratio;
- ``philox``: the same construction on Philox4x64-10 (what ``secure_generator`` uses);
- ``sfc64``: the same on SFC64;
- ``opendp``: OpenDP's ``make_gaussian`` on a float vector (``pip install opendp``),
  the floating-point-safe sampler (exact sampling, then rounding; Canonne, Kamath &
  Steinke 2020 and the OpenDP Library's documentation).

Usage::

    python benchmarks/dp_sampler.py [--size 1000000] [--repeats 3] [--opendp-size N]

Prints one line per sampler with seconds and the ratio to the baseline.
"""

from __future__ import annotations

import argparse
import math
import secrets
import time
from collections.abc import Callable

import numpy as np

from flowerpress.privacy.mechanisms import gaussian_like

Sampler = Callable[[int], np.ndarray]


def _numpy_sampler(bit_generator: Callable[[np.random.SeedSequence], np.random.BitGenerator]
                   ) -> Sampler:
    def draw(size: int) -> np.ndarray:
        rng = np.random.Generator(bit_generator(np.random.SeedSequence(secrets.randbits(256))))
        model = np.zeros(size, dtype=np.float32)
        noise = gaussian_like((size,), std=0.5, rng=rng)
        return (model.astype(np.float64) + noise).astype(np.float32)

    return draw


def _opendp_sampler() -> Sampler | None:
    try:
        import opendp.prelude as dp
    except ImportError:
        return None
    dp.enable_features("contrib")

    def draw(size: int) -> np.ndarray:
        domain = dp.vector_domain(dp.atom_domain(T=float, nan=False), size=size)
        meas = dp.m.make_gaussian(domain, dp.l2_distance(T=float), scale=0.5)
        model = np.zeros(size, dtype=np.float32)
        noised = meas(model.astype(np.float64).tolist())
        return np.asarray(noised, dtype=np.float64).astype(np.float32)

    return draw


def _time(draw: Sampler, size: int, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        out = draw(size)
        best = min(best, time.perf_counter() - start)
        assert out.dtype == np.float32 and out.shape == (size,)
        assert abs(float(np.std(out)) / 0.5 - 1.0) < 0.05
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--opendp-size", type=int, default=None,
                        help="coordinates for OpenDP (default --size); time scaled to --size")
    args = parser.parse_args()

    samplers: dict[str, Sampler] = {
        "pcg64dxsm": _numpy_sampler(np.random.PCG64DXSM),
        "philox": _numpy_sampler(np.random.Philox),
        "sfc64": _numpy_sampler(np.random.SFC64),
    }
    results: dict[str, float] = {}
    for name, draw in samplers.items():
        results[name] = _time(draw, args.size, args.repeats)
    opendp = _opendp_sampler()
    if opendp is not None:
        n = args.opendp_size or args.size
        results["opendp"] = _time(opendp, n, 1) * args.size / n
    base = results["pcg64dxsm"]
    print(f"noise for {args.size:,} float32 coordinates (best of {args.repeats}; "
          f"opendp: 1 run{'' if not args.opendp_size else f' of {args.opendp_size:,}, scaled'})")
    for name, seconds in results.items():
        print(f"{name:10s} {seconds:9.4f} s  {seconds / base:8.1f}x pcg64dxsm  "
              f"{args.size / seconds / 1e6:8.2f} M coords/s")
    if opendp is None:
        print("opendp     not installed (pip install opendp)")


if __name__ == "__main__":
    main()
