"""``secagg_mod``: the device side of secure aggregation, as a Flower mod.

Place it innermost, after flowerpress's other mods::

    app = ClientApp(mods=[compression_mod, dp_mod, secagg_mod])

It handles only train messages that carry a SecAgg stage (``"secagg-stage"``
in ``"config"``) and passes every other message through untouched, so it is a
no-op unless the server runs a ``secagg`` round. For the four stages it

1. ``advertise``: draws fresh key pairs and a self-mask seed, keeps them in
   ``Context.state`` (:data:`STATE_KEY`), replies with the public keys and a
   commitment;
2. ``share-keys``: replies with encrypted Shamir shares for its neighbours;
3. ``mask``: lets the ClientApp train (``call_next``), then turns
   ``local - received`` into the clipped, rotated, rounded, noised (with
   ``noise > 0``) vector modulo ``2**bits`` (:mod:`flowerpress.secagg.encoding`),
   masks it and replies with the packed masked vector and its complaints (with
   their evidence) only: no weights, no metrics, no timing (``num-examples``,
   the loss and the training time would leak what the sum hides; the
   compression mod outside it adds no ``download`` record to a secure stage);
4. ``unmask``: reveals the shares the server may have, once.

A request a device must refuse (a replay, a stage out of order, an unmask
request naming a device both alive and dropped) gets an error reply, as does
any malformed request; the secrets never leave ``Context.state``.
"""

from __future__ import annotations

import logging
import random

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode

from flowerpress.secagg import encoding
from flowerpress.secagg import messages as m
from flowerpress.secagg.core import (
    ClientSession,
    PublicKeys,
    StageError,
    client_advertise,
    client_mask,
    client_share_keys,
    client_unmask,
)
from flowerpress.secagg.settings import parse_secagg

log = logging.getLogger(__name__)

#: Where the round's secrets live in ``Context.state`` (never in a reply).
STATE_KEY = "flowerpress.secagg"
REFUSAL_CODE = ErrorCode.MOD_FAILED_PRECONDITION


def _refuse(msg: Message, reason: str) -> Message:
    log.warning("secagg_mod refused: %s", reason)
    return Message(Error(code=REFUSAL_CODE, reason=f"secagg_mod refused: {reason}"),
                   reply_to=msg)


def _config(msg: Message) -> ConfigRecord:
    return msg.content.config_records.get("config", ConfigRecord())


def _int(config: ConfigRecord, key: str) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise StageError(f"{key!r} must be an int")
    return value


def _byte_list(config: ConfigRecord, key: str, count: int) -> list[bytes]:
    value = config.get(key)
    if count == 0 and value in (None, []):
        return []
    if not isinstance(value, list) or len(value) != count:
        raise StageError(f"{key!r} must hold {count} byte strings")
    out = [v for v in value if isinstance(v, bytes)]
    if len(out) != count:
        raise StageError(f"{key!r} must hold {count} byte strings")
    return out


def _load(context: Context, round_id: int) -> ClientSession:
    record = context.state.config_records.get(STATE_KEY)
    if record is None:
        raise StageError("no SecAgg session on this device (stage out of order)")
    session = ClientSession.from_record(dict(record))
    if session.round_id != round_id:
        raise StageError(f"request for round {round_id}, the session is for round "
                         f"{session.round_id}")
    return session


def _save(context: Context, session: ClientSession) -> None:
    context.state[STATE_KEY] = ConfigRecord(session.to_record())


def _reply(msg: Message, record: ConfigRecord) -> Message:
    # The stage's record and nothing else (messages.REPLY_KEYS; the server refuses more).
    return Message(RecordDict({m.RECORD: record}), reply_to=msg)


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run this device's part of a SecAgg round (see the module doc); pass other messages."""
    stage = m.stage_of(msg)
    if stage is None or msg.metadata.message_type.split(".")[0] != "train":
        return call_next(msg, context)
    try:
        return _handle(stage, msg, context, call_next)
    except (StageError, ValueError, KeyError, TypeError) as exc:
        return _refuse(msg, f"{stage}: {exc}")


def _handle(stage: str, msg: Message, context: Context, call_next: ClientAppCallable
            ) -> Message:
    config = _config(msg)
    round_id = _int(config, m.ROUND)
    if stage == m.ADVERTISE:
        old = context.state.config_records.get(STATE_KEY)
        if old is not None and ClientSession.from_record(dict(old)).round_id == round_id:
            raise StageError(f"round {round_id} was already keyed (replayed advertise)")
        session, keys = client_advertise(
            node=context.node_id, round_id=round_id, bits=_int(config, m.BITS),
            length=_int(config, m.LENGTH), threshold=_int(config, m.THRESHOLD),
            neighbours=m.unpack_ids(config.get(m.NEIGHBOURS), what="neighbours"))
        _save(context, session)
        return _reply(msg, m.advertise_reply(keys))
    session = _load(context, round_id)
    if stage == m.SHARE_KEYS:
        peers = m.unpack_ids(config.get(m.PEERS), what="peers")
        c_pk, s_pk, b_commit = (_byte_list(config, k, len(peers))
                                for k in (m.PEER_C, m.PEER_S, m.PEER_B))
        roster = {p: PublicKeys(c, s, b)
                  for p, c, s, b in zip(peers, c_pk, s_pk, b_commit, strict=True)}
        session, cts = client_share_keys(session, roster)
        _save(context, session)
        return _reply(msg, m.share_keys_reply(cts))
    if stage == m.MASK:
        return _mask(msg, context, call_next, session, config)
    if stage == m.UNMASK:
        session, b, sk = client_unmask(session,
                                       m.unpack_ids(config.get(m.ALIVE), what="alive"),
                                       m.unpack_ids(config.get(m.DROPPED), what="dropped"))
        _save(context, session)
        return _reply(msg, m.unmask_reply(b, sk))
    raise StageError(f"unknown stage {stage!r}")


def _mask(msg: Message, context: Context, call_next: ClientAppCallable,
          session: ClientSession, config: ConfigRecord) -> Message:
    if session.stage != 2:
        raise StageError(f"masked-input request in stage {session.stage} (replayed?)")
    settings = parse_secagg(str(config.get(m.SPEC, "")))
    if settings is None:
        raise StageError("mask request without secagg settings")
    senders = m.unpack_ids(config.get(m.INBOX_FROM), what="inbox")
    cts = _byte_list(config, m.INBOX, len(senders))
    inbox = dict(zip(senders, cts, strict=True))
    record = msg.content.array_records.get("arrays")
    if record is None:
        raise StageError("mask request carries no model")
    received = [np.asarray(a, dtype=np.float64) for a in record.to_numpy_ndarrays()]
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    local_record = reply.content.array_records.get("arrays")
    if local_record is None:
        raise StageError("the ClientApp's train reply carries no weights")
    local = local_record.to_numpy_ndarrays()
    if len(local) != len(received) or any(
            np.shape(a) != b.shape for a, b in zip(local, received, strict=True)):
        raise StageError("the train reply's weights differ in shape from the model's")
    flat = np.concatenate([(np.asarray(a, dtype=np.float64) - b).ravel()
                           for a, b in zip(local, received, strict=True)])
    randk = config.get(m.RANDK, 0.0)
    plan = encoding.make_plan(
        dim=flat.size, bits=settings.bits, clip=settings.clip, noise=settings.noise,
        cohort=_int(config, "clients-per-round"), min_summands=_int(config, m.MIN_SUMMANDS),
        seed=_int(config, m.SEED),
        randk=float(randk) if isinstance(randk, float) and randk > 0 else None)
    if plan.padded != session.length:
        raise StageError(f"the model encodes to {plan.padded} words, the round expects "
                         f"{session.length}")
    words, _ = encoding.encode_update(flat, plan, rng=np.random.default_rng(),
                                      noise_rng=random.SystemRandom())
    session, masked, complaints = client_mask(session, inbox, words)
    _save(context, session)
    return _reply(msg, m.mask_reply(encoding.pack_words(masked, session.bits), complaints))
