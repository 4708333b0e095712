"""Contrastive (InfoNCE-family) objectives, their pair samplers and contrastive transforms."""
