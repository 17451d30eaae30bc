"""Training, evaluation and comparison of dense models: what ``agentattn dense`` runs.

    train: AdamW, linear warmup, steps ×0.1 at 8/12 and 11/12 of the run (mmdet's 1x shape), then evaluate
    eval:  detection → COCO box / mask AP through pycocotools; segmentation → mIoU, mAcc (mmseg's definitions)
           (in :mod:`agentattn.dense.evaluation`, re-exported here)
    compare: params, FLOPs (one multiply-add = one FLOP) and CPU/GPU latency of a detector with the agent
             backbone and with its softmax twin (in :mod:`agentattn.dense.compare`, re-exported here)

Files in ``output``: ``metrics.jsonl`` (step and eval lines, appended through :func:`agentattn.io.open_log`,
which never writes through a symlink), ``final.json`` (config + final metrics) and ``model.pth`` (plain
containers and tensors: config, weights, metrics), both written atomically. A run holds ``output`` for its whole
life (a second run into it stops at once) and refuses to start over an earlier run's results unless
``overwrite``, which removes those three files (nothing else).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.scheduler import MultiStepLRScheduler
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..device import resolve_device
from ..io import (
    atomic_torch_save,
    atomic_write_text,
    load_tagged_checkpoint,
    lock_run_directory,
    open_log,
)
from ..models.record import check_model_fits_weights
from ..train.record_checks import (
    check_architecture_kwargs,
    check_bool,
    check_dataclass_values,
    check_int,
    check_state_dict,
    get_field,
    load_state_dict_checked,
    prepare_output,
)
from .compare import backbone_flops, compare_detectors
from .data import IGNORE_INDEX, DenseData, build_dense_data
from .detection import DETECTOR_KINDS, build_detector
from .evaluation import dense_loader, evaluate_detection, evaluate_segmentation
from .segmentation import SEGMENTER_KINDS, build_segmenter

__all__ = [
    "DenseConfig",
    "backbone_flops",
    "build_dense_model",
    "compare_detectors",
    "evaluate_detection",
    "evaluate_segmentation",
    "load_dense_checkpoint",
    "train_dense",
]

CHECKPOINT_FORMAT = "agentattn-dense-v1"
# The files a run writes into its output directory: what ``overwrite`` removes, and nothing else.
RUN_FILES = ("metrics.jsonl", "final.json", "model.pth")
MAX_CLASSES = 100_000

# Light heads for the ≤256 px synthetic task (the backbone is unchanged): small anchors, narrow FPN and heads,
# fewer proposals. Real data (coco:PATH) uses torchvision's defaults and 800/1333.
SYNTHETIC_DETECTOR_KWARGS: dict[str, Any] = dict(
    fpn_channels=128,
    representation_size=256,
    mask_head_channels=64,
    anchor_sizes=(16, 32, 64, 128, 256),
    rpn_pre_nms_top_n_train=500,
    rpn_post_nms_top_n_train=250,
    rpn_pre_nms_top_n_test=500,
    rpn_post_nms_top_n_test=100,
    box_batch_size_per_image=128,
    box_detections_per_img=20,  # at most 4 objects per image
)


@dataclass
class DenseConfig:
    """Everything one ``agentattn dense train`` run depends on (defaults: the synthetic acceptance run)."""

    task: str = "det"
    kind: str = "maskrcnn"
    backbone: str = "agent_pvt_tiny_224"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    agent_grids: Any = None
    pretrained_backbone: str | None = None
    detector_kwargs: dict[str, Any] = field(default_factory=dict)
    data: str = "synthetic"
    img_size: int = 128
    min_size: int | None = None  # detector resize; default img_size (synthetic) or 800
    max_size: int | None = None  # default img_size (synthetic) or 1333
    num_train: int = 2000
    num_val: int = 200
    epochs: int = 12
    max_steps: int | None = None
    time_limit_min: float | None = 15.0  # then evaluate: the default run ends within 20 min on 2 CPU cores
    batch_size: int = 4
    lr: float = 6e-4  # best stable value of benchmarks/dense_lr_sweep.sh at the CPU budget (2e-3 diverges)
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    clip_grad: float = 5.0
    seed: int = 0
    threads: int | None = None
    num_workers: int = 0
    device: str = "auto"
    output: str = "runs/dense"
    overwrite: bool = False  # replace an earlier run's results in output
    progress: bool = True

    def __post_init__(self) -> None:
        kinds = DETECTOR_KINDS if self.task == "det" else SEGMENTER_KINDS
        if self.task not in ("det", "seg"):
            raise ValueError(f"task must be 'det' or 'seg', got {self.task!r}")
        if self.task == "seg" and self.kind == "maskrcnn":
            self.kind = "fpn"  # the default kind is a detector's
        if self.kind not in kinds:
            raise ValueError(f"kind for task {self.task!r} must be one of {kinds}, got {self.kind!r}")
        for name in ("epochs", "batch_size", "num_train", "num_val", "img_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.time_limit_min is not None and self.time_limit_min <= 0:
            self.time_limit_min = None  # 0 disables the limit
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


def build_dense_model(config: DenseConfig, num_classes: int, synthetic: bool) -> nn.Module:
    """The detector or segmenter ``config`` describes, for ``num_classes`` classes."""
    if config.task == "det":
        kwargs: dict[str, Any] = dict(SYNTHETIC_DETECTOR_KWARGS) if synthetic else {}
        kwargs["min_size"] = config.min_size or (config.img_size if synthetic else 800)
        kwargs["max_size"] = config.max_size or (config.img_size if synthetic else 1333)
        if config.kind == "retinanet":
            for key in [k for k in kwargs if k.startswith(("rpn_", "box_", "representation", "mask_"))]:
                kwargs.pop(key, None)
        elif config.kind == "fasterrcnn":
            kwargs.pop("mask_head_channels", None)
        kwargs.update(config.detector_kwargs)
        return build_detector(
            config.kind,
            config.backbone,
            num_classes=num_classes,
            pretrained_backbone=config.pretrained_backbone,
            agent_grids=config.agent_grids,
            backbone_kwargs=config.backbone_kwargs,
            **kwargs,
        )
    head_kwargs = dict(config.detector_kwargs)
    if synthetic:
        head_kwargs.setdefault("channels", 64 if config.kind == "fpn" else 128)
        if config.kind == "fpn":
            head_kwargs.setdefault("fpn_channels", 128)
    return build_segmenter(
        config.kind,
        config.backbone,
        num_classes=num_classes,
        pretrained_backbone=config.pretrained_backbone,
        agent_grids=config.agent_grids,
        backbone_kwargs=config.backbone_kwargs,
        **head_kwargs,
    )


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------
def mmdet_1x_scheduler(optimizer: torch.optim.Optimizer, total: int, warmup: int) -> MultiStepLRScheduler:
    """timm's step scheduler in mmdet's 1x shape: linear warm-up from 0.001·lr over ``warmup`` steps, then ×0.1
    at 8/12 and 11/12 of ``total`` steps. Call ``step_update(num_updates)`` before each step."""
    return MultiStepLRScheduler(
        optimizer,
        decay_t=[round(total * 8 / 12), round(total * 11 / 12)],
        decay_rate=0.1,
        warmup_t=warmup,
        warmup_lr_init=0.001 * optimizer.param_groups[0]["lr"],
        warmup_prefix=False,  # the decay points count from step 0, warm-up included
        t_in_epochs=False,
    )


def _schedule_position(step: int, total: int, warmup: int, progress: float | None) -> int:
    """The step the schedule is at: the step itself, or past warm-up the elapsed share of a time limit
    (``progress``, 0 … 1) of ``total`` when larger, so that a run cut by ``time_limit_min`` still goes through
    both decays."""
    if step < warmup or progress is None:
        return step
    return max(step, int(progress * total))


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open_log(path) as f:  # refuses a symlink
        f.write(json.dumps(record) + "\n")


def train_dense(config: DenseConfig, data: DenseData | None = None) -> dict[str, Any]:
    """Train, evaluate on the validation split, write the run files; returns the final metrics dict.

    Raises:
        ValueError: bad options or data, or ``output`` holds an earlier run's results (and not ``overwrite``).
        RunDirectoryInUse: another live run holds ``output`` (an ``OSError``).
    """
    out_dir = Path(config.output)
    with lock_run_directory(out_dir):  # for the run's whole life; removes temp files of dead writers
        prepare_output(out_dir, RUN_FILES, config.overwrite)
        return _train_dense(config, data, out_dir)


def _train_dense(config: DenseConfig, data: DenseData | None, out_dir: Path) -> dict[str, Any]:
    """Train, evaluate and write the run files into ``out_dir`` (already locked and prepared)."""
    torch.manual_seed(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    data = data or build_dense_data(
        config.data, config.task, config.img_size, config.num_train, config.num_val, config.seed
    )
    model = build_dense_model(config, data.num_classes, data.synthetic).to(device)
    log = out_dir / "metrics.jsonl"
    open_log(log, truncate=True).close()  # starts the run's append-only log (a symlink is refused)

    optimizer = _optimizer(model, config)
    loader = dense_loader(data.train, config.batch_size, True, config.task, config.num_workers, config.seed)
    total = config.max_steps or config.epochs * len(loader)
    step, stopped_early, train_time = _run_steps(config, model, optimizer, loader, total, device, log)
    if stopped_early and config.progress:
        print(f"stopped by the {config.time_limit_min:g}-minute time limit after {step} of {total} steps")
    t0 = time.perf_counter()
    metrics = _evaluate(config, model, data, device)
    result = {
        **metrics,
        "steps": step,
        "epochs_run": step / max(len(loader), 1),
        "train_time_s": train_time,
        "eval_time_s": time.perf_counter() - t0,
        "stopped_by_time_limit": stopped_early,
        "params": sum(p.numel() for p in model.parameters()),
    }
    _append_jsonl(log, {"kind": "eval", **result})
    _write_results(config, data, model, result, out_dir)
    return result


def _optimizer(model: nn.Module, config: DenseConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and kernels only (not on biases and norm scales)."""
    params_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim > 1]
    params_other = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim <= 1]
    return torch.optim.AdamW(
        [
            {"params": params_decay, "weight_decay": config.weight_decay},
            {"params": params_other, "weight_decay": 0.0},
        ],
        lr=config.lr,
    )


def _run_steps(
    config: DenseConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    total: int,
    device: torch.device,
    log: Path,
) -> tuple[int, bool, float]:
    """Train ``total`` steps or until the time limit, one ``step`` line in ``log`` each.

    Returns (steps done, stopped by the time limit, training seconds).
    """
    scheduler = mmdet_1x_scheduler(optimizer, total, config.warmup_steps)
    limit_s = config.time_limit_min * 60 if config.time_limit_min is not None else None
    start, step, epoch = time.perf_counter(), 0, 0
    stopped_early = False
    bar = tqdm(total=total, desc=f"{config.task} train", disable=not config.progress, dynamic_ncols=True)
    model.train()
    while step < total and not stopped_early:
        for batch in loader:
            progress = (time.perf_counter() - start) / limit_s if limit_s else None
            scheduler.step_update(_schedule_position(step, total, config.warmup_steps, progress))
            losses = _losses(config.task, model, batch, device)
            loss = _update(model, optimizer, losses, config.clip_grad, step)
            step += 1
            elapsed = time.perf_counter() - start
            record = {"kind": "step", "step": step, "epoch": epoch, "lr": optimizer.param_groups[0]["lr"],
                      "loss": loss.item(), **{k: v.item() for k, v in losses.items()}, "time_s": elapsed}  # fmt: skip
            _append_jsonl(log, record)
            if limit_s:  # the bar ends where the time limit will stop the run, not at the step budget
                bar.total = min(total, max(step, round(step * limit_s / max(elapsed, 1e-9))))
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{record['lr']:.2e}")
            if step >= total:
                break
            if limit_s is not None and elapsed > limit_s:
                stopped_early = True
                break
        epoch += 1
    bar.close()
    return step, stopped_early, time.perf_counter() - start


def _losses(task: str, model: nn.Module, batch: Any, device: torch.device) -> dict[str, torch.Tensor]:
    """The loss dict of one batch: the detector's own, or cross-entropy of (B, K, H, W) logits on (B, H, W) labels."""
    if task == "det":
        images = [im.to(device) for im in batch[0]]
        targets = [{k: v.to(device) for k, v in t.items()} for t in batch[1]]
        return model(images, targets)
    logits = model(batch[0].to(device))
    return {"loss_ce": F.cross_entropy(logits, batch[1].to(device), ignore_index=IGNORE_INDEX)}


def _update(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    losses: dict[str, torch.Tensor],
    clip_grad: float,
    step: int,
) -> torch.Tensor:
    """One optimizer step on the sum of ``losses``; returns that sum (a scalar). A non-finite loss stops the run."""
    loss = sum(losses.values())
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower lr or raise warmup_steps")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_grad > 0:
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    optimizer.step()
    return loss


def _evaluate(
    config: DenseConfig, model: nn.Module, data: DenseData, device: torch.device
) -> dict[str, float]:
    """Validation metrics of the trained model: COCO AP (det) or mIoU / mAcc (seg)."""
    if config.task == "det":
        return evaluate_detection(model, data.val, config.batch_size, device, progress=config.progress)
    return evaluate_segmentation(
        model, data.val, data.num_classes, config.batch_size, device, progress=config.progress
    )


def _write_results(
    config: DenseConfig, data: DenseData, model: nn.Module, result: dict[str, Any], out_dir: Path
) -> None:
    """Write ``model.pth`` (config, classes, weights, metrics) and ``final.json`` (config, metrics), atomically."""
    plain = asdict(config)
    atomic_torch_save(
        {"format": CHECKPOINT_FORMAT, "config": plain, "num_classes": data.num_classes, "classes": list(data.classes),
         "synthetic": data.synthetic, "model": model.state_dict(), "metrics": result},
        out_dir / "model.pth",
    )  # fmt: skip
    atomic_write_text(out_dir / "final.json", json.dumps({"config": plain, "metrics": result}, indent=1))


FILE_INT_LIMITS = {"img_size": 4096, "min_size": 4096, "max_size": 4096, "num_train": 100_000, "num_val": 100_000,
                   "epochs": 100_000, "batch_size": 4096}  # fmt: skip


def load_dense_checkpoint(path: str | Path) -> tuple[DenseConfig, nn.Module, dict[str, Any]]:
    """(config, model with the weights, checkpoint dict) from a ``model.pth`` written by :func:`train_dense`.

    Every field is checked before it is used; no path or weight source it names is opened (the model is built
    without its ``pretrained_backbone``: the file holds the weights).

    Raises:
        ValueError: a missing or unreadable file, one that :func:`train_dense` did not write, or a field of the
            wrong type or value (the message names the file and the field).
    """
    path = Path(path)
    ckpt = load_tagged_checkpoint(path, CHECKPOINT_FORMAT, "agentattn dense train")
    values = check_dataclass_values(path, "config", get_field(path, ckpt, "config"), DenseConfig)
    for (
        key,
        high,
    ) in FILE_INT_LIMITS.items():  # sizes a file may ask for: larger ones would only cost time/memory
        if values.get(key) is not None:
            check_int(path, f"config.{key}", values[key], 1, high)
    for key in ("backbone_kwargs", "detector_kwargs"):
        if key in values:
            check_architecture_kwargs(path, f"config.{key}", values[key])
    try:
        config = DenseConfig(**values)
    except ValueError as err:
        raise ValueError(f"{path}: field config: {' '.join(str(err).split())}") from err
    num_classes = check_int(path, "num_classes", get_field(path, ckpt, "num_classes"), 1, MAX_CLASSES)
    synthetic = check_bool(path, "synthetic", get_field(path, ckpt, "synthetic"))
    state = check_state_dict(path, "model", get_field(path, ckpt, "model"))
    # The weights come from this file: a backbone checkpoint it names is never opened.
    build = functools.partial(
        build_dense_model, dataclasses.replace(config, pretrained_backbone=None), num_classes, synthetic
    )
    # Built on the meta device first: a model larger than the file's weights is refused before any allocation.
    check_model_fits_weights(build, state, str(path))
    try:
        model = build()
    except (TypeError, ValueError, RuntimeError, KeyError, IndexError, AttributeError, AssertionError) as err:
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise ValueError(f"{path}: field config describes no model that can be built ({reason})") from err
    load_state_dict_checked(path, "model", model, state)
    return config, model, ckpt
