"""One Hypothesis strategy for hostile payloads, shared by the codec fuzz tests.

Starts from a valid payload and applies 1-3 edits: a bit flip, a byte
overwrite, a truncation, a splice with another valid payload, an insertion, or
a length / shape / count field overwritten with a huge value.
"""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import strategies as hs

KINDS = ("flip", "truncate", "splice", "insert", "huge", "byte")
HUGE_WIDTHS = (2, 4, 8)
HUGE_VALUES = (2**16 - 1, 2**31, 2**32 - 1, 2**63, 2**64 - 1)


def mutated_payloads(valid: Sequence[bytes], *, kinds: Sequence[str] = KINDS,
                     huge_widths: Sequence[int] = HUGE_WIDTHS,
                     huge_values: Sequence[int] = HUGE_VALUES) -> hs.SearchStrategy[bytes]:
    """Payloads derived from ``valid`` by a few random edits of the given ``kinds``."""

    @hs.composite
    def mutated(draw: hs.DrawFn) -> bytes:
        base = bytearray(draw(hs.sampled_from(valid)))
        for _ in range(draw(hs.integers(1, 3))):
            kind = draw(hs.sampled_from(list(kinds)))
            pos = draw(hs.integers(0, max(0, len(base) - 1)))
            if kind == "flip" and base:
                base[pos] ^= 1 << draw(hs.integers(0, 7))
            elif kind == "byte" and base:
                base[pos] = draw(hs.integers(0, 255))
            elif kind == "truncate":
                del base[pos:]
            elif kind == "splice":
                other = draw(hs.sampled_from(valid))
                cut = draw(hs.integers(0, len(other)))
                base = base[:pos] + bytearray(other[cut:])
            elif kind == "insert":
                base[pos:pos] = draw(hs.binary(min_size=1, max_size=16))
            else:  # "huge" (or an edit of an empty payload): a huge length/shape/count field
                width = draw(hs.sampled_from(list(huge_widths)))
                value = draw(hs.sampled_from(list(huge_values)))
                base[pos : pos + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
        return bytes(base)

    return mutated()
