"""``agentattn eval --checkpoint FILE [--data SRC] [--split test]``: top-1, top-5, confusion matrix, throughput.

The checkpoint is read with the safe loader. A checkpoint written by ``agentattn train`` names its model,
model kwargs and data; any other state dict (``.pth`` or ``.safetensors``) needs ``--model`` (and
``--model-kwargs``) and ``--data``. Bad input ends with one ``agentattn eval: error: ...`` line and exit code 1.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..io import atomic_write_text, quote
from ..models.record import check_model_fits_weights
from ..train.data import build_data
from ..train.loop import build_model, evaluate
from ..train.restore import load_weights, read_checkpoint
from .options import device_option
from .train import parse_model_kwargs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``eval`` options."""
    parser.add_argument(
        "--checkpoint", required=True, type=Path, help="last.pth of a run, or a state dict file"
    )
    parser.add_argument("--data", default=None, help="data source (default: the one the run trained on)")
    parser.add_argument("--split", default="test", help="test (val for image folders) or train")
    parser.add_argument("--model", default=None, help="model name, for checkpoints that do not record it")
    parser.add_argument("--model-kwargs", nargs="*", default=None, metavar="KEY=VALUE")
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--subset", type=int, default=None, help="evaluate N images chosen from --seed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--amp", choices=["none", "bf16"], default="none")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def format_confusion(confusion: torch.Tensor, names: list[str]) -> str:
    """The confusion matrix (C, C) as text: rows = true class, columns = predicted class."""
    names = names if len(names) == len(confusion) else [""] * len(confusion)
    labels = [f"{i} {n[:12]}".rstrip() for i, n in enumerate(names)]
    width = max(6, *(len(str(v)) for v in confusion.flatten().tolist())) + 1
    lab = max(len("true \\ pred"), *(len(s) for s in labels)) + 1
    lines = ["true \\ pred".ljust(lab) + "".join(str(i).rjust(width) for i in range(len(labels)))]
    for label, row in zip(labels, confusion.tolist(), strict=True):
        lines.append(label.ljust(lab) + "".join(str(v).rjust(width) for v in row))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Evaluate; print the results; return 0, or 1 with one line on stderr for bad input."""
    path = Path(args.checkpoint)
    try:
        state, meta = read_checkpoint(path, args.ema)
        name = meta.get("model_name")
        if args.model and name and args.model != name:
            raise ValueError(f"{path} is a checkpoint of {quote(name)}, not {args.model!r}: drop --model")
        name = name or args.model
        if not name:
            raise ValueError(f"{path} does not record its model: pass --model NAME (and --model-kwargs)")
        kwargs = dict(meta.get("model_kwargs") or {})
        kwargs.update(parse_model_kwargs(args.model_kwargs))
        if not args.data and meta.get("data_named"):
            raise ValueError(
                f"{path} was trained on {meta['data_named']}: pass it with --data (a path read from a checkpoint "
                "is never opened)"
            )
        data_spec = args.data or meta.get("data") or "fashion-mnist"
        data = build_data(
            data_spec,
            img_size=args.img_size or meta.get("img_size"),
            eval_subset=args.subset,
            seed=args.seed,
            eval_split=args.split,
            with_train=False,
        )
        if meta and (meta["num_classes"], meta["in_chans"]) != (data.num_classes, data.in_chans):
            raise ValueError(
                f"{path} was trained for {meta['num_classes']} classes / {meta['in_chans']} channels, but "
                f"--data {data_spec} has {data.num_classes} / {data.in_chans}: pass the data it was trained on"
            )
        build = functools.partial(build_model, name, data.num_classes, data.in_chans, data.img_size, kwargs)
        if meta:
            check_model_fits_weights(
                build, state, str(path)
            )  # before allocating a model the file may inflate
        model = build()
        load_weights(model, state, path, name)
        device = device_option(args.device, 0)
        loader = DataLoader(data.eval, batch_size=args.batch_size)
        amp = torch.bfloat16 if args.amp == "bf16" else None
        result = evaluate(model.to(device), loader, device, data.num_classes, amp, progress=args.progress)
    except (ValueError, OSError) as err:
        print(f"agentattn eval: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1

    print(f"model {name} ({sum(p.numel() for p in model.parameters()):,} params), checkpoint {path}")
    print(f"data {data_spec}, split {data.eval_split}, {result['images']} images")
    print(f"top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  loss {result['loss']:.4f}")
    print(f"throughput {result['img_per_s']:.1f} img/s (batch {args.batch_size}, {device})")
    print("confusion matrix (rows: true class, columns: predicted class):")
    print(format_confusion(result["confusion"], data.class_names))
    if args.json:
        out = {k: v for k, v in result.items() if k != "confusion"}
        out.update(
            confusion=result["confusion"].tolist(), model=name, checkpoint=str(path), split=data.eval_split
        )
        atomic_write_text(args.json, json.dumps(out, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="agentattn eval", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
