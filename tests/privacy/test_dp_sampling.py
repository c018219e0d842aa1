"""sample_cohort draws each scheme the accountant knows."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from flowerpress.privacy.sampling import sample_cohort

IDS = [f"node-{i}" for i in range(20)]


def test_fixed_is_uniform_without_replacement() -> None:
    # Prepare: an injected seeded source (tests only) for a reproducible check.
    source = random.Random(0)

    # Execute
    counts: Counter[str] = Counter()
    for _ in range(2000):
        cohort = sample_cohort(IDS, sampling="fixed", size=5, source=source)
        assert len(set(cohort)) == 5 and set(cohort) <= set(IDS)
        counts.update(cohort)

    # Assert: every id about 2000 * 5/20 = 500 times (sd ~19).
    assert all(abs(c - 500) < 100 for c in counts.values()) and len(counts) == 20


def test_fixed_defaults_to_the_os_csprng() -> None:
    a = sample_cohort(IDS, sampling="fixed", size=10)
    b = sample_cohort(IDS, sampling="fixed", size=10)
    c = sample_cohort(IDS, sampling="fixed", size=10)
    assert len(a) == 10 and not (a == b == c)


def test_poisson_includes_each_with_probability_q() -> None:
    source = random.Random(1)
    sizes = [len(sample_cohort(IDS, sampling="poisson", probability=0.25, source=source))
             for _ in range(2000)]
    assert abs(np.mean(sizes) - 5.0) < 0.2
    assert min(sizes) < 5 < max(sizes)


def test_predictable_is_reproducible_from_the_seed() -> None:
    first = sample_cohort(IDS, sampling="predictable", size=4, rng=np.random.default_rng(7))
    again = sample_cohort(IDS, sampling="predictable", size=4, rng=np.random.default_rng(7))
    assert first == again


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"sampling": "stratified", "size": 2}, "sampling"),
        ({"sampling": "fixed", "size": 21}, "size"),
        ({"sampling": "poisson", "probability": 0.0}, "probability"),
        ({"sampling": "predictable", "size": 2}, "rng"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict[str, object], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        sample_cohort(IDS, **kwargs)  # type: ignore[arg-type]
