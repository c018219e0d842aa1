"""flowerpress.privacy."""
