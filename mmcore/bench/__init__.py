"""Benchmark harness shared by ``benchmarks/`` and ``mmcore demo``."""
