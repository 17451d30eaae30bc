"""Evaluation of dense models: detection → COCO box / mask AP through pycocotools; segmentation → mIoU, mAcc
(mmseg's definitions). :mod:`agentattn.dense.engine` runs these after training and re-exports them."""

from __future__ import annotations

import contextlib
import io
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from .data import IGNORE_INDEX, collate_detection, to_coco_dict

__all__ = ["dense_loader", "evaluate_detection", "evaluate_segmentation"]


def dense_loader(
    dataset, batch_size: int, shuffle: bool, task: str, num_workers: int, seed: int
) -> DataLoader:
    """The DataLoader for ``task`` ('det': lists of images and targets; 'seg': stacked batches); a shuffled one
    drops its last partial batch."""
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


def _rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO run-length encoding of an (H, W) boolean mask, JSON-ready (``counts`` as text)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _coco_eval(gt: dict[str, Any], results: list[dict[str, Any]], iou_type: str) -> dict[str, float]:
    """pycocotools' six AP numbers (``{iou_type}_mAP`` ...) of ``results`` against ``gt``, its printout muted."""
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
        batches = dense_loader(dataset, batch_size, False, "det", 0, 0)
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
        batches = dense_loader(dataset, batch_size if same_size else 1, False, "seg", 0, 0)
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
