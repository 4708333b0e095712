"""Classification losses and the input transforms of supervised training."""
