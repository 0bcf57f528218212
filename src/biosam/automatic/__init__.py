"""Automatic instance segmentation: grid-prompted mask generation, a trained instance decoder, tiling."""
