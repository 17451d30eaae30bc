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

from ..io import load_checkpoint, quote, safe_torch_load
from ..models.record import check_model_fits_weights, read_model_record
from .loop import CHECKPOINT_FORMAT, build_model
from .record_checks import check_state_dict

BUILTIN_DATA = ("fashion-mnist",)

__all__ = ["load_weights", "model_from_checkpoint", "read_checkpoint"]


def read_checkpoint(
    path: str | Path, use_ema: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, what the run recorded about it) of a checkpoint; the record is ``{}`` for foreign files.

    The record holds the checked model fields (:func:`agentattn.models.record.read_model_record`:
    ``model_name``, ``model_kwargs``, ``num_classes``, ``in_chans``, ``img_size``) and ``data``, the data set the
    run trained on when it is a built-in one (``"fashion-mnist"``), else None: a path read from a file is never
    opened, the caller must name the data (``data_named`` then quotes it, for messages); and ``class_names`` (checked strings, or ``[]``). Nothing else of the
    file is passed on.

    Raises:
        ValueError: missing, unreadable, unsafe or malformed file, or ``use_ema`` for a run without EMA.
    """
    path = Path(path)
    if path.is_dir() and (path / "last.pth").is_file():
        path = path / "last.pth"
    if not path.is_file():
        raise ValueError(f"{path}: no such checkpoint file (pass the last.pth of a training run)")
    if path.suffix != ".safetensors":
        obj = safe_torch_load(path)
        if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
            key = "state_dict_ema" if use_ema else "model"
            state = obj.get(key)
            if state is None and use_ema:
                raise ValueError(f"{path}: the run had no EMA (ema_decay 0); set use_ema to False")
            if not check_state_dict(path, key, state):
                raise ValueError(f"{path}: field {key} is an empty state dict")
            record: dict[str, Any] = dict(read_model_record(obj, str(path)))
            config = obj.get("config")
            if not isinstance(config, dict):
                raise ValueError(f"{path}: its 'config' entry is a {type(config).__name__}, not a dict")
            data = config.get("data")
            # The data set's kind, never a path chosen by the file (fashion-mnist:DIR is kept as fashion-mnist).
            kind = data.split(":", 1)[0] if isinstance(data, str) else None
            record["data"] = kind if kind in BUILTIN_DATA else None
            if record["data"] is None and data is not None:  # for messages only: never opened
                record["data_named"] = quote(data, 120)
            names = obj.get("class_names", [])
            if not (
                isinstance(names, list)
                and len(names) in (0, record["num_classes"])
                and all(isinstance(n, str) and len(n) <= 256 for n in names)
            ):
                raise ValueError(
                    f"{path}: class_names is not a list of num_classes short strings: {quote(names)}"
                )
            record["class_names"] = list(names)
            return dict(state), record
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
            "pass the matching model_name and model_kwargs"
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
        raise ValueError(
            f"{path} is a checkpoint of {quote(recorded)}, not {model_name!r}: leave model_name unset"
        )
    name = recorded or model_name
    if not name:
        raise ValueError(f"{path} does not record its model: pass model_name (and model_kwargs)")
    kwargs = dict(meta.get("model_kwargs") or {})
    kwargs.update(model_kwargs or {})
    if meta:
        args = (
            name,
            num_classes or meta["num_classes"],
            in_chans or meta["in_chans"],
            img_size or meta["img_size"],
        )
    else:
        # Foreign weights: the model's defaults unless told otherwise (the head size comes from the file).
        head = next((k for k in state if k.endswith("head.weight") or k.endswith("head.fc.weight")), None)
        classes = num_classes or (
            int(state[head].shape[0]) if head is not None and state[head].dim() else None
        )
        args = (name, classes or 1000, in_chans or 3, img_size or 224)
    if (
        meta
    ):  # the file's fields may describe a model far larger than its weights: check on the meta device first
        check_model_fits_weights(lambda: build_model(*args, kwargs), state, str(path))
    model = build_model(*args, kwargs)
    load_weights(model, state, path, name)
    return model.eval(), meta
