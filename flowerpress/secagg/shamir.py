"""Shamir secret sharing of 32-byte secrets over the prime field GF(2**521 - 1).

A secret is an integer below 2**256; a share is the point ``(x, f(x))`` of a
random polynomial ``f`` of degree ``threshold - 1`` with ``f(0) = secret``,
coefficients drawn uniformly from the field with :mod:`secrets`. Any
``threshold`` shares determine the secret (Lagrange interpolation at 0); fewer
reveal nothing about it (Shamir 1979). ``x`` is the holder's node id (non-zero
and far below the modulus, so distinct holders have distinct points).

Why not Flower's ``flwr.common.secure_aggregation.crypto.shamir``: it is sound
(PyCryptodome's GF(2**128) Shamir with random coefficients), but it pads the
secret to 16-byte chunks, starts a thread pool per call and costs about 30 ms
to split a key into 20 shares and 110 ms to combine one on the benchmark
machine; here both take well under a millisecond, which matters because the
server combines one secret per cohort member every round.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping

#: The Mersenne prime 2**521 - 1: larger than every 256-bit secret and every node id.
PRIME = (1 << 521) - 1
SHARE_BYTES = 66  # ceil(521 / 8)
SECRET_BYTES = 32


def split(secret: bytes, *, threshold: int, holders: list[int]) -> dict[int, bytes]:
    """Shares of ``secret`` for each holder id (``threshold`` of them recover it).

    Raises
    ------
    ValueError
        ``threshold`` is outside ``[1, len(holders)]``, a holder id is not in
        ``[1, 2**64)`` or repeats, or the secret is not 32 bytes.
    """
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"secret has {len(secret)} bytes, expected {SECRET_BYTES}")
    if not 1 <= threshold <= len(holders):
        raise ValueError(f"threshold={threshold} must be in [1, {len(holders)}] (the holders)")
    if len(set(holders)) != len(holders) or any(not 0 < h < (1 << 64) for h in holders):
        raise ValueError("holder ids must be distinct integers in [1, 2**64)")
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    out: dict[int, bytes] = {}
    for x in holders:
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % PRIME
        out[x] = y.to_bytes(SHARE_BYTES, "big")
    return out


def combine(shares: Mapping[int, bytes]) -> bytes:
    """The secret the shares interpolate at 0 (correct if at least ``threshold`` are honest).

    Raises
    ------
    ValueError
        A share is malformed (wrong length, not a field element) or ids repeat;
        or the interpolated value is not a 32-byte secret (inconsistent shares).
    """
    points: list[tuple[int, int]] = []
    for x, data in shares.items():
        if len(data) != SHARE_BYTES or not 0 < x < (1 << 64):
            raise ValueError("malformed share")
        y = int.from_bytes(data, "big")
        if y >= PRIME:
            raise ValueError("malformed share: not a field element")
        points.append((x, y))
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * SECRET_BYTES):
        raise ValueError("shares are inconsistent: the interpolated secret is out of range")
    return secret.to_bytes(SECRET_BYTES, "big")
