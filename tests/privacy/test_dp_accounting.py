"""ServerPrivacy and calibration against Google's dp_accounting."""

from __future__ import annotations

import json
import math
from typing import Any

import dp_accounting
import pytest
from dp_accounting.rdp import RdpAccountant
from hypothesis import given, settings
from hypothesis import strategies as st

from flowerpress.privacy import (
    DpSettings,
    ServerPrivacy,
    epsilon_after,
    noise_multiplier_for,
    parse_dp,
)
from flowerpress.privacy.accounting import CALIBRATION_ORDERS


def _direct_wor_epsilon(z: float, n: int, m: int, rounds: int, delta: float) -> float:
    """The reference: replace-one RDP, sampled w/o replacement, sensitivity 2C -> z/2."""
    accountant = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    gaussian = dp_accounting.GaussianDpEvent(z / 2)
    event = dp_accounting.SampledWithoutReplacementDpEvent(n, m, gaussian)
    accountant.compose(event, rounds)
    return float(accountant.get_epsilon(delta))


def _server(
    spec: str, n: int = 50, m: int = 10, max_epsilon: float | None = None, **kwargs: Any
) -> ServerPrivacy:
    settings = parse_dp(spec)
    assert settings is not None
    return ServerPrivacy(
        settings, num_clients=n, clients_per_round=m, delta=1e-5, max_epsilon=max_epsilon,
        **kwargs,
    )


def test_distributed_epsilon_equals_dp_accounting() -> None:
    # Prepare
    server = _server("distributed:clip=1.0,noise=1.0")
    expected = _direct_wor_epsilon(1.0, 50, 10, 5, 1e-5)

    # Execute
    eps = [server.end_round(list(range(10)), [{}] * 10) for _ in range(5)]

    # Assert: monotone, and the last equals the reference library's value
    assert eps == sorted(eps) and eps[0] > 0
    assert eps[-1] == pytest.approx(expected, rel=1e-12)
    assert server.epsilon == eps[-1]


def test_dropouts_account_less_noise_unless_topped_up() -> None:
    full = _server("distributed:clip=1.0,noise=1.0")
    short = _server("distributed:clip=1.0,noise=1.0")
    topped = _server("distributed:clip=1.0,noise=1.0")

    e_full = full.end_round(list(range(10)), [])
    e_short = short.end_round(list(range(10)), [], aggregated=4)
    e_topped = topped.end_round(list(range(10)), [], aggregated=4, topped_up=True)

    assert e_short == pytest.approx(_direct_wor_epsilon(math.sqrt(0.4), 50, 10, 1, 1e-5))
    assert e_short > e_full == e_topped
    assert topped.topup_std(4) == pytest.approx(1.0 * 1.0 * math.sqrt(0.6))


def test_local_mode_worst_case_client_no_amplification() -> None:
    # Prepare: client 7 takes part in 3 rounds, others in fewer.
    server = _server("local:clip=0.5,noise=4.0")
    accountant = RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(4.0 / 2), 3)

    # Execute
    server.end_round([7, 1], [])
    server.end_round([7, 2], [])
    eps = server.end_round([7, 3], [])

    # Assert
    assert eps == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-12)
    assert server.privacy_block()["rounds_accounted"] == 3


def test_can_run_round_stops_before_budget() -> None:
    # Prepare: budget between epsilon after 2 and after 3 rounds.
    probe = _server("distributed:clip=1.0,noise=1.0")
    e2 = [probe.end_round(list(range(10)), []) for _ in range(2)][-1]
    e3 = probe.end_round(list(range(10)), [])
    server = _server("distributed:clip=1.0,noise=1.0", max_epsilon=(e2 + e3) / 2, min_replies=10)

    # Execute / Assert
    ran = 0
    while True:
        ok, reason = server.can_run_round()
        if not ok:
            break
        server.end_round(list(range(10)), [])
        ran += 1
    assert ran == 2
    assert "max-epsilon" in reason and server.epsilon <= (e2 + e3) / 2


def test_adaptive_clip_moves_towards_quantile() -> None:
    server = _server("distributed:clip=1.0,noise=1.0,quantile=0.5,clip-lr=0.2")
    assert server.settings.count_noise == pytest.approx(max(10 / 20, 1.0))

    # All updates clipped (indicator 0) -> clip grows; all below -> it shrinks.
    server.end_round(list(range(10)), [{"dp-clip-indicator": 0.0}] * 10)
    grown = server.clip
    server.end_round(list(range(10)), [{"dp-clip-indicator": 1.0}] * 10)

    assert grown == pytest.approx(math.exp(0.2 * 0.5))
    assert server.clip == pytest.approx(1.0)
    assert server.train_config(3)["dp-clip"] == pytest.approx(1.0)
    # The canonical spec sent to clients carries the resolved count noise.
    sent = parse_dp(str(server.train_config(3)["dp"]))
    assert sent is not None and sent.count_noise == server.settings.count_noise
    assert server.update_noise_multiplier > 1.0


def test_state_round_trip_through_json() -> None:
    # Prepare
    server = _server("distributed:clip=1.0,noise=1.0,quantile=0.5")
    for _ in range(3):
        server.end_round(list(range(10)), [{"dp-clip-indicator": 0.3}] * 10)
    server.end_round(list(range(10)), [], aggregated=7)
    state = json.loads(json.dumps(server.state_dict()))

    # Execute
    resumed = _server("distributed:clip=1.0,noise=1.0,quantile=0.5")
    resumed.load_state_dict(state)

    # Assert: identical now and after one more identical round
    assert resumed.epsilon == server.epsilon and resumed.clip == server.clip
    assert resumed.end_round(list(range(10)), []) == server.end_round(list(range(10)), [])


def test_load_refuses_other_configuration() -> None:
    state = _server("distributed:clip=1.0,noise=1.0").state_dict()
    with pytest.raises(ValueError, match="dp spec"):
        _server("distributed:clip=1.0,noise=2.0").load_state_dict(state)
    with pytest.raises(ValueError, match="num_clients"):
        _server("distributed:clip=1.0,noise=1.0", n=60).load_state_dict(state)


def test_privacy_block_fields() -> None:
    block = _server("distributed:clip=1.0,noise=1.0").privacy_block()

    for key in ("mode", "clip", "noise_multiplier", "sampling", "sampling_rate", "num_clients",
                "clients_per_round", "delta", "accountant"):
        assert key in block
    assert block["sampling_rate"] == 0.2
    json.dumps(block)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"num_clients": 0}, "num_clients"),
        ({"clients_per_round": 51}, "clients_per_round"),
        ({"clients_per_round": 0}, "clients_per_round"),
        ({"delta": 0.0}, "delta"),
        ({"delta": 1.0}, "delta"),
        ({"max_epsilon": 0.0}, "max_epsilon"),
        ({"max_epsilon": -1.0}, "max_epsilon"),
    ],
)
def test_server_privacy_rejects_bad_params(kwargs: dict[str, float], named: str) -> None:
    args: dict[str, float | None] = {
        "num_clients": 50, "clients_per_round": 10, "delta": 1e-5, "max_epsilon": None
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=named):
        ServerPrivacy(DpSettings(mode="distributed", clip=1.0, noise=1.0), **args)  # type: ignore[arg-type]


def test_end_round_rejects_more_than_sampled() -> None:
    with pytest.raises(ValueError, match="cohort_size"):
        _server("distributed:clip=1.0,noise=1.0").end_round(list(range(11)), [])
    with pytest.raises(ValueError, match="aggregated"):
        _server("distributed:clip=1.0,noise=1.0").end_round(list(range(3)), [], aggregated=4)


def test_calibration_rejects_bad_target() -> None:
    with pytest.raises(ValueError, match="target_epsilon"):
        noise_multiplier_for(0.0, delta=1e-5, rounds=10, num_clients=100, clients_per_round=10)


@settings(max_examples=4, deadline=None, derandomize=True)
@given(
    target=st.floats(min_value=0.5, max_value=20.0),
    rounds=st.integers(min_value=1, max_value=60),
    n=st.integers(min_value=10, max_value=2000),
    frac=st.floats(min_value=0.01, max_value=1.0),
)
def test_calibrated_noise_never_overshoots(target: float, rounds: int, n: int, frac: float) -> None:
    # Prepare
    m = max(1, min(n, round(frac * n)))

    # Execute
    z = noise_multiplier_for(
        target, delta=1e-5, rounds=rounds, num_clients=n, clients_per_round=m, rtol=1e-2
    )

    # Assert: the accountant the server uses (all default orders) stays within the
    # target, and the search is tight: 5% less noise overshoots the calibration's bound.
    spent = epsilon_after(
        noise_multiplier=z, rounds=rounds, delta=1e-5, num_clients=n, clients_per_round=m
    )
    assert spent <= target
    assert epsilon_after(
        noise_multiplier=z * 0.95, rounds=rounds, delta=1e-5, num_clients=n,
        clients_per_round=m, orders=CALIBRATION_ORDERS,
    ) > target


def test_calibration_local_mode() -> None:
    z = noise_multiplier_for(
        8.0, delta=1e-5, rounds=20, num_clients=50, clients_per_round=10, mode="local"
    )
    server = _server(f"local:clip=1.0,noise={z!r}", max_epsilon=8.0, min_replies=10)
    for _ in range(20):
        assert server.can_run_round()[0]
        server.end_round([1], [])
    assert server.epsilon <= 8.0
    assert not server.can_run_round()[0]


def test_adaptive_clipping_is_charged_the_effective_multiplier() -> None:
    # Andrew et al.: update (z_u) + count (sigma_b) together cost exactly one Gaussian
    # with multiplier z, so the epsilon equals the fixed-clip run with the same z.
    fixed = _server("distributed:clip=1.0,noise=1.0")
    adaptive = _server("distributed:clip=1.0,noise=1.0,quantile=0.5,count-noise=0.75")

    e_fixed = fixed.end_round(list(range(10)), [])
    e_adaptive = adaptive.end_round(list(range(10)), [{"dp-clip-indicator": 0.5}] * 10)

    assert e_adaptive == e_fixed
    assert adaptive.update_noise_multiplier == pytest.approx((1.0 - 1 / 2.25) ** -0.5)


def test_local_state_round_trip() -> None:
    server = _server("local:clip=0.5,noise=4.0")
    server.end_round([3, 4], [])
    server.end_round([3], [])

    resumed = _server("local:clip=0.5,noise=4.0")
    resumed.load_state_dict(json.loads(json.dumps(server.state_dict())))

    assert resumed.epsilon == server.epsilon
    assert resumed.end_round([4], []) == server.end_round([4], []) < server.end_round([3], [])
