"""The user example ``examples/custom_codec/ternary.py`` (TernGrad), via the public interface."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from flowerpress.compression import PayloadError, ValueStage, decode, parse, register_stage
from tests.compression.payload_mutations import mutated_payloads

REPO = Path(__file__).resolve().parents[2]
SPEC = "examples.custom_codec.ternary:Ternary"
MAX_ELEMENTS = 2048
MAX_TENSORS = 4
_SHAPES: list[tuple[int, ...]] = [(8, 3, 3), (40,), (), (30, 40)]


def _import_example() -> ModuleType:
    # The example is imported relative to the project, as a user's module would be.
    sys.path.insert(0, str(REPO))
    try:
        return importlib.import_module("examples.custom_codec.ternary")
    finally:
        sys.path.remove(str(REPO))


@pytest.fixture
def ternary(restore_stage_registry: None) -> Iterator[type[ValueStage]]:
    module = _import_example()
    cls: type[ValueStage] = module.Ternary
    register_stage(cls)
    yield cls


def _update(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in _SHAPES]


def test_round_trip_gives_ternary_values_with_the_shapes(ternary: type[ValueStage]) -> None:
    # Prepare
    update = _update()

    # Execute
    payload, _ = parse("ternary").encode(update, rng=np.random.default_rng(1))
    out = decode(payload, max_elements=MAX_ELEMENTS, max_tensors=MAX_TENSORS)

    # Assert: each value is 0 or +-max|x| with the sign of x; 2 bits per value
    assert [a.shape for a in out] == _SHAPES
    for got, x in zip(out, update, strict=True):
        s = float(np.abs(x).max())
        assert got.dtype == np.float32
        assert np.isin(got, [-s, 0.0, s]).all()
        assert (np.sign(got) * np.sign(x) >= 0).all()
    n = sum(a.size for a in update)
    assert len(payload) < n / 4 + 64 * len(update) + 64


def test_exact_on_ternary_inputs(ternary: type[ValueStage]) -> None:
    # Prepare: values already in {-s, 0, s} are kept with probability 1 or 0
    x = [np.array([[1.5, 0.0, -1.5], [0.0, 1.5, 1.5]], dtype=np.float32)]

    # Execute
    payload, _ = parse("ternary").encode(x, rng=np.random.default_rng(3))

    # Assert
    np.testing.assert_array_equal(decode(payload, max_elements=6)[0], x[0])


def test_unbiased_over_seeded_draws(ternary: type[ValueStage]) -> None:
    # Prepare
    x = [np.random.default_rng(7).standard_normal(500).astype(np.float32)]
    pipe = parse("ternary")
    draws = 2000

    # Execute
    total = np.zeros(500)
    for seed in range(draws):
        payload, _ = pipe.encode(x, rng=np.random.default_rng(seed))
        total += decode(payload, max_elements=500)[0]

    # Assert: per-coordinate std of the mean is at most s / sqrt(draws)
    s = float(np.abs(x[0]).max())
    np.testing.assert_allclose(total / draws, x[0], atol=5 * s / np.sqrt(draws))


@pytest.mark.parametrize("spec", ["ternary+zstd", "topk:0.1+ternary+ef", "randk:0.2+ternary+ef"])
def test_in_a_pipeline_with_error_feedback_invariant(ternary: type[ValueStage], spec: str) -> None:
    # Prepare
    update = _update(2)
    pipe = parse(spec)

    # Execute
    payload, state = pipe.encode(update, rng=np.random.default_rng(5))
    out = decode(payload, max_elements=MAX_ELEMENTS, max_tensors=MAX_TENSORS)

    # Assert: update + 0 == decoded + new residual (the EF invariant)
    assert payload[:4] == b"FPC\x02"
    assert parse(pipe.spec) == pipe
    if pipe.has_error_feedback:
        for x, got, res in zip(update, out, state.residuals, strict=True):
            np.testing.assert_allclose(got + res, x, atol=1e-6)
        payload2, _ = pipe.encode(update, state, rng=np.random.default_rng(6))
        assert len(decode(payload2, max_elements=MAX_ELEMENTS)) == len(update)


def test_named_by_import_path_registers_it(
    restore_stage_registry: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    monkeypatch.chdir(REPO)

    # Execute
    pipe = parse(f"topk:0.5+{SPEC}+zstd")
    payload, _ = pipe.encode(_update(), rng=np.random.default_rng(0))

    # Assert
    assert pipe.spec == "topk:0.5+ternary+zstd:3"
    assert len(decode(payload, max_elements=MAX_ELEMENTS)) == len(_SHAPES)


def test_server_without_the_stage_rejects_it(ternary: type[ValueStage]) -> None:
    # Prepare
    payload, _ = parse("ternary").encode(_update(), rng=np.random.default_rng(0))
    from flowerpress.compression import registry

    registry._BY_NAME.pop("ternary")
    registry._BY_WIRE.pop((registry.ROLE_VALUE, ternary.wire_id or 0))

    # Execute / Assert
    with pytest.raises(PayloadError, match=r"'ternary' .*not registered here"):
        decode(payload, max_elements=MAX_ELEMENTS)


def test_invalid_code_and_bad_scale_are_rejected(ternary: type[ValueStage]) -> None:
    # Prepare: one tensor of 4 values; the code byte is the last one
    payload, _ = parse("ternary").encode([np.ones(4, np.float32)], rng=np.random.default_rng(0))
    code3 = payload[:-1] + b"\x03"
    nan_scale = payload[:-5] + np.array([np.nan], "<f4").tobytes() + payload[-1:]
    inf_scale = payload[:-5] + np.array([np.inf], "<f4").tobytes() + payload[-1:]

    # Execute / Assert
    with pytest.raises(PayloadError, match="code 3"):
        decode(code3, max_elements=4)
    with pytest.raises(PayloadError, match="ternary scale"):
        decode(nan_scale, max_elements=4)
    with pytest.raises(PayloadError, match="non-finite"):
        decode(inf_scale, max_elements=4)


# --------------------------------------------------------------------------- fuzzing
def _seeds() -> list[bytes]:
    module = _import_example()
    from flowerpress.compression import registry

    saved = dict(registry._BY_NAME), dict(registry._BY_WIRE)
    try:
        if registry.stage_class("ternary") is not module.Ternary:
            register_stage(module.Ternary, force=True)
        return [
            parse(spec).encode(_update(), rng=np.random.default_rng(0))[0]
            for spec in ("ternary", "ternary+zstd:1", "topk:0.1+ternary+ef", "randk:0.3+ternary")
        ]
    finally:
        registry._BY_NAME.clear()
        registry._BY_NAME.update(saved[0])
        registry._BY_WIRE.clear()
        registry._BY_WIRE.update(saved[1])


SEEDS = _seeds()


def mutated() -> hs.SearchStrategy[bytes]:
    # huge values written into 1-byte fields too
    return mutated_payloads(SEEDS, huge_widths=(1, 2, 4, 8),
                            huge_values=(2**8 - 1, 2**16 - 1, 2**31, 2**32 - 1, 2**64 - 1))


def test_fuzz_seeds_decode(ternary: type[ValueStage]) -> None:
    for payload in SEEDS:
        out = decode(payload, max_elements=MAX_ELEMENTS, max_tensors=MAX_TENSORS)
        assert [a.shape for a in out] == _SHAPES


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
@given(payload=mutated())
def test_mutated_payloads_raise_payload_error_or_decode_within_bounds(
    ternary: type[ValueStage], payload: bytes
) -> None:
    # Execute
    try:
        out = decode(payload, max_elements=MAX_ELEMENTS, max_tensors=MAX_TENSORS)
    except PayloadError as exc:
        assert "\n" not in str(exc)
        return

    # Assert: a valid result within every bound
    assert len(out) <= MAX_TENSORS
    assert sum(a.size for a in out) <= MAX_ELEMENTS
    for a in out:
        assert a.dtype == np.float32
        assert np.isfinite(a).all()
