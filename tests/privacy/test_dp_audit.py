"""The privacy audit: each numbered failure of the old ledger, pinned against dp_accounting.

Every test here fails on the ledger before the audit (a missing keyword, or a smaller
epsilon than the mechanism that was released).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from typing import Any

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from hypothesis import given, settings
from hypothesis import strategies as st

from flowerpress.privacy import DevicePolicy, ServerPrivacy, parse_dp, secure_generator

REPLACE_ONE = dp_accounting.NeighboringRelation.REPLACE_ONE
ZERO_OUT = dp_accounting.NeighboringRelation.REPLACE_SPECIAL
DELTA = 1e-5


def _server(spec: str, n: int = 50, m: int = 10, **kwargs: Any) -> ServerPrivacy:
    dp = parse_dp(spec)
    assert dp is not None
    kwargs.setdefault("max_epsilon", None)
    return ServerPrivacy(dp, num_clients=n, clients_per_round=m, delta=DELTA, **kwargs)


def _gaussian_epsilon(multipliers: list[float]) -> float:
    """Reference: plain Gaussian composition under replace-one (multipliers already z/2)."""
    accountant = RdpAccountant(neighboring_relation=REPLACE_ONE)
    for z in multipliers:
        accountant.compose(dp_accounting.GaussianDpEvent(z))
    return float(accountant.get_epsilon(DELTA))


# -- 1. sampling schemes -----------------------------------------------------------------


def test_poisson_sampling_is_accounted_with_pld_and_rdp() -> None:
    # Prepare: q = 10/50, 5 rounds, every reply aggregated.
    server = _server("distributed:clip=1.0,noise=1.0", sampling="poisson")
    pld = PLDAccountant(neighboring_relation=ZERO_OUT)
    rdp = RdpAccountant(neighboring_relation=ZERO_OUT)
    event = dp_accounting.PoissonSampledDpEvent(0.2, dp_accounting.GaussianDpEvent(1.0))
    pld.compose(event, 5)
    rdp.compose(event, 5)

    # Execute: Poisson cohorts have varying sizes; devices size their noise to them.
    for size in (9, 12, 10, 7, 11):
        config = server.train_config(1, cohort_size=size)
        assert config["clients-per-round"] == size
        eps = server.end_round(list(range(size)), [])

    # Assert: PLD decides epsilon; RDP is reported alongside; both as dp_accounting.
    block = server.privacy_block()
    assert eps == pytest.approx(pld.get_epsilon(DELTA), rel=1e-9)
    assert block["epsilon_by_accountant"]["rdp"] == pytest.approx(rdp.get_epsilon(DELTA), rel=1e-9)
    assert block["sampling"] == "poisson"
    assert "zero-out" in block["neighboring_relation"]


def test_predictable_sampling_has_no_amplification() -> None:
    # Prepare: client "a" joins 3 of 4 rounds, the others fewer.
    server = _server("distributed:clip=1.0,noise=2.0", n=50, m=3, sampling="predictable")
    cohorts = [["a", "b", 1], ["a", 2, 3], ["c", 2, 4], ["a", "b", 5]]

    # Execute
    for cohort in cohorts:
        eps = server.end_round(cohort, [])

    # Assert: the worst client's 3 plain Gaussians (aggregate std z*C, sensitivity 2C).
    assert eps == pytest.approx(_gaussian_epsilon([1.0] * 3), rel=1e-12)
    amplified = _server("distributed:clip=1.0,noise=2.0", n=50, m=3)
    for cohort in cohorts:
        amplified.end_round(cohort, [])
    assert eps > amplified.epsilon
    assert server.privacy_block()["sampling"] == "predictable"
    assert server.participation()["a"] == 3


def test_sampling_scheme_is_validated() -> None:
    with pytest.raises(ValueError, match="sampling"):
        _server("distributed:clip=1.0,noise=1.0", sampling="stratified")


def test_fixed_sampling_cannot_use_pld() -> None:
    with pytest.raises(ValueError, match="pld"):
        _server("distributed:clip=1.0,noise=1.0", accountant="pld")


# -- 2. strategies that are not a weighted sum -------------------------------------------


def test_non_weighted_sum_charges_each_update() -> None:
    # Prepare: median/Krum see each update with z/sqrt(m) noise.
    server = _server("distributed:clip=1.0,noise=2.0", m=4, weighted_sum=False)

    # Execute: client 0 in both rounds.
    server.end_round([0, 1, 2, 3], [])
    eps = server.end_round([0, 4, 5, 6], [])

    # Assert: two Gaussians with multiplier (z/sqrt(m))/2 = 0.5; no amplification.
    assert eps == pytest.approx(_gaussian_epsilon([0.5, 0.5]), rel=1e-12)
    assert "not a weighted sum" in server.privacy_block()["accounting_unit"]


def test_non_weighted_sum_local_mode_charges_z() -> None:
    server = _server("local:clip=1.0,noise=2.0", m=4, weighted_sum=False)
    eps = server.end_round([0, 1, 2, 3], [])
    assert eps == pytest.approx(_gaussian_epsilon([1.0]), rel=1e-12)


# -- 3. the budget against every allowed dropout -----------------------------------------


def test_budget_check_assumes_only_min_replies_arrive() -> None:
    # Prepare: a budget that one full round fits but a round with 2 of 10 replies does not.
    full = _server("distributed:clip=1.0,noise=1.0")
    e_full = full.end_round(list(range(10)), [])
    short = _server("distributed:clip=1.0,noise=1.0")
    e_short = short.end_round(list(range(10)), [], aggregated=2)
    budget = (e_full + e_short) / 2

    # Execute
    strict = _server("distributed:clip=1.0,noise=1.0", max_epsilon=budget, min_replies=2)
    lenient = _server("distributed:clip=1.0,noise=1.0", max_epsilon=budget, min_replies=10)

    # Assert: with min-replies 2 the round could spend e_short > budget: refused.
    ok, reason = strict.can_run_round()
    assert not ok and "2 valid replies" in reason
    assert lenient.can_run_round()[0]
    assert strict.can_run_round(topped_up=True)[0]


def test_min_replies_is_validated() -> None:
    with pytest.raises(ValueError, match="min_replies"):
        _server("distributed:clip=1.0,noise=1.0", min_replies=11)


# -- 4. noise sized to the real cohort ----------------------------------------------------


def test_small_cohort_gets_its_own_noise_and_no_amplification() -> None:
    # Prepare: 10 per round planned, but only 4 nodes are connected this round.
    server = _server("distributed:clip=1.0,noise=1.0")

    # Execute
    config = server.train_config(1, cohort_size=4)
    eps = server.end_round([0, 1, 2, 3], [], population=4)

    # Assert: devices divide by sqrt(4), the sum carries z*C, and sampling 4 of 4
    # amplifies nothing: a plain Gaussian z/2.
    assert config["clients-per-round"] == 4
    assert eps == pytest.approx(_gaussian_epsilon([0.5]), rel=1e-12)


# -- 5. delta below 1/population -------------------------------------------------------------


def test_delta_must_be_below_one_over_population() -> None:
    dp = parse_dp("distributed:clip=1.0,noise=1.0")
    assert dp is not None
    with pytest.raises(ValueError, match=r"delta.*1/num_clients = 0\.02"):
        ServerPrivacy(dp, num_clients=50, clients_per_round=10, delta=0.05, max_epsilon=None)


# -- 6. epsilon across restarts ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "kwargs"),
    [
        ("distributed:clip=1.0,noise=1.0,quantile=0.5", {}),
        ("distributed:clip=1.0,noise=1.0", {"sampling": "predictable"}),
        ("local:clip=1.0,noise=3.0", {"sampling": "poisson"}),
        ("distributed:clip=1.0,noise=1.5", {"weighted_sum": False}),
    ],
)
def test_resumed_run_continues_the_epsilon(spec: str, kwargs: dict[str, Any]) -> None:
    # Prepare: string and int ids, a dropout, an adaptive clip.
    cohorts: list[list[int | str]] = [["x", 1, 2], ["x", "y", 3], [1, "y", 4]]
    live = _server(spec, m=3, **kwargs)
    for i, cohort in enumerate(cohorts[:2]):
        live.end_round(cohort, [{"dp-clip-indicator": 0.2}] * 3, aggregated=3 - i)
    state = json.loads(json.dumps(live.state_dict(), allow_nan=False))

    # Execute: a new process with a (new) budget.
    resumed = _server(spec, m=3, max_epsilon=live.epsilon * 1.01, **kwargs)
    resumed.load_state_dict(state)

    # Assert: same ledger, same next round, and the budget counts the first run.
    assert resumed.epsilon == live.epsilon and resumed.clip == live.clip
    assert resumed.participation() == live.participation()
    assert set(resumed.participation()) == {"x", 1, 2, "y", 3}
    assert resumed.end_round(cohorts[2], []) == live.end_round(cohorts[2], [])
    assert not resumed.can_run_round()[0]


def test_state_of_another_sampling_is_refused() -> None:
    state = _server("distributed:clip=1.0,noise=1.0").state_dict()
    with pytest.raises(ValueError, match="sampling"):
        _server("distributed:clip=1.0,noise=1.0", sampling="predictable").load_state_dict(state)


# -- 7. device policy on the noise the device itself adds -------------------------------------


def test_device_floor_applies_to_its_own_share() -> None:
    # Prepare
    policy = DevicePolicy.from_node_config({"dp-min-noise": 1.0})
    dp = parse_dp("distributed:clip=1.0,noise=1.0")
    local = parse_dp("local:clip=1.0,noise=1.0")

    # Execute / Assert: z=1 split over 4 devices leaves each update 0.5 < 1.0.
    reason = policy.refusal(dp, 1.0, cohort_size=4)
    assert reason is not None and "0.5" in reason and "dp-min-noise" in reason
    assert policy.refusal(dp, 1.0, cohort_size=1) is None
    assert policy.refusal(local, 1.0) is None


def test_device_can_require_a_mode() -> None:
    policy = DevicePolicy.from_node_config({"dp-modes": "local"})
    reason = policy.refusal(parse_dp("distributed:clip=1.0,noise=9.0"), 1.0, cohort_size=1)
    assert reason is not None and "dp-modes" in reason
    assert policy.refusal(parse_dp("local:clip=1.0,noise=1.0"), 1.0) is None


# -- 8. seeded noise is not private -------------------------------------------------------------


def test_seeded_noise_reports_infinite_epsilon_as_valid_json() -> None:
    server = _server("distributed:clip=1.0,noise=1.0,rng=seeded")

    eps = server.end_round(list(range(10)), [])

    block = server.privacy_block()
    assert math.isinf(eps) and server.epsilon_json is None
    assert block["epsilon"] is None and "not differentially private" in block["epsilon_reason"]
    assert block["nominal_epsilon"] > 0
    json.dumps(block, allow_nan=False)


def test_simulation_nodes_do_not_accept_seeded_noise_by_default() -> None:
    policy = DevicePolicy.from_node_config({"partition-id": 1, "num-partitions": 4})
    reason = policy.refusal(parse_dp("local:clip=1.0,noise=1.0,rng=seeded"), 1.0)
    assert reason is not None and "dp-allow-seeded" in reason


# -- 9. the sampler -----------------------------------------------------------------------------


def test_secure_generator_is_philox_keyed_per_call() -> None:
    a, b = secure_generator(), secure_generator()
    assert isinstance(a.bit_generator, np.random.Philox)
    assert not np.array_equal(a.standard_normal(4), b.standard_normal(4))


# -- the property: never below the mechanism actually released ------------------------------------


@st.composite
def _runs(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(min_value=4, max_value=60))
    m = draw(st.integers(min_value=1, max_value=min(n, 8)))
    rounds = []
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        population = draw(st.integers(min_value=1, max_value=n))  # nodes connected
        cohort = draw(st.integers(min_value=1, max_value=min(population, n)))
        ids = draw(st.lists(st.integers(0, n - 1), min_size=cohort, max_size=cohort,
                            unique=True))
        aggregated = draw(st.integers(min_value=0, max_value=cohort))
        rounds.append((population, ids, aggregated))
    return {
        "n": n,
        "m": m,
        "z": draw(st.floats(min_value=0.5, max_value=4.0)),
        "mode": draw(st.sampled_from(["distributed", "local"])),
        "sampling": draw(st.sampled_from(["fixed", "poisson", "predictable"])),
        "weighted_sum": draw(st.booleans()),
        "rounds": rounds,
    }


def _reference(run: dict[str, Any], device_std: list[float]) -> float:
    """dp_accounting on what was released, built from the noise the devices added."""
    n, sampling = run["n"], run["sampling"]
    q = run["m"] / n
    per_client = run["mode"] == "local" or not run["weighted_sum"] or sampling == "predictable"
    unit = 1.0 if sampling == "poisson" else 2.0  # sensitivity of the sum in units of C
    if per_client:
        charges: dict[int, list[float]] = {}
        for (_, ids, k), std in zip(run["rounds"], device_std, strict=True):
            alone = run["mode"] == "local" or not run["weighted_sum"]
            if not alone and k == 0:
                continue
            z = std if alone else std * math.sqrt(k)
            for client in ids:
                charges.setdefault(client, []).append(z / unit)
        worst = 0.0
        for zs in charges.values():
            # The accountant of the scheme: PLD (tight) for Poisson, RDP otherwise.
            accountant: PLDAccountant | RdpAccountant = (
                PLDAccountant(neighboring_relation=ZERO_OUT) if sampling == "poisson"
                else RdpAccountant(neighboring_relation=REPLACE_ONE))
            for z in zs:
                accountant.compose(dp_accounting.GaussianDpEvent(z))
            worst = max(worst, float(accountant.get_epsilon(DELTA)))
        return worst
    events = []
    for (population, ids, k), std in zip(run["rounds"], device_std, strict=True):
        if k == 0:
            continue
        gaussian = dp_accounting.GaussianDpEvent(std * math.sqrt(k) / unit)
        if sampling == "poisson":
            events.append(gaussian if q == 1 else dp_accounting.PoissonSampledDpEvent(q, gaussian))
        elif len(ids) == population:
            events.append(gaussian)
        else:
            events.append(dp_accounting.SampledWithoutReplacementDpEvent(
                population, len(ids), gaussian))
    if not events:
        return 0.0
    if sampling == "poisson":
        pld = PLDAccountant(neighboring_relation=ZERO_OUT)
        pld.compose(dp_accounting.ComposedDpEvent(events))
        return float(pld.get_epsilon(DELTA))
    rdp = RdpAccountant(neighboring_relation=REPLACE_ONE)
    rdp.compose(dp_accounting.ComposedDpEvent(events))
    return float(rdp.get_epsilon(DELTA))


@settings(max_examples=12, deadline=None, derandomize=True)
@given(run=_runs())
def test_reported_epsilon_never_below_the_released_mechanism(run: dict[str, Any]) -> None:
    # Prepare
    server = _server(f"{run['mode']}:clip=1.0,noise={run['z']!r}", n=run["n"], m=run["m"],
                     sampling=run["sampling"], weighted_sum=run["weighted_sum"])
    device_std = []

    # Execute: the devices size their noise from what train_config sends them.
    eps = 0.0
    for population, ids, k in run["rounds"]:
        config = server.train_config(1, cohort_size=len(ids))
        share = 1 if run["mode"] == "local" else int(config["clients-per-round"])
        device_std.append(run["z"] / math.sqrt(share))
        eps = server.end_round(ids, [], aggregated=k, population=population)

    # Assert (float rounding aside)
    assert eps >= _reference(run, device_std) * (1 - 1e-9)
    assert Counter(server.participation()) == Counter(
        c for _, ids, _ in run["rounds"] for c in ids)


def test_pld_reads_replace_one_multipliers_like_rdp() -> None:
    # dp_accounting's PLD shifts by 2*sensitivity under REPLACE_ONE; our multipliers are
    # against the whole difference, so a replace-one release must cost what the same
    # Gaussian costs under zero-out (one shift of the same size), and no more than RDP.
    from flowerpress.privacy import GaussianRelease, make_accountant

    replace_one, zero_out, rdp = (make_accountant(n) for n in ("pld", "pld", "rdp"))
    replace_one.compose(GaussianRelease(1.0, "replace-one"), 20)
    zero_out.compose(GaussianRelease(1.0, "zero-out"), 20)
    rdp.compose(GaussianRelease(1.0, "replace-one"), 20)

    assert replace_one.get_epsilon(DELTA) == pytest.approx(zero_out.get_epsilon(DELTA), rel=1e-6)
    assert 0.9 * rdp.get_epsilon(DELTA) < replace_one.get_epsilon(DELTA) <= rdp.get_epsilon(DELTA)


def test_pld_composed_round_by_round_matches_pldaccountant_and_self_compose() -> None:
    # The ledger extends each release's last composition by one round (as PLDAccountant
    # composes one event per round) instead of rebuilding self_compose(count) every round.
    from flowerpress.privacy import accounting

    rounds = 6
    server = _server("distributed:clip=1.0,noise=2.0", m=50, accountant="pld")
    reference = PLDAccountant(neighboring_relation=REPLACE_ONE)
    # Replace-one: the release's multiplier is 1.0 against the whole difference 2C, which
    # is PLDAccountant's GaussianDpEvent(2.0) (its replace-one shifts by twice its sensitivity).
    event = dp_accounting.GaussianDpEvent(2.0)
    for _ in range(rounds):
        eps = server.end_round(list(range(50)), [])
        reference.compose(event)
    assert eps == pytest.approx(reference.get_epsilon(DELTA), rel=1e-9)

    # The same ledger rebuilt from scratch (a resumed run) takes self_compose's path.
    state = server.state_dict()
    accounting._composed.clear()
    accounting._epsilons.clear()
    resumed = _server("distributed:clip=1.0,noise=2.0", m=50, accountant="pld")
    resumed.load_state_dict(state)
    assert resumed.epsilon == pytest.approx(eps, rel=1e-9)


def test_predictable_charges_only_the_aggregated_clients() -> None:
    server = _server("distributed:clip=1.0,noise=2.0", m=3, sampling="predictable")

    server.end_round(["a", "b", "c"], [], aggregated=2, aggregated_ids=["a", "b"])
    eps = server.end_round(["a", "d", "e"], [], aggregated=3)

    # "a": two aggregates, std 2*sqrt(2/3) then 2 (sensitivity 2): multipliers below.
    assert eps == pytest.approx(_gaussian_epsilon([math.sqrt(2 / 3), 1.0]), rel=1e-12)
    with pytest.raises(ValueError, match="aggregated_ids"):
        server.end_round(["x", "y"], [], aggregated=1, aggregated_ids=["z"])


def test_a_refused_end_round_changes_nothing() -> None:
    server = _server("distributed:clip=1.0,noise=1.0,quantile=0.5", m=3, sampling="predictable")
    before = server.state_dict()

    with pytest.raises(ValueError, match="aggregated_ids"):
        server.end_round([1, 2, 3], [{"dp-clip-indicator": 0.0}], aggregated=2,
                         aggregated_ids=[1, 1])
    with pytest.raises(ValueError, match="dp-clip-indicator"):
        server.end_round([1, 2, 3], [{"dp-clip-indicator": float("nan")}])

    assert server.state_dict() == before


def test_poisson_needs_the_drawn_cohort_size() -> None:
    # 20 devices, min-replies 10: each PLD takes seconds (n=50, min-replies 2: a minute)
    server = _server("distributed:clip=1.0,noise=1.0", n=20, sampling="poisson",
                     min_replies=10, max_epsilon=1e6)

    with pytest.raises(ValueError, match="cohort_size"):
        server.train_config(1)
    # Without the drawn size the budget check assumes the largest cohort: everyone.
    assert server.peek_epsilon() == server.peek_epsilon(cohort_size=20)
    assert server.peek_epsilon() > server.peek_epsilon(cohort_size=10)
