"""dp_mod called directly with constructed Flower messages and a fake ClientApp."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.common.constant import ErrorCode

from flowerpress.privacy import (
    adaptive_update_noise,
    add_gaussian_noise,
    clip_inplace,
    dp_mod,
    seeded_generator,
)
from flowerpress.privacy.mod import WITHHELD_REASON

SIM_NODE = {"partition-id": 3, "num-partitions": 10, "dp-allow-seeded": True}
SPEC = "distributed:clip=1.0,noise=1.0,rng=seeded"


def _message(
    config: dict[str, int | float | str | bool], weights: list[np.ndarray], kind: str = "train"
) -> Message:
    metadata = Metadata(
        run_id=1,
        message_id="msg-1",
        src_node_id=0,
        dst_node_id=11,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type=kind,
    )
    content = RecordDict({"arrays": ArrayRecord(weights), "config": ConfigRecord(config)})
    return Message(content=content, metadata=metadata)


def _context(node_config: dict[str, int | float | str | bool]) -> Context:
    return Context(
        run_id=1, node_id=11, node_config=node_config, state=RecordDict(), run_config={}
    )


Scalar = int | float | str | bool


def _config(spec: str = SPEC, **extra: Scalar) -> dict[str, Scalar]:
    config: dict[str, Scalar] = {
        "dp": spec, "dp-clip": 1.0, "server-round": 2, "seed": 5, "clients-per-round": 4,
    }
    config.update(extra)
    return config


def _global() -> list[np.ndarray]:
    # Multiples of 1/8: adding the fake trainer's steps is exact in float32, so the
    # delta the mod sees is exactly ``step`` everywhere.
    return [(np.arange(12, dtype=np.float32).reshape(3, 4) - 6) / 8, np.ones(5, np.float32)]


Trainer = Callable[[Message, Context], Message]


def _trainer(step: float, *, leak: bool = True, calls: list[int] | None = None) -> Trainer:
    """A fake ClientApp: moves every weight by ``step`` and reports leaky extras."""

    def train(msg: Message, context: Context) -> Message:
        if calls is not None:
            calls.append(1)
        received = msg.content["arrays"].to_numpy_ndarrays()
        local = [(w + step).astype(np.float32) for w in received]
        pairs = zip(local, received, strict=True)
        raw_norm = math.sqrt(sum(float(np.sum((a - b) ** 2)) for a, b in pairs))
        content = RecordDict({
            "arrays": ArrayRecord(local),
            "metrics": MetricRecord({"num-examples": 123, "train-loss": 0.25 * step,
                                     "raw-norm": raw_norm}),
        })
        if leak:
            content["debug"] = ConfigRecord({"raw-norm": raw_norm})
        return Message(content, reply_to=msg)

    return train


def _arrays(msg: Message) -> list[np.ndarray]:
    return msg.content["arrays"].to_numpy_ndarrays()


def test_non_train_messages_pass_through() -> None:
    msg = _message(_config(), _global(), kind="evaluate")
    sentinel = Message(RecordDict({"metrics": MetricRecord({"x": 1.0})}), reply_to=msg)

    reply = dp_mod(msg, _context(SIM_NODE), lambda m, c: sentinel)

    assert reply is sentinel


def test_custom_train_actions_are_privatized() -> None:
    msg = _message(_config(), _global(), kind="train.finetune")

    reply = dp_mod(msg, _context(SIM_NODE), _trainer(0.5))

    assert set(reply.content["metrics"].keys()) == {"num-examples", "dp-noised"}


def test_dp_off_passes_through() -> None:
    msg = _message(_config("off"), _global())
    reply = dp_mod(msg, _context({}), _trainer(0.5))
    assert reply.content["metrics"]["num-examples"] == 123


def test_distributed_update_is_clipped_and_noised_exactly() -> None:
    # Prepare: the expected reply recomputed from the public mechanism functions.
    received = _global()
    delta = [np.full(a.shape, 0.5, dtype=np.float64) for a in received]
    clip_inplace(delta, clip=1.0)
    rng = seeded_generator(seed=5, client_id=3, server_round=2, stream=0)
    noised = add_gaussian_noise(delta, std=1.0 * 1.0 / math.sqrt(4), rng=rng)
    expected = [
        (g.astype(np.float64) + d).astype(np.float32) for g, d in zip(received, noised, strict=True)
    ]

    # Execute
    reply = dp_mod(_message(_config(), received), _context(SIM_NODE), _trainer(0.5))

    # Assert
    out = _arrays(reply)
    assert [a.dtype for a in out] == [np.float32, np.float32]
    assert list(reply.content["arrays"].keys()) == ["0", "1"]
    for got, want in zip(out, expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_nothing_unnoised_leaves_the_client() -> None:
    # Prepare: two trainings whose raw updates, losses and norms differ but clip to the
    # same update (same direction, both norms > C).
    msg_a = _message(_config(SPEC.replace("rng=seeded", "quantile=0.5,count-noise=2.0,rng=seeded")),
                     _global())
    msg_b = _message(_config(SPEC.replace("rng=seeded", "quantile=0.5,count-noise=2.0,rng=seeded")),
                     _global())

    # Execute
    reply_a = dp_mod(msg_a, _context(SIM_NODE), _trainer(2.0))
    reply_b = dp_mod(msg_b, _context(SIM_NODE), _trainer(7.0))

    # Assert: only the privatized arrays and vetted metrics leave ...
    for reply in (reply_a, reply_b):
        assert set(reply.content.keys()) == {"arrays", "metrics"}
        assert set(reply.content["metrics"].keys()) == {"num-examples", "dp-noised",
                                                        "dp-clip-indicator"}
        assert reply.content["metrics"]["num-examples"] == 1
    # ... and they are bit-identical: nothing else about the raw update got through.
    for a, b in zip(_arrays(reply_a), _arrays(reply_b), strict=True):
        np.testing.assert_array_equal(a, b)
    assert (reply_a.content["metrics"]["dp-clip-indicator"]
            == reply_b.content["metrics"]["dp-clip-indicator"])


def test_clip_indicator_is_noised() -> None:
    values = []
    for seed in range(200):
        msg = _message(_config("local:clip=10.0,noise=1.0,quantile=0.5,count-noise=1.0,rng=seeded",
                               seed=seed), _global())
        reply = dp_mod(msg, _context(SIM_NODE), _trainer(0.01))  # norm << clip: indicator 1
        values.append(float(reply.content["metrics"]["dp-clip-indicator"]))
    arr = np.asarray(values)
    assert not np.any(np.isin(arr, [0.0, 1.0]))
    assert abs(arr.mean() - 1.0) < 5 / math.sqrt(200)
    assert 0.8 < arr.std() < 1.2


def test_distributed_noise_std_is_share_of_zc() -> None:
    # Prepare: a large zero update so the reply minus the received weights is pure noise.
    received = [np.zeros(40_000, np.float32)]
    msg = _message(_config("distributed:clip=2.0,noise=1.5,rng=seeded", **{"dp-clip": 2.0,
                                                                         "clients-per-round": 9}),
                   received)

    reply = dp_mod(msg, _context(SIM_NODE), _trainer(0.0))

    noise = _arrays(reply)[0].astype(np.float64)
    expected = 1.5 * 2.0 / 3.0
    assert abs(noise.std() / expected - 1) < 5 / math.sqrt(2 * noise.size)


@pytest.mark.parametrize(
    ("node", "spec", "clip", "why"),
    [
        ({"dp-min-noise": 2.0}, "local:clip=1.0,noise=1.0", 1.0, "dp-min-noise"),
        ({"dp-max-clip": 0.5}, "local:clip=1.0,noise=1.0", 1.0, "dp-max-clip"),
        ({"dp-max-clip": 1.5}, "local:clip=1.0,noise=1.0", 2.0, "dp-max-clip"),  # adaptive grew
        ({"dp-min-noise": 1.0}, "off", 1.0, "dp=off"),
        ({}, "local:clip=1.0,noise=1.0,rng=seeded", 1.0, "dp-allow-seeded"),
    ],
)
def test_device_refuses_weaker_requests(
    node: dict[str, float], spec: str, clip: float, why: str
) -> None:
    # Prepare
    calls: list[int] = []
    msg = _message(_config(spec, **{"dp-clip": clip}), _global())

    # Execute
    reply = dp_mod(msg, _context(dict(node)), _trainer(0.5, calls=calls))

    # Assert: an error reply saying why; the model was never trained on.
    assert reply.has_error() and not reply.has_content()
    assert reply.error.code == ErrorCode.MOD_FAILED_PRECONDITION
    assert why in str(reply.error.reason)
    assert calls == []


def test_device_accepts_request_within_its_limits() -> None:
    node = {"dp-min-noise": 1.0, "dp-max-clip": 1.0, "dp-allow-seeded": True}
    reply = dp_mod(_message(_config("local:clip=1.0,noise=1.0,rng=seeded"), _global()),
                   _context(node), _trainer(0.5))
    assert reply.has_content()


def test_error_reply_from_app_keeps_its_code_not_its_text() -> None:
    # Prepare: the app's error text quotes a (private) local loss.
    msg = _message(_config(), _global())
    failed = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                           reason="loss 0.731942 diverged"), reply_to=msg)

    # Execute
    reply = dp_mod(msg, _context(SIM_NODE), lambda m, c: failed)

    # Assert
    assert reply.has_error() and reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert reply.error.reason == WITHHELD_REASON
    assert "0.731942" not in str(reply.error.reason)


def test_exception_in_app_is_withheld_under_dp() -> None:
    msg = _message(_config(), _global())

    def crash(m: Message, c: Context) -> Message:
        raise FloatingPointError("update norm 1234.5678 is not finite")

    reply = dp_mod(msg, _context(SIM_NODE), crash)

    assert reply.has_error() and reply.error.reason == WITHHELD_REASON
    assert "1234.5678" not in str(reply.error.reason)


@pytest.mark.parametrize(
    ("config", "node", "named"),
    [
        (_config("distributed:clip=1.0,noise=1.0,sigma=3"), SIM_NODE, "sigma"),
        (_config(**{"dp-clip": -1.0}), SIM_NODE, "dp-clip"),
        (_config(**{"dp-clip": "wide"}), SIM_NODE, "dp-clip"),
        ({"dp": SPEC, "seed": 1, "server-round": 1}, SIM_NODE, "clients-per-round"),
        (_config(seed=-3), SIM_NODE, "seed"),
        (_config("local:clip=1,noise=1,quantile=0.5"), SIM_NODE, "count-noise"),
        (_config(), {**SIM_NODE, "dp-min-noise": "lots"}, "dp-min-noise"),
        (_config(), {**SIM_NODE, "dp-allow-seeded": "maybe"}, "dp-allow-seeded"),
    ],
)
def test_invalid_parameters_raise_value_error(
    config: dict[str, int | float | str | bool], node: dict[str, int | float | str], named: str
) -> None:
    with pytest.raises(ValueError, match=named):
        dp_mod(_message(config, _global()), _context(dict(node)), _trainer(0.5))


def test_reply_with_other_keys_is_rejected() -> None:
    msg = _message(_config(), _global())

    def wrong(m: Message, c: Context) -> Message:
        return Message(RecordDict({"arrays": ArrayRecord([np.ones(3, np.float32)])}), reply_to=m)

    with pytest.raises(ValueError, match="keys"):
        dp_mod(msg, _context(SIM_NODE), wrong)


def test_opendp_sampler_noises_small_models() -> None:
    # Prepare: OpenDP is optional (pip install opendp).
    pytest.importorskip("opendp")
    received = [np.zeros(3000, np.float32)]
    spec = "distributed:clip=2.0,noise=1.5,quantile=0.5,count-noise=2.0,rng=opendp"
    msg = _message(_config(spec, **{"dp-clip": 2.0, "clients-per-round": 9}), received)

    # Execute
    reply = dp_mod(msg, _context({}), _trainer(0.0))

    # Assert: float32 out, std z_u*C/sqrt(9) within 5 standard errors, noised indicator.
    noise = _arrays(reply)[0]
    assert noise.dtype == np.float32
    expected = adaptive_update_noise(1.5, 2.0) * 2.0 / 3.0
    assert abs(noise.astype(np.float64).std() / expected - 1) < 5 / math.sqrt(2 * noise.size)
    assert reply.content["metrics"]["dp-clip-indicator"] not in (0.0, 1.0)
