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
from collections.abc import Mapping, Sequence

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


# --- field-level helpers (the verifiable dealing of flowerpress.secagg.core) -----------


def field_bytes(value: int) -> bytes:
    """A field element as :data:`SHARE_BYTES` big-endian bytes."""
    return (value % PRIME).to_bytes(SHARE_BYTES, "big")


def field_int(data: bytes) -> int:
    """Inverse of :func:`field_bytes`.

    Raises
    ------
    ValueError
        ``data`` is not :data:`SHARE_BYTES` long or not below the modulus.
    """
    if len(data) != SHARE_BYTES:
        raise ValueError("malformed field element")
    value = int.from_bytes(data, "big")
    if value >= PRIME:
        raise ValueError("malformed field element: not below the modulus")
    return value


def random_polynomial(constant: int, *, threshold: int) -> list[int]:
    """Coefficients (constant first) of a uniform polynomial of degree ``threshold - 1``."""
    if threshold < 1:
        raise ValueError(f"threshold={threshold} must be >= 1")
    return [constant % PRIME] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]


def evaluate(coefficients: Sequence[int], x: int) -> int:
    """The polynomial at ``x`` (Horner, modulo :data:`PRIME`)."""
    y = 0
    for c in reversed(coefficients):
        y = (y * x + c) % PRIME
    return y


def interpolate(points: Mapping[int, int], at: int) -> int:
    """The value at ``at`` of the polynomial of degree ``< len(points)`` through ``points``.

    Raises
    ------
    ValueError
        No points, or two points share an ``x``.
    """
    if not points:
        raise ValueError("no points to interpolate")
    xs = list(points)
    if len(set(x % PRIME for x in xs)) != len(xs):
        raise ValueError("interpolation points repeat")
    value = 0
    for xi in xs:
        num, den = 1, 1
        for xj in xs:
            if xj != xi:
                num = num * (at - xj) % PRIME
                den = den * (xi - xj) % PRIME
        value = (value + points[xi] * num * pow(den, -1, PRIME)) % PRIME
    return value
