"""End to end in-process: SecAgg + quantization + distributed discrete Gaussian learns."""

from __future__ import annotations

from typing import Any

import pytest

from flowerpress.config import ConfigError, validate
from flowerpress.server.app import serve
from flowerpress.simulations.app import app as client_app
from flowerpress.testing import InProcessGrid, server_identity

BASE = {"dataset": "digits", "partition": "iid", "model": "logreg", "num-clients": 8,
        "clients-per-round": 8, "rounds": 3, "local-epochs": 1, "round-timeout": 5.0}


def _serve(**overrides: Any) -> dict[str, Any]:
    config = validate({**BASE, **overrides})
    with server_identity():
        return serve(InProcessGrid(client_app, 8, run_config=config), config)


def test_secagg_with_q8_to_q16_and_distributed_dp_learns_with_epsilon_every_round() -> None:
    # Execute: the same run without SecAgg and without noise (a stricter baseline than
    # Gaussian noise 0.1, whose PLD cross-check alone costs ~40 s), and with both
    plain = _serve()
    secure = _serve(secagg="on:threshold=0.7,clip=2.0,noise=0.1", compression="q:12")
    # Assert: it learns, close to the run without SecAgg; epsilon grows every round
    start = secure["summary"]["initial_accuracy"]
    assert secure["summary"]["final_accuracy"] > start + 0.3
    assert secure["summary"]["final_accuracy"] > plain["summary"]["final_accuracy"] - 0.15
    eps = [r["epsilon"] for r in secure["rounds"]]
    assert all(e is not None and e > 0 for e in eps) and eps == sorted(eps)
    assert secure["privacy"]["mechanism"].startswith("distributed discrete Gaussian")
    assert all(r["clients"] == 8 and r["rejected"] == 0 for r in secure["rounds"])


def test_q8_without_noise_learns() -> None:
    secure = _serve(secagg="on:threshold=0.7,clip=2.0", compression="q:8", rounds=2)
    assert secure["summary"]["final_accuracy"] > secure["summary"]["initial_accuracy"] + 0.3
    assert all(r["epsilon"] is None for r in secure["rounds"])
    # the masked inputs carry no compute (it would reveal what the sum hides): no columns
    assert all(r["device_flops"] is None and r["cum_device_seconds"] is None
               for r in secure["rounds"])
    assert secure["summary"]["total_device_flops"] is None


def test_randk_on_a_shared_support_learns() -> None:
    secure = _serve(secagg="on:threshold=0.7,clip=2.0", compression="randk:0.5+q:16",
                    rounds=2)
    assert secure["summary"]["final_accuracy"] > secure["summary"]["initial_accuracy"] + 0.2
    assert all(r["clients"] == 8 for r in secure["rounds"])


@pytest.mark.parametrize(("overrides", "match"), [
    ({"strategy": "median"}, "weighted sum"),
    ({"compression": "topk:0.1+q:8"}, "secagg serves compression"),
    ({"dp": "distributed:clip=1,noise=1"}, "dp=off"),
])
def test_combinations_it_cannot_serve_are_refused_in_one_line(overrides: dict[str, str],
                                                              match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        validate({**BASE, "secagg": "on", **overrides})
    assert "\n" not in str(info.value)
