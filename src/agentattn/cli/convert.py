"""``agentattn convert IN.pth OUT.safetensors [--ema]``: a clean safetensors file from a training checkpoint.

The input is read with the safe loader (no pickled code runs) and unwrapped (``model``, ``state_dict``,
``state_dict_ema`` with ``--ema``, ``module.`` prefixes); the output holds only the tensors, with metadata
naming the source file. With ``--hub MODEL`` the output is a Hugging Face Hub directory in timm's format
(config.json, model.safetensors, README.md), loadable with ``timm.create_model("local-dir:OUT", pretrained=True)``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..io import check_views_within_storages, load_checkpoint, save_safetensors


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``convert`` arguments: input, output, ``--ema``."""
    parser.add_argument(
        "input", type=Path, help="checkpoint to read (.pth/.pt/.bin torch.save file or .safetensors)"
    )
    parser.add_argument("output", type=Path, help="safetensors file to write (a directory with --hub)")
    parser.add_argument(
        "--ema", action="store_true", help="take the EMA weights (state_dict_ema / model_ema)"
    )
    parser.add_argument(
        "--hub",
        metavar="MODEL",
        default=None,
        help="write a timm Hub directory for this registered model (e.g. agent_deit_tiny_patch16_224) instead",
    )


def run(args: argparse.Namespace) -> int:
    """Convert ``args.input`` to ``args.output``; return 0, or 1 with a message on stderr on failure."""
    src, dst = Path(args.input), Path(args.output)
    if getattr(args, "hub", None):
        return _run_hub(src, dst, args.hub, bool(getattr(args, "ema", False)))
    try:
        if src.resolve() == dst.resolve():
            raise ValueError("the output would overwrite the input")
        if dst.suffix != ".safetensors":
            raise ValueError(f"the output {dst} should end in .safetensors")
        state = load_checkpoint(src, use_ema=bool(getattr(args, "ema", False)))
        check_views_within_storages(state)  # the output holds no more bytes than the input's storages
        metadata = {"format": "pt", "source": src.name, "ema": str(bool(getattr(args, "ema", False))).lower()}
        save_safetensors(state, dst, metadata=metadata)
    except (ValueError, OSError) as err:
        print(f"agentattn convert: error: {err}", file=sys.stderr)
        return 1
    numel = sum(t.numel() for t in state.values())
    print(f"wrote {len(state)} tensors ({numel:,} values) to {dst}")
    return 0


def _run_hub(src: Path, dst: Path, model_name: str, ema: bool) -> int:
    import timm

    from ..models import hub
    from ..models.record import checked_model_name

    try:
        name = checked_model_name(model_name, "--hub")
        if dst.exists() and not dst.is_dir():
            raise ValueError(f"the output {dst} must be a directory with --hub")
        if not src.is_file():
            raise ValueError(f"no such checkpoint file: {src}")
        model = timm.create_model(
            f"{name}.in1k_ema" if ema else name, pretrained=True, pretrained_cfg_overlay=dict(file=str(src))
        )
        hub.save_for_hub(model, dst)
    except (ValueError, OSError, RuntimeError) as err:
        print(f"agentattn convert: error: {err}", file=sys.stderr)
        return 1
    print(
        f"wrote {dst}/ (config.json, model.safetensors, README.md); load it with "
        f"timm.create_model('local-dir:{dst}', pretrained=True)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="agentattn convert", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
