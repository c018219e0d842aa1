"""Spec grammar: canonical strings, composition rules, one-line errors naming the stage."""

from __future__ import annotations

import pytest

from flowerpress.compression import VALID_NAMES, Pipeline, parse
from flowerpress.compression import stages as st


@pytest.mark.parametrize(
    ("spec", "canonical"),
    [
        ("none", "none"),
        ("fp16", "fp16"),
        ("q:8", "q:8"),
        ("q:1", "q:1"),
        ("q:16", "q:16"),
        ("sign", "sign"),
        ("sign+ef", "sign+ef"),
        ("topk:0.01+q:8+zstd", "topk:0.01+q:8+zstd:3"),
        ("topk:1e-2+q:4+ef+zstd:19", "topk:0.01+q:4+ef+zstd:19"),
        ("ef+topk:0.01", "topk:0.01+ef"),
        ("lowrank:4+q:8+ef", "lowrank:4+q:8+ef"),
        ("randk:0.1", "randk:0.1"),
        ("randk:0.1,unbiased+q:8", "randk:0.1,unbiased+q:8"),
        (" q : 4 + zstd ", "q:4+zstd:3"),
        ("none+zstd", "zstd:3"),
        ("none+ef", "ef"),
    ],
)
def test_parse_gives_canonical_spec_that_reparses_to_the_same_pipeline(
    spec: str, canonical: str
) -> None:
    # Execute
    pipe = parse(spec)

    # Assert
    assert pipe.spec == canonical
    assert parse(pipe.spec) == pipe


def test_parse_builds_the_stages_named_in_the_spec() -> None:
    # Execute
    pipe = parse("topk:0.05+q:4+ef+zstd:7")

    # Assert
    assert pipe == Pipeline(
        structure=st.TopKStage(fraction=0.05),
        value=st.QuantStage(bits=4),
        error_feedback=True,
        zstd_level=7,
    )
    assert pipe.has_error_feedback
    assert not parse("q:8").has_error_feedback


@pytest.mark.parametrize(
    ("spec", "bad_stage"),
    [
        ("bogus", "bogus"),
        ("q:8+gzip", "gzip"),
        ("q", "q"),
        ("q:0", "q:0"),
        ("q:17", "q:17"),
        ("q:abc", "q:abc"),
        ("q:8,2", "q:8,2"),
        ("topk:0", "topk:0"),
        ("topk:1.5", "topk:1.5"),
        ("topk:nan", "topk:nan"),
        ("randk:0.1,sometimes", "randk:0.1,sometimes"),
        ("lowrank:0", "lowrank:0"),
        ("lowrank:2.5", "lowrank:2.5"),
        ("lowrank:257", "lowrank:257"),
        ("sign:3", "sign:3"),
        ("ef:1", "ef:1"),
        ("zstd:0", "zstd:0"),
        ("zstd:23", "zstd:23"),
        ("zstd+q:8", "q:8"),
        ("topk:0.1+randk:0.1", "randk:0.1"),
        ("q:8+sign", "sign"),
        ("ef+ef", "ef"),
        ("q:8++zstd", ""),
    ],
)
def test_parse_rejects_bad_stage_naming_it_and_listing_valid_names(
    spec: str, bad_stage: str
) -> None:
    # Execute
    with pytest.raises(ValueError) as info:
        parse(spec)

    # Assert
    message = str(info.value)
    assert f"stage {bad_stage!r}" in message
    assert "valid names: " + ", ".join(VALID_NAMES) in message
    assert "\n" not in message


@pytest.mark.parametrize("spec", ["", "   "])
def test_parse_rejects_empty_spec(spec: str) -> None:
    with pytest.raises(ValueError, match="empty spec"):
        parse(spec)
