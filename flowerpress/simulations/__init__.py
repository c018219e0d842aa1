"""flowerpress.simulations."""
