"""What a training run trains and checkpoints, built as timm's recipe builds it: the model (:func:`build_model`),
AdamW, the per-step cosine schedule with warm-up, the optional GradScaler, EMA and mixup, and the loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import timm
import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch import nn

from ..models import check_model_name
from .config import TrainConfig
from .data import DataBundle
from .process import RunProcess
from .state import _seed_everything

__all__ = ["RunParts", "build_model", "build_parts"]


def build_model(
    name: str, num_classes: int, in_chans: int, img_size: int, model_kwargs: dict[str, Any] | None = None
) -> nn.Module:
    """``timm.create_model`` of a registered name (``import agentattn`` registers the agent models).

    Raises:
        ValueError: an unknown model name, or kwargs the model does not take.
    """
    check_model_name(name)
    kwargs = dict(model_kwargs or {})
    kwargs.setdefault("img_size", img_size)
    try:
        return timm.create_model(name, num_classes=num_classes, in_chans=in_chans, **kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"model {name!r} rejects the model kwargs {kwargs}: {err}") from err


@dataclass
class RunParts:
    """What a run trains and checkpoints: the model and everything that updates it."""

    model: nn.Module
    model_kwargs: dict[str, Any]
    optimizer: torch.optim.Optimizer
    scheduler: CosineLRScheduler
    scaler: torch.amp.GradScaler | None
    ema: ModelEmaV3 | None
    mixup: Mixup | None
    criterion: nn.Module


def build_parts(config: TrainConfig, data: DataBundle, proc: RunProcess, steps_per_epoch: int) -> RunParts:
    """Model, AdamW, cosine schedule (per step, with warm-up), EMA, mixup and loss, as timm's recipe sets them.
    The same seed on every rank gives every rank the same initial weights."""
    _seed_everything(config.seed)
    model_kwargs = dict(config.model_kwargs)
    if config.drop_path is not None:
        model_kwargs["drop_path_rate"] = config.drop_path
    model = build_model(config.model, data.num_classes, data.in_chans, data.img_size, model_kwargs)
    model = model.to(proc.device)
    global_batch = config.batch_size * proc.world_size
    scale = global_batch / config.lr_base_batch if config.lr_base_batch > 0 else 1.0
    no_decay = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    optimizer = torch.optim.AdamW(
        param_groups_weight_decay(model, config.weight_decay, no_weight_decay_list=no_decay),
        lr=config.lr * scale,
        betas=tuple(config.betas),
        eps=config.eps,
    )
    warmup_steps = int(config.warmup_epochs * steps_per_epoch)
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=max(1, config.epochs * steps_per_epoch - warmup_steps),
        lr_min=config.min_lr * scale,
        warmup_t=warmup_steps,
        warmup_lr_init=config.warmup_lr * scale,
        warmup_prefix=True,
        cycle_limit=1,
        t_in_epochs=False,
    )
    scaler = torch.amp.GradScaler("cuda") if proc.amp_dtype == torch.float16 else None
    ema = (
        ModelEmaV3(model, decay=config.ema_decay, stochastic_rounding=False) if config.ema_decay > 0 else None
    )
    return RunParts(model, model_kwargs, optimizer, scheduler, scaler, ema, *_mixup_and_loss(config, data))


def _mixup_and_loss(config: TrainConfig, data: DataBundle) -> tuple[Mixup | None, nn.Module]:
    """Mixup/CutMix (None when both are off) and the loss that fits it: soft-target CE with mixup, else CE."""
    mixup = None
    if config.mixup > 0 or config.cutmix > 0:
        mixup = Mixup(
            mixup_alpha=config.mixup,
            cutmix_alpha=config.cutmix,
            prob=config.mixup_prob,
            switch_prob=config.mixup_switch_prob,
            label_smoothing=config.label_smoothing,
            num_classes=data.num_classes,
        )
    criterion: nn.Module = (
        SoftTargetCrossEntropy() if mixup else nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    )
    return mixup, criterion
