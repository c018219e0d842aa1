"""The codec-stage registry: stages by spec name, and value/structure stages by wire id.

Built-in stages register here through :func:`register_stage` exactly as a
user's stage does.  A name, and a ``(role, wire_id)`` pair, can be registered
once; ``force=True`` replaces whatever registration it collides with (tests
restore the registry afterwards).  Wire ids below
:data:`~flowerpress.compression.stages.FIRST_USER_WIRE_ID` are reserved for
flowerpress's own stages, so a user's stage never changes how an existing
payload decodes.
"""

from __future__ import annotations

import re

from flowerpress.compression import stages as st

__all__ = [
    "ROLE_STRUCTURE",
    "ROLE_VALUE",
    "available_stages",
    "register_stage",
    "stage_class",
    "structure_stage_class",
    "value_stage_class",
]

#: Role bytes of the version-2 payload manifest.
ROLE_VALUE = 0
ROLE_STRUCTURE = 1

_BY_NAME: dict[str, type[st.Stage]] = {}
_BY_WIRE: dict[tuple[int, int], type[st.Stage]] = {}
_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_BASES: tuple[type[st.Stage], ...] = (
    st.ValueStage,
    st.StructureStage,
    st.ErrorFeedbackStage,
    st.EF21Stage,
    st.FlatStage,
    st.ZstdStage,
)


def _wire_key(cls: type[st.Stage]) -> tuple[int, int] | None:
    if issubclass(cls, st.ValueStage):
        role = ROLE_VALUE
    elif issubclass(cls, st.StructureStage):
        role = ROLE_STRUCTURE
    else:
        return None
    wire_id = cls.wire_id
    if not isinstance(wire_id, int) or isinstance(wire_id, bool) or not 0 <= wire_id <= 255:
        raise ValueError(
            f"stage {cls.name!r}: wire_id must be an int in "
            f"[{st.FIRST_USER_WIRE_ID}, 255], got {wire_id!r}"
        )
    if role == ROLE_STRUCTURE and wire_id == st.STRUCT_DENSE:
        raise ValueError(f"stage {cls.name!r}: structure wire id 0 means 'dense'")
    if wire_id < st.FIRST_USER_WIRE_ID and not cls.__module__.startswith("flowerpress."):
        raise ValueError(
            f"stage {cls.name!r}: wire_id {wire_id} is reserved for flowerpress; "
            f"use one in [{st.FIRST_USER_WIRE_ID}, 255]"
        )
    return role, wire_id


def register_stage(cls: type[st.Stage], *, force: bool = False) -> None:
    """Make the stage class ``cls`` usable in specs (as ``cls.name``) and payloads.

    Parameters
    ----------
    cls : type[Stage]
        A subclass of :class:`~flowerpress.compression.ValueStage` or
        :class:`~flowerpress.compression.StructureStage` (or of the built-in
        ``ef`` / ``ef21`` / ``flat`` / ``zstd`` stages) with class attributes ``name`` (lower-case
        letters, digits, ``-``, ``_``; at most 32) and, for value and
        structure stages, ``wire_id`` in ``[64, 255]`` (unique per role).
    force : bool
        Replace the registrations ``cls`` collides with (by name or by wire
        id) instead of refusing.

    Raises
    ------
    ValueError
        If the name or the wire id is malformed, reserved or already taken
        (and ``force`` is false).
    TypeError
        If ``cls`` is not a concrete stage class.
    """
    if not (isinstance(cls, type) and issubclass(cls, _BASES)) or cls in _BASES[:2]:
        raise TypeError(f"cls must subclass ValueStage or StructureStage, got {cls!r}")
    missing = sorted(getattr(cls, "__abstractmethods__", ()))
    if missing:
        raise TypeError(f"stage {cls.__qualname__} leaves {missing} unimplemented")
    name = cls.name
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"stage name {name!r} must be 1-32 lower-case letters, digits, '-' or '_', "
            "starting with a letter"
        )
    key = _wire_key(cls)
    old_by_name = _BY_NAME.get(name)
    old_by_wire = _BY_WIRE.get(key) if key is not None else None
    if not force:
        if old_by_name is not None:
            raise ValueError(
                f"codec stage {name!r} is already registered ({old_by_name.__qualname__}); "
                "pass force=True to replace it"
            )
        if old_by_wire is not None:
            raise ValueError(
                f"wire id {cls.wire_id} is already used by stage {old_by_wire.name!r}; "
                "pass force=True to replace it"
            )
    for old in (old_by_name, old_by_wire):
        if old is not None:
            _unregister(old)
    _BY_NAME[name] = cls
    if key is not None:
        _BY_WIRE[key] = cls


def _unregister(cls: type[st.Stage]) -> None:
    for name in [n for n, c in _BY_NAME.items() if c is cls]:
        del _BY_NAME[name]
    for key in [k for k, c in _BY_WIRE.items() if c is cls]:
        del _BY_WIRE[key]


def available_stages() -> list[str]:
    """Return the registered stage names, sorted."""
    return sorted(_BY_NAME)


def stage_class(name: str) -> type[st.Stage] | None:
    """The stage registered as ``name``, or ``None``."""
    return _BY_NAME.get(name)


def value_stage_class(wire_id: int) -> type[st.ValueStage] | None:
    """The value stage registered with ``wire_id``, or ``None``."""
    cls = _BY_WIRE.get((ROLE_VALUE, wire_id))
    return cls if cls is not None and issubclass(cls, st.ValueStage) else None


def structure_stage_class(wire_id: int) -> type[st.StructureStage] | None:
    """The structure stage registered with ``wire_id``, or ``None``."""
    cls = _BY_WIRE.get((ROLE_STRUCTURE, wire_id))
    return cls if cls is not None and issubclass(cls, st.StructureStage) else None


for _builtin in (
    st.NoneStage,
    st.Fp16Stage,
    st.QuantStage,
    st.SignStage,
    st.TopKStage,
    st.RandKStage,
    st.LowRankStage,
    st.ErrorFeedbackStage,
    st.EF21Stage,
    st.FlatStage,
    st.ZstdStage,
):
    register_stage(_builtin)
