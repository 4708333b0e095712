"""Post-hoc calibrators."""
