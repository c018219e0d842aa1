"""The server runs the DP mechanism its ledger accounts: sampling, cohort size, reply contract."""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from flowerpress.config import validate
from flowerpress.server.app import serve
from flowerpress.server.loop import LoopSettings, run_federation, sample_round
from flowerpress.simulations.app import app as client_app
from flowerpress.strategies import build_strategy
from flowerpress.testing import InProcessGrid, server_identity

BASE = {"dataset": "digits", "partition": "iid", "num-clients": 4, "clients-per-round": 3,
        "rounds": 2, "local-epochs": 1, "round-timeout": 5.0,
        "dp": "distributed:clip=1.0,noise=1.0"}


def _serve(grid_kwargs: dict[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    config = validate({**BASE, **overrides})
    grid = InProcessGrid(client_app, 4, run_config=config, **(grid_kwargs or {}))
    with server_identity():
        return serve(grid, config)


def test_dp_cohorts_do_not_come_from_the_published_seed() -> None:
    # Prepare: the run's seeded generator
    rng = np.random.default_rng([0, 1])
    before = rng.bit_generator.state
    # Execute: fixed and poisson draw from the OS CSPRNG; predictable from the seed
    fixed = sample_round(list(range(1, 11)), 3, rng, "fixed")
    poisson = sample_round(list(range(1, 11)), 3, rng, "poisson")
    assert rng.bit_generator.state == before  # the published seed decided nothing
    predictable = sample_round(list(range(1, 11)), 3, rng, "predictable")
    # Assert
    assert len(fixed) == 3 and set(fixed) <= set(range(1, 11))
    assert set(poisson) <= set(range(1, 11))
    assert rng.bit_generator.state != before and len(predictable) == 3


def test_results_say_which_sampling_ran() -> None:
    # Execute
    fixed = _serve()
    predictable = _serve(**{"dp-sampling": "predictable"})
    # Assert: the block names the scheme that ran (the ledger accounts that one)
    assert fixed["privacy"]["sampling"] == "fixed"
    assert predictable["privacy"]["sampling"] == "predictable"
    assert all(r["epsilon"] is not None and r["epsilon"] > 0
               for r in fixed["rounds"] + predictable["rounds"])


def _without_dp_mod(reply: Message) -> Message:
    """A device that skipped dp_mod: its raw weights and a large example count."""
    arrays = reply.content.array_records["arrays"].to_numpy_ndarrays()
    reply.content = RecordDict({"arrays": ArrayRecord(arrays),
                                "metrics": MetricRecord({"num-examples": 500})})
    return reply


def test_replies_that_skipped_dp_mod_are_rejected() -> None:
    # Execute: node 1 sends un-noised weights every round it is sampled
    result = _serve({"tamper": {1: _without_dp_mod}}, **{"clients-per-round": 4})
    # Assert
    assert all(r["rejected"] == 1 and r["clients"] == 3 for r in result["rounds"])


def test_devices_size_their_noise_by_the_real_cohort() -> None:
    # Prepare: 3 nodes although clients-per-round asks for 10
    config = validate({**BASE, "num-clients": 10, "clients-per-round": 10})
    grid = InProcessGrid(client_app, 3, run_config=config)
    settings = LoopSettings(rounds=1, clients_per_round=10, round_timeout=5.0, min_replies=1,
                            seed=0, node_wait_timeout=0.5, dp=True)
    from flowerpress.privacy import ServerPrivacy, parse_dp

    settings_dp = parse_dp(str(config["dp"]))
    assert settings_dp is not None
    # Execute
    with server_identity():
        run_federation(grid, grid_initial(config), build_strategy("fedavg"), settings,
                       evaluate_fn=lambda w: {"accuracy": 0.0, "loss": 0.0},
                       privacy=lambda n: ServerPrivacy(settings_dp, num_clients=n,
                                                       clients_per_round=n, delta=1e-5,
                                                       max_epsilon=None))
    # Assert: every train message told its device the cohort it is in (3, not 10)
    train = [m for m in grid.pushed if m.metadata.message_type == "train"]
    assert train and all(m.content.config_records["config"]["clients-per-round"] == 3
                         for m in train)


def grid_initial(config: dict[str, Any]) -> list[np.ndarray]:
    from flowerpress.tasks import build_task, task_spec

    return build_task(task_spec(config), config).initial_weights()


def test_a_non_mean_strategy_is_accounted_per_update() -> None:
    # Execute
    mean = _serve()
    median = _serve(strategy="median")
    # Assert: the median reads single updates, each carrying z/sqrt(m): a larger epsilon
    assert median["rounds"][-1]["epsilon"] > mean["rounds"][-1]["epsilon"]
