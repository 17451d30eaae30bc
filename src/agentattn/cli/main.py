"""``agentattn``: one entry point with subcommands.

agentattn bench attention [--tokens 197 3137 16385] [--json FILE]
agentattn flops NAME... [--img-size S]
agentattn convert IN.pth OUT.safetensors [--ema]
"""

from __future__ import annotations

import argparse
import sys

from ..bench import attention as bench_attention
from . import convert, flops
from . import eval as eval_cmd
from . import train as train_cmd


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agentattn", description="Agent Attention tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="benchmarks")
    bench_kinds = bench.add_subparsers(dest="bench_kind", required=True)
    attention = bench_kinds.add_parser(
        "attention", help="agent attention vs the official code and softmax attention"
    )
    bench_attention.add_arguments(attention)
    attention.set_defaults(handler=bench_attention.run)
    flops_parser = commands.add_parser("flops", help="parameters and FLOPs (one multiply-add = one FLOP)")
    flops.add_arguments(flops_parser)
    flops_parser.set_defaults(handler=flops.run)
    convert_parser = commands.add_parser(
        "convert", help="checkpoint (.pth, loaded safely) -> clean safetensors"
    )
    convert.add_arguments(convert_parser)
    convert_parser.set_defaults(handler=convert.run)
    train_parser = commands.add_parser(
        "train", help="train a model (timm recipe, resumable, DDP via torchrun)"
    )
    train_cmd.add_arguments(train_parser)
    train_parser.set_defaults(handler=train_cmd.run)
    eval_parser = commands.add_parser(
        "eval", help="top-1/top-5, confusion matrix and throughput of a checkpoint"
    )
    eval_cmd.add_arguments(eval_parser)
    eval_parser.set_defaults(handler=eval_cmd.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
