"""The training loop: :func:`train` (set-up, restore, then epochs of steps), configured by :class:`TrainConfig`.

What a step does: forward under optional autocast, (soft-target) cross-entropy, backward, grad clipping,
AdamW step, EMA update, then the cosine-with-warmup learning rate for the next step (timm's
``CosineLRScheduler``, stepped per iteration). Every epoch ends with an evaluation and a checkpoint. The
process set-up (device, DDP) is :mod:`.process`; the model and what updates it are built by :mod:`.parts`.

Files in ``config.output``:

- ``metrics.jsonl``: one ``{"kind": "step", ...}`` line per step and one ``{"kind": "epoch", ...}`` per epoch;
- ``metrics.csv``: the epoch lines as a table;
- ``last.pth``: the checkpoint ``resume`` reads (plain containers and tensors only, loaded with the safe
  loader, so resuming never unpickles code), written atomically; every field is checked before it is used.

The run holds ``config.output`` (rank 0 takes its lock) for its whole life: a second run into it stops at once.
A directory that already holds results is only continued (``resume`` with a checkpoint) or, with
``overwrite``, emptied of this run's own files; otherwise the run refuses to start. The logs are appended
through :func:`agentattn.io.open_log`, which never writes through a symlink.

Timing fields (``time_s``, ``img_per_s``, ``epoch_time_s``) are the only ones that differ between two runs
with the same seed in deterministic mode; everything else, and the weights, are bit-identical, also when a
run is killed and resumed.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..io import atomic_torch_save, lock_run_directory
from ..models import check_model_name
from .config import TrainConfig, check_config
from .data import DataBundle, EpochSampler, build_data
from .parts import RunParts, build_model, build_parts
from .process import RunProcess, start_process
from .record_checks import (
    check_dict,
    check_optimizer_state,
    check_scheduler_state,
    check_state_dict,
    get_field,
    load_state_dict_checked,
)
from .state import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    _MetricsWriter,
    _prepare_output,
    _resume_fields,
    _rng_state,
    _seed_everything,
    _set_rng_state,
    load_training_checkpoint,
    plain_config,
)

__all__ = [
    "TrainResult",
    "build_model",
    "evaluate",
    "train",
]


@dataclass
class TrainResult:
    """What :func:`train` hands back: the trained (unwrapped) model, its EMA and the epoch metrics."""

    model: nn.Module
    ema: nn.Module | None
    epochs: list[dict[str, Any]]
    output: Path


# ---------------------------------------------------------------------------------------------------------------
# Evaluation.


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    num_classes: int,
    amp_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Top-1/top-5 accuracy (%), mean cross-entropy, throughput and the confusion matrix (with a tqdm bar when
    ``progress``).

    Returns:
        ``{"loss", "top1", "top5", "images", "img_per_s", "confusion"}``; ``confusion`` is an int64 tensor
        (num_classes, num_classes), rows = true class, columns = predicted class.
    """
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    loss_sum, top5_hits, count, elapsed = 0.0, 0, 0, 0.0
    for images, targets in tqdm(loader, desc="eval", disable=not progress, dynamic_ncols=True, leave=False):
        images, targets = images.to(device), targets.to(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            logits = model(images)
        logits = logits.float()
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed += time.perf_counter() - start
        loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
        k = min(5, num_classes)
        top5_hits += (logits.topk(k, dim=1).indices == targets[:, None]).any(dim=1).sum().item()
        pred = logits.argmax(dim=1)
        confusion += torch.bincount(
            (targets * num_classes + pred).cpu(), minlength=num_classes * num_classes
        ).view(num_classes, num_classes)
        count += len(targets)
    return {
        "loss": loss_sum / max(count, 1),
        "top1": 100.0 * confusion.diag().sum().item() / max(count, 1),
        "top5": 100.0 * top5_hits / max(count, 1),
        "images": count,
        "img_per_s": count / elapsed if elapsed > 0 else 0.0,
        "confusion": confusion,
    }


# ---------------------------------------------------------------------------------------------------------------
# The loop.


def train(config: TrainConfig, data: DataBundle | None = None) -> TrainResult:
    """Train ``config.model`` on ``config.data``; see the module docstring for the files it writes.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) it uses DistributedDataParallel (gloo on CPU, nccl on CUDA); only
    rank 0 logs, evaluates and checkpoints.

    Raises:
        ValueError: bad data source, model name or kwargs, an unusable checkpoint with ``resume``, or an output
            directory holding an earlier run's results (without ``resume`` of its checkpoint or ``overwrite``).
        RunDirectoryInUse: another live run holds the output directory (an ``OSError``).
    """
    with contextlib.ExitStack() as stack:  # holds the run directory until the run ends, however it ends
        return _train(config, data, stack)


def _load_data(config: TrainConfig, data: DataBundle | None, world_size: int) -> tuple[DataBundle, int]:
    """The data (built from ``config.data`` unless given) and the number of optimizer steps per epoch."""
    if data is None:
        data = build_data(
            config.data,
            img_size=config.img_size,
            train_subset=config.train_subset,
            eval_subset=config.eval_subset,
            seed=config.seed,
            train_transform=dict(
                auto_augment=config.auto_augment,
                color_jitter=config.color_jitter,
                re_prob=config.reprob,
                interpolation=config.interpolation,
            ),
        )
    assert data.train is not None
    global_batch = config.batch_size * world_size
    steps_per_epoch = len(data.train) // global_batch  # type: ignore[arg-type]
    if steps_per_epoch == 0:
        raise ValueError(
            f"the training set ({len(data.train)} images) is smaller than one global batch ({global_batch}): "  # type: ignore[arg-type]
            "use a smaller batch_size or a larger train_subset"
        )
    return data, steps_per_epoch


@dataclass
class _Position:
    """Where the run goes on: the batches before (epoch, step_in_epoch) were consumed."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    epoch_sums: tuple[float, int] = (0.0, 0)  # train-loss sum and count of the epoch begun
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics_sizes: dict[str, int] | None = None
    rng: dict[str, Any] | None = None


def _restore(
    path: Path,
    ckpt: dict[str, Any],
    resumed: dict[str, Any],
    config: TrainConfig,
    parts: RunParts,
    steps: int,
) -> _Position:
    """Load the checkpoint ``ckpt`` (its fields checked by ``_resume_fields``) into ``parts``; every state is
    checked against the part it goes into before any is loaded."""
    last = steps - 1 if resumed["epoch"] < config.epochs + config.cooldown_epochs else 0
    if resumed["step_in_epoch"] > last:
        raise ValueError(
            f"{path}: field step_in_epoch must be an int in [0, {last}], got {resumed['step_in_epoch']}"
        )
    load_state_dict_checked(path, "model", parts.model, get_field(path, ckpt, "model"))
    optimizer_state = check_optimizer_state(
        path, "optimizer", get_field(path, ckpt, "optimizer"), parts.optimizer
    )
    scheduler_state = check_scheduler_state(
        path, "scheduler", get_field(path, ckpt, "scheduler"), parts.scheduler.state_dict()
    )
    scaler_state = get_field(path, ckpt, "scaler")
    if scaler_state is not None:
        check_dict(path, "scaler", scaler_state)
        if parts.scaler is not None and scaler_state:
            check_scheduler_state(path, "scaler", scaler_state, parts.scaler.state_dict())
    ema_state = get_field(path, ckpt, "state_dict_ema")
    if ema_state is not None:
        check_state_dict(path, "state_dict_ema", ema_state)
        if parts.ema is not None and ema_state:
            load_state_dict_checked(path, "state_dict_ema", parts.ema.module, ema_state)
    parts.optimizer.load_state_dict(optimizer_state)
    parts.scheduler.load_state_dict(scheduler_state)
    if parts.scaler is not None and scaler_state:
        parts.scaler.load_state_dict(scaler_state)
    return _Position(
        epoch=resumed["epoch"],
        step_in_epoch=resumed["step_in_epoch"],
        global_step=resumed["global_step"],
        epoch_sums=resumed["epoch_sums"],
        history=resumed["history"],
        metrics_sizes=resumed["metrics_bytes"],
        rng=resumed["rng"],
    )


def _checkpoint_state(
    config: TrainConfig, data: DataBundle, parts: RunParts, position: _Position, metrics: _MetricsWriter
) -> dict[str, Any]:
    """Everything a resumed run needs to continue as if never stopped (read back by ``_resume_fields``)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "model_name": config.model,
        "model_kwargs": parts.model_kwargs,
        "num_classes": data.num_classes,
        "in_chans": data.in_chans,
        "img_size": data.img_size,
        "class_names": list(data.class_names),
        "config": plain_config(config),
        "model": parts.model.state_dict(),
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(),
        "scaler": parts.scaler.state_dict() if parts.scaler is not None else None,
        "state_dict_ema": parts.ema.module.state_dict() if parts.ema is not None else None,
        "rng": _rng_state(),
        "epoch": position.epoch,
        "step_in_epoch": position.step_in_epoch,
        "global_step": position.global_step,
        "epoch_sums": list(position.epoch_sums),
        "metrics_bytes": metrics.sizes(),
        "history": position.history,
    }


def _train_step(
    parts: RunParts, train_model: nn.Module, images: torch.Tensor, targets: torch.Tensor, config: TrainConfig,
    proc: RunProcess, global_step: int, where: str,
) -> tuple[float, float | None, float]:  # fmt: skip
    """One optimizer step on a batch; ``global_step`` counts it. Returns (loss, grad norm or None, the lr used).

    Raises:
        FloatingPointError: the loss is not finite.
    """
    images, targets = images.to(proc.device, non_blocking=True), targets.to(proc.device, non_blocking=True)
    if parts.mixup is not None:
        images, targets = parts.mixup(images, targets)
    with torch.autocast(
        proc.device.type, dtype=proc.amp_dtype or torch.bfloat16, enabled=proc.amp_dtype is not None
    ):
        logits = train_model(images)
    loss = parts.criterion(logits.float(), targets)
    if not math.isfinite(loss.item()):
        raise FloatingPointError(f"loss is {loss.item()} at {where}")
    parts.optimizer.zero_grad(set_to_none=True)
    if parts.scaler is not None:
        parts.scaler.scale(loss).backward()
        parts.scaler.unscale_(parts.optimizer)
    else:
        loss.backward()
    grad_norm = None
    if config.clip_grad > 0:
        grad_norm = nn.utils.clip_grad_norm_(parts.model.parameters(), config.clip_grad).item()
    if parts.scaler is not None:
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
    else:
        parts.optimizer.step()
    if parts.ema is not None:
        parts.ema.update(parts.model, step=global_step)
    lr = parts.optimizer.param_groups[0]["lr"]  # the lr this step used
    parts.scheduler.step_update(num_updates=global_step)
    return loss.item(), grad_norm, lr


def _epoch_record(
    config: TrainConfig, data: DataBundle, parts: RunParts, proc: RunProcess, eval_loader: DataLoader,
    position: _Position, epoch_time: float,
) -> dict[str, Any]:  # fmt: skip
    """Evaluate the model (and its EMA) at the end of an epoch: the record that the logs and history keep."""
    show = config.progress  # rank 0 only, as here
    result = evaluate(parts.model, eval_loader, proc.device, data.num_classes, proc.amp_dtype, progress=show)
    loss_sum, seen = position.epoch_sums
    record = dict(
        epoch=position.epoch,
        global_step=position.global_step,
        lr=parts.optimizer.param_groups[0]["lr"],
        train_loss=loss_sum / max(seen, 1),
        eval_loss=result["loss"],
        eval_top1=result["top1"],
        eval_top5=result["top5"],
    )
    if parts.ema is not None:
        ema_result = evaluate(
            parts.ema.module, eval_loader, proc.device, data.num_classes, proc.amp_dtype, progress=show
        )
        record.update(ema_top1=ema_result["top1"], ema_top5=ema_result["top5"])
    record.update(epoch_time_s=epoch_time, img_per_s=seen * proc.world_size / max(epoch_time, 1e-9))
    return record


def _train(config: TrainConfig, data: DataBundle | None, stack: contextlib.ExitStack) -> TrainResult:
    check_config(config)
    check_model_name(config.model)  # before the data: a typo should not wait for a dataset to load
    proc = start_process(config)
    output = Path(config.output)
    ckpt_path = output / CHECKPOINT_NAME
    if proc.master:
        # One live run per directory; this also removes the temp files of writers that are gone (a kill
        # during a save), never a live writer's. last.pth itself is intact.
        stack.enter_context(lock_run_directory(output))
        _prepare_output(output, config)
    ckpt, resumed = None, None
    if config.resume and ckpt_path.is_file():  # its plain fields are checked before the data loads
        ckpt = load_training_checkpoint(ckpt_path)
        resumed = _resume_fields(ckpt_path, ckpt, config, proc.master)
    data, steps_per_epoch = _load_data(config, data, proc.world_size)
    parts = build_parts(config, data, proc, steps_per_epoch)
    position = _Position()
    if ckpt is not None and resumed is not None:
        position = _restore(ckpt_path, ckpt, resumed, config, parts, steps_per_epoch)
        if proc.master:
            print(
                f"resuming from {ckpt_path}: epoch {position.epoch}, step {position.step_in_epoch} "
                f"(global step {position.global_step})"
            )
    train_model: nn.Module = parts.model
    if proc.distributed:
        device_ids = [proc.device.index] if proc.device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(parts.model, device_ids=device_ids)
    _seed_everything(config.seed + 1000 * proc.rank + 1)  # each rank draws its own augmentation randomness
    if position.rng is not None:
        _set_rng_state(position.rng)
    metrics = _MetricsWriter(
        output, enabled=proc.master, truncate_to=position.metrics_sizes, source=ckpt_path
    )
    stack.callback(metrics.close)
    eval_loader = DataLoader(
        data.eval,
        batch_size=config.batch_size,
        num_workers=config.num_workers,
        generator=torch.Generator().manual_seed(config.seed),
    )
    total_epochs = config.epochs + config.cooldown_epochs
    start_epoch, stop = position.epoch, False
    for epoch in range(start_epoch, total_epochs):
        skip = position.step_in_epoch if epoch == start_epoch else 0
        position.epoch, position.step_in_epoch = epoch, skip
        if epoch != start_epoch:
            position.epoch_sums = (0.0, 0)
        epoch_start = time.perf_counter()
        stop = _run_epoch(
            config, data, parts, proc, train_model, position, steps_per_epoch, metrics, ckpt_path
        )
        # ---- end of epoch: evaluate, log, checkpoint (rank 0; the other ranks wait at the barrier)
        epoch_time = time.perf_counter() - epoch_start
        if proc.master:
            record = _epoch_record(config, data, parts, proc, eval_loader, position, epoch_time)
            position.history.append(
                {k: v for k, v in record.items() if k not in ("epoch_time_s", "img_per_s")}
            )
            metrics.epoch(record)
            print(
                f"epoch {epoch + 1}/{total_epochs}: train loss {record['train_loss']:.4f}, "
                f"{data.eval_split} top-1 {record['eval_top1']:.2f}% top-5 {record['eval_top5']:.2f}%"
            )
            position.epoch, position.step_in_epoch, position.epoch_sums = epoch + 1, 0, (0.0, 0)
            atomic_torch_save(_checkpoint_state(config, data, parts, position, metrics), ckpt_path)
        if proc.distributed:
            dist.barrier()
        if stop:
            break

    metrics.close()
    if proc.distributed:
        dist.destroy_process_group()
    ema = parts.ema.module if parts.ema is not None else None
    return TrainResult(model=parts.model, ema=ema, epochs=position.history, output=output)


def _run_epoch(
    config: TrainConfig, data: DataBundle, parts: RunParts, proc: RunProcess, train_model: nn.Module,
    position: _Position, steps_per_epoch: int, metrics: _MetricsWriter, ckpt_path: Path,
) -> bool:  # fmt: skip
    """Train from ``position`` to the end of its epoch (or to ``max_steps``: then return True), logging each step
    and writing a mid-epoch checkpoint every ``ckpt_every_steps``. ``position`` follows the steps."""
    epoch, skip = position.epoch, position.step_in_epoch
    assert data.train is not None
    sampler = EpochSampler(
        len(data.train), config.seed, epoch, proc.rank, proc.world_size, skip * config.batch_size
    )  # type: ignore[arg-type]
    # Own generator: creating the loader iterator must not draw from the global RNG we checkpoint.
    loader = DataLoader(
        data.train,
        batch_size=config.batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=config.num_workers,
        generator=torch.Generator().manual_seed(config.seed + epoch),
        persistent_workers=False,
    )
    train_model.train()
    last_step = steps_per_epoch
    if config.max_steps:  # the bar ends where max_steps stops the run
        last_step = min(steps_per_epoch, skip + max(config.max_steps - position.global_step, 0))
    total_epochs = config.epochs + config.cooldown_epochs
    bar = tqdm(
        total=last_step,
        initial=skip,
        desc=f"epoch {epoch + 1}/{total_epochs}",
        disable=not (proc.master and config.progress),
        dynamic_ncols=True,
    )
    global_batch = config.batch_size * proc.world_size
    stop = False
    for step_in_epoch, (images, targets) in enumerate(loader, start=skip):
        step_start = time.perf_counter()
        global_step = position.global_step + 1
        where = f"epoch {epoch}, step {step_in_epoch}"
        loss_value, grad_norm, lr = _train_step(
            parts, train_model, images, targets, config, proc, global_step, where
        )
        loss_sum, seen = position.epoch_sums
        position.epoch_sums = (loss_sum + loss_value * len(images), seen + len(images))
        position.global_step, position.step_in_epoch = global_step, step_in_epoch + 1
        step_time = time.perf_counter() - step_start
        img_per_s = global_batch / step_time if step_time > 0 else 0.0
        record = dict(epoch=epoch, step=step_in_epoch, global_step=global_step, loss=loss_value, lr=lr)
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        metrics.step({**record, "time_s": step_time, "img_per_s": img_per_s})
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", img_s=f"{img_per_s:.0f}", refresh=False)
        bar.update(1)  # by hand: a bar wrapping the loader misses the step a max_steps break ends on
        stop = bool(config.max_steps) and global_step >= config.max_steps
        if config.ckpt_every_steps and global_step % config.ckpt_every_steps == 0 and not stop:
            if step_in_epoch + 1 < steps_per_epoch and proc.master:
                atomic_torch_save(_checkpoint_state(config, data, parts, position, metrics), ckpt_path)
        if stop:
            break
    bar.close()
    return stop
