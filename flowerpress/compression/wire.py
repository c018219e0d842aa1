"""Byte-level helpers for the flowerpress update wire format.

The format is little-endian throughout and never uses pickle.  Every size read
from a payload is checked against the bytes actually present before anything is
allocated, so a reader can only ever allocate memory proportional to the
payload it was handed (or to an explicit caller-provided bound).
"""

from __future__ import annotations

import struct

import numpy as np
import numpy.typing as npt

__all__ = ["PayloadError", "Reader", "Writer"]

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_F32 = struct.Struct("<f")


class PayloadError(ValueError):
    """A payload is malformed, truncated, oversized or otherwise untrusted.

    Raised by :func:`flowerpress.compression.decode`.  The message is one line
    naming what was wrong; servers count these as rejected updates.
    """


class Writer:
    """Append-only byte builder (a list of chunks joined once at the end)."""

    def __init__(self) -> None:
        self._chunks: list[bytes | memoryview] = []

    def u8(self, value: int) -> None:
        """Append an unsigned 8-bit integer."""
        self._chunks.append(_U8.pack(value))

    def u16(self, value: int) -> None:
        """Append an unsigned 16-bit integer."""
        self._chunks.append(_U16.pack(value))

    def u32(self, value: int) -> None:
        """Append an unsigned 32-bit integer."""
        self._chunks.append(_U32.pack(value))

    def u64(self, value: int) -> None:
        """Append an unsigned 64-bit integer."""
        self._chunks.append(_U64.pack(value))

    def f32(self, value: float) -> None:
        """Append a float32 scalar."""
        self._chunks.append(_F32.pack(value))

    def raw(self, data: bytes) -> None:
        """Append raw bytes."""
        self._chunks.append(data)

    def array(self, arr: npt.NDArray[np.generic]) -> None:
        """Append the raw bytes of an array (zero-copy until :meth:`getvalue`).

        The array must not be modified before :meth:`getvalue` is called.
        """
        flat = np.ascontiguousarray(arr).reshape(-1)
        self._chunks.append(flat.data.cast("B"))

    def extend(self, other: Writer) -> None:
        """Append everything written to ``other`` (zero-copy)."""
        self._chunks.extend(other._chunks)

    def getvalue(self) -> bytes:
        """Return everything written so far as one ``bytes`` object."""
        return b"".join(self._chunks)


class Reader:
    """Bounds-checked cursor over an untrusted buffer.

    Every read raises :class:`PayloadError` instead of reading past the end.
    """

    def __init__(self, data: bytes | memoryview) -> None:
        self._view = memoryview(data)
        self._pos = 0

    @property
    def remaining(self) -> int:
        """Number of unread bytes."""
        return len(self._view) - self._pos

    def _take(self, n: int, what: str) -> memoryview:
        if n < 0 or n > self.remaining:
            raise PayloadError(
                f"truncated payload: {what} needs {n} bytes, {self.remaining} left"
            )
        out = self._view[self._pos : self._pos + n]
        self._pos += n
        return out

    def u8(self, what: str) -> int:
        """Read an unsigned 8-bit integer."""
        return int(_U8.unpack(self._take(1, what))[0])

    def u16(self, what: str) -> int:
        """Read an unsigned 16-bit integer."""
        return int(_U16.unpack(self._take(2, what))[0])

    def u32(self, what: str) -> int:
        """Read an unsigned 32-bit integer."""
        return int(_U32.unpack(self._take(4, what))[0])

    def u64(self, what: str) -> int:
        """Read an unsigned 64-bit integer."""
        return int(_U64.unpack(self._take(8, what))[0])

    def u32s(self, count: int, what: str) -> tuple[int, ...]:
        """Read ``count`` unsigned 32-bit integers as a tuple (e.g. a shape)."""
        if count == 0:
            return ()
        pos = self._pos
        self._take(4 * count, what)
        return struct.unpack_from(f"<{count}I", self._view, pos)

    def f32(self, what: str) -> float:
        """Read a float32 scalar (may be non-finite; callers validate)."""
        return float(_F32.unpack(self._take(4, what))[0])

    def raw(self, n: int, what: str) -> memoryview:
        """Read ``n`` raw bytes (a zero-copy view)."""
        return self._take(n, what)

    def array(self, dtype: type[np.generic], count: int, what: str) -> npt.NDArray[np.generic]:
        """Read ``count`` little-endian items of ``dtype`` (read-only view)."""
        itemsize = np.dtype(dtype).itemsize
        buf = self._take(count * itemsize, what)
        return np.frombuffer(buf, dtype=np.dtype(dtype).newbyteorder("<"), count=count)

    def expect_end(self) -> None:
        """Raise :class:`PayloadError` if unread bytes remain."""
        if self.remaining:
            raise PayloadError(f"trailing bytes: {self.remaining} unread bytes after the payload")
