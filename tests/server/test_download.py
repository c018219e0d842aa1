"""Message bytes, the history download and the link-time estimate, on an in-process grid."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from flwr.common.serde import message_to_proto

from flowerpress import protocol
from flowerpress.client.download import HELD_KEY, HELD_META_KEY, held_model, held_record
from flowerpress.client.mods import compression_mod
from flowerpress.compression import parse
from flowerpress.config import ConfigError, LinkProfile, parse_link, validate
from flowerpress.server.download import DownloadHistory
from flowerpress.server.loop import LoopSettings, RoundOutcome, run_round
from flowerpress.strategies import build_strategy
from flowerpress.testing import InProcessGrid, server_identity

SHAPES = [(40, 30), (30,)]


def _user_app(seen: list[list[np.ndarray]] | None = None, mod: Mod = compression_mod
              ) -> ClientApp:
    """A user's ClientApp: moves every weight by a node-dependent step."""
    app = ClientApp(mods=[mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        arrays = msg.content.array_records["arrays"].to_numpy_ndarrays()
        if seen is not None:
            seen.append([np.array(a) for a in arrays])
        step = np.float32(0.01 * (context.node_id + 1))
        new = [a - step * np.sign(a + 0.1) for a in arrays]
        return Message(RecordDict({"arrays": ArrayRecord(new),
                                   "metrics": MetricRecord({"num-examples": 5})}), reply_to=msg)

    return app


def _settings(**kw: object) -> LoopSettings:
    values: dict[str, object] = {"rounds": 1, "clients_per_round": 2, "round_timeout": 0.5,
                                 "min_replies": 1, "seed": 0, "compression": "q:8+ef"}
    values.update(kw)
    return LoopSettings(**values)  # type: ignore[arg-type]


def _history(budget: int = 10**8, diff: str = "topk:0.2+q:8") -> DownloadHistory:
    return DownloadHistory(diff_codec=parse(diff), full_codec=parse("q:8"), budget_bytes=budget)


def _initial() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.normal(size=s).astype(np.float32) for s in SHAPES]


def _rounds(grid: InProcessGrid, history: DownloadHistory | None, picks: list[list[int]],
            settings: LoopSettings | None = None) -> tuple[list[np.ndarray], list[RoundOutcome]]:
    weights = _initial()
    outcomes = []
    strategy = build_strategy("fedavg")
    with server_identity():
        for rnd, nodes in enumerate(picks, start=1):
            out = run_round(grid, rnd, nodes, weights, strategy, settings or _settings(),
                            extra_config={}, history=history, rng=np.random.default_rng(rnd))
            weights = out.new_global
            outcomes.append(out)
    return weights, outcomes


# --- bytes as Flower sends them ----------------------------------------------------------


def test_message_bytes_is_the_serialized_length() -> None:
    # Prepare: a pushed message (Flower gave it an id) and its reply
    with server_identity():
        msg = Message(RecordDict({"arrays": ArrayRecord([np.ones(7, np.float32)]),
                                  "config": ConfigRecord({"server-round": 1})}),
                      dst_node_id=3, message_type="train")
        unpushed = protocol.message_bytes(msg)
        msg.metadata.__dict__["_message_id"] = "a" * protocol.MESSAGE_ID_CHARS
        reply = Message(RecordDict({"metrics": MetricRecord({"num-examples": 5})}),
                        reply_to=msg)
    reply.metadata.__dict__["_message_id"] = "b" * protocol.MESSAGE_ID_CHARS
    # Execute / Assert
    for m in (msg, reply):
        assert protocol.message_bytes(m) == len(message_to_proto(m).SerializeToString())
    assert unpushed == protocol.message_bytes(msg)  # counted with the id Flower will give it
    assert protocol.message_bytes(msg) > protocol.record_bytes(msg.content) + 100


def test_round_bytes_are_the_messages_both_ways() -> None:
    # Prepare: keep every reply the server will see
    replies: list[Message] = []

    def keep(reply: Message) -> Message:
        replies.append(reply)
        return reply

    grid = InProcessGrid(_user_app(), num_nodes=3, tamper={n: keep for n in (1, 2, 3)})
    # Execute
    _, (out,) = _rounds(grid, None, [[1, 2, 3]])
    # Assert
    train = [m for m in grid.pushed if m.metadata.message_type == "train"]
    assert out.download_bytes == sum(len(message_to_proto(m).SerializeToString())
                                     for m in train)
    assert out.download_payload_bytes == sum(protocol.record_bytes(m.content)
                                             for m in train)
    assert out.upload_bytes == sum(protocol.message_bytes(r) for r in replies)
    assert out.upload_payload_bytes == sum(protocol.record_bytes(r.content)
                                           for r in replies)
    assert out.upload_bytes > out.upload_payload_bytes


# --- the history download ------------------------------------------------------------------


def _held(grid: InProcessGrid, node: int) -> tuple[tuple[int, int], list[np.ndarray]]:
    held = held_model(grid.context(node))
    assert held is not None
    return held[0], held[2]


def test_devices_hold_exactly_the_model_the_server_records() -> None:
    # Prepare: 4 nodes, partial participation, so devices lag by different rounds
    seen: list[list[np.ndarray]] = []
    grid = InProcessGrid(_user_app(seen), num_nodes=4)
    history = _history()
    picks = [[1, 2], [2, 3], [1, 4], [1, 2], [3, 4], [1, 3]]
    # Execute
    _, outcomes = _rounds(grid, history, picks)
    # Assert: every device's model is bit-identical to the server's record of it
    for node in (1, 2, 3, 4):
        (_, rnd), weights = _held(grid, node)
        assert rnd == max(r for r, nodes in enumerate(picks, start=1) if node in nodes)
        for w, s in zip(weights, history.devices[node].weights, strict=True):
            np.testing.assert_array_equal(w, s)
    # the app trained on exactly that model, and diffs were used once devices came back
    for w, s in zip(seen[-1], history.devices[3].weights, strict=True):
        np.testing.assert_array_equal(w, s)
    assert sum(o.diff_downloads for o in outcomes) > 0
    assert all(o.rejected == 0 and o.valid == 2 for o in outcomes)


def test_server_error_feedback_keeps_devices_close_to_the_server_model() -> None:
    # Prepare: a coarse diff codec; the line's error is re-sent every round
    grid = InProcessGrid(_user_app(), num_nodes=2)
    history = _history(diff="topk:0.1+q:4")
    # Execute
    final, _ = _rounds(grid, history, [[1, 2]] * 8)
    # Assert: the devices' model tracks the server's within a fraction of the update size
    line = history.devices[1].weights
    gap = max(float(np.abs(a - b).max()) for a, b in zip(line, final, strict=True))
    assert gap < 0.2


def test_new_device_and_exhausted_bound_get_full_models() -> None:
    # Prepare
    grid = InProcessGrid(_user_app(), num_nodes=3)
    tiny = _history(budget=0)
    # Execute
    _, outcomes = _rounds(grid, tiny, [[1, 2], [1, 2], [2, 3]])
    # Assert: with no memory every download is a full model, and nothing fails
    assert [o.full_downloads for o in outcomes] == [2, 2, 2]
    assert all(o.rejected == 0 for o in outcomes)
    assert tiny.kept_bytes() == 0
    # and with memory, the new node 3 still gets a full model while node 2 gets diffs
    grid2 = InProcessGrid(_user_app(), num_nodes=3)
    roomy = _history()
    _, outcomes2 = _rounds(grid2, roomy, [[1, 2], [1, 2], [2, 3]])
    last = outcomes2[-1]
    assert (last.full_downloads, last.diff_downloads) == (1, 1)


def _raw_claim(anchor: int, rnd: int, digest: bytes) -> bytes:
    return struct.pack(">II16s", anchor, rnd, digest)


@pytest.mark.parametrize("claim", [
    {protocol.DOWNLOAD_CLAIM: _raw_claim(1, 1, bytes(16))},  # wrong digest
    {protocol.DOWNLOAD_CLAIM: _raw_claim(999_999_999, 999_999_999, b"\xff" * 16)},
    {protocol.DOWNLOAD_CLAIM: _raw_claim(0, 2**32 - 1, bytes(16))},  # round out of range
    {protocol.DOWNLOAD_CLAIM: _raw_claim(2, 1, bytes(16))},  # anchor > round
    {protocol.DOWNLOAD_CLAIM: b"x"},  # not one of the three sizes
    {protocol.DOWNLOAD_CLAIM: "0" * 24},  # not bytes
    {protocol.DOWNLOAD_HELD: "1.1", protocol.DOWNLOAD_DIGEST: "0" * 32},  # the old form
])
def test_a_false_claim_gets_a_full_model(claim: dict[str, str | bytes]) -> None:
    # Prepare: node 1 lies about what it holds in every reply
    def lie(reply: Message) -> Message:
        reply.content[protocol.DOWNLOAD] = ConfigRecord(dict(claim))
        return reply

    grid = InProcessGrid(_user_app(), num_nodes=2, tamper={1: lie})
    history = _history()
    # Execute
    _, outcomes = _rounds(grid, history, [[1, 2]] * 3)
    # Assert: node 1 always gets the full model, node 2 diffs; nobody is rejected
    assert [o.full_downloads for o in outcomes] == [2, 1, 1]
    assert all(o.rejected == 0 for o in outcomes)


def test_a_true_claim_with_an_extra_entry_is_no_claim() -> None:
    # Prepare: node 1 sends its true claim plus one more entry in the record
    def pad(reply: Message) -> Message:
        reply.content[protocol.DOWNLOAD]["extra"] = "x" * 100
        return reply

    grid = InProcessGrid(_user_app(), num_nodes=2, tamper={1: pad})
    # Execute
    _, outcomes = _rounds(grid, _history(), [[1, 2]] * 3)
    # Assert: the record must hold exactly the packed value
    assert [o.full_downloads for o in outcomes] == [2, 1, 1]


def test_a_device_claiming_another_devices_version_gets_a_full_model() -> None:
    # Prepare: node 2 claims node 1's version, digest and all
    def steal(reply: Message) -> Message:
        record = held_record(grid.context(1), None)
        assert record is not None
        reply.content[protocol.DOWNLOAD] = record
        return reply

    grid = InProcessGrid(_user_app(), num_nodes=2, tamper={2: steal})
    # Execute
    _, outcomes = _rounds(grid, _history(), [[1], [2], [1, 2], [1, 2]])
    # Assert: claims are checked against the server's record of that node
    assert [o.full_downloads for o in outcomes] == [1, 1, 1, 1]
    assert [o.diff_downloads for o in outcomes] == [0, 0, 1, 1]
    assert all(o.rejected == 0 for o in outcomes)


def test_a_device_that_lost_its_model_only_loses_its_own_round() -> None:
    # Prepare: node 2 claims its true version but has forgotten the model (restart)
    def forget(reply: Message) -> Message:
        if not reply.has_error():
            grid.context(2).state.config_records.pop(HELD_META_KEY, None)
            grid.context(2).state.array_records.pop(HELD_KEY, None)
        return reply

    grid = InProcessGrid(_user_app(), num_nodes=2, tamper={2: forget})
    # Execute
    final, outcomes = _rounds(grid, _history(), [[1, 2]] * 3)
    # Assert: round 2 node 2 cannot build the model: an error reply, a full model next
    assert [o.rejected for o in outcomes] == [0, 1, 0]
    assert [o.full_downloads for o in outcomes] == [2, 0, 1]
    assert all(o.valid >= 1 for o in outcomes)
    assert all(np.isfinite(w).all() for w in final)


# --- the link-time estimate ------------------------------------------------------------------


def test_link_profile_arithmetic() -> None:
    # Prepare
    link = parse_link("up:1mbit,down:10mbit,rtt:50ms")
    # Assert
    assert link == LinkProfile(up_bps=1e6, down_bps=1e7, rtt_s=0.05)
    # 1 MB down at 10 Mbit/s = 0.8 s, 125 kB up at 1 Mbit/s = 1 s, 2 s compute, 50 ms rtt
    assert link.client_seconds(download_bytes=1_000_000, upload_bytes=125_000,
                               compute_seconds=2.0) == pytest.approx(3.85)
    assert link.round_seconds([1.0, 3.85, 2.0]) == pytest.approx(3.85)
    assert link.round_seconds([]) == 0.0
    assert parse_link("none") is None
    assert parse_link("rtt:1s,down:1gbit,up:100kbit") == LinkProfile(1e5, 1e9, 1.0)


@pytest.mark.parametrize("bad", ["up:1mbit,down:10mbit", "up:0mbit,down:1mbit,rtt:1ms",
                                 "up:1mb,down:1mbit,rtt:1ms", "up:1mbit,up:1mbit,rtt:1ms",
                                 "sideways:1mbit"])
def test_link_refuses_bad_profiles(bad: str) -> None:
    with pytest.raises(ConfigError, match="link="):
        validate({"link": bad})


def test_round_rows_carry_link_time() -> None:
    # Prepare
    grid = InProcessGrid(_user_app(), num_nodes=2)
    link = parse_link("up:1mbit,down:10mbit,rtt:50ms")
    # Execute
    _, (out,) = _rounds(grid, None, [[1, 2]], settings=_settings(link=link))
    # Assert: at least the slowest device's transfer time
    per_node = [m for m in grid.pushed if m.metadata.message_type == "train"]
    floor = 0.05 + 8 * protocol.message_bytes(per_node[0]) / 1e7
    assert out.link_seconds is not None and out.link_seconds >= floor


def test_warmup_spec_tightens_topk_density() -> None:
    from flowerpress.server.schedule import warmup_spec

    spec = "topk:0.01+q:4+ef+zstd"
    densities = [float(warmup_spec(spec, r, 3).split("+")[0].split(":")[1]) for r in (1, 2, 3)]
    assert densities == pytest.approx([0.01 ** 0.25, 0.01 ** 0.5, 0.01 ** 0.75], rel=1e-5)
    assert warmup_spec(spec, 4, 3) == spec
    assert warmup_spec("q:8+ef", 1, 3) == "q:8+ef"
    assert warmup_spec(spec, 1, 3).endswith("+q:4+ef+zstd")


def test_serve_with_history_download_from_the_run_config() -> None:
    # Prepare: the bundled ClientApp and the run-config keys
    from flowerpress.server.app import serve
    from flowerpress.simulations.app import app as sim_app

    config = validate({"dataset": "digits", "partition": "iid", "num-clients": 4,
                       "clients-per-round": 2, "rounds": 3, "local-epochs": 1,
                       "compression": "topk:0.1+q:8+ef", "download-history": 10,
                       "download-compression": "topk:0.2+q:8",
                       "download-full-compression": "q:8"})
    # Execute
    with server_identity():
        doc = serve(InProcessGrid(sim_app, 4, run_config=config), config)
    # Assert
    rows = doc["rounds"]
    assert all(r["rejected"] == 0 and r["clients"] == 2 for r in rows)
    assert sum(r["download"]["diffs"] for r in rows) > 0
    assert all(r["link_seconds"] is not None and r["link_seconds"] > 0 for r in rows)
    assert doc["summary"]["total_bytes"] == sum(r["upload_bytes"] + r["download_bytes"]
                                                for r in rows)
    assert doc["summary"]["final_accuracy"] > doc["summary"]["initial_accuracy"]


# --- first contact from the initial model (the anchor "0.0") ---------------------------------


def _anchored_app(initial: list[np.ndarray] | None,
                  seen: list[list[np.ndarray]] | None = None) -> ClientApp:
    """``_user_app`` whose compression mod can build ``initial`` (None: a plain mod)."""
    from flowerpress.client.mods import make_compression_mod

    if initial is None:
        return _user_app(seen)
    return _user_app(seen, make_compression_mod(initial_weights=lambda _: initial))


def _anchored_history(budget: int = 10**8, first: str | None = "topk:0.2+q:8") -> DownloadHistory:
    return DownloadHistory(diff_codec=parse("topk:0.2+q:8"), full_codec=parse("q:8"),
                           budget_bytes=budget, initial=_initial(),
                           first_codec=None if first is None else parse(first))


def _anchored_rounds(grid: InProcessGrid, history: DownloadHistory, picks: list[list[int]],
                     anchors: dict[int, str]) -> tuple[list[np.ndarray], list[RoundOutcome]]:
    weights = _initial()
    outcomes = []
    strategy = build_strategy("fedavg")
    with server_identity():
        for rnd, nodes in enumerate(picks, start=1):
            out = run_round(grid, rnd, nodes, weights, strategy, _settings(), extra_config={},
                            history=history, anchors=anchors, rng=np.random.default_rng(rnd))
            weights = out.new_global
            outcomes.append(out)
    return weights, outcomes


def test_first_contact_is_a_difference_from_the_initial_model() -> None:
    # Prepare: devices that build the initial model; new ones join in every round
    seen: list[list[np.ndarray]] = []
    grid = InProcessGrid(_anchored_app(_initial(), seen), num_nodes=5)
    history = _anchored_history()
    digest = history.anchor_digest
    assert digest == protocol.weights_digest(_initial())
    picks = [[1, 2], [2, 3], [1, 4], [3, 5], [1, 2]]
    # Execute
    _, outcomes = _anchored_rounds(grid, history, picks, dict.fromkeys(range(1, 6), digest))
    # Assert: no full model at all, nobody rejected, devices hold the server's record
    assert [o.full_downloads for o in outcomes] == [0] * 5
    assert all(o.rejected == 0 and o.valid == 2 for o in outcomes)
    for node in range(1, 6):
        (anchor, rnd), weights = _held(grid, node)
        assert anchor == 0
        assert (anchor, rnd) == (history.devices[node].anchor,
                                 history.devices[node].server_round)
        for w, s in zip(weights, history.devices[node].weights, strict=True):
            np.testing.assert_array_equal(w, s)
    for w, s in zip(seen[-1], history.devices[2].weights, strict=True):
        np.testing.assert_array_equal(w, s)


def test_first_contact_payload_is_built_once_per_round_and_is_smaller() -> None:
    # Prepare: a server model some way from W0; two new devices and one unknown to the anchor
    history = _anchored_history()
    rng = np.random.default_rng(0)
    g = [w + np.float32(0.05) * np.sign(w) for w in _initial()]
    history.advance(4, g, rng)
    digest = history.anchor_digest
    # Execute
    first = [history.download_for(n, rng, anchor=digest) for n in (1, 2)]
    full = history.download_for(3, rng, anchor=None)
    wrong = history.download_for(4, rng, anchor="0" * 32)
    # Assert: the same payload object for both, based on "0.0", smaller than the full model
    p1, p2 = (next(iter(d.arrays.values())).data for d in first)
    assert p1 is p2
    assert all(not d.full and d.record[protocol.DOWNLOAD_BASE] == "0.0"
               and d.record[protocol.DOWNLOAD_VERSION] == "0.4" for d in first)
    assert full.full and wrong.full
    assert len(p1) < len(next(iter(full.arrays.values())).data)
    # what the devices will hold is W0 + D(c0), and the server records exactly that
    for w, s in zip(first[0].received, history.devices[1].weights, strict=True):
        np.testing.assert_array_equal(w, s)
    assert history.devices[1].digest == first[0].record[protocol.DOWNLOAD_DIGEST]


def test_a_device_without_the_provider_gets_full_models() -> None:
    # Prepare: a plain compression_mod; its hello never named the anchor
    grid = InProcessGrid(_anchored_app(None), num_nodes=3)
    history = _anchored_history()
    # Execute
    _, outcomes = _anchored_rounds(grid, history, [[1, 2], [2, 3], [1, 3]], anchors={})
    # Assert: full models first, then differences from them, as before
    assert [o.full_downloads for o in outcomes] == [2, 1, 0]
    assert all(o.rejected == 0 for o in outcomes)
    assert not history.refused


@pytest.mark.parametrize("device_initial", ["none", "other"])
def test_a_mismatching_device_errs_once_then_gets_full_models(device_initial: str) -> None:
    # Prepare: node 1 names the server's digest but has no provider or builds another W0
    initial = None if device_initial == "none" else [w + np.float32(1e-3) for w in _initial()]
    grid = InProcessGrid(_anchored_app(initial), num_nodes=2)
    history = _anchored_history()
    anchors = dict.fromkeys((1, 2), history.anchor_digest or "")
    picks = [[1], [1], [1], [1]]
    # Execute
    _, outcomes = _anchored_rounds(grid, history, picks, anchors)
    # Assert: round 1's download from W0 + 0 differs only for "other" (g = W0 there);
    # after its one error the node gets a full model, then differences from it
    errors = [o.rejected for o in outcomes]
    assert sum(errors) == 1
    failed = errors.index(1)
    assert history.refused == {1}
    after = outcomes[failed + 1:]
    assert after[0].full_downloads == 1
    assert all(o.rejected == 0 for o in after)
    assert all(o.diff_downloads == 1 for o in after[1:])


def test_anchored_history_respects_the_memory_bound() -> None:
    # Prepare: room for two devices' models, five devices
    model_bytes = sum(w.nbytes for w in _initial())
    grid = InProcessGrid(_anchored_app(_initial()), num_nodes=5)
    history = _anchored_history(budget=2 * model_bytes)
    anchors = dict.fromkeys(range(1, 6), history.anchor_digest or "")
    picks = [[1, 2], [3, 4], [5, 1], [2, 3], [4, 5]]
    # Execute
    _, outcomes = _anchored_rounds(grid, history, picks, anchors)
    # Assert: never more than two models kept; forgotten devices start from W0 again
    assert history.kept_bytes() <= 2 * model_bytes
    assert len(history.devices) == 2
    assert all(o.rejected == 0 and o.full_downloads == 0 for o in outcomes)
    # and a bound below one model still runs (every download from the anchor)
    tiny = _anchored_history(budget=0)
    grid2 = InProcessGrid(_anchored_app(_initial()), num_nodes=2)
    _, outs = _anchored_rounds(grid2, tiny, [[1, 2]] * 3, dict.fromkeys((1, 2), anchors[1]))
    assert tiny.kept_bytes() == 0
    assert all(o.rejected == 0 and o.full_downloads == 0 for o in outs)


def test_history_state_round_trips_through_the_checkpoint(tmp_path: object) -> None:
    # Prepare: a history after three rounds, saved and loaded the checkpoint's way
    from pathlib import Path

    from flowerpress.server.checkpoint import LoopState, load_checkpoint, save_checkpoint

    grid = InProcessGrid(_anchored_app(_initial()), num_nodes=3)
    history = _anchored_history()
    anchors = dict.fromkeys(range(1, 4), history.anchor_digest or "")
    final, _ = _anchored_rounds(grid, history, [[1, 2], [2, 3], [1, 3]], anchors)
    state = LoopState(server_round=3, weights=final, rows=[], rng={}, membership={},
                      strategy={}, download=history.state_dict())
    out = Path(str(tmp_path))
    save_checkpoint(out, state, {})
    saved = load_checkpoint(out)
    assert saved is not None
    # Execute
    restored = _anchored_history()
    restored.load_state_dict(saved.state.download, final)
    # Assert: the same devices, versions, digests and bit-identical models
    assert set(restored.devices) == set(history.devices)
    for node, held in history.devices.items():
        again = restored.devices[node]
        assert (again.anchor, again.server_round, again.digest) == (
            held.anchor, held.server_round, held.digest)
        for a, b in zip(again.weights, held.weights, strict=True):
            np.testing.assert_array_equal(a, b)
    assert {n: (c.anchor, c.server_round, c.digest) for n, c in restored.claims.items()} == {
        n: (c.anchor, c.server_round, c.digest) for n, c in history.claims.items()}
    # a model that does not fit is refused
    with pytest.raises(ValueError, match="not this model"):
        restored.load_state_dict(saved.state.download, [np.zeros(3, np.float32)])


def test_inprocess_run_sends_first_contacts_as_differences() -> None:
    # Prepare: the bundled ClientApp (it knows its task) on digits, hello and all
    from flowerpress.server.app import serve
    from flowerpress.simulations.app import app as sim_app

    config = validate({"dataset": "digits", "partition": "iid", "num-clients": 6,
                       "clients-per-round": 3, "rounds": 3, "local-epochs": 1,
                       "compression": "topk:0.1+q:8+ef", "download-history": 10,
                       "download-compression": "topk:0.2+q:8",
                       "download-first-compression": "topk:0.3+q:8",
                       "download-full-compression": "q:8"})
    # Execute
    with server_identity():
        doc = serve(InProcessGrid(sim_app, 6, run_config=config), config)
    # Assert: every download a difference (first contacts from the initial model)
    rows = doc["rounds"]
    assert all(r["rejected"] == 0 and r["clients"] == 3 for r in rows)
    assert sum(r["download"]["full"] for r in rows) == 0
    assert sum(r["download"]["diffs"] for r in rows) == 9
    assert doc["summary"]["final_accuracy"] > doc["summary"]["initial_accuracy"]


@pytest.mark.parametrize(("spec", "anchored", "codec"), [
    ("", True, None), ("topk:0.1+q:4+zstd", True, "topk:0.1+q:4+zstd:3"), ("off", False, None)])
def test_download_first_compression_from_the_run_config(spec: str, anchored: bool,
                                                        codec: str | None) -> None:
    from flowerpress.server.loop import make_history

    # Prepare
    assert validate({"download-first-compression": spec})["download-first-compression"] == spec
    settings = _settings(download_history_bytes=10**6, download_first=spec)
    # Execute
    history = make_history(settings, parse("topk:0.05+q:4"), _initial())
    # Assert: "off" keeps full first contacts; empty reuses download-compression
    assert history is not None
    assert (history.anchor_digest is not None) == anchored
    assert (None if history.first_codec is None else history.first_codec.spec) == codec
    with pytest.raises(ConfigError):
        validate({"download-first-compression": "topk:2"})
