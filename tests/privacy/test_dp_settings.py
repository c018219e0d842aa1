"""parse_dp and DpSettings: grammar, validation, canonical round trip."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowerpress.privacy import DpSettings, parse_dp


def test_off_is_none() -> None:
    assert parse_dp("off") is None
    assert parse_dp("  OFF ") is None


def test_distributed_minimal() -> None:
    # Execute
    s = parse_dp("distributed:clip=1.0,noise=1.0")

    # Assert
    assert s == DpSettings(mode="distributed", clip=1.0, noise=1.0)
    assert s is not None and s.rng == "secure" and not s.adaptive


def test_local_with_all_options() -> None:
    s = parse_dp("local:clip=0.5,noise=4.0,quantile=0.5,clip-lr=0.1,count-noise=3,rng=seeded")

    assert s == DpSettings(
        mode="local", clip=0.5, noise=4.0, quantile=0.5, clip_lr=0.1, count_noise=3.0,
        rng="seeded",
    )
    assert s is not None and s.adaptive


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ("central:clip=1,noise=1", "mode"),
        ("distributed", "clip=<C>"),
        ("distributed:noise=1", "clip"),
        ("distributed:clip=1", "noise"),
        ("distributed:clip=-1,noise=1", "clip"),
        ("distributed:clip=1,noise=0", "noise"),
        ("distributed:clip=nan,noise=1", "clip"),
        ("distributed:clip=1,noise=inf", "noise"),
        ("distributed:clip=abc,noise=1", "clip"),
        ("distributed:clip=1,noise=1,sigma=2", "sigma"),
        ("distributed:clip=1,noise=1,clip=2", "clip"),
        ("distributed:clip=1,noise=1,quantile=1.5", "quantile"),
        ("distributed:clip=1,noise=1,quantile=0.5,clip-lr=0", "clip-lr"),
        ("distributed:clip=1,noise=1,count-noise=2", "count-noise"),
        ("distributed:clip=1,noise=2,quantile=0.5,count-noise=1", "count-noise"),
        ("distributed:clip=1,noise=1,rng=fast", "rng"),
        ("distributed:clip", "clip"),
    ],
)
def test_bad_spec_names_the_key(spec: str, named: str) -> None:
    with pytest.raises(ValueError, match=named) as info:
        parse_dp(spec)
    assert "\n" not in str(info.value)


def test_settings_validated_at_construction() -> None:
    with pytest.raises(ValueError, match="noise"):
        DpSettings(mode="local", clip=1.0, noise=-1.0)
    with pytest.raises(ValueError, match="mode"):
        DpSettings(mode="central", clip=1.0, noise=1.0)  # type: ignore[arg-type]


@settings(max_examples=50, deadline=None, derandomize=True)
@given(
    mode=st.sampled_from(["distributed", "local"]),
    clip=st.floats(min_value=1e-6, max_value=1e6),
    noise=st.floats(min_value=1e-3, max_value=1e3),
    quantile=st.one_of(st.none(), st.floats(min_value=0.01, max_value=0.99)),
    rng=st.sampled_from(["secure", "seeded"]),
)
def test_spec_round_trip(
    mode: str, clip: float, noise: float, quantile: float | None, rng: str
) -> None:
    spec = DpSettings(
        mode=mode,  # type: ignore[arg-type]
        clip=clip,
        noise=noise,
        quantile=quantile,
        count_noise=None if quantile is None else noise,
        rng=rng,  # type: ignore[arg-type]
    )
    assert parse_dp(spec.to_spec()) == spec
