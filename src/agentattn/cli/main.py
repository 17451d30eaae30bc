"""``agentattn``: one entry point with subcommands.

agentattn train --data fashion-mnist --model NAME --epochs E --output DIR [--resume]
agentattn eval --checkpoint FILE [--data SRC] [--split test]
agentattn bench attention [--tokens 197 3137 16385] [--json FILE]
agentattn flops NAME... [--img-size S]
agentattn convert IN.pth OUT.safetensors [--ema]

Each command module provides ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import sys
from types import ModuleType

from ..bench import attention as bench_attention
from . import convert, flops
from . import eval as eval_cmd
from . import train as train_cmd

COMMANDS: list[tuple[str, ModuleType, str]] = [
    ("train", train_cmd, "train a model (timm recipe, resumable, DDP via torchrun)"),
    ("eval", eval_cmd, "top-1/top-5, confusion matrix and throughput of a checkpoint"),
    ("flops", flops, "parameters and FLOPs (one multiply-add = one FLOP)"),
    ("convert", convert, "checkpoint (.pth, loaded safely) -> clean safetensors"),
]
BENCHMARKS: list[tuple[str, ModuleType, str]] = [
    ("attention", bench_attention, "agent attention vs the official code and softmax attention"),
]


def _add(subparsers: argparse._SubParsersAction, name: str, module: ModuleType, help_text: str) -> None:
    parser = subparsers.add_parser(name, help=help_text)
    module.add_arguments(parser)
    parser.set_defaults(handler=module.run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agentattn", description="Agent Attention tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, module, help_text in COMMANDS:
        _add(commands, name, module, help_text)
    bench_kinds = commands.add_parser("bench", help="benchmarks").add_subparsers(
        dest="bench_kind", required=True
    )
    for name, module, help_text in BENCHMARKS:
        _add(bench_kinds, name, module, help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
