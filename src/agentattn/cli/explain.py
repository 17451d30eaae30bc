"""``agentattn explain CHECKPOINT IMAGE... [--output DIR] [--layer NAME]``: what the agents attend to.

CHECKPOINT is the ``last.pth`` of a run (it records its model), or any state dict with ``--model``. IMAGE is
a file PIL reads, or ``fashion-mnist:test:INDEX``. One PNG per image goes to ``--output``. Bad input ends with
one ``agentattn explain: error: ...`` line and exit code 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..report.explain import explain, load_images, preprocessing_for
from ..train.restore import model_from_checkpoint
from .train import parse_model_kwargs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``explain`` options."""
    add = parser.add_argument
    add("checkpoint", type=Path, help="last.pth of a training run, or a state dict file with --model")
    add("images", nargs="+", metavar="IMAGE", help="image files or fashion-mnist:test:INDEX")
    add(
        "--output", type=Path, default=Path("explain"), help="directory for the figures (default %(default)s)"
    )
    add("--layer", default=None, help="agent-attention layer to draw (default: the first, finest one)")
    add("--model", default=None, help="model name, for checkpoints that do not record it")
    add("--model-kwargs", nargs="*", default=None, metavar="KEY=VALUE")
    add("--ema", action="store_true", help="use the EMA weights")


def run(args: argparse.Namespace) -> int:
    """Draw the figures; print one line per image. 0, or 1 with one line on stderr."""
    try:
        model, meta = model_from_checkpoint(
            args.checkpoint,
            use_ema=args.ema,
            model_name=args.model,
            model_kwargs=parse_model_kwargs(args.model_kwargs),
        )
        prep = preprocessing_for(model, meta)
        images, labels = load_images(args.images, **prep)
        class_names = list(meta.get("class_names") or [])
        names = [
            Path(s).stem if not s.startswith("fashion-mnist:") else s.replace(":", "_") for s in args.images
        ]
        results = explain(model, images, args.output, names, class_names, labels, layer=args.layer)
    except (ValueError, OSError) as err:
        print(f"agentattn explain: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    for source, item in zip(args.images, results, strict=True):
        name = class_names[item.predicted] if item.predicted < len(class_names) else str(item.predicted)
        print(f"{source}: predicted {name} ({100 * item.probability:.1f}%) -> {item.figure}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="agentattn explain", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
