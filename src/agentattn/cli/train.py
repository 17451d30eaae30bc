"""``agentattn train --data SRC --model NAME --epochs E --output DIR [--resume] [--overwrite] [...]``.

Options left out take the preset's value (``--preset imagenet-agent``, the paper's ImageNet recipe), else the
:class:`~agentattn.train.config.TrainConfig` default. Under ``torchrun --nproc_per_node=K -m agentattn train``
the run is data-parallel (DDP). Bad input ends with one ``agentattn train: error: ...`` line and exit code 1.

OUTPUT belongs to one live run: a second run into it stops at once. A directory holding an earlier run's results
is continued with ``--resume`` (from its last.pth), or replaced with ``--overwrite``; otherwise the run refuses.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path
from typing import Any

from ..io import one_line
from ..train.config import PRESETS, TrainConfig
from ..train.loop import train
from ..train.state import CHECKPOINT_NAME
from .defaults import show_config_defaults


def parse_model_kwargs(items: list[str] | None) -> dict[str, Any]:
    """``["depths=(1,1,1,1)", "attn_type=AAAA"]`` -> ``{"depths": (1, 1, 1, 1), "attn_type": "AAAA"}``.

    Values are Python literals where they parse as one, else strings.
    """
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--model-kwargs {item!r} is not key=value")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``train`` options. Defaults are applied in :func:`build_config` (preset, then dataclass)."""
    S = argparse.SUPPRESS
    add = parser.add_argument
    add("--data", default=S, help="fashion-mnist, fashion-mnist:DIR or imagefolder:PATH")
    add("--model", default=S, help="registered timm model name")
    add("--model-kwargs", nargs="*", default=S, metavar="KEY=VALUE", help="model kwargs, Python literals")
    add("--epochs", type=int, default=S)
    add("--output", default=S, help="run directory (metrics, last.pth)")
    add("--resume", action="store_true", default=S, help="continue from OUTPUT/last.pth")
    add(
        "--overwrite",
        action="store_true",
        default=S,
        help="replace the results of an earlier run in OUTPUT (with --resume: only if it has no last.pth)",
    )
    add("--preset", choices=sorted(PRESETS), default=S, help="imagenet-agent: the paper's ImageNet recipe")
    add("--batch-size", type=int, default=S, help="per process")
    add("--lr", type=float, default=S)
    add("--warmup-lr", type=float, default=S)
    add("--min-lr", type=float, default=S)
    add("--warmup-epochs", type=float, default=S)
    add("--cooldown-epochs", type=int, default=S)
    add("--lr-base-batch", type=int, default=S, help="scale lrs by global batch / this (0: off)")
    add("--weight-decay", type=float, default=S)
    add("--label-smoothing", type=float, default=S)
    add("--mixup", type=float, default=S, help="Mixup alpha (0: off)")
    add("--cutmix", type=float, default=S, help="CutMix alpha (0: off)")
    add("--mixup-prob", type=float, default=S)
    add("--mixup-switch-prob", type=float, default=S)
    add("--clip-grad", type=float, default=S, help="max grad norm (0: off)")
    add("--ema-decay", type=float, default=S, help="model EMA decay (0: no EMA)")
    add("--amp", choices=["none", "bf16", "fp16"], default=S, help="autocast dtype (fp16: CUDA only)")
    add("--drop-path", type=float, default=S)
    add("--img-size", type=int, default=S)
    add("--auto-augment", default=S, help="timm auto-augment string (image folders)")
    add("--color-jitter", type=float, default=S)
    add("--reprob", type=float, default=S, help="random erasing probability (image folders)")
    add("--interpolation", default=S)
    add("--train-subset", type=int, default=S, help="train on N images chosen from the seed")
    add("--eval-subset", type=int, default=S)
    add("--seed", type=int, default=S)
    add(
        "--deterministic",
        action="store_true",
        default=S,
        help="deterministic kernels, 1 thread unless --threads",
    )
    add("--threads", type=int, default=S)
    add("--num-workers", type=int, default=S)
    add("--ckpt-every-steps", type=int, default=S, help="also checkpoint every K optimizer steps")
    add("--max-steps", type=int, default=S, help="stop after this many steps in total")
    add("--device", default=S, help="auto, cpu or cuda")
    add("--no-progress", dest="progress", action="store_false", default=S)
    show_config_defaults(parser, TrainConfig)


def build_config(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from the given options over the preset's values over the defaults."""
    given = {k: v for k, v in vars(args).items() if k not in ("command", "handler")}
    values: dict[str, Any] = dict(PRESETS[given["preset"]]) if given.get("preset") else {}
    if "model_kwargs" in given:
        given["model_kwargs"] = parse_model_kwargs(given["model_kwargs"])
    values.update(given)
    if values.get("deterministic") and values.get("num_workers"):
        raise ValueError("--deterministic needs --num-workers 0 (worker processes reorder RNG draws)")
    return TrainConfig(**values)


def run(args: argparse.Namespace) -> int:
    """Train; return 0, or 1 with one line on stderr for bad input."""
    config = None
    try:
        config = build_config(args)
        train(config)
    except (ValueError, OSError, FloatingPointError) as err:
        print(f"agentattn train: error: {one_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        saved = config is not None and (Path(config.output) / CHECKPOINT_NAME).is_file()
        how = "continue with --resume" if saved else "no checkpoint yet: start again with --overwrite"
        print(f"agentattn train: interrupted ({how})", file=sys.stderr)
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="agentattn train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
