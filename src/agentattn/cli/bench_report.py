"""``agentattn bench report``: the command line of :mod:`agentattn.bench.report` (its flags, checks and printing)."""

from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

from ..bench.report import RESULTS, build_report
from ..io import atomic_write_text
from ..measure import command_line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--attention", type=Path, default=RESULTS / "attention.json")
    parser.add_argument("--model", type=Path, default=RESULTS / "model.json")
    parser.add_argument(
        "--section",
        type=Path,
        nargs="*",
        default=None,
        help=f"section JSON files (default: {RESULTS}/sections/*.json)",
    )
    parser.add_argument("--output", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument("--figures", type=Path, default=Path("benchmarks/figures"))


def run(args: argparse.Namespace) -> int:
    sections = (
        [Path(p) for p in sorted(glob.glob(str(RESULTS / "sections" / "*.json")))]
        if args.section is None
        else list(args.section)
    )
    for path in sections:
        if not path.exists():
            print(f"error: --section file {path} does not exist", file=sys.stderr)
            return 2
    root = args.output.resolve().parent
    try:
        text = build_report(
            args.attention, args.model, sections, args.figures, root, command_line("bench", "report")
        )
    except (json.JSONDecodeError, KeyError) as e:
        print(f"error: cannot read a benchmark JSON: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    atomic_write_text(args.output, text)
    print(f"wrote {args.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="agentattn bench report", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
