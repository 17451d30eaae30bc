"""``agentattn flops NAME... [--img-size S]``: parameters and FLOPs (one multiply-add = one FLOP)."""

from __future__ import annotations

import argparse
import json
import sys

import timm

from ..io import atomic_write_text
from ..measure import count_flops, count_params
from .train import parse_model_kwargs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="+", help="registered model names (e.g. agent_deit_tiny_patch16_224)")
    parser.add_argument("--img-size", type=int, default=None, help="input resolution (default: the model's)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument(
        "--model-kwargs", nargs="*", default=None, metavar="KEY=VALUE", help="timm.create_model kwargs"
    )


def run(args: argparse.Namespace) -> int:
    """Print the table (and write ``--json`` atomically); return 0, or 1 with one line on stderr."""
    try:
        return _run(args)
    except (ValueError, OSError) as err:
        print(f"agentattn flops: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    if args.img_size is not None and args.img_size < 1:
        raise ValueError(f"--img-size must be a positive number of pixels, got {args.img_size}")
    for name in args.names:
        if name not in timm.list_models():
            raise ValueError(f"unknown model {name!r}; see timm.list_models('agent_*')")
    results = []
    print(f"{'model':36s} {'img':>5s} {'params (M)':>11s} {'GFLOPs':>8s}")
    extra = parse_model_kwargs(getattr(args, "model_kwargs", None))
    for name in args.names:
        kwargs = {**extra, **({} if args.img_size is None else {"img_size": args.img_size})}
        try:
            model = timm.create_model(name, pretrained=False, **kwargs)
        except (TypeError, AssertionError) as err:
            raise ValueError(f"model {name!r} rejects the model kwargs {kwargs}: {err}") from err
        input_size = (
            model.pretrained_cfg["input_size"] if args.img_size is None else (3, args.img_size, args.img_size)
        )
        counter = count_flops(model, tuple(input_size))
        params = count_params(model)
        print(f"{name:36s} {input_size[-1]:5d} {params / 1e6:11.2f} {counter.total / 1e9:8.2f}")
        results.append(
            {
                "model": name,
                "img_size": input_size[-1],
                "params": params,
                "flops": counter.total,
                "flops_by_operator": dict(counter.by_operator),
            }
        )
    if args.json:
        atomic_write_text(args.json, json.dumps(results, indent=1))
    return 0
