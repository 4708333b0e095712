"""Measurements that seed papers study: representation geometry, probes, separability."""
