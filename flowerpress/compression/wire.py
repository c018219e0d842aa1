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
_LE_DTYPES: dict[type[np.generic], np.dtype[np.generic]] = {}


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

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        self._view = view
        self._pos = 0
        self._end = len(view)

    @property
    def remaining(self) -> int:
        """Number of unread bytes."""
        return self._end - self._pos

    def _advance(self, n: int, what: str) -> int:
        """Claim ``n`` bytes; return their start offset."""
        pos = self._pos
        if n < 0 or n > self._end - pos:
            raise PayloadError(
                f"truncated payload: {what} needs {n} bytes, {self._end - pos} left"
            )
        self._pos = pos + n
        return pos

    def _take(self, n: int, what: str) -> memoryview:
        pos = self._advance(n, what)
        return self._view[pos : pos + n]

    def u8(self, what: str) -> int:
        """Read an unsigned 8-bit integer."""
        pos = self._pos
        if pos >= self._end:
            raise PayloadError(f"truncated payload: {what} needs 1 bytes, 0 left")
        self._pos = pos + 1
        return int(self._view[pos])

    def u16(self, what: str) -> int:
        """Read an unsigned 16-bit integer."""
        return int(_U16.unpack_from(self._view, self._advance(2, what))[0])

    def u32(self, what: str) -> int:
        """Read an unsigned 32-bit integer."""
        return int(_U32.unpack_from(self._view, self._advance(4, what))[0])

    def u64(self, what: str) -> int:
        """Read an unsigned 64-bit integer."""
        return int(_U64.unpack_from(self._view, self._advance(8, what))[0])

    def u32s(self, count: int, what: str) -> tuple[int, ...]:
        """Read ``count`` unsigned 32-bit integers as a tuple (e.g. a shape)."""
        if count == 0:
            return ()
        return struct.unpack_from(f"<{count}I", self._view, self._advance(4 * count, what))

    def f32(self, what: str) -> float:
        """Read a float32 scalar (may be non-finite; callers validate)."""
        return float(_F32.unpack_from(self._view, self._advance(4, what))[0])

    def raw(self, n: int, what: str) -> memoryview:
        """Read ``n`` raw bytes (a zero-copy view)."""
        return self._take(n, what)

    def array(self, dtype: type[np.generic], count: int, what: str) -> npt.NDArray[np.generic]:
        """Read ``count`` little-endian items of ``dtype`` (read-only view)."""
        dt = _LE_DTYPES.get(dtype)
        if dt is None:
            dt = _LE_DTYPES[dtype] = np.dtype(dtype).newbyteorder("<")
        pos = self._advance(count * dt.itemsize, what)
        return np.frombuffer(self._view, dtype=dt, count=count, offset=pos)

    def expect_end(self) -> None:
        """Raise :class:`PayloadError` if unread bytes remain."""
        if self.remaining:
            raise PayloadError(f"trailing bytes: {self.remaining} unread bytes after the payload")
