"""``agentattn``: one entry point with subcommands.

agentattn compare [--epochs E | --full] [--output DIR]
agentattn explain CHECKPOINT IMAGE... [--output DIR]
agentattn train --data fashion-mnist --model NAME --epochs E --output DIR [--resume]
agentattn eval --checkpoint FILE [--data SRC] [--split test]
agentattn bench attention [--tokens 197 785 3137 12545 50177] [--json FILE] [--plot FILE]
agentattn bench model [NAME...] [--img-size 224 448] [--json FILE]
agentattn bench report [--output BENCHMARKS.md]
agentattn flops NAME... [--img-size S]
agentattn convert IN.pth OUT.safetensors [--ema]
agentattn export NAME [--checkpoint FILE] --format onnx|torch-export [--img-size S] [--dynamic-batch] OUT
agentattn bench deploy [--models NAME...] [--batches 1 32] [--json FILE] [--markdown FILE]
agentattn sd --model PIPELINE_DIR --prompt TEXT... [--baseline]
agentattn bench sd [--models sd15 sdxl] [--latents 64 96 128]
agentattn bench gpu [--tokens 4096 16384 65536] [--json FILE] [--section FILE]   # needs CUDA
agentattn lm train|eval|sample|compare|bench [...]

Each command module provides ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import sys
from types import ModuleType

from .. import __version__
from ..bench import attention as bench_attention
from ..bench import deploy as bench_deploy
from ..bench import gpu as bench_gpu
from ..bench import model as bench_model
from ..bench import report as bench_report
from ..bench import sd as bench_sd
from . import compare, convert, dense, explain, flops
from . import eval as eval_cmd
from . import export as export_cmd
from . import lm as lm_cmd
from . import sd as sd_cmd
from . import train as train_cmd

COMMANDS: list[tuple[str, ModuleType, str]] = [
    ("compare", compare, "train agent, softmax and linear twins on Fashion-MNIST; write a report"),
    ("explain", explain, "figures of what the agents attend to, for given images"),
    ("train", train_cmd, "train a model (timm recipe, resumable, DDP via torchrun)"),
    ("eval", eval_cmd, "top-1/top-5, confusion matrix and throughput of a checkpoint"),
    ("flops", flops, "parameters and FLOPs (one multiply-add = one FLOP)"),
    ("dense", dense, "detection/segmentation on agent backbones: train, eval, compare"),
    ("convert", convert, "checkpoint (.pth, loaded safely) -> clean safetensors"),
    ("export", export_cmd, "ONNX or torch.export program of a model (int8/bf16 optional), checked"),
    ("sd", sd_cmd, "Stable Diffusion images with AgentSD from a local pipeline directory"),
    ("lm", lm_cmd, "byte-level LM with causal agent attention: train, eval, sample, compare, bench"),
]
BENCHMARKS: list[tuple[str, ModuleType, str]] = [
    ("attention", bench_attention, "agent attention vs the official code and softmax attention"),
    ("model", bench_model, "whole-model inference/training img/s, agent models vs timm counterparts"),
    ("report", bench_report, "regenerate BENCHMARKS.md from the measured JSON files"),
    ("deploy", bench_deploy, "CPU throughput: eager, torch.compile, onnxruntime fp32/int8"),
    ("sd", bench_sd, "SD v1.5 / SDXL UNet forward: unpatched vs AgentSD vs tomesd"),
    ("gpu", bench_gpu, "CUDA: check every path, time fused agent attention vs FlashAttention (bf16)"),
]


def _add(subparsers: argparse._SubParsersAction, name: str, module: ModuleType, help_text: str) -> None:
    parser = subparsers.add_parser(name, help=help_text)
    module.add_arguments(parser)
    parser.set_defaults(handler=module.run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agentattn", description="Agent Attention tools.")
    parser.add_argument("--version", action="version", version=f"agentattn {__version__}")
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
