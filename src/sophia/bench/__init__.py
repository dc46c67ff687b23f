"""Benchmarks: the optimizer step's cost (more sub-commands arrive with the benchmark issue)."""
