"""Rebuild a trained model from a checkpoint: the run's own ``last.pth``, or a foreign state dict.

A checkpoint written by ``agentattn train`` records its model name, model kwargs, classes, channels and input
size, so ``model_from_checkpoint(path)`` needs nothing else. Any other state dict (``.pth`` loaded safely, or
``.safetensors``) needs the model name (and kwargs) from the caller.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models._checkpoint import load_checkpoint, safe_torch_load
from .loop import CHECKPOINT_FORMAT, build_model

__all__ = ["load_weights", "model_from_checkpoint", "read_checkpoint"]


def read_checkpoint(
    path: str | Path, use_ema: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, what the run recorded about it) of a checkpoint; the record is ``{}`` for foreign files.

    Raises:
        ValueError: missing, unreadable or unsafe file, or ``use_ema`` for a run without EMA.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such checkpoint file (pass the last.pth of a training run)")
    if path.suffix != ".safetensors":
        obj = safe_torch_load(path)
        if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
            state = obj.get("state_dict_ema") if use_ema else obj["model"]
            if state is None:
                raise ValueError(f"{path}: the run had no EMA (--ema-decay 0); drop --ema")
            return state, obj
    return load_checkpoint(path, use_ema=use_ema), {}


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path, name: str) -> None:
    """``model.load_state_dict(state)`` (strict), with a one-line error that names the file and the model.

    Raises:
        ValueError: the state dict comes from another architecture.
    """
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        detail = next((ln.strip() for ln in str(err).splitlines()[1:] if ln.strip()), "")
        raise ValueError(
            f"{path} does not fit model {name!r} ({detail[:200]}): it comes from another architecture; "
            "pass the matching --model/--model-kwargs"
        ) from err


def model_from_checkpoint(
    path: str | Path,
    *,
    use_ema: bool = False,
    model_name: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    num_classes: int | None = None,
    in_chans: int | None = None,
    img_size: int | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """The model of a checkpoint with its weights loaded, in eval mode, and the run's record (``{}`` if foreign).

    Arguments given here override the record; a foreign file needs at least ``model_name`` (the other values
    then default to the model's own).

    Raises:
        ValueError: unreadable file, unknown or mismatched model name, or weights of another architecture.
    """
    state, meta = read_checkpoint(path, use_ema)
    recorded = meta.get("model_name")
    if model_name and recorded and model_name != recorded:
        raise ValueError(f"{path} is a checkpoint of {recorded!r}, not {model_name!r}: drop --model")
    name = recorded or model_name
    if not name:
        raise ValueError(f"{path} does not record its model: pass --model NAME (and --model-kwargs)")
    kwargs = dict(meta.get("model_kwargs") or {})
    kwargs.update(model_kwargs or {})
    if meta:
        model = build_model(
            name,
            num_classes or meta["num_classes"],
            in_chans or meta["in_chans"],
            img_size or meta["img_size"],
            kwargs,
        )
    else:
        # Foreign weights: the model's defaults unless told otherwise (the head size comes from the file).
        head = next((k for k in state if k.endswith("head.weight") or k.endswith("head.fc.weight")), None)
        classes = num_classes or (state[head].shape[0] if head is not None else None)
        extra = {k: v for k, v in (("in_chans", in_chans), ("img_size", img_size)) if v is not None}
        model = build_model(
            name, classes or 1000, extra.pop("in_chans", 3), extra.pop("img_size", 224), kwargs
        )
    load_weights(model, state, path, name)
    return model.eval(), meta
