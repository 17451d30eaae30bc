"""The ``agentattn`` console script: the command table, and ``--help`` / ``--version`` without torch.

``import agentattn`` registers the models with timm, so it imports torch and timm (6-9 s on a small machine).
This launcher sits outside the package so that ``agentattn``, ``agentattn --help`` and ``agentattn --version``
answer at once; any other command line goes to :func:`agentattn.cli.main.main`, which builds the full parser.
"""

from __future__ import annotations

import sys

# (name, module under agentattn.cli or agentattn.bench, one-line help). agentattn.cli.main builds its parser
# from these two tables.
COMMANDS: list[tuple[str, str, str]] = [
    ("compare", "cli.compare", "train agent, softmax and linear twins on Fashion-MNIST; write a report"),
    ("explain", "cli.explain", "figures of what the agents attend to, for given images"),
    ("train", "cli.train", "train a model (timm recipe, resumable, DDP via torchrun)"),
    ("eval", "cli.eval", "top-1/top-5, confusion matrix and throughput of a checkpoint"),
    ("flops", "cli.flops", "parameters and FLOPs (one multiply-add = one FLOP)"),
    ("dense", "cli.dense", "detection/segmentation on agent backbones: train, eval, compare"),
    (
        "convert",
        "cli.convert",
        "checkpoint (.pth, loaded safely) -> clean safetensors or a timm Hub directory",
    ),
    ("export", "cli.export", "ONNX or torch.export program of a model (int8/bf16 optional), checked"),
    ("sd", "cli.sd", "Stable Diffusion images with AgentSD from a local pipeline directory"),
    ("lm", "cli.lm", "byte-level LM with causal agent attention: train, eval, sample, compare, bench"),
]
BENCHMARKS: list[tuple[str, str, str]] = [
    ("attention", "cli.bench_attention", "agent attention vs the official code and softmax attention"),
    ("model", "cli.bench_model", "whole-model inference/training img/s, agent models vs timm counterparts"),
    ("report", "cli.bench_report", "regenerate BENCHMARKS.md from the measured JSON files"),
    ("deploy", "cli.bench_deploy", "CPU throughput: eager, torch.compile, onnxruntime fp32/int8"),
    ("sd", "cli.bench_sd", "SD v1.5 / SDXL UNet forward: unpatched vs AgentSD vs tomesd"),
    ("gpu", "cli.bench_gpu", "CUDA: check every path, time fused agent attention vs FlashAttention (bf16)"),
]
DESCRIPTION = (
    "Agent Attention tools. `agentattn COMMAND --help` shows a command's options and their defaults."
)


def version() -> str:
    """The installed distribution's version (no import of the package itself)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("agentattn")
    except PackageNotFoundError:  # pragma: no cover - a source tree on sys.path without an install
        return "unknown"


def _top_level_parser():
    import argparse

    parser = argparse.ArgumentParser(prog="agentattn", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"agentattn {version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, _, help_text in COMMANDS:
        commands.add_parser(name, help=help_text)
    commands.add_parser("bench", help="benchmarks: " + ", ".join(name for name, _, _ in BENCHMARKS))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Answer ``--help`` / ``--version`` / no command here; hand anything else to the full CLI."""
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help", "--version"):
        _top_level_parser().parse_args(args)  # prints and exits (an error without a command)
        return 0  # pragma: no cover - parse_args has exited
    from agentattn.cli.main import main as full_main

    return full_main(args)


if __name__ == "__main__":
    sys.exit(main())
