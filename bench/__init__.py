"""Benchmarks run by ``nox -s bench``: every ``bench/bench_*.py`` module with a ``run(report)``."""
