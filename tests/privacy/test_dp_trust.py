"""DP's trust model, enforced where it can be (issue 20, item 7).

- ``honest=h``: the noise is sized so that ``H = ceil(h c)`` devices carry all of it,
  and the accountant counts only the shares it can be sure of, so the epsilon it
  reports is never below the truth when up to ``c - H`` devices add no noise.
- The server's bound on every DP update, ``C + sigma (sqrt(d) + 20)``, binds on no
  honest noised update.
- Every privacy block names its neighbouring relation.
"""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

from flowerpress.privacy import (
    ServerPrivacy,
    add_gaussian_noise,
    clip_inplace,
    dp_mod,
    epsilon_after,
    parse_dp,
)
from flowerpress.privacy.accounting import RdpGaussianAccountant
from flowerpress.privacy.mechanisms import dp_update_bound
from flowerpress.privacy.mod import device_noise_multiplier
from flowerpress.privacy.registry import GaussianRelease

SIM_NODE = {"partition-id": 3, "num-partitions": 10, "dp-allow-seeded": True}


def _ledger(spec: str, *, n: int = 50, m: int = 10, sampling: str = "fixed",
            weighted_sum: bool = True) -> ServerPrivacy:
    settings = parse_dp(spec)
    assert settings is not None
    return ServerPrivacy(settings, num_clients=n, clients_per_round=m, delta=1e-5,
                         max_epsilon=None, sampling=sampling,  # type: ignore[arg-type]
                         weighted_sum=weighted_sum)


# --- the spec ------------------------------------------------------------------------------

def test_honest_round_trips_through_the_spec() -> None:
    settings = parse_dp("distributed:clip=1.0,noise=1.0,honest=0.8")
    assert settings is not None and settings.honest == 0.8
    assert parse_dp(settings.to_spec()) == settings
    default = parse_dp("distributed:clip=1.0,noise=1.0")
    assert default is not None and default.honest == 1.0 and "honest" not in default.to_spec()


@pytest.mark.parametrize(("spec", "words"), [
    ("distributed:clip=1,noise=1,honest=0", "honest must be in (0, 1]"),
    ("distributed:clip=1,noise=1,honest=1.5", "honest must be in (0, 1]"),
    ("distributed:clip=1,noise=1,honest=nan", "honest must be in (0, 1]"),
    ("local:clip=1,noise=1,honest=0.5", "noises every update in full"),
])
def test_a_bad_honest_fraction_is_refused_naming_the_key(spec: str, words: str) -> None:
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace("]", r"\]")):
        parse_dp(spec)


@pytest.mark.parametrize(("honest", "cohort", "expected"), [
    (1.0, 10, 10), (0.8, 10, 8), (0.7, 10, 7), (0.5, 9, 5), (0.1, 3, 1), (0.3, 10, 3),
])
def test_the_noise_cohort_is_the_exact_ceiling(honest: float, cohort: int, expected: int) -> None:
    settings = parse_dp(f"distributed:clip=1,noise=1,honest={honest}")
    assert settings is not None and settings.noise_cohort(cohort) == expected


# --- the device ------------------------------------------------------------------------------

def _message(config: dict[str, int | float | str | bool], weights: list[np.ndarray]) -> Message:
    metadata = Metadata(run_id=1, message_id="msg-1", src_node_id=0, dst_node_id=11,
                        reply_to_message_id="", group_id="1", created_at=time.time(),
                        ttl=3600.0, message_type="train")
    return Message(content=RecordDict({"arrays": ArrayRecord(weights),
                                       "config": ConfigRecord(config)}), metadata=metadata)


def test_a_device_sizes_its_share_for_the_honest_part_of_the_cohort() -> None:
    # Prepare: a zero update, so the reply is pure noise; 10 devices, honest=0.5 -> 5
    received = [np.zeros(40_000, np.float32)]
    config: dict[str, int | float | str | bool] = {
        "dp": "distributed:clip=2.0,noise=1.5,rng=seeded,honest=0.5", "dp-clip": 2.0,
        "server-round": 1, "seed": 5, "clients-per-round": 10}
    context = Context(run_id=1, node_id=11, node_config=SIM_NODE, state=RecordDict(),
                      run_config={})

    def train(msg: Message, context: Context) -> Message:
        del context
        return Message(RecordDict({"arrays": msg.content["arrays"]}), reply_to=msg)

    # Execute
    reply = dp_mod(_message(config, received), context, train)
    # Assert: std z C / sqrt(5), not z C / sqrt(10)
    noise = reply.content["arrays"].to_numpy_ndarrays()[0].astype(np.float64)
    expected = 1.5 * 2.0 / math.sqrt(5)
    assert abs(noise.std() / expected - 1) < 5 / math.sqrt(2 * noise.size)


# --- the accountant: reported epsilon never below the truth ---------------------------------

def _charged_multiplier(ledger: ServerPrivacy, *, cohort: int, aggregated: int) -> float:
    ledger.end_round(list(range(cohort)), [], aggregated=aggregated, cohort_size=cohort)
    return ledger._history[-1].noise_multiplier * 2.0  # replace-one: in units of C


@pytest.mark.parametrize("honest", [1.0, 0.8, 0.5, 0.3])
@pytest.mark.parametrize("aggregated", [1, 3, 6, 8])
def test_the_charged_noise_is_at_most_what_any_placement_of_liars_leaves(
        honest: float, aggregated: int) -> None:
    # Prepare: a cohort of 8; every set of up to c - H liars, every aggregated set
    # holding the charged honest client 0
    cohort = 8
    ledger = _ledger(f"distributed:clip=1.0,noise=2.0,honest={honest}", m=cohort)
    share = device_noise_multiplier(ledger.settings, cohort_size=cohort)
    liars_max = cohort - ledger.settings.noise_cohort(cohort)
    worst = math.inf
    for liars in range(liars_max + 1):
        for liar_set in itertools.combinations(range(1, cohort), liars):
            for others in itertools.combinations(range(1, cohort), aggregated - 1):
                shares = 1 + sum(1 for o in others if o not in liar_set)
                worst = min(worst, share * math.sqrt(shares))
    # Execute
    charged = _charged_multiplier(ledger, cohort=cohort, aggregated=aggregated)
    # Assert: the accountant never assumes more noise than the worst placement leaves
    assert charged <= worst * (1 + 1e-12)
    assert charged == pytest.approx(worst)


def test_half_the_devices_lying_the_default_under_reports_and_honest_half_does_not() -> None:
    # Prepare: 10 of 50 per round, z = 1, 20 rounds; 5 of the 10 add no noise
    rounds, z = 20, 1.0
    truth_default = epsilon_after(noise_multiplier=z / math.sqrt(2), rounds=rounds, delta=1e-5,
                                  num_clients=50, clients_per_round=10)
    # Execute
    reported = {}
    for honest in (1.0, 0.5):
        ledger = _ledger(f"distributed:clip=1.0,noise={z},honest={honest}")
        for _ in range(rounds):
            ledger.end_round(list(range(10)), [], cohort_size=10)
        reported[honest] = ledger.epsilon
    # With honest=0.5 each device adds z/sqrt(5): 5 honest shares carry z exactly
    truth_half = epsilon_after(noise_multiplier=z, rounds=rounds, delta=1e-5, num_clients=50,
                               clients_per_round=10)
    # Assert
    assert reported[1.0] < truth_default  # the defect: the default trusts every device
    assert reported[0.5] >= truth_half * (1 - 1e-9)
    assert reported[0.5] == pytest.approx(reported[1.0])  # same z, same accounted noise


def test_the_top_up_restores_the_accounted_noise_with_liars() -> None:
    # Prepare: cohort 10, honest 0.5 -> 5 shares of z C / sqrt(5); 7 replies, 5 may lie
    ledger = _ledger("distributed:clip=1.0,noise=2.0,honest=0.5")
    share_std = device_noise_multiplier(ledger.settings, cohort_size=10) * ledger.clip
    # Execute
    top_up = ledger.topup_std(7, cohort_size=10)
    # Assert: the 2 shares sure to be there plus the top-up give z C
    assert math.sqrt(2 * share_std**2 + top_up**2) == pytest.approx(2.0 * ledger.clip)
    charged = ledger._release(cohort=10, aggregated=7, population=50, topped_up=True)
    assert charged.noise_multiplier * 2.0 == pytest.approx(2.0)


def test_a_per_update_ledger_charges_the_larger_honest_share() -> None:
    ledger = _ledger("distributed:clip=1.0,noise=2.0,honest=0.5", weighted_sum=False)
    ledger.end_round(list(range(10)), [], cohort_size=10)
    ((multiplier, count),) = ledger._clients[0].items()
    assert count == 1 and multiplier == pytest.approx(2.0 / math.sqrt(5) / 2.0)


# --- the server's bound on DP updates -------------------------------------------------------

@pytest.mark.parametrize(("spec", "cohort", "d"), [
    ("distributed:clip=1.0,noise=1.0", 10, 650),
    ("distributed:clip=0.5,noise=0.3,honest=0.6", 100, 20),
    ("local:clip=2.0,noise=0.8", 1, 5000),
])
def test_no_honest_noised_update_reaches_the_server_bound(spec: str, cohort: int, d: int) -> None:
    # Prepare
    ledger = _ledger(spec, n=max(cohort, 50), m=cohort)
    ledger.train_config(1, cohort_size=cohort)
    bound = ledger.update_bound(d)
    std = device_noise_multiplier(ledger.settings, cohort_size=cohort) * ledger.clip
    rng = np.random.default_rng(0)
    # Execute: 300 honest updates, each clipped to C (some far above it) then noised
    norms = []
    for _ in range(300):
        raw = [rng.normal(0, 10.0 * ledger.clip / math.sqrt(d), d)]
        clip_inplace(raw, clip=ledger.clip)
        noised = add_gaussian_noise(raw, std=std, rng=rng)[0].astype(np.float32)
        norms.append(float(np.linalg.norm(noised.astype(np.float64))))
    # Assert: below the bound, and the bound is within a small factor of the typical norm
    assert bound == pytest.approx(dp_update_bound(clip=ledger.clip, noise_std=std, elements=d))
    assert max(norms) < bound
    assert bound < 1.05 * ledger.clip + std * (math.sqrt(d) + 20.0)


def test_the_bound_follows_the_adaptive_clip_and_the_cohort_sent() -> None:
    ledger = _ledger("distributed:clip=1.0,noise=1.0,quantile=0.5")
    ledger.train_config(1, cohort_size=10)
    first = ledger.update_bound(100)
    ledger.end_round(list(range(10)), [{"dp-clip-indicator": 1.0}] * 10, cohort_size=10)
    ledger.train_config(2, cohort_size=4)
    second = ledger.update_bound(100)
    z_u = ledger.update_noise_multiplier
    assert first == pytest.approx(1.0 + z_u / math.sqrt(10) * 30.0)
    assert second == pytest.approx(ledger.clip * (1 + z_u / 2.0 * 30.0))
    assert ledger.clip < 1.0


# --- the neighbouring relation is named in every privacy block --------------------------------

@pytest.mark.parametrize(("sampling", "relation"), [
    ("fixed", "replace-one"), ("predictable", "replace-one"), ("poisson", "zero-out")])
def test_the_privacy_block_names_the_relation_the_accountant_uses(
        sampling: str, relation: str) -> None:
    # Prepare
    ledger = _ledger("distributed:clip=1.0,noise=1.0,honest=0.8", sampling=sampling)
    ledger.train_config(1, cohort_size=10)
    ledger.end_round(list(range(10)), [], cohort_size=10)
    # Execute
    block = ledger.privacy_block()
    # Assert: the name matches the relation of every release composed
    assert block["relation"] == relation and block["neighboring_relation"].startswith(relation)
    assert block["honest_fraction"] == 0.8 and "ceil(0.8 x cohort)" in block["trust"]
    assert "C + sigma (sqrt(d) + 20)" in block["server_update_bound"]
    released = (ledger._history if not ledger.per_client else
                [GaussianRelease(m, ledger.relation) for m in ledger._clients[0]])
    assert all(r.relation == relation for r in released)


def test_the_secure_aggregation_block_names_zero_out() -> None:
    from flowerpress.secagg.accounting import SecAggLedger
    from flowerpress.secagg.settings import parse_secagg

    settings = parse_secagg("on:threshold=0.7,clip=1.0,noise=1.0")
    assert settings is not None
    ledger = SecAggLedger(settings, dim=64, randk=None, delta=1e-5)
    ledger.end_round(list(range(10)), [], aggregated=10)
    block = ledger.privacy_block()
    assert block["relation"] == "zero-out" and "zero-out" in block["neighboring_relation"]


def test_zero_out_and_replace_one_differ_on_the_same_release() -> None:
    # Why the name matters: the same Gaussian of std z C, read under each relation.
    zero_out, replace_one = RdpGaussianAccountant(), RdpGaussianAccountant()
    zero_out.compose(GaussianRelease(1.0, "zero-out"), 10)
    replace_one.compose(GaussianRelease(0.5, "replace-one"), 10)
    assert replace_one.get_epsilon(1e-5) > 1.8 * zero_out.get_epsilon(1e-5)
