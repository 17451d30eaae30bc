"""``agentattn bench model``: the command line of :mod:`agentattn.bench.model` (its flags, checks and printing)."""

from __future__ import annotations

import argparse
import sys

import timm
import torch

from ..bench.model import (
    AMP,
    DEFAULT_MODELS,
    Setup,
    bench_models,
    expand_entries,
    format_table,
    write_section,
)
from ..io import atomic_write_json
from ..measure import command_line, environment
from ..ops.agent import BACKENDS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="*", default=list(DEFAULT_MODELS), help="timm model names")
    parser.add_argument("--img-size", type=int, nargs="+", default=[224, 448], help="input resolutions")
    parser.add_argument(
        "--batch", type=int, nargs="+", default=[16], help="batch size: one, or one per --img-size (in order)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per model and mode")
    parser.add_argument("--rounds", type=int, default=3, help="timed steps per model and mode (interleaved)")
    parser.add_argument("--step-timeout", type=float, default=120.0, help="seconds allowed for one step")
    parser.add_argument("--modes", nargs="+", default=["infer", "train"], choices=["infer", "train"])
    parser.add_argument("--json", type=str, default=None, help="write the results to this JSON file")
    parser.add_argument("--section", type=str, default=None, help="write a `bench report` section JSON file")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none", help="autocast dtype")
    parser.add_argument("--channels-last", action="store_true", help="channels-last weights and input")
    parser.add_argument(
        "--backends", nargs="+", default=["auto"], choices=list(BACKENDS),
        help="agent-attention backends to time every agent model with (see ops.attention_backend)",
    )  # fmt: skip
    parser.add_argument(
        "--softmax-twins", action="store_true",
        help="also time each agent model without a timm counterpart with softmax attention in every stage",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    unknown = [m for m in args.models if not timm.is_model(m)]
    if unknown:
        print(f"error: unknown model(s) {unknown}; see timm.list_models('agent_*')", file=sys.stderr)
        return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: --device {args.device}: no CUDA device is visible", file=sys.stderr)
        return 2
    if len(args.batch) not in (1, len(args.img_size)):
        print(f"error: --batch: one size, or one per --img-size ({len(args.img_size)}); got {args.batch}",
              file=sys.stderr)  # fmt: skip
        return 2
    torch.set_num_threads(args.threads)
    env = environment(args.threads)
    setup = Setup(args.device, AMP[args.amp], args.channels_last)
    if setup.device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(torch.device(setup.device))
    print(f"torch {env['torch']}, timm {env['timm']}, {env.get('gpu') or str(env['threads']) + ' threads, ' + env['cpu']}"
          f", amp {args.amp}, channels_last {args.channels_last}")  # fmt: skip
    rows = bench_models(
        expand_entries(args.models, args.backends, args.softmax_twins),
        args.img_size,
        args.batch if len(args.batch) > 1 else args.batch[0],
        args.warmup,
        args.rounds,
        args.step_timeout,
        tuple(args.modes),
        setup=setup,
    )
    print(format_table(rows))
    config = {"batch": args.batch, "rounds": args.rounds, "warmup": args.warmup, "device": args.device,
              "amp": args.amp, "channels_last": args.channels_last, "backends": args.backends}  # fmt: skip
    result = {
        "kind": "model",
        "command": command_line("bench", "model"),
        "environment": env,
        "config": config,
        "models": rows,
    }
    if args.json:
        atomic_write_json(args.json, result, make_parents=True)
    if args.section:
        write_section(args.section, result)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="agentattn bench model", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
