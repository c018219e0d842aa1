"""``dp_mod``: the client-side Flower mod that privatizes the update before upload.

Place it innermost of the privacy/compression mods so the order is
train -> clip -> noise -> compress::

    app = ClientApp(mods=[compression_mod, dp_mod])   # outer ... inner

Everything the reply carries with DP on is either the noised update (added back to
the weights the client received), the noised clip indicator, or a constant:
``num-examples`` is reported as 1 and other metrics (train loss, ...) and records are
withheld, because they are derived from the private data without noise. Error replies
are generic for the same reason: a failing ClientApp's message or exception text (a
loss, a norm) is logged on the device and replaced by a fixed sentence.

This module imports only numpy, Flower and the light parts of ``flowerpress.privacy``:
never ``dp_accounting`` or ``scipy`` (the server's accountant).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode
from numpy.typing import NDArray

from flowerpress.privacy.keys import (
    ARRAYS,
    CONFIG,
    CONFIG_CLIENTS_PER_ROUND,
    CONFIG_CLIP,
    CONFIG_DP,
    CONFIG_ROUND,
    CONFIG_SEED,
    METRIC_CLIP_INDICATOR,
    METRIC_DP_NOISED,
    METRIC_NUM_EXAMPLES,
    METRICS,
    NODE_ALLOW_SEEDED,
    NODE_MAX_CLIP,
    NODE_MIN_NOISE,
    NODE_MODES,
    PARTITION_ID,
)
from flowerpress.privacy.mechanisms import (
    STREAM_COUNT_NOISE,
    STREAM_UPDATE_NOISE,
    add_gaussian_noise,
    clip_inplace,
    gaussian_like,
    opendp_gaussian,
    secure_generator,
    seeded_generator,
)
from flowerpress.privacy.registry import get_clipping, get_mechanism
from flowerpress.privacy.settings import DpSettings, parse_dp

log = logging.getLogger(__name__)

REFUSAL_CODE = ErrorCode.MOD_FAILED_PRECONDITION
#: The only text an error reply carries when the ClientApp fails under DP.
WITHHELD_REASON = (
    "dp_mod: the client app failed; details withheld under differential privacy "
    "(they may depend on the private data) and logged on the device"
)


def _node_float(node_config: Mapping[str, object], key: str) -> float | None:
    if key not in node_config:
        return None
    raw = node_config[key]
    try:
        value = float(raw)  # type: ignore[arg-type]  # UserConfigValue: bool|int|float|str
    except (TypeError, ValueError):
        raise ValueError(f"node config {key} must be a number, got {raw!r}") from None
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"node config {key} must be a finite number >= 0, got {raw!r}")
    return value


def _node_bool(node_config: Mapping[str, object], key: str, default: bool) -> bool:
    if key not in node_config:
        return default
    raw = node_config[key]
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"node config {key} must be true or false, got {raw!r}")


@dataclass(frozen=True)
class DevicePolicy:
    """What a device accepts, from its own node config (never from the server).

    Attributes
    ----------
    min_noise : float or None
        ``dp-min-noise``: refuse a request that leaves this device's own update with a
        noise multiplier (std / clip) below this: ``z_u/sqrt(clients-per-round)`` in
        distributed mode, ``z_u`` in local mode (and refuse DP off).
    max_clip : float or None
        ``dp-max-clip``: refuse a clip norm above this (and refuse DP off).
    allow_seeded : bool
        ``dp-allow-seeded``: accept ``rng=seeded`` (whose noise anyone with the run seed
        can recompute). False unless the node config sets it, on simulation nodes too.
    modes : tuple of str or None
        ``dp-modes``: comma-separated mechanisms this node accepts (e.g. ``local``);
        ``None`` accepts every registered one.
    """

    min_noise: float | None
    max_clip: float | None
    allow_seeded: bool = False
    modes: tuple[str, ...] | None = None

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, object]) -> DevicePolicy:
        """Read the policy; ValueError naming a malformed key."""
        modes: tuple[str, ...] | None = None
        if NODE_MODES in node_config:
            raw = node_config[NODE_MODES]
            if not isinstance(raw, str) or not raw.strip():
                raise ValueError(
                    f"node config {NODE_MODES} must be a comma-separated list of DP mechanisms, "
                    f"got {raw!r}"
                )
            modes = tuple(m.strip().lower() for m in raw.split(",") if m.strip())
        return cls(
            min_noise=_node_float(node_config, NODE_MIN_NOISE),
            max_clip=_node_float(node_config, NODE_MAX_CLIP),
            allow_seeded=_node_bool(node_config, NODE_ALLOW_SEEDED, False),
            modes=modes,
        )

    def refusal(
        self, settings: DpSettings | None, clip: float | None, *, cohort_size: int = 1
    ) -> str | None:
        """Reason to refuse this request, or None to accept it.

        ``cohort_size`` is the request's ``clients-per-round``: in distributed mode this
        device adds only ``1/sqrt(cohort_size)`` of the noise.
        """
        if settings is None:
            if self.min_noise or self.max_clip is not None:
                return (
                    f"dp_mod refused: the server asked for dp=off but this node requires "
                    f"noise >= {self.min_noise or 0:g} ({NODE_MIN_NOISE}) and clip <= "
                    f"{self.max_clip if self.max_clip is not None else 'inf'} ({NODE_MAX_CLIP})"
                )
            return None
        if self.modes is not None and settings.mode not in self.modes:
            return (
                f"dp_mod refused: requested mode {settings.mode} is not in this node's "
                f"{NODE_MODES}={','.join(self.modes)}"
            )
        own = device_noise_multiplier(settings, cohort_size=cohort_size)
        if self.min_noise is not None and own < self.min_noise:
            return (
                f"dp_mod refused: the request leaves this device's update with noise "
                f"multiplier {own:g} (mode {settings.mode}, z={settings.noise:g}, "
                f"{CONFIG_CLIENTS_PER_ROUND}={cohort_size}), below this node's "
                f"{NODE_MIN_NOISE}={self.min_noise:g}"
            )
        if self.max_clip is not None and clip is not None and clip > self.max_clip:
            return (
                f"dp_mod refused: requested clip {clip:g} is above this node's "
                f"{NODE_MAX_CLIP}={self.max_clip:g}"
            )
        if settings.rng == "seeded" and not self.allow_seeded:
            return (
                "dp_mod refused: rng=seeded lets the server recompute the noise; this node "
                f"accepts it only with {NODE_ALLOW_SEEDED}=true"
            )
        return None


def device_noise_multiplier(settings: DpSettings, *, cohort_size: int) -> float:
    """Noise std / clip this device adds to its own update for ``settings``.

    The mechanism's share for a cohort of ``settings.noise_cohort(cohort_size)``:
    with ``honest=h`` the noise is sized as if only ``ceil(h c)`` devices added any.
    """
    update_noise = get_clipping(settings.clipping).update_noise_multiplier(settings)
    return get_mechanism(settings.mode).device_noise_multiplier(
        update_noise, cohort_size=settings.noise_cohort(cohort_size)
    )


def _is_train(msg: Message) -> bool:
    kind = msg.metadata.message_type
    return kind == MessageType.TRAIN or kind.startswith(MessageType.TRAIN + ".")


def _config_int(config: ConfigRecord, key: str, *, minimum: int) -> int:
    if key not in config:
        raise ValueError(f"dp_mod: train config lacks {key!r}")
    raw = config[key]
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < minimum:
        raise ValueError(f"dp_mod: train config {key!r} must be an int >= {minimum}, got {raw!r}")
    return raw


def _ordered_arrays(content: RecordDict, what: str) -> dict[str, NDArray[np.floating]]:
    record = content.array_records.get(ARRAYS)
    if record is None:
        raise ValueError(f"dp_mod: {what} message has no {ARRAYS!r} ArrayRecord")
    arrays: dict[str, NDArray[np.floating]] = {}
    for key, array in record.items():
        value = array.numpy()
        if not np.issubdtype(value.dtype, np.floating):
            raise ValueError(
                f"dp_mod: {what} array {key!r} has dtype {value.dtype}; expected floating point"
            )
        arrays[key] = value
    return arrays


def _client_id(context: Context) -> int:
    if PARTITION_ID in context.node_config:
        raw = context.node_config[PARTITION_ID]
        try:
            return int(raw)
        except (TypeError, ValueError):
            raise ValueError(f"node config {PARTITION_ID} must be an int, got {raw!r}") from None
    return int(context.node_id)


def _refuse(msg: Message, reason: str) -> Message:
    log.warning("%s", reason)
    return Message(Error(code=REFUSAL_CODE, reason=reason), reply_to=msg)


def _withheld(msg: Message, code: int, detail: str) -> Message:
    # The detail may quote a local loss or norm: it stays in the device's log.
    log.warning("dp_mod: client app failed (withheld from the reply): %s", detail)
    return Message(Error(code=code, reason=WITHHELD_REASON), reply_to=msg)


def dp_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Clip the client's update to C and add Gaussian noise before it leaves the device.

    Implements the client side of DP-FedAvg (McMahan et al. 2018) with optional adaptive
    clipping (Andrew et al. 2021). Handles ``train`` messages; others pass through.

    The train ConfigRecord ``"config"`` carries ``"dp"`` (spec, see
    :func:`flowerpress.privacy.parse_dp`), ``"dp-clip"`` (current clip; defaults to the
    spec's), ``"clients-per-round"`` (distributed mode), and ``"seed"`` and
    ``"server-round"`` (``rng=seeded``).

    Raises
    ------
    ValueError
        The request or the node config is malformed (names the key). Flower turns it into
        an error reply.

    Returns
    -------
    Message
        The reply with ``"arrays"`` = received weights + privatized delta and a metric
        record holding only ``num-examples`` = 1 and, with adaptive clipping, the noised
        ``dp-clip-indicator``; or an error reply with code ``MOD_FAILED_PRECONDITION``
        when the request is weaker than the node's ``dp-min-noise`` / ``dp-max-clip`` /
        ``dp-modes`` / ``dp-allow-seeded``; or, when the ClientApp fails, an error reply
        with its code and the fixed :data:`WITHHELD_REASON`.
    """
    if not _is_train(msg):
        return call_next(msg, context)
    policy = DevicePolicy.from_node_config(context.node_config)
    config = msg.content.config_records.get(CONFIG, ConfigRecord())
    settings = parse_dp(str(config.get(CONFIG_DP, "off")))
    if settings is None:
        reason = policy.refusal(None, None)
        return _refuse(msg, reason) if reason else call_next(msg, context)

    raw_clip = config.get(CONFIG_CLIP, settings.clip)
    if isinstance(raw_clip, bool) or not isinstance(raw_clip, int | float):
        raise ValueError(f"dp_mod: train config {CONFIG_CLIP!r} must be a number, got {raw_clip!r}")
    clip = float(raw_clip)
    if not (math.isfinite(clip) and clip > 0.0):
        raise ValueError(f"dp_mod: train config {CONFIG_CLIP!r} must be > 0, got {clip!r}")
    if settings.adaptive and settings.count_noise is None:
        raise ValueError("dp_mod: adaptive clipping request lacks count-noise in 'dp'")
    mechanism = get_mechanism(settings.mode)
    clients = (
        1 if mechanism.per_update else _config_int(config, CONFIG_CLIENTS_PER_ROUND, minimum=1)
    )
    reason = policy.refusal(settings, clip, cohort_size=clients)
    if reason:
        return _refuse(msg, reason)

    if settings.rng == "seeded":
        seed = _config_int(config, CONFIG_SEED, minimum=0)
        server_round = _config_int(config, CONFIG_ROUND, minimum=0)
        client = _client_id(context)
        rng_update = seeded_generator(
            seed=seed, client_id=client, server_round=server_round, stream=STREAM_UPDATE_NOISE
        )
        rng_count = seeded_generator(
            seed=seed, client_id=client, server_round=server_round, stream=STREAM_COUNT_NOISE
        )
    else:
        rng_update = secure_generator()
        rng_count = rng_update

    received = _ordered_arrays(msg.content, "incoming")
    try:
        reply = call_next(msg, context)
    except Exception as exc:  # any failure: its text may quote private values
        return _withheld(msg, ErrorCode.CLIENT_APP_RAISED_EXCEPTION, repr(exc))
    if reply.has_error():
        return _withheld(msg, reply.error.code, str(reply.error.reason))
    local = _ordered_arrays(reply.content, "reply")
    if list(local) != list(received):
        raise ValueError("dp_mod: reply array keys differ from the received model's keys")
    for key, value in local.items():
        if value.shape != received[key].shape:
            raise ValueError(
                f"dp_mod: reply array {key!r} has shape {value.shape}, "
                f"received {received[key].shape}"
            )

    # clip -> noise, all in float64; the raw norm stays in this frame.
    delta = [local[k].astype(np.float64) - received[k].astype(np.float64) for k in local]
    norm = clip_inplace(delta, clip=clip)
    own = device_noise_multiplier(settings, cohort_size=clients)
    if settings.rng == "opendp":
        noised = [opendp_gaussian(d, std=own * clip) for d in delta]
    else:
        noised = add_gaussian_noise(delta, std=own * clip, rng=rng_update)
    del delta

    out = ArrayRecord()
    for (key, value), noisy in zip(local.items(), noised, strict=True):
        out[key] = Array((received[key].astype(np.float64) + noisy).astype(value.dtype))
    # The marker tells the server this reply went through dp_mod (the DP reply
    # contract); nothing else derived from the data leaves the device.
    metrics = MetricRecord({METRIC_NUM_EXAMPLES: 1, METRIC_DP_NOISED: 1})
    if settings.adaptive and settings.count_noise is not None:
        indicator = 1.0 if norm <= clip else 0.0
        count_std = mechanism.device_noise_multiplier(
            settings.count_noise, cohort_size=settings.noise_cohort(clients))
        if settings.rng == "opendp":
            released = float(opendp_gaussian(np.array([indicator]), std=count_std)[0])
        else:
            released = indicator + float(gaussian_like((), std=count_std, rng=rng_count))
        metrics[METRIC_CLIP_INDICATOR] = released
    reply.content = RecordDict({ARRAYS: out, METRICS: metrics})
    return reply
