"""Benchmarks: run from the repository root, e.g. `python -m bench.moe_layer --smoke`."""
