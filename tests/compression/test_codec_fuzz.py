"""The decoder never trusts a payload: bad bytes give PayloadError or a valid result."""

from __future__ import annotations

import struct
import tracemalloc

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from flowerpress.compression import PayloadError, decode, parse
from tests.compression.payload_mutations import mutated_payloads

MAX_ELEMENTS = 4096
_SHAPES: list[tuple[int, ...]] = [(6, 2, 3, 3), (6,), (24, 40), (), (0, 3), (5, 7)]
_FUZZ_SPECS = [
    "none",
    "fp16",
    "q:8",
    "q:3",
    "sign",
    "topk:0.1+q:4",
    "topk:0.05+q:8+zstd",
    "randk:0.2+q:2",
    "lowrank:2+q:8",
    "lowrank:3",
    "sign+ef+zstd:1",
]


def _valid_payloads() -> list[bytes]:
    rng = np.random.default_rng(0)
    update = [rng.standard_normal(s).astype(np.float32) for s in _SHAPES]
    return [parse(spec).encode(update, rng=rng)[0] for spec in _FUZZ_SPECS]


VALID = _valid_payloads()


def _assert_rejected_or_valid(payload: bytes) -> None:
    try:
        out = decode(payload, max_elements=MAX_ELEMENTS)
    except PayloadError as exc:
        assert "\n" not in str(exc)
        return
    assert isinstance(out, list)
    assert sum(a.size for a in out) <= MAX_ELEMENTS
    for a in out:
        assert isinstance(a, np.ndarray)
        assert a.dtype == np.float32
        assert np.isfinite(a).all()


def mutated() -> hs.SearchStrategy[bytes]:
    return mutated_payloads(VALID)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(payload=mutated())
def test_mutated_payloads_raise_payload_error_or_decode_validly(payload: bytes) -> None:
    _assert_rejected_or_valid(payload)


@settings(max_examples=100, deadline=None)
@given(payload=hs.binary(max_size=256))
def test_random_bytes_raise_payload_error_or_decode_validly(payload: bytes) -> None:
    _assert_rejected_or_valid(payload)


def test_every_valid_fuzz_seed_decodes() -> None:
    for payload in VALID:
        out = decode(payload, max_elements=MAX_ELEMENTS)
        assert [a.shape for a in out] == _SHAPES


@pytest.mark.parametrize("cut", [0, 1, 3, 4, 5, 8, 9, 20])
def test_every_truncation_is_rejected(cut: int) -> None:
    for payload in VALID:
        with pytest.raises(PayloadError):
            decode(payload[: len(payload) - cut - 1], max_elements=MAX_ELEMENTS)


def test_trailing_bytes_are_rejected() -> None:
    for payload in VALID:
        with pytest.raises(PayloadError, match=r"trailing|zstd"):
            decode(payload + b"\x00", max_elements=MAX_ELEMENTS)


# --------------------------------------------------------------------------- crafted headers
def _frame(body: bytes, flags: int = 0, version: int = 1) -> bytes:
    return b"FPC" + struct.pack("<BB", version, flags) + body


def _tensor_f32(shape: tuple[int, ...], values: np.ndarray) -> bytes:
    head = struct.pack("<B", len(shape)) + b"".join(struct.pack("<I", d) for d in shape)
    return head + b"\x00\x00" + values.astype("<f4").tobytes()


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "truncated"),
        (b"NOPE\x01\x00", "bad magic"),
        (_frame(b"\x00\x00\x00\x00", version=2), "version 2"),
        (_frame(b"\x00\x00\x00\x00", flags=0x80), "unknown flags"),
        (_frame(struct.pack("<I", 2**32 - 1)), "tensors exceed"),
        (_frame(struct.pack("<IB", 1, 33)), "ndim"),
        (_frame(struct.pack("<IB", 1, 32) + b"\xff\xff\xff\xff" * 32), "element bound"),
        (_frame(struct.pack("<IBII", 1, 2, 2**31, 2**31)), "element bound"),
        (_frame(struct.pack("<IBIB", 1, 1, 4, 9)), "unknown structure"),
        (_frame(struct.pack("<IBIBB", 1, 1, 4, 0, 9)), "unknown value kind"),
        (_frame(struct.pack("<I", 1) + _tensor_f32((2,), np.array([1.0, np.nan]))), "non-finite"),
        (_frame(struct.pack("<I", 1) + _tensor_f32((2,), np.array([np.inf, 0.0]))), "non-finite"),
        (_frame(struct.pack("<I", 0) + b"junk"), "trailing"),
        # topk claiming more kept values than elements
        (_frame(struct.pack("<IBIBI", 1, 1, 4, 1, 5)), "keeps 5 of 4"),
        # quantization with a block of size 0 and a min above the max
        (_frame(struct.pack("<IBIBBBI", 1, 1, 4, 0, 2, 8, 0)), "block 0"),
        (_frame(struct.pack("<IBIBBBIff", 1, 1, 4, 0, 2, 8, 2048, 1.0, 0.0)), "minimum above"),
        # low rank whose factors would not save anything
        (_frame(struct.pack("<IBIIBIIH", 1, 2, 4, 4, 3, 4, 4, 2)), "rank 2 invalid"),
        # sign with a negative scale
        (_frame(struct.pack("<IBIBBf", 1, 1, 8, 0, 3, -1.0) + b"\x00"), "sign scale"),
    ],
)
def test_crafted_payloads_are_rejected_with_a_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(PayloadError, match=reason):
        decode(payload, max_elements=MAX_ELEMENTS)


def test_lowrank_product_overflow_is_rejected() -> None:
    # Prepare: finite float32 factors whose product overflows
    p = np.full(40 * 1, 1e30, dtype="<f4").tobytes()
    q = np.full(40 * 1, 1e30, dtype="<f4").tobytes()
    body = struct.pack("<IBIIBIIH", 1, 2, 40, 40, 3, 40, 40, 1) + b"\x00" + p + b"\x00" + q
    payload = _frame(body)

    # Execute / Assert
    with pytest.raises(PayloadError, match="low-rank product"):
        decode(payload, max_elements=1600)


def test_float16_infinity_is_rejected() -> None:
    payload = _frame(struct.pack("<IBIBB", 1, 1, 2, 0, 1) + np.array([1, np.inf], "<f2").tobytes())
    with pytest.raises(PayloadError, match="non-finite"):
        decode(payload, max_elements=MAX_ELEMENTS)


def test_lowrank_rank_above_the_cap_is_rejected() -> None:
    # Prepare: rank 257 would cost 257 multiply-adds per element to decode
    payload = _frame(struct.pack("<IBIIBIIH", 1, 2, 600, 600, 3, 600, 600, 257))

    # Execute / Assert
    with pytest.raises(PayloadError, match="rank 257 invalid"):
        decode(payload, max_elements=600 * 600)


def test_element_bound_is_enforced_on_valid_payloads() -> None:
    # Prepare
    payload, _ = parse("q:8").encode([np.ones((10, 10), dtype=np.float32)])

    # Execute / Assert
    assert decode(payload, max_elements=100)[0].shape == (10, 10)
    with pytest.raises(PayloadError, match="element bound"):
        decode(payload, max_elements=99)


def test_zstd_bomb_is_rejected_without_decompressing() -> None:
    # Prepare: 64 MiB of zeros squeezes into a few KiB
    big = bytes(64 << 20)
    frame = zstandard.ZstdCompressor(level=1).compress(big)
    payload = _frame(struct.pack("<Q", len(big)) + frame, flags=1)
    assert len(payload) < 64 << 10

    # Execute
    tracemalloc.start()
    try:
        with pytest.raises(PayloadError, match="exceeds the bound"):
            decode(payload, max_elements=MAX_ELEMENTS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    # Assert
    assert peak < 4 << 20


def test_zstd_frame_lying_about_its_size_is_rejected() -> None:
    # Prepare: header claims a small body, the frame holds 8 MiB
    big = bytes(8 << 20)
    for content_size in (True, False):
        frame = zstandard.ZstdCompressor(level=1, write_content_size=content_size).compress(big)
        payload = _frame(struct.pack("<Q", 100) + frame, flags=1)

        # Execute / Assert
        with pytest.raises(PayloadError, match="zstd"):
            decode(payload, max_elements=MAX_ELEMENTS)


def test_zstd_frame_with_trailing_garbage_is_rejected() -> None:
    # Prepare
    payload, _ = parse("q:8+zstd").encode([np.ones(50, dtype=np.float32)])

    # Execute / Assert
    with pytest.raises(PayloadError, match="zstd"):
        decode(payload + b"\x28\xb5\x2f\xfd", max_elements=MAX_ELEMENTS)


def test_huge_declared_sections_allocate_nothing_big() -> None:
    # Prepare: shapes within budget, but sections claim far more bytes than exist
    payloads = [
        _frame(struct.pack("<IBIBIBI", 1, 1, 4000, 1, 3000, 0, 2**32 - 1)),  # topk unary length
        _frame(struct.pack("<IBIBBBI", 1, 1, 4000, 0, 2, 16, 1)),  # 4000 quant blocks
        _frame(struct.pack("<IBIIB", 1, 2, 2, 2000, 0) + b"\x00" * 64),  # 4000 f32 claimed
    ]

    # Execute
    tracemalloc.start()
    try:
        for payload in payloads:
            with pytest.raises(PayloadError):
                decode(payload, max_elements=MAX_ELEMENTS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    # Assert
    assert peak < 1 << 20


def test_decode_rejects_bad_bounds_as_caller_errors() -> None:
    with pytest.raises(ValueError, match="max_elements"):
        decode(b"FPC\x01\x00\x00\x00\x00\x00", max_elements=-1)


def test_decode_accepts_payload_as_uint8_array_from_an_array_record() -> None:
    # Prepare: the way a ClientApp ships bytes inside a Flower ArrayRecord
    from flwr.app import Array, ArrayRecord

    payload, _ = parse("q:4").encode([np.arange(8, dtype=np.float32)])
    record = ArrayRecord(array_dict={"payload": Array(np.frombuffer(payload, np.uint8))})

    # Execute
    out = decode(record["payload"].numpy(), max_elements=8)

    # Assert
    np.testing.assert_array_equal(out[0], decode(payload, max_elements=8)[0])


def test_decode_rejects_arrays_that_are_not_bytes() -> None:
    with pytest.raises(PayloadError, match="1-D uint8"):
        decode(np.zeros(4, dtype=np.float32), max_elements=10)  # type: ignore[arg-type]


def test_decode_rejects_non_bytes() -> None:
    with pytest.raises(PayloadError, match="bytes"):
        decode("FPC", max_elements=10)  # type: ignore[arg-type]
