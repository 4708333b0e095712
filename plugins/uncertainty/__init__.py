"""Uncertainty under distribution shift: out-of-distribution detectors and test-time adapters."""
