"""The training loop: one readable function, :func:`train`, configured by :class:`TrainConfig`.

What a step does: forward under optional autocast, (soft-target) cross-entropy, backward, grad clipping,
AdamW step, EMA update, then the cosine-with-warmup learning rate for the next step (timm's
``CosineLRScheduler``, stepped per iteration). Every epoch ends with an evaluation and a checkpoint.

Files in ``config.output``:

- ``metrics.jsonl``: one ``{"kind": "step", ...}`` line per step and one ``{"kind": "epoch", ...}`` per epoch;
- ``metrics.csv``: the epoch lines as a table;
- ``last.pth``: the checkpoint ``--resume`` reads (plain containers and tensors only, loaded with the safe
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
import csv
import json
import math
import os
import random
import stat
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..device import resolve_device
from ..io import atomic_torch_save, lock_run_directory, open_log, quote, safe_torch_load
from ..models import check_model_name
from .data import DataBundle, EpochSampler, build_data
from .record_checks import (
    check_dict,
    check_int,
    check_list,
    check_number,
    check_optimizer_state,
    check_plain,
    check_rng_state,
    check_scheduler_state,
    check_state_dict,
    check_str,
    get_field,
    load_state_dict_checked,
    remove_results,
    results_in,
)

__all__ = [
    "PRESETS",
    "TrainConfig",
    "TrainResult",
    "build_model",
    "evaluate",
    "load_training_checkpoint",
    "train",
]

CHECKPOINT_NAME = "last.pth"
CHECKPOINT_FORMAT = "agentattn-train-v1"
METRICS_NAMES = ("metrics.jsonl", "metrics.csv")
# The files a run writes into its output directory: what --overwrite removes, and nothing else.
RUN_FILES = (*METRICS_NAMES, CHECKPOINT_NAME)
# Options a resumed run must share with the run it continues.
_RESUME_KEYS = (
    "data",
    "model_kwargs",
    "seed",
    "batch_size",
    "train_subset",
    "img_size",
    "drop_path",
    "epochs",
)


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


@dataclass
class TrainResult:
    """What :func:`train` hands back: the trained (unwrapped) model, its EMA and the epoch metrics."""

    model: nn.Module
    ema: nn.Module | None
    epochs: list[dict[str, Any]]
    output: Path


# ---------------------------------------------------------------------------------------------------------------
# Helpers: model, RNG, checkpoints, metrics, evaluation.


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


def _rng_state() -> dict[str, Any]:
    # Plain containers only (numpy's state holds an ndarray, which the safe loader would refuse).
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # noqa: NPY002  (timm Mixup draws from it)
    state = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002  (the global RNG is what timm Mixup uses)
    torch.manual_seed(seed)


def load_training_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`train` with the safe loader (no pickled code runs).

    Raises:
        ValueError: missing, unreadable or corrupted file, or one that :func:`train` did not write.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such checkpoint file")
    ckpt = safe_torch_load(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{path}: not a checkpoint written by `agentattn train` (no {CHECKPOINT_FORMAT!r} tag)"
        )
    return ckpt


def _plain_config(config: TrainConfig) -> dict[str, Any]:
    out = asdict(config)
    out["betas"] = list(config.betas)
    return out


class _MetricsWriter:
    """Appends JSONL (steps and epochs) and CSV (epochs) lines; ``sizes()`` lets a resume truncate them."""

    def __init__(
        self, output: Path, enabled: bool, truncate_to: dict[str, int] | None, source: Path | None = None
    ) -> None:
        self.enabled = enabled
        self.jsonl_path, self.csv_path = output / "metrics.jsonl", output / "metrics.csv"
        if not enabled:
            return
        paths = (self.jsonl_path, self.csv_path)
        with contextlib.ExitStack() as stack:
            # Both logs open (a symlink is refused) before either is cut.
            logs = [stack.enter_context(open_log(path, binary=True)) for path in paths]
            for path, log in zip(paths, logs, strict=True):
                size = (truncate_to or {}).get(path.name, 0)
                current = os.fstat(log.fileno()).st_size
                if size > current:  # never grow a log (a huge size would make a huge sparse file)
                    raise ValueError(
                        f"{source}: field metrics_bytes[{path.name!r}] must be at most {current} (the size of "
                        f"{path}), got {size}"
                    )
                # Drop the lines written after the checkpoint we resume from: they will be written again.
                log.truncate(size)
        self.jsonl = open_log(self.jsonl_path)
        self.csv = open_log(self.csv_path)

    def step(self, record: dict[str, Any]) -> None:
        if self.enabled:
            self.jsonl.write(json.dumps({"kind": "step", **record}) + "\n")

    def epoch(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"kind": "epoch", **record}) + "\n")
        writer = csv.DictWriter(self.csv, fieldnames=list(record))
        if self.csv.tell() == 0:
            writer.writeheader()
        writer.writerow(record)

    def sizes(self) -> dict[str, int]:
        if not self.enabled:
            return {}
        self.jsonl.flush()
        self.csv.flush()
        return {self.jsonl_path.name: self.jsonl.tell(), self.csv_path.name: self.csv.tell()}

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.csv.close()


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


def check_config(config: TrainConfig) -> None:
    """ValueError naming the option (as on the command line) for out-of-range settings, before any work."""

    def bad(name: str, want: str) -> ValueError:
        return ValueError(f"--{name.replace('_', '-')} must be {want}, got {getattr(config, name)!r}")

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
        raise ValueError(f"--amp must be none, bf16 or fp16, not {amp!r}")
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


# ---------------------------------------------------------------------------------------------------------------
# The run directory and the checkpoint to resume.


def _prepare_output(output: Path, config: TrainConfig) -> None:
    """Refuse to start over an earlier run's results (unless ``overwrite``: then remove its files).

    Called by rank 0 with the directory locked. Resuming an existing checkpoint is always allowed; ``resume``
    without one is refused (timm's train.py refuses a missing --resume file too) rather than starting over,
    unless ``overwrite`` also says to start over.
    """
    ckpt_path = output / CHECKPOINT_NAME
    if config.resume and ckpt_path.is_file():
        return
    found = results_in(output, RUN_FILES)
    if config.resume and not config.overwrite:
        earlier = f" (it holds an earlier run's {', '.join(found)})" if found else ""
        raise ValueError(
            f"nothing to resume: {ckpt_path} does not exist{earlier}; start the run without --resume, choose "
            "another --output, or pass --overwrite to replace the earlier results"
        )
    if not found:
        return
    if config.overwrite:
        removed = remove_results(output, RUN_FILES)
        print(f"--overwrite: removed the earlier run's {', '.join(removed)} from {output}")
        return
    if CHECKPOINT_NAME in found:
        raise ValueError(
            f"{ckpt_path} exists: pass --resume to continue that run, choose another --output, or pass "
            "--overwrite to replace its results"
        )
    raise ValueError(
        f"{output} holds results of an earlier run ({', '.join(found)}) but no {CHECKPOINT_NAME} to continue "
        "it with --resume: choose another --output, or pass --overwrite to replace them"
    )


def _log_size(path: Path) -> int | None:
    """The size of the log at ``path``, 0 when there is none; None for a symlink or another non-regular file
    (refused when it is opened, before anything is cut)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return 0
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def _resume_fields(path: Path, ckpt: dict[str, Any], config: TrainConfig, master: bool) -> dict[str, Any]:
    """Check the fields of the checkpoint ``path`` that do not depend on the data or the model (before the data
    loads: a bad file fails at once). ValueError names the file and the field."""
    name = check_str(path, "model_name", get_field(path, ckpt, "model_name"), 500)
    if name != config.model:
        raise ValueError(f"{path} is a {quote(name)} checkpoint, not {config.model!r}")
    # These fix the data order and the weights' shapes: resuming with other values would not continue the run.
    saved = check_plain(path, "config", check_dict(path, "config", get_field(path, ckpt, "config")))
    now = _plain_config(config)
    changed = [k for k in _RESUME_KEYS if saved.get(k) != now[k]]
    if changed:
        diffs = ", ".join(f"{k}: {quote(saved.get(k), 80)} -> {quote(now[k], 80)}" for k in changed)
        raise ValueError(f"{path} was written with other settings ({diffs}): pass the run's options again")
    total_epochs = config.epochs + config.cooldown_epochs
    epoch = check_int(path, "epoch", get_field(path, ckpt, "epoch"), 0, total_epochs)
    step = check_int(path, "step_in_epoch", get_field(path, ckpt, "step_in_epoch"), 0)
    global_step = check_int(path, "global_step", get_field(path, ckpt, "global_step"), 0, 2**62)
    sums = check_list(path, "epoch_sums", get_field(path, ckpt, "epoch_sums"), 2)
    loss_sum = check_number(path, "epoch_sums[0]", sums[0], 0)
    seen = check_int(path, "epoch_sums[1]", sums[1], 0)
    history = check_list(path, "history", get_field(path, ckpt, "history"))
    if len(history) != epoch:  # one record per finished epoch
        raise ValueError(
            f"{path}: field history must be a list of {epoch} epoch records (field epoch is {epoch}), "
            f"got {len(history)}"
        )
    for i, record in enumerate(history):
        for key, value in check_dict(path, f"history[{i}]", record).items():
            check_number(path, f"history[{i}].{quote(key, 40)[1:-1]}", value, finite=False)
    sizes = check_dict(path, "metrics_bytes", get_field(path, ckpt, "metrics_bytes"))
    if set(sizes) != set(METRICS_NAMES):
        raise ValueError(
            f"{path}: field metrics_bytes must have the keys {list(METRICS_NAMES)}, got {quote(list(sizes))}"
        )
    output = path.parent
    for log in METRICS_NAMES:
        size = check_int(path, f"metrics_bytes[{log!r}]", sizes[log], 0)
        current = _log_size(output / log) if master else None
        if current is not None and size > current:
            raise ValueError(
                f"{path}: field metrics_bytes[{log!r}] must be an int in [0, {current}] (the size of "
                f"{output / log}), got {size}"
            )
    rng = check_rng_state(path, "rng", get_field(path, ckpt, "rng"))
    return dict(
        epoch=epoch,
        step_in_epoch=step,
        global_step=global_step,
        epoch_sums=(loss_sum, seen),
        history=[dict(r) for r in history],
        metrics_bytes={k: int(sizes[k]) for k in METRICS_NAMES},
        rng=rng,
    )


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


def _train(config: TrainConfig, data: DataBundle | None, stack: contextlib.ExitStack) -> TrainResult:
    # ---- processes, devices, determinism
    check_config(config)
    check_model_name(config.model)  # before the data: a typo should not wait for a dataset to load
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    distributed = world_size > 1
    device = resolve_device(config.device, local_rank)
    if distributed and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    master = rank == 0
    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    threads = config.threads or (1 if config.deterministic else 0)
    if threads:
        torch.set_num_threads(threads)  # the reduction order of CPU kernels depends on the thread count
    amp_dtype = _amp_dtype(config.amp)
    if amp_dtype == torch.float16 and device.type != "cuda":
        raise ValueError("--amp fp16 needs a CUDA device (it uses a GradScaler): use --amp bf16 on the CPU")
    output = Path(config.output)
    ckpt_path = output / CHECKPOINT_NAME
    if master:
        # One live run per directory; this also removes the temp files of writers that are gone (a kill
        # during a save), never a live writer's. last.pth itself is intact.
        stack.enter_context(lock_run_directory(output))
        _prepare_output(output, config)
    ckpt, resumed = None, None
    if config.resume and ckpt_path.is_file():
        ckpt = load_training_checkpoint(ckpt_path)
        resumed = _resume_fields(ckpt_path, ckpt, config, master)

    # ---- data
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
            "use a smaller --batch-size or a larger --train-subset"
        )

    # ---- model, optimizer, schedule, EMA (same seed on every rank: same initial weights)
    _seed_everything(config.seed)
    model_kwargs = dict(config.model_kwargs)
    if config.drop_path is not None:
        model_kwargs["drop_path_rate"] = config.drop_path
    model = build_model(config.model, data.num_classes, data.in_chans, data.img_size, model_kwargs).to(device)
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
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    ema = (
        ModelEmaV3(model, decay=config.ema_decay, stochastic_rounding=False) if config.ema_decay > 0 else None
    )
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

    # ---- resume (every field checked before it is used)
    start_epoch, start_step, global_step, metrics_sizes, history = 0, 0, 0, None, []
    resume_rng, resume_sums = None, (0.0, 0)
    if ckpt is not None and resumed is not None:
        total = config.epochs + config.cooldown_epochs
        last = steps_per_epoch - 1 if resumed["epoch"] < total else 0
        if resumed["step_in_epoch"] > last:
            raise ValueError(
                f"{ckpt_path}: field step_in_epoch must be an int in [0, {last}], got {resumed['step_in_epoch']}"
            )
        load_state_dict_checked(ckpt_path, "model", model, get_field(ckpt_path, ckpt, "model"))
        optimizer_state = check_optimizer_state(
            ckpt_path, "optimizer", get_field(ckpt_path, ckpt, "optimizer"), optimizer
        )
        scheduler_state = check_scheduler_state(
            ckpt_path, "scheduler", get_field(ckpt_path, ckpt, "scheduler"), scheduler.state_dict()
        )
        scaler_state = get_field(ckpt_path, ckpt, "scaler")
        if scaler_state is not None:
            check_dict(ckpt_path, "scaler", scaler_state)
            if scaler is not None and scaler_state:
                check_scheduler_state(ckpt_path, "scaler", scaler_state, scaler.state_dict())
        ema_state = get_field(ckpt_path, ckpt, "state_dict_ema")
        if ema_state is not None:
            check_state_dict(ckpt_path, "state_dict_ema", ema_state)
            if ema is not None and ema_state:
                load_state_dict_checked(ckpt_path, "state_dict_ema", ema.module, ema_state)
        optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict(scheduler_state)
        if scaler is not None and scaler_state:
            scaler.load_state_dict(scaler_state)
        start_epoch, start_step, global_step = (
            resumed["epoch"],
            resumed["step_in_epoch"],
            resumed["global_step"],
        )
        metrics_sizes, history, resume_rng = resumed["metrics_bytes"], resumed["history"], resumed["rng"]
        resume_sums = resumed["epoch_sums"]
        if master:
            print(
                f"resuming from {ckpt_path}: epoch {start_epoch}, step {start_step} (global step {global_step})"
            )

    train_model: nn.Module = model
    if distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    # Each rank draws its own augmentation/mixup/drop-path randomness.
    _seed_everything(config.seed + 1000 * rank + 1)
    if resume_rng is not None:
        _set_rng_state(resume_rng)

    metrics = _MetricsWriter(output, enabled=master, truncate_to=metrics_sizes, source=ckpt_path)
    stack.callback(metrics.close)
    eval_loader = DataLoader(
        data.eval,
        batch_size=config.batch_size,
        num_workers=config.num_workers,
        generator=torch.Generator().manual_seed(config.seed),
    )

    def save_checkpoint(epoch: int, step_in_epoch: int, epoch_sums: tuple[float, int]) -> None:
        # (epoch, step_in_epoch) is where the run continues: the batches before it were consumed.
        state = {
            "format": CHECKPOINT_FORMAT,
            "model_name": config.model,
            "model_kwargs": model_kwargs,
            "num_classes": data.num_classes,
            "in_chans": data.in_chans,
            "img_size": data.img_size,
            "class_names": list(data.class_names),
            "config": _plain_config(config),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "state_dict_ema": ema.module.state_dict() if ema is not None else None,
            "rng": _rng_state(),
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "global_step": global_step,
            "epoch_sums": list(epoch_sums),  # running train-loss sum and count of a mid-epoch checkpoint
            "metrics_bytes": metrics.sizes(),
            "history": history,
        }
        atomic_torch_save(state, ckpt_path)

    total_epochs = config.epochs + config.cooldown_epochs
    stop = False
    for epoch in range(start_epoch, total_epochs):
        skip = start_step if epoch == start_epoch else 0
        sampler = EpochSampler(
            len(data.train), config.seed, epoch, rank, world_size, skip * config.batch_size
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
        if config.max_steps:  # the bar ends where --max-steps stops the run
            last_step = min(steps_per_epoch, skip + max(config.max_steps - global_step, 0))
        bar = tqdm(
            total=last_step,
            initial=skip,
            desc=f"epoch {epoch + 1}/{total_epochs}",
            disable=not (master and config.progress),
            dynamic_ncols=True,
        )
        epoch_start = time.perf_counter()
        loss_sum, seen = resume_sums if epoch == start_epoch else (0.0, 0)
        for step_in_epoch, (images, targets) in enumerate(loader, start=skip):
            step_start = time.perf_counter()
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            if mixup is not None:
                images, targets = mixup(images, targets)
            with torch.autocast(
                device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None
            ):
                logits = train_model(images)
            loss = criterion(logits.float(), targets)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch}, step {step_in_epoch}")

            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            grad_norm = None
            if config.clip_grad > 0:
                grad_norm = nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad).item()
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            global_step += 1
            if ema is not None:
                ema.update(model, step=global_step)
            lr = optimizer.param_groups[0]["lr"]  # the lr this step used
            scheduler.step_update(num_updates=global_step)

            loss_value = loss.item()
            loss_sum += loss_value * len(images)
            seen += len(images)
            step_time = time.perf_counter() - step_start
            img_per_s = global_batch / step_time if step_time > 0 else 0.0
            record = dict(epoch=epoch, step=step_in_epoch, global_step=global_step, loss=loss_value, lr=lr)
            if grad_norm is not None:
                record["grad_norm"] = grad_norm
            metrics.step({**record, "time_s": step_time, "img_per_s": img_per_s})
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", img_s=f"{img_per_s:.0f}", refresh=False)
            bar.update(1)  # by hand: a bar wrapping the loader misses the step a --max-steps break ends on

            if config.max_steps and global_step >= config.max_steps:
                stop = True
            if config.ckpt_every_steps and global_step % config.ckpt_every_steps == 0 and not stop:
                if step_in_epoch + 1 < steps_per_epoch and master:
                    save_checkpoint(epoch, step_in_epoch + 1, (loss_sum, seen))
            if stop:
                break
        bar.close()

        # ---- end of epoch: evaluate, log, checkpoint (rank 0; the other ranks wait at the barrier)
        epoch_time = time.perf_counter() - epoch_start
        if master:
            show = config.progress  # rank 0 only, as here
            result = evaluate(model, eval_loader, device, data.num_classes, amp_dtype, progress=show)
            record = dict(
                epoch=epoch,
                global_step=global_step,
                lr=optimizer.param_groups[0]["lr"],
                train_loss=loss_sum / max(seen, 1),
                eval_loss=result["loss"],
                eval_top1=result["top1"],
                eval_top5=result["top5"],
            )
            if ema is not None:
                ema_result = evaluate(
                    ema.module, eval_loader, device, data.num_classes, amp_dtype, progress=show
                )
                record.update(ema_top1=ema_result["top1"], ema_top5=ema_result["top5"])
            record.update(epoch_time_s=epoch_time, img_per_s=seen * world_size / max(epoch_time, 1e-9))
            history.append({k: v for k, v in record.items() if k not in ("epoch_time_s", "img_per_s")})
            metrics.epoch(record)
            print(
                f"epoch {epoch + 1}/{total_epochs}: train loss {record['train_loss']:.4f}, "
                f"{data.eval_split} top-1 {record['eval_top1']:.2f}% top-5 {record['eval_top5']:.2f}%"
            )
            save_checkpoint(epoch + 1, 0, (0.0, 0))
        if distributed:
            dist.barrier()
        if stop:
            break

    metrics.close()
    if distributed:
        dist.destroy_process_group()
    return TrainResult(
        model=model, ema=ema.module if ema is not None else None, epochs=history, output=output
    )
