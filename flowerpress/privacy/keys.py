"""Names shared by the device (``dp_mod``) and the server (``ServerPrivacy``).

The message keys are the contract's (:mod:`flowerpress.protocol`), re-exported
under the names privacy code uses. Nothing here loads the server's accountant
(``dp_accounting``, ``scipy``): a device imports it too.
"""

from __future__ import annotations

from typing import Final, Literal

from flowerpress import protocol

ARRAYS: Final = protocol.ARRAYS
CONFIG: Final = protocol.CONFIG
METRICS: Final = protocol.METRICS
PARTITION_ID: Final = protocol.PARTITION_ID
# Train ConfigRecord keys the server sets and the device reads.
CONFIG_DP: Final = protocol.DP
CONFIG_CLIP: Final = protocol.DP_CLIP
#: Size of the cohort the train message went to; each device sizes its share of the
#: distributed noise as ``1/sqrt(clients-per-round)``, so the server must send the
#: size of the cohort that actually runs (``ServerPrivacy.train_config(cohort_size=)``).
CONFIG_CLIENTS_PER_ROUND: Final = protocol.COHORT_SIZE
CONFIG_ROUND: Final = protocol.SERVER_ROUND
CONFIG_SEED: Final = protocol.SEED
# Reply MetricRecord keys: the noised clip indicator and dp_mod's marker.
METRIC_CLIP_INDICATOR: Final = protocol.CLIP_INDICATOR
METRIC_DP_NOISED: Final = protocol.DP_NOISED
METRIC_NUM_EXAMPLES: Final = protocol.NUM_EXAMPLES

# Node config keys a device sets to protect itself (never set by the server).
NODE_MIN_NOISE: Final = "dp-min-noise"
NODE_MAX_CLIP: Final = "dp-max-clip"
NODE_ALLOW_SEEDED: Final = "dp-allow-seeded"
NODE_MODES: Final = "dp-modes"

#: How the server draws each round's cohort; the accountant analyses exactly this.
Sampling = Literal["fixed", "poisson", "predictable"]
SAMPLING_SCHEMES: Final[tuple[Sampling, ...]] = ("fixed", "poisson", "predictable")
