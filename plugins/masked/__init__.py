"""Masked and predictive modelling: masking transforms and objectives that reconstruct, complete
or predict hidden parts of the input."""
