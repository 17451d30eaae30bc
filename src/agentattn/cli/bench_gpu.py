"""``agentattn bench gpu``: the command line of :mod:`agentattn.bench.gpu` (its flags, checks and printing)."""

from __future__ import annotations

import argparse
import sys

import torch

from ..bench.gpu import add_ratios, check_paths, format_rows, section, time_layers, time_ops
from ..io import atomic_write_json
from ..measure import command_line, environment
from ..ops import triton_agent


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tokens", type=int, nargs="+", default=[1024, 2048, 4096, 16384, 65536], help="N (op level)"
    )
    parser.add_argument(
        "--layer-sides", type=int, nargs="*", default=[64, 128, 256], help="grid sides (layers)"
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--agents", type=int, default=49)
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument("--json", type=str, default=None, help="write the results to this JSON file")
    parser.add_argument("--section", type=str, default=None, help="write a `bench report` section JSON file")


def run(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        print("error: agentattn bench gpu needs a CUDA device; none is visible", file=sys.stderr)
        return 2
    if not triton_agent.available():
        print("error: agentattn bench gpu needs Triton (it ships with CUDA builds of torch)", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    env = environment()
    env["gpu"] = torch.cuda.get_device_name(device)
    print(f"{env['gpu']}, torch {env['torch']}, triton {__import__('triton').__version__}")
    env["triton"] = __import__("triton").__version__
    checks = [] if args.skip_checks else check_paths(device)
    for c in checks:
        print(f"{'ok  ' if c['ok'] else 'FAIL'} {c['check']}: {c['rel_err']:.2e} (bound {c['bound']:.0e})")
    rows: list[dict] = []
    for tokens in args.tokens:
        rows += time_ops(args.batch, tokens, args.heads, args.head_dim, args.agents, device)
        torch.cuda.empty_cache()
    for side in args.layer_sides:
        rows += time_layers(args.batch, side, args.heads * args.head_dim, args.heads, args.agents, device)
    add_ratios([r for r in rows if r["level"] == "op"], "softmax-flash")
    add_ratios([r for r in rows if r["level"] == "layer"], "softmax-sdpa")
    table_op = format_rows([r for r in rows if r["level"] == "op"], "softmax-flash")
    table_layer = format_rows([r for r in rows if r["level"] == "layer"], "softmax-sdpa")
    print(table_op)
    print(table_layer)
    command = command_line("bench", "gpu")
    config = {"batch": args.batch, "heads": args.heads, "head_dim": args.head_dim, "agents": args.agents,
              "dtype": "bfloat16"}  # fmt: skip
    result = {"kind": "gpu", "command": command, "environment": env, "config": config, "checks": checks,
              "rows": rows}  # fmt: skip
    if args.json:
        atomic_write_json(args.json, result, make_parents=True)
    if args.section:
        atomic_write_json(args.section, section(result), make_parents=True)
    failed = [c for c in checks if not c["ok"]]
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="agentattn bench gpu", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
