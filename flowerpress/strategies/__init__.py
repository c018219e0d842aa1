"""flowerpress.strategies."""
