"""Benchmarks and the baselines they compare against (the official forward, softmax attention)."""
