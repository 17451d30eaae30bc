"""``agentattn dense train|eval|compare``: detection and segmentation with agent-attention backbones.

agentattn dense train [--task det|seg] [--kind maskrcnn] [--backbone agent_pvt_tiny_224] [--data synthetic]
                      [--epochs 3] [--output runs/dense] [--overwrite] [...]
agentattn dense eval --checkpoint runs/dense/model.pth [--data SRC]
agentattn dense compare [--kind maskrcnn] [--backbone agent_pvt_tiny_224] [--twin-attn-type BBBB] [--json F]

The default ``train`` is the synthetic acceptance run: Mask R-CNN on Agent-PVT-T, shapes on textures at 128²,
min_size = max_size = 128, COCO box/mask AP on the fixed validation split. The output directory belongs to one
live run, and an earlier run's results in it are only replaced with ``--overwrite``. Bad input ends with one
``agentattn dense: error: ...`` line and exit code 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from typing import Any

from ..io import atomic_write_text, one_line, quote
from .defaults import show_config_defaults
from .options import device_option
from .train import parse_model_kwargs


def _grids(value: str) -> Any:
    """'none' → None, 'official' → 'official', '12-16-28-28' → (12, 16, 28, 28)."""
    if value in ("none", "official"):
        return None if value == "none" else value
    try:
        return tuple(int(v) for v in value.split("-"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--agent-grids must be none, official or e.g. 12-16-28-28, got {value!r}"
        ) from None


def _size(value: str) -> tuple[int, int]:
    h, _, w = value.partition("x")
    try:
        return int(h), int(w or h)
    except ValueError:
        raise argparse.ArgumentTypeError(f"sizes are HxW or S, got {value!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="dense_command", required=True)
    S = argparse.SUPPRESS

    train = sub.add_parser(
        "train",
        formatter_class=parser.formatter_class,
        help="train a detector or segmenter, then evaluate it",
    )
    add = train.add_argument
    add("--task", choices=["det", "seg"], default=S)
    add(
        "--kind",
        default=S,
        help="det: maskrcnn, fasterrcnn, retinanet; seg: fpn, upernet (maskrcnn means fpn for seg)",
    )
    add("--backbone", default=S, help="hierarchical zoo model")
    add("--backbone-kwargs", nargs="*", default=S, metavar="KEY=VALUE", help="e.g. attn_type=BBBB")
    add("--agent-grids", type=_grids, default=S, help="none (classification grids), official, or 12-16-28-28")
    add("--pretrained-backbone", default=S, help="classification checkpoint for the backbone")
    add(
        "--detector-kwargs", nargs="*", default=S, metavar="KEY=VALUE", help="to the torchvision model / head"
    )
    add("--data", default=S, help="synthetic (default), coco:PATH or ade20k:PATH")
    add("--img-size", type=int, default=S, help="synthetic image side (≤256) / ADE20K crop")
    add("--min-size", type=int, default=S)
    add("--max-size", type=int, default=S)
    add("--num-train", type=int, default=S, help="synthetic training images")
    add("--num-val", type=int, default=S, help="synthetic validation images")
    add("--epochs", type=int, default=S)
    add("--max-steps", type=int, default=S)
    add(
        "--time-limit-min",
        type=float,
        default=S,
        help="stop training after this many minutes, then evaluate (default 15; 0: no limit)",
    )
    add("--batch-size", type=int, default=S)
    add("--lr", type=float, default=S)
    add("--weight-decay", type=float, default=S)
    add("--warmup-steps", type=int, default=S)
    add("--clip-grad", type=float, default=S)
    add("--seed", type=int, default=S)
    add("--threads", type=int, default=S)
    add("--num-workers", type=int, default=S)
    add("--device", default=S, help="auto, cpu or cuda")
    add("--output", default=S, help="run directory (default runs/dense)")
    add("--overwrite", action="store_true", default=S, help="replace the results of an earlier run in OUTPUT")
    add("--no-progress", dest="progress", action="store_false", default=S)
    from ..dense.engine import DenseConfig  # imported with the command only: it pulls in torchvision

    show_config_defaults(train, DenseConfig)

    ev = sub.add_parser(
        "eval", formatter_class=parser.formatter_class, help="evaluate a model.pth written by dense train"
    )
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--data", default=None, help="default: synthetic, if the run trained on it")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--device", default="auto")
    ev.add_argument("--json", default=None, help="also write the metrics to this file")
    ev.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")

    cmp = sub.add_parser(
        "compare",
        formatter_class=parser.formatter_class,
        help="params, FLOPs and latency: agent backbone vs its softmax twin",
    )
    cmp.add_argument("--kind", default="maskrcnn", choices=["maskrcnn", "fasterrcnn", "retinanet"])
    cmp.add_argument("--backbone", default="agent_pvt_tiny_224")
    cmp.add_argument("--twin-attn-type", default="BBBB", help="attn_type of the softmax twin")
    cmp.add_argument("--agent-grids", type=_grids, default="official")
    cmp.add_argument("--flops-size", type=_size, default=(800, 1333), help="HxW")
    cmp.add_argument(
        "--latency-sizes", type=_size, nargs="+", default=[(512, 512), (800, 1333), (1024, 1024)]
    )
    cmp.add_argument("--budget-s", type=float, default=10.0, help="timing budget per size")
    cmp.add_argument("--threads", type=int, default=None)
    cmp.add_argument("--device", default="auto")
    cmp.add_argument("--json", default=None)


def _train(args: argparse.Namespace) -> int:
    from ..dense.engine import DenseConfig, train_dense

    known = {f.name for f in fields(DenseConfig)}
    values = {k: v for k, v in vars(args).items() if k in known}
    for key in ("backbone_kwargs", "detector_kwargs"):
        if key in values:
            values[key] = parse_model_kwargs(values[key])
    result = train_dense(DenseConfig(**values))
    print(json.dumps(result, indent=1))
    return 0


def _eval(args: argparse.Namespace) -> int:
    import torch

    from ..dense.data import build_dense_data
    from ..dense.engine import evaluate_detection, evaluate_segmentation, load_dense_checkpoint

    config, model, ckpt = load_dense_checkpoint(args.checkpoint)
    if args.data is None and config.data != "synthetic":
        raise ValueError(
            f"{args.checkpoint} was trained on {quote(config.data)}: pass that data with --data (a path read "
            "from a file is never opened)"
        )
    data = build_dense_data(
        args.data or config.data, config.task, config.img_size, config.num_train, config.num_val, config.seed
    )
    if data.num_classes != ckpt["num_classes"]:
        raise ValueError(
            f"--data has {data.num_classes} classes but the checkpoint was trained on {ckpt['num_classes']}"
        )
    device = device_option(args.device)
    model.to(device)
    with torch.no_grad():
        if config.task == "det":
            metrics = evaluate_detection(model, data.val, args.batch_size, device, progress=args.progress)
        else:
            metrics = evaluate_segmentation(
                model, data.val, data.num_classes, args.batch_size, device, progress=args.progress
            )
    print(json.dumps(metrics, indent=1))
    if args.json:
        atomic_write_text(args.json, json.dumps(metrics, indent=1) + "\n")
    return 0


def _compare(args: argparse.Namespace) -> int:
    import torch

    from ..dense.engine import compare_detectors

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = compare_detectors(
        args.kind, args.backbone, args.twin_attn_type, args.agent_grids, tuple(args.flops_size),
        tuple(tuple(s) for s in args.latency_sizes), device=args.device, budget_s=args.budget_s,
    )  # fmt: skip
    sizes = list(rows[0]["latency_ms"])
    fh, fw = args.flops_size
    print(f"{args.kind} on {args.backbone}; device {rows[0]['device']}; latency: batch 1, median ms")
    print(
        f"{'variant':14s} {'params M':>9s} {f'GFLOPs {fh}x{fw}':>17s} {'backbone GFLOPs':>16s} "
        + " ".join(f"{s:>10s}" for s in sizes)
    )
    for r in rows:
        lat = " ".join(f"{r['latency_ms'][s]:10.1f}" for s in sizes)
        print(
            f"{r['variant']:14s} {r['params'] / 1e6:9.2f} {r['flops'] / 1e9:17.1f} {r['backbone_flops'] / 1e9:16.1f} {lat}"
        )
    if args.json:
        atomic_write_text(args.json, json.dumps(rows, indent=1) + "\n")
    return 0


def run(args: argparse.Namespace) -> int:
    """Dispatch ``train``/``eval``/``compare``; 0, or 1 with one line on stderr for bad input."""
    handler = {"train": _train, "eval": _eval, "compare": _compare}[args.dense_command]
    try:
        return handler(args)
    except (ValueError, OSError, FloatingPointError, ImportError) as err:
        print(f"agentattn dense: error: {one_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("agentattn dense: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="agentattn dense", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
