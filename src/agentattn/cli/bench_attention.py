"""``agentattn bench attention``: the command line of :mod:`agentattn.bench.attention` (its flags, checks and printing)."""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

import torch

from ..bench.attention import (
    CASES,
    COMPILED,
    DEFAULT_TOKENS,
    MODES,
    bench_op_efficiency,
    bench_sweep,
    crossover,
    format_table,
    matmul_peak,
    plot,
    write_rounds_section,
)
from ..io import atomic_write_json
from ..measure import command_line, environment


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="agentattn bench attention", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tokens", type=int, nargs="+", default=list(DEFAULT_TOKENS), help="token counts N = 1 + side²"
    )
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=[*CASES, COMPILED])
    parser.add_argument("--compile", action="store_true", help=f"add the {COMPILED} case (fullgraph)")
    parser.add_argument(
        "--compile-tokens", type=int, nargs="+", default=[197], help=f"the N at which {COMPILED} runs"
    )
    parser.add_argument("--dim", type=int, default=192)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--agents", type=int, default=49)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--budget", type=float, default=4.0, help="seconds of timed runs per case and mode")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument("--case-timeout", type=float, default=120.0, help="seconds allowed for one call")
    parser.add_argument("--mem-limit-gb", type=float, default=8.0, help="skip cases estimated above this")
    parser.add_argument(
        "--batch",
        type=str,
        nargs="*",
        default=[],
        metavar="N=B",
        help="batch for a token count (default TOKEN_BUDGET // N, at least 1), e.g. 197=64",
    )
    parser.add_argument(
        "--memory",
        choices=["subprocess", "inprocess"],
        default="subprocess",
        help="peak memory per case in a fresh process (default), or in this one (quick, approximate)",
    )
    parser.add_argument("--peak-size", type=int, default=2048, help="m of the m×m matmul peak measurement")
    parser.add_argument("--skip-op", action="store_true", help="skip the op efficiency and the matmul peak")
    parser.add_argument("--json", type=str, default=None, help="write the results to this JSON file")
    parser.add_argument("--plot", type=str, default=None, help="write the log-log plot to this PNG file")
    parser.add_argument(
        "--section",
        type=str,
        default=None,
        help="also write a BENCHMARKS.md section JSON: the paired per-round ratios of every case and the goals",
    )


def _batch_override(args: argparse.Namespace) -> dict[int, int] | None:
    """The ``--batch`` pairs as {N: B}; None, after printing why, when an option is bad."""
    try:
        batch_override = {int(k): int(v) for k, v in (item.split("=") for item in args.batch)}
    except ValueError:
        print(f"error: --batch takes N=B pairs, got {args.batch}", file=sys.stderr)
        return None
    for n in args.tokens:
        side = math.isqrt(max(n - 1, 0))
        if n < 2 or side * side != n - 1:
            print(f"error: --tokens must be 1 + a square (cls + patch grid), got {n}", file=sys.stderr)
            return None
    for flag, value, ok, want in (
        ("--threads", args.threads, args.threads >= 1, "at least 1"),
        ("--dim", args.dim, args.dim >= 1 and args.heads >= 1 and args.dim % args.heads == 0,
         f"a positive multiple of --heads ({args.heads})"),
        ("--agents", args.agents, args.agents >= 1, "at least 1"),
        ("--budget", args.budget, args.budget > 0, "a positive number of seconds"),
    ):  # fmt: skip
        if not ok:
            print(f"error: {flag} must be {want}, got {value}", file=sys.stderr)
            return None
    return batch_override


def _bench_op(args: argparse.Namespace) -> tuple[list[dict] | None, dict | None]:
    """Time the agent op against the fp32 matmul peak and print both; (None, None) with ``--skip-op``."""
    if args.skip_op:
        return None, None
    peak = matmul_peak(args.peak_size)
    op = bench_op_efficiency(
        args.tokens,
        args.heads,
        args.dim // args.heads,
        args.agents,
        args.budget,
        peak_size=args.peak_size,
    )
    print(f"\nfp32 matmul peak ({peak['size']}³, best of 5): {peak['gflops_per_s']:.1f} GFLOP/s")
    for r in op:
        print(
            f"op N={r['tokens']} B={r['batch']}: {r['ms']:.2f} ms, {r['gflops_per_s']:.1f} GFLOP/s = "
            f"{100 * r['fraction_of_peak']:.0f}% of the matmul timed next to it "
            f"(median {r['peak_gflops_per_s']:.1f} GFLOP/s; {100 * r['gflops_per_s'] / peak['gflops_per_s']:.0f}% "
            "of the best of 5)"
        )
    return op, peak


def _result(
    args: argparse.Namespace,
    env: dict[str, Any],
    label: str,
    rows: list[dict],
    op: list[dict] | None,
    peak: dict | None,
) -> dict[str, Any]:
    """The results JSON: command, environment, settings, layer rows, op efficiency and crossovers."""
    return {
        "kind": "attention",
        "command": command_line("bench", "attention"),
        "environment": env,
        "config": {
            "dim": args.dim,
            "heads": args.heads,
            "agents": args.agents,
            "threads": args.threads,
            "budget_s": args.budget,
            "rounds": args.rounds,
            "label": label,
            "memory": args.memory,
        },
        "layers": rows,
        "op": op,
        "matmul_peak": peak,
        "crossover": {mode: crossover(rows, mode) for mode in MODES},
    }


def run(args: argparse.Namespace) -> int:
    """Run the sweep (and the op efficiency), print them and write the requested files; 2 on a bad option."""
    batch_override = _batch_override(args)
    if batch_override is None:
        return 2
    torch.set_num_threads(args.threads)
    cases = list(args.cases) + ([COMPILED] if args.compile and COMPILED not in args.cases else [])
    env = environment(args.threads)
    label = f"C={args.dim}, heads={args.heads}, agents={args.agents}, cls token, fp32"
    print(f"torch {env['torch']}, {env['threads']} threads, {env['cpu']}, {label}")
    rows = bench_sweep(
        args.tokens,
        cases,
        args.dim,
        args.heads,
        args.agents,
        args.budget,
        args.rounds,
        args.threads,
        args.case_timeout,
        args.mem_limit_gb,
        batch_override,
        tuple(args.compile_tokens),
        args.memory == "subprocess",
    )
    print(format_table(rows))
    op, peak = _bench_op(args)
    result = _result(args, env, label, rows, op, peak)
    if args.json:
        atomic_write_json(args.json, result, make_parents=True)
    if args.plot:
        plot(result, args.plot)
    if args.section:
        write_rounds_section(result, args.section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
