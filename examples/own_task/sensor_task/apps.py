"""The Flower apps of this example, built with flowerpress's public API.

``[tool.flwr.app.components]`` in pyproject.toml names ``server`` and
``client``; ``flwr run`` loads them like any Flower App.
"""

from flowerpress import client_app, server_app
from sensor_task.task import SensorTask

task = SensorTask()

# Upload: 8-bit quantization with error feedback; download: 8-bit too.
# Privacy: distributed DP (each device adds its share of the noise).
# Aggregation: FedAdam (Reddi et al., ICLR 2021) instead of FedAvg.
server = server_app(
    task,
    strategy="fedadam:lr=0.1",
    compression="q:8+ef",
    download_compression="q:8",
    dp="distributed:clip=2.0,noise=0.3",
    num_clients=6,
    clients_per_round=4,
    rounds=5,
)
client = client_app(task)
