"""``agentattn bench deploy``: the command line of :mod:`agentattn.bench.deploy` (its flags, checks and printing)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..bench.deploy import BACKENDS, DEFAULT_MODELS, bench_model, format_table
from ..bench.section import write_section
from ..io import atomic_write_text
from ..measure import command_line, environment


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench deploy`` options."""
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2, help="torch and onnxruntime intra-op threads")
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of timed runs per case")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table to this file")
    parser.add_argument("--section", type=Path, default=None, help="also write a `bench report` section JSON")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; print the table; return 0 (1 with one line for bad options)."""
    if args.threads < 1 or any(b < 1 for b in args.batches) or args.img_size < 1:
        print(
            "agentattn bench deploy: error: --threads, --batches and --img-size must be ≥ 1", file=sys.stderr
        )
        return 1
    torch.set_num_threads(args.threads)
    env = environment()
    print(f"torch {env['torch']}, {args.threads} threads, {env['machine']}, {args.img_size}², random weights")
    results = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="agentattn-bench-deploy-") as workdir:
        for name in args.models:
            print(f"{name}:", flush=True)
            try:
                results.append(
                    bench_model(
                        name,
                        args.batches,
                        args.backends,
                        Path(workdir),
                        args.img_size,
                        args.threads,
                        args.budget,
                    )
                )
            except ValueError as err:
                print(f"agentattn bench deploy: error: {' '.join(str(err).split())}", file=sys.stderr)
                return 1
    table = format_table(results, args.batches, args.backends)
    print(table)
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.markdown:
        atomic_write_text(args.markdown, table + "\n")
    if args.section:
        note = (
            f"Random weights, {args.img_size}², {args.threads} threads. Images/s are medians after warm-up; "
            "`compile` is `torch.compile` (inductor; compile time not counted). The last column is the ONNX "
            "parity check, max |Δlogits| between onnxruntime fp32 and eager at batch 1 and 3."
        )
        write_section(args.section, "Deployment: eager, torch.compile, onnxruntime fp32 and int8",
                      command_line("bench", "deploy"), env, note + "\n\n" + table)  # fmt: skip
    if args.json:
        payload = {"environment": env, "img_size": args.img_size, "results": [asdict(r) for r in results]}
        atomic_write_text(args.json, json.dumps(payload, indent=1) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="agentattn bench deploy", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
