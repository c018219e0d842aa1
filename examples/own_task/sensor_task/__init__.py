"""A user's own task for flowerpress: activity recognition from sensor windows."""
