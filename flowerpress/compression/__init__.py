"""flowerpress.compression."""
