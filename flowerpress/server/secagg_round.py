"""One round of secure aggregation (SecAgg+) through the Grid: the server learns only the sum.

:func:`run_secagg_round` has :func:`~flowerpress.server.loop.run_round`'s
signature and returns the same :class:`~flowerpress.server.loop.RoundOutcome`;
``run_federation`` calls it instead when the run config sets ``secagg``. The
round has four stages, each a ``train`` message per device and a pull of the
replies as they arrive (:func:`~flowerpress.server.loop.poll_replies`, with
``round-timeout`` per stage):

1. advertise keys -> 2. share keys -> 3. masked input (the model goes out,
the devices train, encode and mask) -> 4. unmasking.

A device that replies with an error or breaks the protocol (wrong sizes, ids
it was not given, a replayed reply) is dropped at that stage and counted in
``rejected``; a device that does not answer is counted in ``timed_out``; the
round goes on while the threshold holds. Fewer survivors than the threshold
raise :class:`~flowerpress.secagg.SecAggAbort` inside; the round is then
skipped: the model is unchanged, ``clients`` is 0, ``timed_out`` counts the
devices that vanished and ``rejected`` those dropped, and the loop goes on.

The unmasked sum is decoded (:func:`flowerpress.secagg.encoding.decode_sum`)
into the mean delta of the survivors and handed to the strategy as one
:class:`~flowerpress.strategies.base.ClientUpdate` whose weight is the number
of survivors: the strategy must aggregate by a weighted sum (every survivor
weighs the same; ``num-examples`` is not sent).

Bytes are the serialized sizes (Flower's protobuf ``RecordDict``) of every
message of every stage, both directions.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp import Grid

from flowerpress import protocol
from flowerpress.secagg import encoding
from flowerpress.secagg import messages as m
from flowerpress.secagg.core import SecAggAbort, SecAggViolation, ServerSession
from flowerpress.secagg.graph import default_degree
from flowerpress.secagg.settings import effective, parse_secagg
from flowerpress.server.loop import (
    AggregationStrategy,
    DownloadCodec,
    LoopSettings,
    PrivacyLedger,
    RoundOutcome,
    Scalar,
    Weights,
    _broadcast,
    check_strategy_result,
    poll_replies,
)
from flowerpress.strategies.base import ClientUpdate

log = logging.getLogger(__name__)

#: Handles one device's reply to a stage; raises SecAggViolation to drop the device.
ReplyHandler = Callable[[int, Message], None]


def message_bytes(content: RecordDict) -> int:
    """Serialized size of a message's content (Flower's protobuf)."""
    return int(recorddict_to_proto(content).ByteSize())


def round_seed(seed: int, server_round: int) -> int:
    """The round's public seed (rotation signs, rand-k support, graph)."""
    state = np.random.SeedSequence([seed, server_round, 0x5EC]).generate_state(2)
    return int(state[0]) << 31 | int(state[1]) >> 1


class _Stages:
    """Pushes one stage, pulls its replies, counts bytes and drops bad devices."""

    def __init__(self, grid: Grid, server_round: int, timeout: float,
                 clock: Callable[[], float], sleep: Callable[[float], None]) -> None:
        self.grid, self.round, self.timeout = grid, server_round, timeout
        self.clock, self.sleep = clock, sleep
        self.upload = self.download = 0
        self.rejected: set[int] = set()
        self.vanished: set[int] = set()  # asked, never answered (within the timeout)

    def run(self, name: str, contents: Mapping[int, RecordDict], handle: ReplyHandler) -> None:
        nodes = list(contents)
        messages = [Message(contents[n], dst_node_id=n, message_type=MessageType.TRAIN)
                    for n in nodes]
        self.download += sum(message_bytes(contents[n]) for n in nodes)
        ids = list(self.grid.push_messages(messages))
        id_to_node = dict(zip(ids, nodes, strict=True))
        silent = set(nodes)
        for reply in poll_replies(self.grid, ids, timeout=self.timeout, clock=self.clock,
                                  sleep=self.sleep):
            node = id_to_node[reply.metadata.reply_to_message_id]
            silent.discard(node)
            if not reply.has_error():
                self.upload += message_bytes(reply.content)
            try:
                handle(node, reply)
            except SecAggViolation as exc:
                self.rejected.add(node)
                log.warning("round %s, secagg %s: dropped node %s: %.300s", self.round, name,
                            node, exc)
            except Exception as exc:  # one reply never ends the round
                self.rejected.add(node)
                log.warning("round %s, secagg %s: dropped node %s: %s: %.300s", self.round,
                            name, node, type(exc).__name__, exc)
        self.vanished |= silent


def run_secagg_round(
    grid: Grid,
    server_round: int,
    nodes: Sequence[int],
    global_weights: Weights,
    strategy: AggregationStrategy,
    settings: LoopSettings,
    *,
    extra_config: Mapping[str, Scalar],
    download: DownloadCodec | None = None,
    rng: np.random.Generator,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> RoundOutcome:
    """One secure-aggregation round (see the module doc); ``run_round``'s contract.

    Raises
    ------
    ValueError
        ``settings.secagg`` is off or malformed, or its bits cannot carry the
        cohort's sum (configuration errors, not device faults).
    """
    parsed = parse_secagg(settings.secagg)
    if parsed is None:
        raise ValueError("run_secagg_round called with secagg=off")
    secagg, randk = effective(parsed, settings.compression)
    broadcast, received = _broadcast(global_weights, download, rng)
    dim = sum(int(w.size) for w in received)
    cohort = len(nodes)
    min_summands = secagg.min_summands(cohort)
    seed = round_seed(settings.seed, server_round)
    plan = encoding.make_plan(dim=dim, bits=secagg.bits, clip=secagg.clip, noise=secagg.noise,
                              cohort=cohort, min_summands=min_summands, seed=seed, randk=randk)
    session = ServerSession(round_id=server_round, nodes=list(nodes), bits=secagg.bits,
                            length=plan.padded, fraction=secagg.threshold,
                            degree=secagg.degree or default_degree(cohort), seed=seed)
    stages = _Stages(grid, server_round, settings.round_timeout, clock, sleep)
    packed_bytes = (plan.padded * secagg.bits + 7) // 8
    instruction = protocol.TrainInstruction(
        server_round=server_round, seed=settings.seed, compression="none", cohort_size=cohort,
        extra={**settings.client_config, **extra_config})
    train_config = {**instruction.to_record(), m.SPEC: secagg.spec(), m.SEED: seed,
                    m.RANDK: float(randk or 0.0), m.MIN_SUMMANDS: min_summands}
    try:
        stages.run(m.ADVERTISE, {
            n: RecordDict({protocol.CONFIG: m.advertise_request(session.setup_for(n))})
            for n in nodes},
            lambda n, r: session.add_keys(n, m.parse_advertise_reply(r, n)))
        session.close_keys()
        stages.run(m.SHARE_KEYS, {
            n: RecordDict({protocol.CONFIG: m.share_keys_request(server_round,
                                                                 session.roster_for(n))})
            for n in session.u1},
            lambda n, r: session.add_shares(n, m.parse_share_keys_reply(
                r, n, max_peers=cohort)))
        session.close_shares()

        def add_masked(node: int, reply: Message) -> None:
            packed, complaints = m.parse_mask_reply(reply, node, packed_bytes=packed_bytes)
            session.add_masked(node, encoding.unpack_words(packed, secagg.bits, plan.padded),
                               complaints)

        stages.run(m.MASK, {
            n: RecordDict({protocol.ARRAYS: broadcast, protocol.CONFIG: ConfigRecord(
                {**train_config, **m.mask_config(server_round, session.inbox_for(n))})})
            for n in session.u2}, add_masked)
        survivors = session.close_masked()
        accused = set(session.masked) - set(survivors)
        stages.rejected |= accused
        stages.run(m.UNMASK, {
            n: RecordDict({protocol.CONFIG: m.unmask_request(server_round,
                                                             *session.unmask_request(n))})
            for n in survivors},
            lambda n, r: session.add_unmask(n, *m.parse_unmask_reply(r, n)))
        total = session.finish()
    except SecAggAbort as exc:
        log.warning("round %s: secure aggregation skipped, the model is unchanged: %s",
                    server_round, exc)
        return RoundOutcome(global_weights, 0, len(stages.rejected), len(stages.vanished),
                            stages.upload, stages.download, [], [])
    mean = encoding.decode_sum(total, plan, len(survivors))
    delta: Weights = []
    offset = 0
    for g in received:
        delta.append(mean[offset:offset + g.size].reshape(g.shape).astype(np.float32))
        offset += g.size
    valid = len(survivors)
    # A survivor that failed in stage 4 still has its input in the sum: it counts as valid.
    rejected = len(stages.rejected - set(survivors))
    timed_out = cohort - valid - rejected
    if timed_out:
        log.warning("round %s: %s of %s clients did not complete secure aggregation within "
                    "%.1f s per stage", server_round, timed_out, cohort, settings.round_timeout)
    strategy.begin_round(server_round, received)
    if valid >= settings.min_replies:
        strategy.add(ClientUpdate(delta=delta, weight=float(valid), node_id=0))
        new_global = check_strategy_result(strategy.result(), received, type(strategy).__name__)
    else:
        log.warning("round %s: %s survivors < min-replies=%s; the model is unchanged",
                    server_round, valid, settings.min_replies)
        new_global = global_weights
    return RoundOutcome(new_global, valid, rejected, timed_out, stages.upload, stages.download,
                        list(survivors), [{} for _ in survivors])


def secagg_privacy(config: Mapping[str, Scalar], *, weighted_sum: bool, strategy: str,
                   elements: int, into: list[Any]) -> Callable[[int], PrivacyLedger] | None:
    """Check that the run can use secure aggregation; the ledger factory if it adds noise.

    The ledgers built are appended to ``into`` (the ServerApp's list of ledgers).

    Raises
    ------
    flowerpress.config.ConfigError
        One line: the strategy, codec or ``dp`` setting cannot be served.
    """
    from flowerpress.config import ConfigError
    from flowerpress.secagg.settings import refusal

    parsed = parse_secagg(str(config["secagg"]))
    if parsed is None:
        return None
    line = refusal(parsed, compression=str(config["compression"]), dp=str(config["dp"]),
                   weighted_sum=weighted_sum, strategy=strategy)
    if line:
        raise ConfigError(f"secagg={config['secagg']!r} is not allowed: {line}")
    if parsed.noise <= 0:
        return None
    secagg, randk = effective(parsed, str(config["compression"]))
    max_eps = float(config["max-epsilon"])

    def make(population: int) -> PrivacyLedger:
        del population  # no amplification by sampling is claimed
        from flowerpress.secagg.accounting import SecAggLedger

        into.append(SecAggLedger(secagg, dim=elements, randk=randk,
                                 delta=float(config["dp-delta"]),
                                 max_epsilon=max_eps if max_eps > 0 else None))
        return cast(PrivacyLedger, into[-1])

    return make
