"""flowerpress: federated learning on Flower with compressed, private updates."""

__version__ = "0.1.0"
