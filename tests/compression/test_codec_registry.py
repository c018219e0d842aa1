"""The stage registry: built-ins and user stages by name and wire id, with bounded decoding."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import numpy as np
import numpy.typing as npt
import pytest

from flowerpress.compression import (
    VALID_NAMES,
    PayloadError,
    Reader,
    SparseRecon,
    StructureEncoding,
    StructureStage,
    ValueDecoder,
    ValueEncoder,
    ValueStage,
    Writer,
    available_stages,
    decode,
    parse,
    register_stage,
)
from flowerpress.compression import stages as st

F32 = npt.NDArray[np.float32]
pytestmark = pytest.mark.usefixtures("restore_stage_registry")

BUILTINS = ["ef", "ef21", "flat", "fp16", "lowrank", "none", "q", "randk", "sign", "topk", "zstd"]


@dataclass(frozen=True)
class Halves(ValueStage):
    """Test value stage: float16 with a float32 offset argument (``halves:OFFSET``)."""

    name: ClassVar[str] = "halves"
    wire_id: ClassVar[int | None] = 200
    offset: float = 0.0

    @classmethod
    def from_args(cls, args: Sequence[str]) -> Self:
        return cls(offset=float(args[0])) if args else cls()

    def spec(self) -> str:
        return f"halves:{self.offset!r}"

    def encode(
        self, x: F32, w: Writer, *, rng: np.random.Generator, need_recon: bool
    ) -> F32 | None:
        w.f32(self.offset)
        half = (x - np.float32(self.offset)).astype("<f2")
        w.array(half)
        return (half.astype(np.float32) + np.float32(self.offset)) if need_recon else None

    @classmethod
    def decode(cls, r: Reader, count: int) -> F32:
        offset = np.float32(r.f32("offset"))
        return r.array(np.float16, count, "halves").astype(np.float32) + offset


@dataclass(frozen=True)
class EveryOther(StructureStage):
    """Test structure stage: sends the even positions only."""

    name: ClassVar[str] = "everyother"
    wire_id: ClassVar[int | None] = 201

    def encode(
        self,
        x: F32,
        w: Writer,
        *,
        put_values: ValueEncoder,
        rng: np.random.Generator,
        need_recon: bool,
        warm: F32 | None,
    ) -> StructureEncoding | None:
        if x.size < 2:
            return None
        idx = np.arange(0, x.size, 2, dtype=np.int64)
        vrec = put_values(x.reshape(-1)[idx], need_recon)
        return StructureEncoding(SparseRecon(idx, vrec) if vrec is not None else None)

    @classmethod
    def decode(cls, r: Reader, shape: tuple[int, ...], *, values: ValueDecoder) -> F32:
        n = math.prod(shape)
        out = np.zeros(n, dtype=np.float32)
        out[::2] = values((n + 1) // 2)
        return out


UPDATE = [np.arange(12, dtype=np.float32).reshape(3, 4) - 5, np.array([0.5], dtype=np.float32)]


def test_builtins_are_registered_and_valid_names_is_a_live_view() -> None:
    # Execute
    before = list(VALID_NAMES)
    register_stage(Halves)

    # Assert
    assert before == BUILTINS
    assert available_stages() == sorted([*BUILTINS, "halves"])
    assert "halves" in VALID_NAMES and list(VALID_NAMES) == available_stages()


def test_duplicates_are_refused_unless_forced() -> None:
    # Prepare
    register_stage(Halves)

    @dataclass(frozen=True)
    class SameId(Halves):
        name: ClassVar[str] = "other"

    @dataclass(frozen=True)
    class SameName(Halves):
        wire_id: ClassVar[int | None] = 202

    # Execute / Assert
    with pytest.raises(ValueError, match="'halves' is already registered"):
        register_stage(Halves)
    with pytest.raises(ValueError, match="wire id 200 is already used by stage 'halves'"):
        register_stage(SameId)
    with pytest.raises(ValueError, match="already registered"):
        register_stage(SameName)
    register_stage(SameId, force=True)  # evicts Halves (same wire id) entirely
    assert "halves" not in available_stages() and "other" in available_stages()


def test_builtin_names_and_reserved_wire_ids_are_refused() -> None:
    @dataclass(frozen=True)
    class Low(Halves):
        name: ClassVar[str] = "low"
        wire_id: ClassVar[int | None] = 5

    @dataclass(frozen=True)
    class Topk(Halves):
        name: ClassVar[str] = "topk"

    @dataclass(frozen=True)
    class BadName(Halves):
        name: ClassVar[str] = "Bad:name"

    with pytest.raises(ValueError, match="reserved"):
        register_stage(Low)
    with pytest.raises(ValueError, match="already registered"):
        register_stage(Topk)
    with pytest.raises(ValueError, match="stage name"):
        register_stage(BadName)
    with pytest.raises(TypeError, match="subclass"):
        register_stage(int)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="subclass"):
        register_stage(ValueStage)


@pytest.mark.parametrize(
    "spec",
    [
        "halves:0.5",
        "halves:0.5+ef+zstd",
        "everyother",
        "everyother+halves:1.0+ef",
        "topk:0.5+halves",
    ],
)
def test_user_stages_round_trip_end_to_end(spec: str) -> None:
    # Prepare
    register_stage(Halves)
    register_stage(EveryOther)
    pipe = parse(spec)

    # Execute
    payload, state = pipe.encode(UPDATE, rng=np.random.default_rng(0))
    out = decode(payload, max_elements=13, max_tensors=2)

    # Assert
    assert payload[3] == 2  # wire version 2: it carries the manifest
    assert parse(pipe.spec) == pipe
    assert [a.shape for a in out] == [a.shape for a in UPDATE]
    if "everyother" not in spec and "topk" not in spec:
        for got, want in zip(out, UPDATE, strict=True):
            np.testing.assert_array_equal(got, want)  # small integers are exact in float16
    if pipe.has_error_feedback:  # input + 0 == decoded + residual
        for got, res, want in zip(out, state.residuals, UPDATE, strict=True):
            np.testing.assert_allclose(got + res, want, atol=1e-6)


def test_builtin_payloads_stay_version_1() -> None:
    payload, _ = parse("topk:0.5+q:8+ef").encode(UPDATE, rng=np.random.default_rng(0))
    assert payload[:4] == b"FPC\x01"


def test_decoder_without_the_stage_rejects_the_payload_naming_it() -> None:
    # Prepare
    register_stage(Halves)
    payload, _ = parse("halves").encode(UPDATE, rng=np.random.default_rng(0))

    @dataclass(frozen=True)
    class Impostor(Halves):
        name: ClassVar[str] = "impostor"

    # Execute / Assert: unregistered here
    register_stage(Impostor, force=True)  # evicts halves, takes its wire id
    with pytest.raises(PayloadError, match="wire id 200 is stage 'halves', registered here as"):
        decode(payload, max_elements=13)
    from flowerpress.compression import registry

    registry._BY_NAME.pop("impostor")
    registry._BY_WIRE.pop((registry.ROLE_VALUE, 200))
    with pytest.raises(PayloadError, match=r"'halves' .*not registered here"):
        decode(payload, max_elements=13)


def test_user_wire_id_missing_from_the_manifest_is_rejected() -> None:
    # Prepare: a version-1 payload whose value kind byte is a user id
    register_stage(Halves)
    payload = bytearray(parse("none").encode([np.ones(2, np.float32)])[0])
    kind_at = 3 + 2 + 4 + 1 + 4 + 1
    assert payload[kind_at] == 0
    payload[kind_at] = 200

    # Execute / Assert
    with pytest.raises(PayloadError, match="unknown value kind 200"):
        decode(bytes(payload), max_elements=2)


@dataclass(frozen=True)
class Liar(ValueStage):
    """A misbehaving decoder: its result is whatever ``mode`` says."""

    name: ClassVar[str] = "liar"
    wire_id: ClassVar[int | None] = 210
    mode: ClassVar[str] = "short"

    def encode(
        self, x: F32, w: Writer, *, rng: np.random.Generator, need_recon: bool
    ) -> F32 | None:
        w.array(x.astype("<f4"))
        return x.copy() if need_recon else None

    @classmethod
    def decode(cls, r: Reader, count: int) -> F32:
        vals: Any = r.array(np.float32, count, "values").astype(np.float32)
        if cls.mode == "short":
            return vals[:-1]  # type: ignore[no-any-return]
        if cls.mode == "float64":
            return vals.astype(np.float64)  # type: ignore[no-any-return]
        if cls.mode == "nan":
            vals[0] = np.nan
            return vals  # type: ignore[no-any-return]
        if cls.mode == "list":
            return vals.tolist()  # type: ignore[no-any-return]
        raise KeyError("boom\nsecond line")


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("short", "expected 4 float32 values"),
        ("float64", "float64 array"),
        ("nan", "non-finite value"),
        ("list", "decoded list"),
        ("raise", "KeyError"),
    ],
)
def test_framework_checks_a_user_decoder_result(
    monkeypatch: pytest.MonkeyPatch, mode: str, reason: str
) -> None:
    # Prepare
    register_stage(Liar)
    payload, _ = parse("liar").encode([np.ones(4, np.float32)])
    monkeypatch.setattr(Liar, "mode", mode)

    # Execute
    with pytest.raises(PayloadError, match=reason) as info:
        decode(payload, max_elements=4)

    # Assert
    assert "\n" not in str(info.value)


@dataclass(frozen=True)
class Greedy(EveryOther):
    """A structure decoder asking for more values than the tensor holds."""

    name: ClassVar[str] = "greedy"
    wire_id: ClassVar[int | None] = 211

    @classmethod
    def decode(cls, r: Reader, shape: tuple[int, ...], *, values: ValueDecoder) -> F32:
        values(math.prod(shape) // 2)
        return values(2**40)


def test_structure_stage_never_gets_an_unbounded_count() -> None:
    # Prepare
    register_stage(Greedy)
    payload, _ = parse("greedy").encode([np.ones(8, np.float32)])

    # Execute / Assert
    with pytest.raises(PayloadError, match="asked for 1099511627776 values, at most 4 left"):
        decode(payload, max_elements=8)


def test_parse_imports_and_registers_a_stage_by_module_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: this module is importable as tests.compression.test_codec_registry
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    spec = "tests.compression.test_codec_registry:Halves:2.0+zstd"

    # Execute
    pipe = parse(spec)
    again = parse(spec)  # the same class again: a no-op, not a duplicate

    # Assert
    assert pipe == again
    assert pipe.spec == "halves:2.0+zstd:3"
    assert "halves" in available_stages()
    with pytest.raises(ValueError, match="has no stage class 'Nope'"):
        parse("tests.compression.test_codec_registry:Nope")
    with pytest.raises(ValueError, match="cannot import"):
        parse("no_such_pkg.mod:Halves")


def test_parse_passes_user_argument_errors_on_naming_the_stage() -> None:
    register_stage(Halves)
    with pytest.raises(ValueError, match=r"stage 'halves:abc'.*valid names: .*halves"):
        parse("halves:abc")


def test_builtin_stage_classes_are_registered_by_wire_id() -> None:
    from flowerpress.compression import registry

    assert registry.value_stage_class(st.KIND_QUANT) is st.QuantStage
    assert registry.structure_stage_class(st.STRUCT_LOWRANK) is st.LowRankStage
    assert registry.structure_stage_class(st.STRUCT_DENSE) is None


# Version 2 is pinned too: magic, version 2, flags, one manifest entry (value
# stage, wire id 200, "halves"), then the version-1 body with kind byte 200.
GOLDEN_V2 = (
    "4650430200" + "01" + "00c8" + "06" + "68616c766573"  # header + manifest
    + "01000000" + "0102000000" + "00" + "c8" + "0000003f" + "0038" + "00c1"  # body
)  # fmt: skip


def test_version_2_payload_is_pinned() -> None:
    # Prepare
    register_stage(Halves)
    x = [np.array([1.0, -2.0], np.float32)]

    # Execute
    payload, _ = parse("halves:0.5").encode(x)

    # Assert
    assert payload.hex() == GOLDEN_V2
    np.testing.assert_array_equal(decode(bytes.fromhex(GOLDEN_V2), max_elements=2)[0], x[0])


@pytest.mark.parametrize(
    ("manifest", "reason"),
    [
        ("00", "lists no extension stage"),
        ("01" + "02c8" + "06" + "68616c766573", "role 2"),
        ("01" + "0005" + "06" + "68616c766573", "wire id 5"),
        ("01" + "00c8" + "06" + "48414c564553", "invalid"),
        ("02" + ("00c8" + "06" + "68616c766573") * 2, "twice"),
        ("01" + "00c8" + "ff" + "68", "truncated"),
    ],
)
def test_malformed_manifests_are_rejected(manifest: str, reason: str) -> None:
    # Prepare
    register_stage(Halves)
    payload = bytes.fromhex("4650430200" + manifest + GOLDEN_V2[len("4650430200") + 22 :])

    # Execute / Assert
    with pytest.raises(PayloadError, match=reason):
        decode(payload, max_elements=2)
