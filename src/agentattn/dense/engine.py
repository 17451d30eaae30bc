"""Training, evaluation and comparison of dense models: what ``agentattn dense`` runs.

    train: AdamW, linear warmup, steps ×0.1 at 8/12 and 11/12 of the run (mmdet's 1x shape), then evaluate
    eval:  detection → COCO box / mask AP through pycocotools; segmentation → mIoU, mAcc (mmseg's definitions)
    compare: params, FLOPs (one multiply-add = one FLOP) and CPU/GPU latency of a detector with the agent
             backbone and with its softmax twin

Files in ``output``: ``metrics.jsonl`` (step and eval lines, appended through :func:`agentattn.io.open_log`,
which never writes through a symlink), ``final.json`` (config + final metrics) and ``model.pth`` (plain
containers and tensors: config, weights, metrics), both written atomically. A run holds ``output`` for its whole
life (a second run into it stops at once) and refuses to start over an earlier run's results unless
``overwrite``, which removes those three files (nothing else).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import io
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
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
from .data import IGNORE_INDEX, DenseData, build_dense_data, collate_detection, to_coco_dict
from .detection import DETECTOR_KINDS, build_detector
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
# The files a run writes into its output directory: what --overwrite removes, and nothing else.
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
            raise ValueError(f"--task must be 'det' or 'seg', got {self.task!r}")
        if self.task == "seg" and self.kind == "maskrcnn":
            self.kind = "fpn"  # the default kind is a detector's
        if self.kind not in kinds:
            raise ValueError(f"--kind for task {self.task!r} must be one of {kinds}, got {self.kind!r}")
        for name in ("epochs", "batch_size", "num_train", "num_val", "img_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.time_limit_min is not None and self.time_limit_min <= 0:
            self.time_limit_min = None  # 0 disables the limit
        if self.lr <= 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")


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


def _loader(dataset, batch_size: int, shuffle: bool, task: str, num_workers: int, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        collate_fn=collate_detection if task == "det" else None,
        generator=generator,
        drop_last=shuffle,
    )


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------
def _rle(mask: np.ndarray) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _coco_eval(gt: dict[str, Any], results: list[dict[str, Any]], iou_type: str) -> dict[str, float]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    names = ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l")
    if not results:
        return {f"{iou_type}_{n}": 0.0 for n in names}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {f"{iou_type}_{n}": max(float(v), 0.0) for n, v in zip(names, ev.stats[:6], strict=True)}


@torch.no_grad()
def evaluate_detection(
    model: nn.Module,
    dataset,
    batch_size: int = 8,
    device: torch.device | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """COCO box (and, for Mask R-CNN, mask) AP of ``model`` on ``dataset`` through pycocotools.

    Returns ``bbox_mAP``, ``bbox_mAP_50``, ``bbox_mAP_75``, ... (and ``segm_*``), in [0, 1].
    """
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    label_to_cat = getattr(dataset, "label_to_cat", None)
    boxes_out, masks_out = [], []
    has_masks = False
    try:
        batches = _loader(dataset, batch_size, False, "det", 0, 0)
        for images, targets in tqdm(
            batches, desc="eval", disable=not progress, dynamic_ncols=True, leave=False
        ):
            outputs = model([im.to(device) for im in images])
            for target, out in zip(targets, outputs, strict=True):
                image_id = int(target["image_id"])
                boxes = out["boxes"].cpu()
                scores, labels = out["scores"].cpu().tolist(), out["labels"].cpu().tolist()
                masks = out.get("masks")
                has_masks = has_masks or masks is not None
                for j, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
                    cat = label_to_cat[labels[j]] if label_to_cat else labels[j]
                    entry = {"image_id": image_id, "category_id": cat, "score": scores[j]}
                    boxes_out.append({**entry, "bbox": [x1, y1, x2 - x1, y2 - y1]})
                    if masks is not None:
                        masks_out.append({**entry, "segmentation": _rle((masks[j, 0] > 0.5).cpu().numpy())})
    finally:
        model.train(was_training)
    gt = dataset.coco.dataset if hasattr(dataset, "coco") else to_coco_dict(dataset)
    metrics = _coco_eval(gt, boxes_out, "bbox")
    if has_masks:
        metrics.update(_coco_eval(gt, masks_out, "segm"))
    return metrics


@torch.no_grad()
def evaluate_segmentation(
    model: nn.Module,
    dataset,
    num_classes: int,
    batch_size: int = 8,
    device: torch.device | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """mIoU and mAcc (mmseg: per-class IoU / accuracy, NaN for classes absent from the labels, nan-mean).

    Pixels labelled 255 are ignored. Logits are resized to the label map when their sizes differ.
    """
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    hist = torch.zeros(num_classes, num_classes, dtype=torch.float64)
    try:
        same_size = getattr(dataset, "split", "") != "val" or not hasattr(dataset, "label_dir")
        batches = _loader(dataset, batch_size if same_size else 1, False, "seg", 0, 0)
        for images, labels in tqdm(
            batches, desc="eval", disable=not progress, dynamic_ncols=True, leave=False
        ):
            logits = model(images.to(device))
            if logits.shape[-2:] != labels.shape[-2:]:
                logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
            pred = logits.argmax(1).cpu()
            valid = labels != IGNORE_INDEX
            idx = labels[valid] * num_classes + pred[valid]
            hist += torch.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes).double()
    finally:
        model.train(was_training)
    inter = hist.diag()
    label_area, pred_area = hist.sum(1), hist.sum(0)
    iou = inter / (label_area + pred_area - inter)
    acc = inter / label_area
    return {
        "mIoU": float(np.nanmean(iou.numpy())),
        "mAcc": float(np.nanmean(acc.numpy())),
        "aAcc": float(inter.sum() / hist.sum().clamp_min(1)),
    }


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
    (``progress``, 0 … 1) of ``total`` when larger, so that a run cut by ``--time-limit-min`` still goes through
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

    params_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim > 1]
    params_other = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [
            {"params": params_decay, "weight_decay": config.weight_decay},
            {"params": params_other, "weight_decay": 0.0},
        ],
        lr=config.lr,
    )
    loader = _loader(data.train, config.batch_size, True, config.task, config.num_workers, config.seed)
    total = config.max_steps or config.epochs * len(loader)
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
            if config.task == "det":
                images = [im.to(device) for im in batch[0]]
                targets = [{k: v.to(device) for k, v in t.items()} for t in batch[1]]
                losses = model(images, targets)
            else:
                logits = model(batch[0].to(device))
                losses = {"loss_ce": F.cross_entropy(logits, batch[1].to(device), ignore_index=IGNORE_INDEX)}
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"loss is {loss.item()} at step {step}; lower --lr or raise --warmup-steps"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.clip_grad > 0:
                nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad)
            optimizer.step()
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
    if stopped_early and config.progress:
        print(f"stopped by the {config.time_limit_min:g}-minute time limit after {step} of {total} steps")
    train_time = time.perf_counter() - start
    t0 = time.perf_counter()
    if config.task == "det":
        metrics = evaluate_detection(model, data.val, config.batch_size, device, progress=config.progress)
    else:
        metrics = evaluate_segmentation(
            model, data.val, data.num_classes, config.batch_size, device, progress=config.progress
        )
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
    plain = asdict(config)
    atomic_torch_save(
        {"format": CHECKPOINT_FORMAT, "config": plain, "num_classes": data.num_classes, "classes": list(data.classes),
         "synthetic": data.synthetic, "model": model.state_dict(), "metrics": result},
        out_dir / "model.pth",
    )  # fmt: skip
    atomic_write_text(out_dir / "final.json", json.dumps({"config": plain, "metrics": result}, indent=1))
    return result


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


# ---------------------------------------------------------------------------------------------------------------
# Comparison: agent backbone vs its softmax twin
# ---------------------------------------------------------------------------------------------------------------
def _set_size(model: nn.Module, height: int, width: int) -> None:
    """Make the detector's transform keep an input of this size as it is (no resize)."""
    model.transform.min_size = (min(height, width),)
    model.transform.max_size = max(height, width)


def backbone_flops(backbone: nn.Module, size: tuple[int, int]) -> int:
    """FLOPs (multiply-adds) of one (1, 3, H, W) backbone forward, counted on the meta device (no compute)."""
    from ..measure import FlopCounter

    meta = copy.deepcopy(backbone).eval().to_empty(device="meta")
    counter = FlopCounter()
    with torch.no_grad(), counter:
        meta(torch.empty(1, backbone.in_chans, *size, device="meta"))
    return counter.total


def compare_detectors(
    kind: str = "maskrcnn",
    backbone: str = "agent_pvt_tiny_224",
    twin_attn_type: str = "BBBB",
    agent_grids: Any = "official",
    flops_size: tuple[int, int] = (800, 1333),
    latency_sizes: tuple[tuple[int, int], ...] = ((512, 512), (800, 1333), (1024, 1024)),
    num_classes: int = 81,
    device: str = "auto",
    budget_s: float = 10.0,
) -> list[dict[str, Any]]:
    """Params, FLOPs and latency (batch 1, eval, median ms) of ``kind`` with the agent backbone and its twin.

    Both detectors use torchvision's default heads (FPN 256, 1000 proposals); ``box_score_thresh=0`` so that
    both run the heads on the full 100 detections whatever their (random) weights predict.
    """
    from ..measure import count_flops, median_ms

    dev = resolve_device(device)
    rows = []
    for label, bkw, grids in (
        ("agent", {}, agent_grids),
        ("softmax twin", {"attn_type": twin_attn_type}, None),
    ):
        torch.manual_seed(0)
        extra = {"box_score_thresh": 0.0} if kind != "retinanet" else {"score_thresh": 0.0}
        model = build_detector(
            kind, backbone, num_classes=num_classes, agent_grids=grids, backbone_kwargs=bkw, **extra
        )
        model.eval()
        row: dict[str, Any] = {"backbone": backbone, "variant": label, "attn_type": bkw.get("attn_type", "default"),
                               "agent_grids": grids, "kind": kind, "params": sum(p.numel() for p in model.parameters()),
                               "backbone_params": sum(p.numel() for p in model.backbone.body.parameters())}  # fmt: skip
        _set_size(model, *flops_size)
        row["flops"] = count_flops(model, (3, *flops_size)).total
        row["backbone_flops"] = backbone_flops(model.backbone.body, flops_size)
        row["flops_size"] = list(flops_size)
        model.to(dev)
        row["latency_ms"] = {}
        for height, width in latency_sizes:
            _set_size(model, height, width)
            x = [torch.rand(3, height, width, device=dev)]

            def run(model=model, x=x):
                with torch.no_grad():
                    model(x)
                if dev.type == "cuda":
                    torch.cuda.synchronize()

            row["latency_ms"][f"{height}x{width}"] = median_ms(
                run, warmup=1, min_reps=3, max_reps=20, budget_s=budget_s
            )
        row["device"] = (
            torch.cuda.get_device_name(dev)
            if dev.type == "cuda"
            else f"cpu ({torch.get_num_threads()} threads)"
        )
        rows.append(row)
    return rows
