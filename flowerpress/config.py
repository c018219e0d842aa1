"""Run configuration: one schema for `flwr run`, the CLI and Python.

The keys are those of ``[tool.flwr.app.config]`` in the project's pyproject
(a test keeps the two in step). Values arrive as TOML scalars (from Flower's
run config or a ``--config`` file) or as strings (from ``--set KEY=VALUE``);
:func:`validate` turns either into typed values and raises :class:`ConfigError`
with a single line naming the key and what it accepts.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Scalar = bool | int | float | str
Config = dict[str, Scalar]
SpecCheck = Callable[[str], object]


class ConfigError(ValueError):
    """A run-config key is unknown or its value is not allowed."""


@dataclass(frozen=True)
class Key:
    """One run-config key: its type, default and what values it allows."""

    kind: type  # int, float, str or bool
    default: Scalar
    help: str
    minimum: float | None = None
    maximum: float | None = None
    # Checks a string value (a spec); raises ValueError with the reason.
    check: SpecCheck | None = None


_PARTITION_RE = re.compile(r"^(iid|dirichlet:(\d+(\.\d*)?|\.\d+)|shard:\d+)$")
_DATASET_RE = re.compile(r"^(mnist|digits|synthetic:[0-9.]+,[0-9.]+|hub:.+)$")


def _check_partition(value: str) -> object:
    if not _PARTITION_RE.match(value):
        raise ValueError("expected iid, dirichlet:ALPHA (ALPHA > 0) or shard:K")
    if value.startswith("dirichlet:") and float(value.split(":", 1)[1]) <= 0:
        raise ValueError("dirichlet ALPHA must be > 0")
    if value.startswith("shard:") and int(value.split(":", 1)[1]) < 1:
        raise ValueError("shard K must be >= 1")
    return value


def _check_dataset(value: str) -> object:
    if not _DATASET_RE.match(value):
        raise ValueError(
            "expected mnist, digits, synthetic:ALPHA,BETA or hub:NAME (a flwr-datasets name)"
        )
    return value


def _check_plugins(value: str) -> object:
    from flowerpress.registry import import_plugins

    return import_plugins(value)


def _check_task(value: str) -> object:
    if not value:
        return value
    from flowerpress.registry import parse_args
    from flowerpress.tasks.registry import TASKS

    cls, args = TASKS.resolve(value)
    return parse_args(value, cls, args, kind="task", error=ValueError)


def _check_model(value: str) -> object:
    from flowerpress.tasks.models import MODELS

    if value not in MODELS:
        raise ValueError(f"expected one of {', '.join(MODELS)}")
    return value


def _check_compression(value: str) -> object:
    from flowerpress.compression import parse

    return parse(value)


def _check_download_compression(value: str) -> object:
    pipeline = _check_compression(value)
    if getattr(pipeline, "flat", False):
        # A device decodes a download into the model's shapes itself; only the
        # server splits a flat vector (protocol.decode_weights).
        raise ValueError("flat is an upload stage; a download spec cannot use it")
    if getattr(pipeline, "ef21", False):
        raise ValueError("ef21 is an upload stage; a download spec cannot use it")
    return pipeline


def _check_first_compression(value: str) -> object:
    return None if value.strip() in ("", "off") else _check_download_compression(value)


def _check_dp(value: str) -> object:
    from flowerpress.privacy import parse_dp

    return parse_dp(value)


def _check_sampling(value: str) -> object:
    if value not in ("fixed", "poisson", "predictable"):
        raise ValueError("expected fixed (OS CSPRNG, amplified), poisson (OS CSPRNG) or "
                         "predictable (seeded, reproducible, no amplification)")
    return value


def _check_strategy(value: str) -> object:
    from flowerpress.strategies import build_strategy

    return build_strategy(value)


def _check_secagg(value: str) -> object:
    from flowerpress.secagg.settings import parse_secagg

    return parse_secagg(value)


def _check_prune(value: str) -> object:
    from flowerpress.compression.mask import parse_prune

    return parse_prune(value)


def _check_link(value: str) -> object:
    return parse_link(value)


def _check_attack(value: str) -> object:
    from flowerpress.simulations.attacks import parse_attack

    return parse_attack(value)


SCHEMA: dict[str, Key] = {
    # --- the user's code: imported first, everywhere -----------------------------
    "plugins": Key(str, "", "comma-separated modules imported on the server and every node "
                   "before any spec is parsed, e.g. mypkg.codecs,mypkg.strategies (they "
                   "register names)", check=_check_plugins),
    # --- what to learn ---------------------------------------------------------
    "task": Key(str, "", "empty (the bundled `dataset`), a registered task or "
                "package.module:Class[:ARG=V,...]", check=_check_task),
    "dataset": Key(str, "mnist", "mnist | digits | synthetic:A,B | hub:NAME", check=_check_dataset),
    "partition": Key(str, "dirichlet:0.5", "iid | dirichlet:ALPHA | shard:K",
                     check=_check_partition),
    "model": Key(str, "auto", "auto | cnn | mlp | logreg", check=_check_model),
    "num-clients": Key(int, 50, "number of simulated clients", minimum=1, maximum=100_000),
    "clients-per-round": Key(int, 10, "clients sampled each round", minimum=1, maximum=100_000),
    "rounds": Key(int, 20, "federated rounds", minimum=1, maximum=100_000),
    # --- local training ----------------------------------------------------------
    "local-epochs": Key(int, 2, "local epochs per round", minimum=1, maximum=1000),
    "batch-size": Key(int, 16, "local mini-batch size", minimum=1, maximum=1_000_000),
    "lr": Key(float, 0.1, "local SGD learning rate", minimum=0.0, maximum=100.0),
    "seed": Key(int, 0, "root seed: partitions, sampling, training", minimum=0, maximum=2**31 - 1),
    # --- the round loop ----------------------------------------------------------
    "round-timeout": Key(float, 120.0, "seconds to wait for replies", minimum=0.01, maximum=1e6),
    "min-replies": Key(int, 1, "valid replies a round needs", minimum=1, maximum=100_000),
    "max-client-weight": Key(float, 1_000_000.0, "cap on a reply's num-examples weight",
                             minimum=1.0, maximum=1e12),
    "max-missed-rounds": Key(int, 3, "skip a node that missed this many rounds in a row "
                             "until it answers again (0: never skip)", minimum=0,
                             maximum=100_000),
    "max-rejected-rounds": Key(int, 3, "fail the run when every reply of this many rounds in a "
                               "row was rejected for the same reason (0: never)", minimum=0,
                               maximum=100_000),
    "max-update-norm": Key(float, 0.0, "clip each update to this L2 norm before the strategy "
                           "(Sun et al. 2019); 0: derived from the model and the run "
                           "(4x the last round's median norm; never off; under DP "
                           "C + sigma (sqrt(d) + 20)), see flowerpress/server/bounds.py",
                           minimum=0.0, maximum=1e30),
    # --- later capabilities -------------------------------------------------------
    "compression": Key(str, "none", "upload codec spec, e.g. topk:0.01+q:8+ef+zstd",
                       check=_check_compression),
    "download-compression": Key(str, "none", "broadcast codec spec, e.g. fp16 or q:8; with "
                                "download-history: the codec of each device's difference",
                                check=_check_download_compression),
    "compression-warmup": Key(int, 0, "rounds of top-k density warm-up (DGC): round r <= K "
                              "sends density F**(r/(K+1)); 0: off", minimum=0, maximum=1000),
    "download-history": Key(float, 0.0, "MB of devices' models kept to send each device the "
                            "compressed difference from the model it holds; 0: off",
                            minimum=0.0, maximum=1e6),
    "train-metrics": Key(bool, True, "train replies carry the task's training metrics "
                         "(train-loss, local-steps, ...); false: only num-examples and DP's "
                         "markers, about 50 bytes less per reply (a strategy that reads a "
                         "metric needs true)"),
    "ef21-memory": Key(float, 64.0, "MB of devices' EF21 upload estimates the server keeps "
                       "(upload specs with ef21); the least recently used device is "
                       "forgotten first and restarts from zero", minimum=0.000001,
                       maximum=1e6),
    "download-full-compression": Key(str, "q:8", "codec of the full model a device without a "
                                     "usable version gets (download-history only)",
                                     check=_check_download_compression),
    "download-first-compression": Key(str, "", "codec of a new device's first download, the "
                                      "difference from the initial model it builds itself "
                                      "(download-history only; empty: download-compression; off: "
                                      "the full model)",
                                      check=_check_first_compression),
    "link": Key(str, "up:1mbit,down:10mbit,rtt:50ms", "devices' link for the round-time "
                "estimate: up:RATE,down:RATE,rtt:TIME (RATE in bit/kbit/mbit/gbit, TIME in "
                "ms/s), or none", check=_check_link),
    "dp": Key(str, "off", "off | local:clip=C,noise=Z | distributed:clip=C,noise=Z",
              check=_check_dp),
    "dp-sampling": Key(str, "fixed", "fixed | poisson | predictable: how DP cohorts are drawn",
                       check=_check_sampling),
    "dp-delta": Key(float, 1e-5, "delta of the (epsilon, delta) guarantee", minimum=0.0,
                    maximum=1.0),
    "max-epsilon": Key(float, 0.0, "stop before exceeding this epsilon (0: no limit)",
                       minimum=0.0, maximum=1e6),
    "strategy": Key(str, "fedavg", "registered name, module:Class or flwr:NAME",
                    check=_check_strategy),
    "attack": Key(str, "none", "none | signflip:fraction=F,scale=S | noise:fraction=F,std=S",
                  check=_check_attack),
    "secagg": Key(str, "off", "off | on[:threshold=T,bits=B,clip=C,noise=Z,degree=K] (secure "
                  "aggregation)", check=_check_secagg),
    "prune": Key(str, "none", "none | magnitude:sparsity=S,start=A,end=B: the server prunes "
                  "the global model (global magnitude, cubic schedule from round A to B); "
                  "devices train the masked model and upload only unmasked coordinates",
                  check=_check_prune),
    "out-dir": Key(str, "", "where the ServerApp writes results.json (empty: not written)"),
    "resume": Key(bool, False, "continue from the checkpoint in out-dir (none there: start)"),
    "overwrite": Key(bool, False, "start a new run in an out-dir holding another run's "
                     "results or checkpoint, removing them"),
}

DEFAULTS: Config = {name: key.default for name, key in SCHEMA.items()}

#: Keys only a task reads (:meth:`flowerpress.tasks.Task.from_run_config`); neither the
#: server nor a device does. A task declares those it takes
#: (``Task.run_config_keys``); a run config may not set the others to a non-default
#: value, and results.json leaves them out (they did not run).
TASK_KEYS: tuple[str, ...] = ("dataset", "partition", "model", "local-epochs", "batch-size",
                              "lr")


def _coerce(name: str, key: Key, raw: object) -> Scalar:
    """Convert ``raw`` to the key's type or raise ConfigError."""
    allowed = f"{key.kind.__name__}: {key.help}"
    value: Scalar
    if key.kind is bool:
        if isinstance(raw, bool):
            value = raw
        elif isinstance(raw, str) and raw.lower() in ("true", "false", "1", "0"):
            value = raw.lower() in ("true", "1")
        else:
            raise ConfigError(f"{name}={raw!r} is not allowed; expected true or false")
    elif key.kind is int:
        if isinstance(raw, bool):
            raise ConfigError(f"{name}={raw!r} is not allowed; expected {allowed}")
        try:
            value = int(raw) if isinstance(raw, int) else int(str(raw), 10)
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not allowed; expected {allowed}") from None
    elif key.kind is float:
        if isinstance(raw, bool):
            raise ConfigError(f"{name}={raw!r} is not allowed; expected {allowed}")
        try:
            value = float(raw) if isinstance(raw, int | float) else float(str(raw))
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not allowed; expected {allowed}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{name}={raw!r} is not allowed; expected a finite number")
    else:
        if not isinstance(raw, str):
            raise ConfigError(f"{name}={raw!r} is not allowed; expected a string: {key.help}")
        value = raw.strip()
    if isinstance(value, int | float) and not isinstance(value, bool):
        if key.minimum is not None and value < key.minimum:
            raise ConfigError(f"{name}={raw!r} is not allowed; must be >= {key.minimum:g}")
        if key.maximum is not None and value > key.maximum:
            raise ConfigError(f"{name}={raw!r} is not allowed; must be <= {key.maximum:g}")
    if key.check is not None and isinstance(value, str):
        try:
            key.check(value)
        except ValueError as exc:
            reason = str(exc).splitlines()[0] if str(exc) else "invalid value"
            raise ConfigError(f"{name}={raw!r} is not allowed: {reason}") from None
    return value


def validate(values: Mapping[str, object], *, strict: bool = True) -> Config:
    """Return the full, typed configuration: defaults overlaid with ``values``.

    Parameters
    ----------
    values
        Keys and raw values (strings from the command line or TOML scalars).
    strict
        Refuse unknown keys. The ServerApp passes ``False`` for Flower's run
        config, which may carry keys of a user's own app; they are ignored.

    Raises
    ------
    ConfigError
        One line naming the key and what it accepts.
    """
    config: Config = dict(DEFAULTS)
    # Plug-ins first: the specs of the other keys may name what they register.
    ordered = sorted(values.items(), key=lambda item: item[0] != "plugins")
    for name, raw in ordered:
        key = SCHEMA.get(name)
        if key is None:
            if strict:
                known = ", ".join(SCHEMA)
                raise ConfigError(f"unknown key {name!r}; known keys: {known}")
            continue
        config[name] = _coerce(name, key, raw)
    cpr, n = int(config["clients-per-round"]), int(config["num-clients"])
    if cpr > n:
        raise ConfigError(
            f"clients-per-round={cpr} is not allowed; must be <= num-clients ({n})"
        )
    if int(config["min-replies"]) > cpr:
        raise ConfigError(
            f"min-replies={config['min-replies']} is not allowed; "
            f"must be <= clients-per-round ({cpr})"
        )
    if any(config[name] != DEFAULTS[name] for name in TASK_KEYS):
        from flowerpress.tasks.registry import TASKS, task_spec

        spec = task_spec(config)
        check_task_keys(config, TASKS.resolve(spec)[0].run_config_keys, task=spec)
    if str(config["prune"]).lower() not in ("", "none", "off"):
        line = _prune_refusal(config)
        if line:
            raise ConfigError(f"prune={config['prune']!r} is not allowed: {line}")
    if str(config["secagg"]) not in ("", "off"):
        from flowerpress.secagg.settings import refusal_of_config

        line = refusal_of_config(config)
        if line:
            raise ConfigError(f"secagg={config['secagg']!r} is not allowed: {line}")
    return config


def _prune_refusal(config: Mapping[str, Scalar]) -> str | None:
    """Why ``prune`` cannot run with the rest of ``config``, or None."""
    from flowerpress.compression import parse

    if str(config["secagg"]) not in ("", "off"):
        return ("secure aggregation sums fixed-size masked vectors its devices agreed on "
                "before the round; a mask that changes every round is not supported "
                "(set secagg=off)")
    if parse(str(config["compression"])).ef21:
        return ("ef21 keeps per-device estimates in the model's shape across rounds; the "
                "gathered upload changes size as the mask grows (drop ef21)")
    return None


def check_task_keys(config: Mapping[str, object], taken: Collection[str], *,
                    task: str) -> None:
    """Refuse a task-only key (:data:`TASK_KEYS`) set to a non-default value the task ignores.

    Parameters
    ----------
    config
        The run config (keys missing from it count as their defaults).
    taken
        The run-config keys the task reads (``Task.run_config_keys``; none for a
        task object, which is built before any run config exists).
    task
        The task's spec or ``module:Class``, for the message.

    Raises
    ------
    ConfigError
        One line naming the first such key, the task and the keys it does take.
    """
    for name in TASK_KEYS:
        value = config.get(name, DEFAULTS[name])
        if name in taken or value == DEFAULTS[name]:
            continue
        takes = ", ".join(k for k in TASK_KEYS if k in taken) or "none of them"
        raise ConfigError(
            f"{name}={value!r} is not allowed: task {task!r} does not take {name} (of "
            f"{', '.join(TASK_KEYS)} it takes {takes}); set it in the task's spec or "
            "constructor instead")


def parse_assignments(items: list[str]) -> dict[str, str]:
    """Parse ``KEY=VALUE`` strings (from ``--set``) into a dict."""
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} is not allowed; expected KEY=VALUE")
        name, value = item.split("=", 1)
        out[name.strip()] = value
    return out


def read_toml(path: Path, *, what: str, missing: str = "") -> dict[str, Any]:
    """The TOML document in ``path``, or ConfigError in one line naming ``what`` and the file."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{what} {str(path)!r} not found{missing}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{what} {str(path)!r} is not valid TOML: {exc}") from None


def load_toml(path: Path) -> dict[str, object]:
    """Read run-config keys from a TOML file.

    The keys may sit at the top level or under ``[tool.flwr.app.config]`` (so
    a project's pyproject.toml works as a config file too).
    """
    data = read_toml(path, what="config file", missing="; expected a TOML file")
    section = data.get("tool", {}).get("flwr", {}).get("app", {}).get("config")
    if isinstance(section, dict):
        return dict(section)
    return dict(data)


# --- the devices' link profile -------------------------------------------------------

_RATE_UNITS = {"bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
_TIME_UNITS = {"ms": 1e-3, "s": 1.0}
_LINK_PART = re.compile(r"^(up|down|rtt):(\d+(?:\.\d*)?|\.\d+)([a-z]+)$")


@dataclass(frozen=True)
class LinkProfile:
    """A device's link: the round-time estimate of results.json (``link_seconds``).

    A device's time in a round is ``rtt + 8 * download / down + compute + 8 *
    upload / up``: one round trip for the request, its download and upload at
    the link's rates (message bytes as Flower sends them) and its local
    training time as the device measured it. Devices work in parallel, so the
    round takes the slowest device's time; server-side work is not counted.
    """

    up_bps: float  # bits per second, device -> server
    down_bps: float  # bits per second, server -> device
    rtt_s: float  # seconds

    def client_seconds(self, *, download_bytes: int, upload_bytes: int,
                       compute_seconds: float) -> float:
        """One device's time in a round."""
        return (self.rtt_s + 8.0 * download_bytes / self.down_bps + compute_seconds
                + 8.0 * upload_bytes / self.up_bps)

    def round_seconds(self, client_seconds: list[float]) -> float:
        """The round's time: its slowest device (0 when none replied)."""
        return max(client_seconds, default=0.0)


def parse_link(text: str) -> LinkProfile | None:
    """``up:1mbit,down:10mbit,rtt:50ms`` as a :class:`LinkProfile`; ``none`` gives None.

    Raises
    ------
    ValueError
        Naming the part that is not ``up:RATE``, ``down:RATE`` or ``rtt:TIME``,
        a missing or repeated part, or a rate that is not positive.
    """
    value = text.strip().lower()
    if value in ("", "none", "off"):
        return None
    parts: dict[str, float] = {}
    for raw in value.split(","):
        match = _LINK_PART.match(raw.strip())
        if match is None:
            raise ValueError(f"link part {raw.strip()!r}: expected up:RATE, down:RATE or "
                             "rtt:TIME, e.g. up:1mbit,down:10mbit,rtt:50ms")
        name, number, unit = match.group(1), float(match.group(2)), match.group(3)
        units = _TIME_UNITS if name == "rtt" else _RATE_UNITS
        if unit not in units:
            raise ValueError(f"link part {raw.strip()!r}: unit {unit!r} is not one of "
                             f"{', '.join(units)}")
        if name in parts:
            raise ValueError(f"link part {name!r} given twice")
        parts[name] = number * units[unit]
    missing = [k for k in ("up", "down", "rtt") if k not in parts]
    if missing:
        raise ValueError(f"link lacks {', '.join(missing)}; expected up:RATE,down:RATE,rtt:TIME")
    if parts["up"] <= 0 or parts["down"] <= 0:
        raise ValueError("link rates must be > 0")
    return LinkProfile(up_bps=parts["up"], down_bps=parts["down"], rtt_s=parts["rtt"])
