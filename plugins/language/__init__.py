"""Token-level objectives of language-model fine-tuning and preference optimisation, on the
sequence-model inputs of :mod:`sdk.sequence`."""
