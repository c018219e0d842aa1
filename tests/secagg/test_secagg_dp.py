"""The distributed discrete Gaussian: the exact sampler and the accounting."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import RdpAccountant

from flowerpress.secagg import encoding
from flowerpress.secagg.accounting import SecAggLedger, ddg_epsilon
from flowerpress.secagg.settings import SecAggSettings


def test_discrete_gaussian_matches_its_pmf() -> None:
    # Prepare: an injected, seeded source (devices use the OS CSPRNG)
    rng = random.Random(0)
    # Execute
    draws = encoding.discrete_gaussian_vector(Fraction(1), 8000, rng)
    # Assert: P[X = k] proportional to exp(-k^2 / 2)
    ks = np.arange(-6, 7)
    pmf = np.exp(-(ks ** 2) / 2.0)
    pmf /= pmf.sum()
    freq = np.array([(draws == k).mean() for k in ks])
    assert np.abs(freq - pmf).max() < 0.015
    assert abs(draws.mean()) < 0.05


def test_discrete_gaussian_variance_for_a_rational_sigma() -> None:
    draws = encoding.discrete_gaussian_vector(Fraction(2500, 7), 5000, random.Random(1))
    assert draws.dtype == np.int64
    assert abs(draws.var() / (2500 / 7) - 1) < 0.08


def test_bernoulli_exp_is_exact_in_expectation() -> None:
    rng = random.Random(2)
    hits = sum(encoding.bernoulli_exp(Fraction(3, 2), rng) for _ in range(20000))
    assert abs(hits / 20000 - math.exp(-1.5)) < 0.01


def test_epsilon_tends_to_the_gaussian_one_when_noise_is_large() -> None:
    # With sigma large the slack tau vanishes: eps = Delta / (sqrt(n) sigma)
    eps = ddg_epsilon(l2=100.0, variance=400.0 ** 2, summands=10, dim=1024)
    assert eps == pytest.approx(100.0 / (math.sqrt(10) * 400.0), rel=1e-9)
    # and the slack only ever adds privacy loss
    assert ddg_epsilon(l2=1.0, variance=0.3, summands=3, dim=64) > 1.0 / math.sqrt(0.9)


def test_ledger_matches_dp_accounting_and_charges_only_released_rounds() -> None:
    # Prepare
    ledger = SecAggLedger(SecAggSettings(noise=1.0, clip=1.0), dim=650, randk=None,
                          delta=1e-5)
    # Execute
    skipped = ledger.end_round(list(range(10)), [], aggregated=0)
    first = ledger.end_round(list(range(10)), [], aggregated=10)
    second = ledger.end_round(list(range(10)), [], aggregated=7)
    # Assert: a skipped round releases nothing; fewer survivors cost more
    assert skipped == 0.0
    assert ledger.rhos[1] > ledger.rhos[0]
    accountant = RdpAccountant()
    accountant.compose(dp_accounting.ZCDpEvent(sum(ledger.rhos)))
    assert second == pytest.approx(accountant.get_epsilon(1e-5))
    # zCDP rho is the Gaussian mechanism's with noise multiplier 1 / sqrt(2 rho)
    gaussian = RdpAccountant()
    gaussian.compose(dp_accounting.GaussianDpEvent(1 / math.sqrt(2 * ledger.rhos[0])))
    assert first == pytest.approx(gaussian.get_epsilon(1e-5), rel=1e-6)
    assert ledger.privacy_block()["epsilon"] == pytest.approx(second)


def test_noise_shares_add_up_to_the_target() -> None:
    plan = encoding.make_plan(dim=650, bits=16, clip=1.0, noise=1.0, cohort=10,
                              min_summands=7, seed=0)
    c_scaled = plan.clip / plan.gamma
    # every device adds 1/7 of the variance: 7 survivors carry at least the target
    assert 7 * float(plan.local_variance) >= (1.0 * c_scaled) ** 2
    assert plan.norm_bound >= c_scaled
