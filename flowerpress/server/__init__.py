"""flowerpress.server."""
