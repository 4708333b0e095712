"""Image-quality objectives on image tensors ``[B, C, H, W]``."""
