"""The device's side of the history download: first contact from the initial model."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from flowerpress import protocol
from flowerpress.client.download import (
    HELD_KEY,
    HELD_META_KEY,
    DownloadMismatchError,
    held_model,
    receive_download,
)
from flowerpress.client.mods import compression_mod, make_compression_mod
from flowerpress.compression import parse
from flowerpress.server.download import Download, DownloadHistory
from flowerpress.testing import server_identity

SHAPES = [(20, 10), (10,)]


def _weights(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=s).astype(np.float32) for s in SHAPES]


def _context() -> Context:
    return Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 1},
                   state=RecordDict(), run_config={})


def _first_contact(initial: list[np.ndarray], server_round: int = 3) -> Download:
    """The server's anchored first download for a new node (the server's own code)."""
    history = DownloadHistory(diff_codec=parse("topk:0.2+q:8"), full_codec=parse("q:8"),
                              budget_bytes=10**8, initial=initial)
    rng = np.random.default_rng(0)
    global_model = [w + np.float32(0.3) * np.sign(w) for w in initial]
    history.advance(server_round, global_model, rng)
    item = history.download_for(7, rng, anchor=history.anchor_digest)
    assert not item.full
    return item


def _train_msg(item: Download) -> Message:
    config = ConfigRecord({"compression": "none", "seed": 0, "server-round": 3})
    return Message(RecordDict({protocol.ARRAYS: item.arrays, protocol.CONFIG: config,
                               protocol.DOWNLOAD: item.record}),
                   dst_node_id=1, message_type="train")


def _app(mod: object) -> ClientApp:
    app = ClientApp(mods=[mod])  # type: ignore[list-item]

    @app.query()
    def hello(msg: Message, context: Context) -> Message:
        return protocol.query_reply(msg, partition_id=0, num_partitions=1)

    return app


def _hello() -> Message:
    return Message(RecordDict({protocol.CONFIG: ConfigRecord({protocol.HELLO: True})}),
                   dst_node_id=1, message_type="query")


def test_hello_reply_names_the_initial_model_only_with_a_provider() -> None:
    # Prepare
    initial = _weights(0)
    with server_identity():
        # Execute
        with_provider = _app(make_compression_mod(initial_weights=lambda _: initial))(
            _hello(), _context())
        plain = _app(compression_mod)(_hello(), _context())
    # Assert: the digest of exactly the initial model; nothing from a plain mod
    assert protocol.anchor_of_reply(with_provider) == protocol.weights_digest(initial)
    assert protocol.anchor_of_reply(plain) is None
    assert protocol.partition_of_reply(with_provider) == 0


def test_a_provider_that_fails_is_no_anchor() -> None:
    def broken(_: Context) -> list[np.ndarray]:
        raise RuntimeError("no task here")

    with server_identity():
        reply = _app(make_compression_mod(initial_weights=broken))(_hello(), _context())
    assert not reply.has_error()
    assert protocol.anchor_of_reply(reply) is None


def test_difference_from_the_initial_model_builds_the_servers_model() -> None:
    # Prepare
    initial = _weights(0)
    item = _first_contact(initial)
    ctx = _context()
    # Execute
    with server_identity():
        got = receive_download(_train_msg(item), ctx, max_elements=10**6,
                               initial=lambda _: initial)
    # Assert: bit-identical to what the server records; held as version 0.3
    for a, b in zip(got, item.received, strict=True):
        np.testing.assert_array_equal(a, b)
    held = held_model(ctx)
    assert held is not None and held[0] == (0, 3)
    assert held[1] == item.record[protocol.DOWNLOAD_DIGEST]
    # the provider's arrays were not modified in place
    for a, b in zip(initial, _weights(0), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("provider", [None, lambda _: None, lambda _: _weights(1)])
def test_a_device_that_cannot_build_the_initial_model_refuses(provider: object) -> None:
    # Prepare: no provider, a provider without a model, or another initial model
    item = _first_contact(_weights(0))
    ctx = _context()
    ctx.state[HELD_META_KEY] = ConfigRecord({protocol.DOWNLOAD_HELD: "1.1",
                                             protocol.DOWNLOAD_DIGEST: "0" * 32})
    # Execute / Assert: refused, and whatever it held is forgotten
    with server_identity(), pytest.raises(DownloadMismatchError):
        receive_download(_train_msg(item), ctx, max_elements=10**6,
                         initial=provider)  # type: ignore[arg-type]
    assert HELD_KEY not in ctx.state and HELD_META_KEY not in ctx.state
