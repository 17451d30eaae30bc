"""Attention benchmark: ``python benchmarks/attention.py [--tokens ...]`` (same as ``agentattn bench attention``)."""

import sys

from agentattn.cli.bench_attention import main

if __name__ == "__main__":
    sys.exit(main())
