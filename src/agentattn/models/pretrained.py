"""Loading a checkpoint into an agent model: resizing the agent bias tables to the model's grid, dropping a
classifier of another size, and reporting what did not match (the ``pretrained_file`` path of every family)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..io.checkpoint import load_checkpoint

__all__ = ["load_pretrained", "resize_agent_bias_tables"]

_logger = logging.getLogger(__name__)

PathLike = str | os.PathLike


# ---------------------------------------------------------------------------------------------------------------
# Resizing and loading into a model.

# Spatial axis of each row/column bias: ah (1,h,n,H,1), aw (1,h,n,1,W), ha (1,h,H,1,n), wa (1,h,1,W,n).
_BIAS_SPATIAL_AXIS = {"ah_bias": 3, "aw_bias": 4, "ha_bias": 2, "wa_bias": 3}


def resize_agent_bias_tables(
    state_dict: Mapping[str, torch.Tensor], model: nn.Module
) -> dict[str, torch.Tensor]:
    """Resize the row/column agent biases of a checkpoint to the model's grid (spec §4, official fine-tuning).

    Every ``*.ah_bias``/``aw_bias``/``ha_bias``/``wa_bias`` whose spatial side differs from the model's is
    1-D linearly interpolated (``F.interpolate(mode='linear', align_corners=False)``) along that side; heads and
    agents must match. ``an_bias``/``na_bias`` are always 7×7 and need nothing.

    Returns:
        A new dict; other entries are passed through unchanged.
    """
    target = model.state_dict()
    out = dict(state_dict)
    for key, value in state_dict.items():
        name = key.rsplit(".", 1)[-1]
        if name not in _BIAS_SPATIAL_AXIS or key not in target or value.shape == target[key].shape:
            continue
        axis, want = _BIAS_SPATIAL_AXIS[name], target[key].shape
        if value.dim() != 5 or len(want) != 5:
            continue
        if any(a != b for i, (a, b) in enumerate(zip(value.shape, want, strict=True)) if i != axis):
            continue  # heads/agents differ: left for load_pretrained to report
        moved = value.movedim(axis, -1)
        lead = moved.shape[:-1]
        resized = F.interpolate(
            moved.reshape(1, -1, moved.shape[-1]).float(), size=want[axis], mode="linear", align_corners=False
        )
        out[key] = resized.reshape(*lead, want[axis]).movedim(-1, axis).to(value.dtype).contiguous()
        _logger.info("resized %s from %s to %s", key, tuple(value.shape), tuple(want))
    return out


def _classifier_names(model: nn.Module) -> list[str]:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    names = cfg.get("classifier") if isinstance(cfg, Mapping) else None
    if names:
        return [names] if isinstance(names, str) else list(names)
    get = getattr(model, "get_classifier", None)
    if callable(get):
        head = get()
        for name, module in model.named_modules():
            if module is head and name:
                return [name]
    return []


def _listing(title: str, keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")
    return f"\n  {title} ({len(keys)}): {shown}"


def load_pretrained(
    model: nn.Module,
    checkpoint_path: PathLike,
    filter_fn: Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]] | None = None,
    use_ema: bool | None = None,
    strict: bool = True,
) -> None:
    """Load a checkpoint into ``model`` safely (see :func:`load_checkpoint`).

    ``use_ema=None`` follows the model's pretrained tag: ``NAME.in1k_ema`` loads ``state_dict_ema``, so that
    ``timm.create_model("NAME.in1k_ema", pretrained=True, pretrained_cfg_overlay=dict(file=PATH))`` does.

    ``filter_fn(state_dict, model)`` adapts the official layout (drops re-created buffers, resamples position
    tables and agent biases). A classifier whose shape differs from the model's (another ``num_classes``) is
    dropped, and the model keeps its freshly initialised head. Any other mismatch raises ValueError listing the
    missing, unexpected and mis-shaped keys; with ``strict=False`` they are skipped with a warning.
    """
    if use_ema is None:
        use_ema = str((getattr(model, "pretrained_cfg", None) or {}).get("tag") or "").endswith("ema")
    state = load_checkpoint(checkpoint_path, use_ema=use_ema)
    if filter_fn is not None:
        state = filter_fn(state, model)
    target = model.state_dict()

    reinit, kept = [], []
    heads = _classifier_names(model)
    for head in heads:
        for key in [k for k in state if k == head or k.startswith(head + ".")]:
            if key not in target or state[key].shape != target[key].shape:
                reinit.append(key)
                del state[key]
    if reinit:
        kept = [k for k in target if k not in state and any(k.startswith(h + ".") for h in heads)]
        _logger.warning(
            "%s: classifier shape differs from the model's (num_classes change); dropped %s, re-initialised %s",
            checkpoint_path,
            reinit,
            kept,
        )

    missing = [k for k in target if k not in state and k not in kept]
    unexpected = [k for k in state if k not in target]
    misshaped = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(target[k].shape)}"
        for k in state
        if k in target and state[k].shape != target[k].shape
    ]
    if missing or unexpected or misshaped:
        message = f"{checkpoint_path} does not match {type(model).__name__}:"
        if missing:
            message += _listing("missing", missing)
        if unexpected:
            message += _listing("unexpected", unexpected)
        if misshaped:
            message += _listing("mis-shaped", misshaped)
        if strict:
            raise ValueError(message)
        _logger.warning("%s\n  (strict=False: loading the rest)", message)
        for entry in misshaped:
            del state[entry.split(" ", 1)[0]]
    model.load_state_dict(state, strict=False)
