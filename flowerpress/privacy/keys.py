"""Names shared by the device (``dp_mod``) and the server (``ServerPrivacy``).

This module imports nothing: a device imports it without the server's accountant
(``dp_accounting``, ``scipy``), see ARCHITECTURE.md ("Nothing a device runs imports
... the server's accountant").
"""

from __future__ import annotations

from typing import Final, Literal

# Train ConfigRecord keys the server sets and the device reads.
CONFIG_DP: Final = "dp"
CONFIG_CLIP: Final = "dp-clip"
#: Size of the cohort the train message went to; each device sizes its share of the
#: distributed noise as ``1/sqrt(clients-per-round)``, so the server must send the
#: size of the cohort that actually runs (``ServerPrivacy.train_config(cohort_size=)``).
CONFIG_CLIENTS_PER_ROUND: Final = "clients-per-round"
CONFIG_ROUND: Final = "server-round"
CONFIG_SEED: Final = "seed"

# Reply MetricRecord key (noised on the device).
METRIC_CLIP_INDICATOR: Final = "dp-clip-indicator"

# Node config keys a device sets to protect itself (never set by the server).
NODE_MIN_NOISE: Final = "dp-min-noise"
NODE_MAX_CLIP: Final = "dp-max-clip"
NODE_ALLOW_SEEDED: Final = "dp-allow-seeded"
NODE_MODES: Final = "dp-modes"

#: How the server draws each round's cohort; the accountant analyses exactly this.
Sampling = Literal["fixed", "poisson", "predictable"]
SAMPLING_SCHEMES: Final[tuple[Sampling, ...]] = ("fixed", "poisson", "predictable")
