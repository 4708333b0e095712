"""Self-supervised objectives without (only) negatives: redundancy reduction, self-distillation."""
