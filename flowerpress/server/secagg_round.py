"""Secure aggregation (SecAgg+) as the way a round's sum travels: the server learns only the sum.

:func:`secure_sum` is the fold transport of the one round skeleton
(:func:`flowerpress.server.loop.run_round`, phases in
:mod:`flowerpress.server.phases`): the round plans, sends and collects
through the same :class:`~flowerpress.server.phases.RoundBook` and
:func:`~flowerpress.server.phases.exchange` as a plain round, in four
exchanges, each a ``train`` message per device and a pull of the replies as
they arrive (``round-timeout`` per stage):

1. advertise keys -> 2. share keys -> 3. masked input (the model goes out,
the devices train, encode and mask) -> 4. unmasking.

A device that replies with an error or breaks the protocol (wrong sizes, ids
it was not given, a replayed reply, fields beyond the stage's own) is dropped
at that stage and counted in ``rejected``; a device that does not answer is
counted in ``timed_out``; the round goes on while the threshold holds. A
device caught breaking the protocol on purpose (the session's ``culprits``:
inconsistent shares, bad reveals, false complaints) is also excluded from
later rounds. Fewer survivors than the threshold raise
:class:`~flowerpress.secagg.SecAggAbort` inside; the round is then skipped:
the model is unchanged and nothing was released.

The unmasked sum is decoded (:func:`flowerpress.secagg.encoding.decode_sum`)
into the mean delta of the survivors, which the round folds into the
strategy as one :class:`~flowerpress.strategies.base.ClientUpdate` whose
weight is the number of survivors: the strategy must aggregate by a weighted
sum (every survivor weighs the same; ``num-examples`` is not sent). A decoded
sum is a release: the privacy ledger charges it whatever ``min-replies``
says.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from flowerpress import protocol
from flowerpress.secagg import encoding
from flowerpress.secagg import messages as m
from flowerpress.secagg.core import SecAggAbort, ServerSession
from flowerpress.secagg.graph import default_degree
from flowerpress.secagg.settings import effective, parse_secagg
from flowerpress.server.loop import (
    DownloadCodec,
    LoopSettings,
    PrivacyLedger,
    Scalar,
    Weights,
    _broadcast,
)
from flowerpress.server.phases import RoundBook, exchange

log = logging.getLogger(__name__)


def round_seed(seed: int, server_round: int) -> int:
    """The round's public seed (rotation signs, rand-k support, graph)."""
    state = np.random.SeedSequence([seed, server_round, 0x5EC]).generate_state(2)
    return int(state[0]) << 31 | int(state[1]) >> 1


def secure_sum(
    grid: Grid,
    book: RoundBook,
    nodes: Sequence[int],
    global_weights: Weights,
    settings: LoopSettings,
    *,
    extra_config: Mapping[str, Scalar],
    download: DownloadCodec | None = None,
    rng: np.random.Generator,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[Weights, Weights | None]:
    """Run the four stages into ``book``; ``(received, mean delta or None if skipped)``.

    ``received`` is the model the devices decoded from the broadcast (what the
    strategy builds on). The survivors are ``book.accepted``; devices caught
    cheating are in ``book.culprits``.

    Raises
    ------
    ValueError
        ``settings.secagg`` is off or malformed, or its bits cannot carry the
        cohort's sum (configuration errors, not device faults).
    """
    parsed = parse_secagg(settings.secagg)
    if parsed is None:
        raise ValueError("secure_sum called with secagg=off")
    server_round = book.server_round
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
    instruction = protocol.TrainInstruction(
        server_round=server_round, seed=settings.seed, compression="none", cohort_size=cohort,
        extra={**settings.client_config, **extra_config})
    train_config = {**instruction.to_record(), m.SPEC: secagg.spec(), m.SEED: seed,
                    m.RANDK: float(randk or 0.0), m.MIN_SUMMANDS: min_summands}

    # A stage reply holds a few entries per neighbour (ids, shares, hashes, the
    # check polynomial): the counting bound grows with the cohort, never the reply.
    limits = protocol.WireLimits(
        max_records=protocol.WIRE_LIMITS.max_records,
        max_entries=protocol.WIRE_LIMITS.max_entries + 16 * cohort)

    def stage(name: str, contents: Mapping[int, RecordDict]) -> None:
        def counted(node: int, reply: Message) -> None:
            book.count_upload(node, reply, limits=limits)
            # Parses, validates and adds; a protocol violation names the node a culprit.
            m.receive_reply(session, name, node, reply)

        exchange(grid, book, f"secagg {name}",
                 {n: Message(c, dst_node_id=n, message_type=MessageType.TRAIN)
                  for n, c in contents.items()}, counted, timeout=settings.round_timeout,
                 clock=clock, sleep=sleep)
        book.culprits.update(session.culprits)

    try:
        stage(m.ADVERTISE, {
            n: RecordDict({protocol.CONFIG: m.advertise_request(session.setup_for(n))})
            for n in nodes})
        session.close_keys()
        stage(m.SHARE_KEYS, {
            n: RecordDict({protocol.CONFIG: m.share_keys_request(server_round,
                                                                 session.roster_for(n))})
            for n in session.u1})
        session.close_shares()
        stage(m.MASK, {
            n: RecordDict({protocol.ARRAYS: broadcast, protocol.CONFIG: ConfigRecord(
                {**train_config, **m.mask_config(server_round, session.inbox_for(n))})})
            for n in session.u2})
        survivors = session.close_masked()
        book.culprits.update(session.culprits)
        for node in set(session.masked) - set(survivors):
            book.reject(node, "secagg masked input", "dropped by the complaints of its "
                        "neighbours (or its own complaints were not believed)")
        stage(m.UNMASK, {
            n: RecordDict({protocol.CONFIG: m.unmask_request(server_round,
                                                             *session.unmask_request(n))})
            for n in survivors})
        total = session.finish()
        book.culprits.update(session.culprits)
    except SecAggAbort as exc:
        book.culprits.update(session.culprits)
        log.warning("round %s: secure aggregation skipped, the model is unchanged: %s",
                    server_round, exc)
        return received, None
    # A survivor that failed in stage 4 still has its input in the sum: it counts as valid.
    for node in survivors:
        book.accept(node)
        if settings.link is not None:
            # Four stages: three more round trips than a plain round; the device's
            # training time is not sent (it would hint at its number of examples).
            book.link_times.append(3 * settings.link.rtt_s + settings.link.client_seconds(
                download_bytes=book.down_of.get(node, 0), upload_bytes=book.up_of.get(node, 0),
                compute_seconds=0.0))
    mean = encoding.decode_sum(total, plan, len(survivors))
    delta: Weights = []
    offset = 0
    for g in received:
        delta.append(mean[offset:offset + g.size].reshape(g.shape).astype(np.float32))
        offset += g.size
    return received, delta


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
