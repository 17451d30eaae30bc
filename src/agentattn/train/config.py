"""What a training run is asked to do: :class:`TrainConfig` (the CLI's options, one field each), the presets, and
the checks every field passes before a run starts."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["PRESETS", "TrainConfig", "check_config"]


@dataclass
class TrainConfig:
    """Everything a run depends on. ``agentattn train`` fills it from the command line."""

    data: str = "fashion-mnist"
    model: str = "agent_pvt_tiny_224"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    output: str = "runs/train"
    epochs: int = 1
    cooldown_epochs: int = 0  # extra epochs at min_lr after the cosine ends (the official PVT/CSwin recipe)
    batch_size: int = 128  # per process
    lr: float = 1e-3
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    warmup_epochs: float = 0.0
    lr_base_batch: int = 0  # >0: scale the three lrs by global batch / lr_base_batch (the paper uses 512)
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    label_smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    clip_grad: float = 0.0  # 0: off
    ema_decay: float = 0.0  # 0: no EMA
    amp: str = "none"  # none | bf16 (CPU or CUDA) | fp16 (CUDA, with a GradScaler)
    drop_path: float | None = None  # overrides the model's drop_path_rate
    img_size: int | None = None  # default: the data's native size (28 for Fashion-MNIST, 224 for folders)
    auto_augment: str | None = None  # image folders only (timm transforms)
    color_jitter: float = 0.0
    reprob: float = 0.0
    interpolation: str = "bilinear"
    train_subset: int | None = None
    eval_subset: int | None = None
    seed: int = 0
    deterministic: bool = False
    threads: int = 0  # 0: torch's default (deterministic mode fixes it to 1 unless given)
    num_workers: int = 0
    ckpt_every_steps: int = 0
    max_steps: int = 0  # >0: stop after this many optimizer steps in total (smoke tests)
    resume: bool = False
    overwrite: bool = False  # replace an earlier run's results (that has no checkpoint to resume)
    device: str = "auto"
    progress: bool = True
    preset: str | None = None


# The ImageNet recipe of the paper (spec §7.1, Swin/DeiT defaults). Per-family overrides (PVT: warmup 5,
# cooldown 10, min lr 1e-5, warmup lr 1e-6, clip off for T/S) go on the command line.
PRESETS: dict[str, dict[str, Any]] = {
    "imagenet-agent": dict(
        epochs=300,
        warmup_epochs=20,
        cooldown_epochs=0,
        batch_size=128,
        lr=5e-4,
        warmup_lr=5e-7,
        min_lr=5e-6,
        lr_base_batch=512,
        weight_decay=0.05,
        betas=(0.9, 0.999),
        eps=1e-8,
        clip_grad=5.0,
        label_smoothing=0.1,
        mixup=0.8,
        cutmix=1.0,
        mixup_prob=1.0,
        mixup_switch_prob=0.5,
        auto_augment="rand-m9-mstd0.5-inc1",
        color_jitter=0.4,
        reprob=0.25,
        interpolation="bicubic",
        img_size=224,
        num_workers=8,
    ),
}


def check_config(config: TrainConfig) -> None:
    """ValueError naming the config field for out-of-range settings, before any work."""

    def bad(name: str, want: str) -> ValueError:
        return ValueError(f"{name} must be {want}, got {getattr(config, name)!r}")

    for name in ("epochs", "batch_size"):
        if getattr(config, name) < 1:
            raise bad(name, "at least 1")
    for name in (
        "cooldown_epochs",
        "lr_base_batch",
        "threads",
        "num_workers",
        "ckpt_every_steps",
        "max_steps",
    ):
        if getattr(config, name) < 0:
            raise bad(name, ">= 0")
    for name in ("lr", "warmup_lr", "min_lr", "warmup_epochs", "weight_decay", "mixup", "cutmix", "clip_grad",
                 "eps", "color_jitter"):  # fmt: skip
        value = getattr(config, name)
        if not (math.isfinite(value) and value >= 0):
            raise bad(name, "a finite number >= 0")
    if not config.lr > 0:
        raise bad("lr", "> 0")
    for name in ("label_smoothing", "ema_decay"):
        if not 0.0 <= getattr(config, name) < 1.0:
            raise bad(name, "in [0, 1)")
    for name in ("mixup_prob", "mixup_switch_prob", "reprob"):
        if not 0.0 <= getattr(config, name) <= 1.0:
            raise bad(name, "in [0, 1]")
    if config.drop_path is not None and not 0.0 <= config.drop_path < 1.0:
        raise bad("drop_path", "in [0, 1)")
    for name in ("img_size", "train_subset", "eval_subset"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise bad(name, "a positive int")
    if config.device not in ("auto", "cpu", "cuda") and not config.device.startswith(("cuda:", "mps", "xpu")):
        raise bad("device", "auto, cpu or cuda[:N]")
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {config.device!r}: CUDA is not available on this machine; use device 'cpu'")


def _amp_dtype(amp: str) -> torch.dtype | None:
    if amp not in ("none", "bf16", "fp16"):
        raise ValueError(f"amp must be 'none', 'bf16' or 'fp16', got {amp!r}")
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
