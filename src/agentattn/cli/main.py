"""``agentattn``: one entry point with subcommands.

agentattn compare [--epochs E | --full] [--output DIR]
agentattn explain CHECKPOINT IMAGE... [--output DIR]
agentattn train --data fashion-mnist --model NAME --epochs E --output DIR [--resume]
agentattn eval --checkpoint FILE [--data SRC] [--split test]
agentattn bench attention [--tokens 197 785 3137 12545 50177] [--json FILE] [--plot FILE]
agentattn bench model [NAME...] [--img-size 224 448] [--json FILE]
agentattn bench report [--output BENCHMARKS.md]
agentattn flops NAME... [--img-size S]
agentattn convert IN.pth OUT.safetensors [--ema] | agentattn convert IN.pth OUT_DIR --hub NAME
agentattn export NAME [--checkpoint FILE] --format onnx|torch-export [--img-size S] [--dynamic-batch] OUT
agentattn bench deploy [--models NAME...] [--batches 1 32] [--json FILE] [--markdown FILE]
agentattn sd --model PIPELINE_DIR --prompt TEXT... [--baseline]
agentattn bench sd [--models sd15 sdxl] [--latents 64 96 128]
agentattn bench gpu [--tokens 4096 16384 65536] [--json FILE] [--section FILE]   # needs CUDA
agentattn lm train|eval|sample|compare|bench [...]

Each command module provides ``add_arguments(parser)`` and ``run(args) -> int``; the command table is in
``_agentattn_cli`` (the console script, which answers ``--help`` without importing torch).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from _agentattn_cli import BENCHMARKS, COMMANDS, DESCRIPTION

from .. import __version__
from .defaults import show_defaults

_HELP_FORMAT = argparse.ArgumentDefaultsHelpFormatter  # every option's help ends with its default


def _chosen(argv: list[str]) -> tuple[str, ...] | None:
    """The command (and bench kind) named on the command line, or None when none is."""
    words = [a for a in argv if not a.startswith("-")]
    if not words:
        return None
    return tuple(words[:2]) if words[0] == "bench" else (words[0],)


def _add(subparsers: argparse._SubParsersAction, name: str, module: str, help_text: str, load: bool) -> None:
    parser = subparsers.add_parser(name, help=help_text, description=help_text, formatter_class=_HELP_FORMAT)
    if load:  # import a command's module (torch, timm, ...) only when that command runs
        command = importlib.import_module(f"agentattn.{module}")
        command.add_arguments(parser)
        show_defaults(parser)
        parser.set_defaults(handler=command.run)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The ``agentattn`` parser. With ``argv``, only the command it names gets its arguments (and its module is
    imported); without, every command does."""
    chosen = None if argv is None else _chosen(argv)
    parser = argparse.ArgumentParser(prog="agentattn", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"agentattn {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module, help_text in COMMANDS:
        _add(commands, name, module, help_text, argv is None or chosen == (name,))
    bench = commands.add_parser("bench", help="benchmarks", formatter_class=_HELP_FORMAT)
    bench_kinds = bench.add_subparsers(dest="bench_kind", metavar="BENCHMARK", required=True)
    for name, module, help_text in BENCHMARKS:
        _add(bench_kinds, name, module, help_text, argv is None or chosen == ("bench", name))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
