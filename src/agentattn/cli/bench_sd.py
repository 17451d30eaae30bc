"""``agentattn bench sd``: the command line of :mod:`agentattn.bench.sd` (its flags, checks and printing)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from ..bench.sd import MODELS, Row, bench_model, environment, format_table, plot, sd_goals, section_markdown
from ..io import atomic_write_text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--models", nargs="+", choices=sorted(MODELS), default=["sd15", "sdxl"], help="UNets to build")
    add("--latents", type=int, nargs="+", default=[64, 96, 128], help="latent sides (image side / 8)")
    add(
        "--sdxl-latents", type=int, nargs="+", default=None, help="latent sides for SDXL (default: --latents)"
    )
    add("--methods", nargs="+", choices=["unpatched", "agentsd", "tomesd"], default=None)
    add("--ratio", type=float, default=0.5, help="AgentSD token merge ratio")
    add("--agent-ratio", type=float, default=0.95)
    add("--sx", type=int, default=4)
    add("--sy", type=int, default=4)
    add("--tome-ratio", type=float, default=None, help="tomesd ratio (default: --ratio)")
    add("--batch", type=int, default=1)
    add("--warmup", type=int, default=1, help="untimed forwards per case")
    add("--repeats", type=int, default=1, help="timed forwards per case (median)")
    add("--threads", type=int, default=2, help="torch intra-op threads (CPU)")
    add("--device", default="cpu")
    add("--json", default="runs/bench_sd.json", help="results file")
    add("--section", default=None, help="also write a `bench report` section JSON")
    add("--plot", default="runs/bench_sd.png", help="plot file ('' for none)")


def run(args: argparse.Namespace) -> int:
    prog = "agentattn bench sd"
    methods = args.methods or ["unpatched", "agentsd", "tomesd"]
    if "unpatched" not in methods:
        methods = ["unpatched", *methods]
    methods = ["unpatched"] + [m for m in methods if m != "unpatched"]
    try:
        import diffusers  # noqa: F401
    except ImportError:
        print(f"{prog}: error: needs diffusers: pip install 'agentattn[diffusion]'", file=sys.stderr)
        return 1
    if "tomesd" in methods:
        try:
            import tomesd  # noqa: F401
        except ImportError:
            print(
                f"{prog}: error: tomesd is not installed (pip install tomesd, or --methods unpatched agentsd)",
                file=sys.stderr,
            )
            return 1
    if any(s < 8 or s % 8 for s in args.latents + (args.sdxl_latents or [])):
        print(
            f"{prog}: error: latent sides must be positive multiples of 8, got {args.latents}",
            file=sys.stderr,
        )
        return 1
    from ..diffusion.patch import AgentSDConfig, check_config

    try:  # fail before spending a minute building a UNet
        check_config(AgentSDConfig(args.ratio, args.agent_ratio, args.sx, args.sy))
        check_config(AgentSDConfig(args.ratio if args.tome_ratio is None else args.tome_ratio))
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    env = environment(args.device)
    print(
        f"torch {env['torch']}, diffusers {env['diffusers']}, {args.device}, {env['threads']} threads, fp32, "
        f"batch {args.batch}, {args.warmup} warm-up + {args.repeats} timed forward(s)"
    )
    tome_ratio = args.ratio if args.tome_ratio is None else args.tome_ratio
    opts = {
        "ratio": args.ratio,
        "agent_ratio": args.agent_ratio,
        "sx": args.sx,
        "sy": args.sy,
        "tome_ratio": tome_ratio,
    }
    rows: list[Row] = []
    try:
        for name in args.models:
            latents = args.sdxl_latents if name == "sdxl" and args.sdxl_latents else args.latents
            rows += bench_model(
                name, latents, methods, opts, args.batch, args.warmup, args.repeats, args.device
            )
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    print(format_table(rows))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "environment": env,
            "args": vars(args) | {"handler": None},
            "rows": [asdict(r) for r in rows],
        }
        atomic_write_text(args.json, json.dumps(payload, indent=1))
        print(f"wrote {args.json}")
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        print(f"wrote {args.plot}" if plot(rows, args.plot) else "matplotlib not installed: no plot")
    if args.section:
        from ..bench.section import write_section
        from ..measure import command_line

        write_section(args.section, "Stable Diffusion: AgentSD vs ToMe (tomesd)", command_line("bench", "sd"), env,
                      section_markdown(rows, args), sd_goals(rows))  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="agentattn bench sd", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
