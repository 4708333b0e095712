"""Metric plugins: registered, streaming wrappers of the math in :mod:`sdk.metrics`."""
