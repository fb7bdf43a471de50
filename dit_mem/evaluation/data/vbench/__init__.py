"""Benchmark data shipped with the package (see dit_mem/evaluation/benchmarks.py)."""
