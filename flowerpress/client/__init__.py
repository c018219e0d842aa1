"""flowerpress.client."""
