"""Data for dense prediction: an offline synthetic shapes dataset, COCO and ADE20K readers, COCO export.

Synthetic shapes (the default ``data="synthetic"``): scikit-image ``draw.random_shapes`` objects (rectangle,
circle, triangle; the class is the shape, the colour is random) on smooth colour-noise and stripe textures.
Every image is a pure function of (seed, split, index), so the validation split is fixed and nothing is
downloaded or stored. Each sample carries class labels, tight boxes and instance masks, and a semantic map.

    detection sample:    image (3, S, S) float in [0, 1], {"boxes": (N, 4) xyxy, "labels": (N,) in 1..K,
                         "masks": (N, S, S) uint8, "image_id": int}
    segmentation sample: image (3, S, S), labels (S, S) int64 in 0..K (0 background; 255 ignored)

``data="coco:PATH"`` reads ``PATH/annotations/instances_{split}2017.json`` (or ``instances_{split}.json``) and
the images in ``PATH/{split}2017`` (or ``PATH/{split}``); ``data="ade20k:PATH"`` reads ADEChallengeData2016
(``images/{training,validation}``, ``annotations/...``; label 0 is "other" and ignored, 1..150 become 0..149).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..io import atomic_write_bytes

__all__ = [
    "SYNTHETIC_CLASSES",
    "ADE20KSegmentation",
    "CocoDetection",
    "DenseData",
    "SyntheticShapes",
    "build_dense_data",
    "collate_detection",
    "export_coco",
    "to_coco_dict",
]

SYNTHETIC_CLASSES = ("rectangle", "circle", "triangle")
IGNORE_INDEX = 255
_SPLIT_ID = {"train": 0, "val": 1}


# ---------------------------------------------------------------------------------------------------------------
# Synthetic shapes
# ---------------------------------------------------------------------------------------------------------------
def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A (size, size, 3) float32 background in [0, 1]: smooth colour noise plus faint stripes and grain."""
    coarse = torch.from_numpy(rng.uniform(0.2, 0.8, size=(1, 3, 6, 6)).astype(np.float32))
    base = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[0].permute(1, 2, 0)
    base = base.numpy()
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle, period = rng.uniform(0, np.pi), rng.uniform(6, 24)
    stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    base = base + rng.uniform(0.0, 0.12) * stripes[..., None] + rng.normal(0, 0.04, size=(size, size, 3))
    return np.clip(base, 0, 1).astype(np.float32)


class SyntheticShapes(Dataset):
    """Shapes on textures with labels, boxes, instance masks and semantic maps (see the module docstring).

    Args:
        split: 'train' or 'val' (a separate, fixed stream of images).
        size: image side S (≤ 256 keeps the CPU run short).
        length: number of images.
        seed: the dataset seed; (seed, split, index) fixes an image.
        max_objects: objects per image are 0 … max_objects (about 5 % of images are empty).
        min_obj, max_obj: object size range in pixels.
        task: 'det' (targets dict) or 'seg' (semantic map).
        hflip: random horizontal flips (training augmentation, seeded per call by torch).
    """

    classes = SYNTHETIC_CLASSES

    def __init__(
        self,
        split: str = "train",
        size: int = 128,
        length: int = 2000,
        seed: int = 0,
        max_objects: int = 4,
        min_obj: int = 16,
        max_obj: int = 56,
        task: str = "det",
        hflip: bool = False,
    ) -> None:
        if split not in _SPLIT_ID:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if not 32 <= size <= 256:
            raise ValueError(f"size must be in [32, 256] (a CPU-sized synthetic task), got {size}")
        if not 4 <= min_obj <= max_obj < size:
            raise ValueError(f"need 4 <= min_obj <= max_obj < size, got {min_obj}, {max_obj}, {size}")
        if task not in ("det", "seg"):
            raise ValueError(f"task must be 'det' or 'seg', got {task!r}")
        self.split, self.size, self.length, self.seed = split, size, length, seed
        self.max_objects, self.min_obj, self.max_obj = max_objects, min_obj, max_obj
        self.task, self.hflip = task, hflip
        self.num_classes = len(self.classes) + 1  # with the background
        self._cache: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return self.length

    def generate(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(image (S, S, 3) uint8, labels (N,) int64 in 1..K, masks (N, S, S) bool) for ``index``."""
        from skimage.draw import random_shapes

        if index in self._cache:
            return self._cache[index]
        rng = np.random.default_rng([self.seed, _SPLIT_ID[self.split], index])
        size = self.size
        image = _texture(rng, size)
        count = 0 if rng.random() < 0.05 else int(rng.integers(1, self.max_objects + 1))
        occupied = np.zeros((size, size), bool)
        labels, masks = [], []
        for _ in range(count):
            for _attempt in range(20):
                cls = int(rng.integers(len(self.classes)))
                shape_img, placed = random_shapes(
                    (size, size), max_shapes=1, min_shapes=1, shape=self.classes[cls], min_size=self.min_obj,
                    max_size=self.max_obj, num_channels=1, channel_axis=None, intensity_range=(0, 0),
                    allow_overlap=True, rng=rng,
                )  # fmt: skip
                mask = shape_img == 0
                if not placed or mask.sum() < 16:
                    continue
                grown = np.zeros_like(mask)
                ys, xs = np.nonzero(mask)
                grown[max(ys.min() - 2, 0) : ys.max() + 3, max(xs.min() - 2, 0) : xs.max() + 3] = True
                if (grown & occupied).any():
                    continue  # keep objects apart: boxes and masks stay unambiguous
                occupied |= mask
                colour = rng.uniform(0, 1, size=3).astype(np.float32)
                local = image[mask].mean(axis=0)
                if np.abs(colour - local).mean() < 0.25:  # enough contrast with the texture under it
                    colour = np.where(local > 0.5, rng.uniform(0, 0.2, 3), rng.uniform(0.8, 1, 3)).astype(
                        np.float32
                    )
                shade = colour + rng.normal(0, 0.03, size=(int(mask.sum()), 3)).astype(np.float32)
                image[mask] = np.clip(shade, 0, 1)
                labels.append(cls + 1)
                masks.append(mask)
                break
        out = (
            (image * 255).round().astype(np.uint8),
            np.asarray(labels, np.int64),
            np.stack(masks) if masks else np.zeros((0, size, size), bool),
        )
        self._cache[index] = out
        return out

    def target(self, index: int) -> dict[str, torch.Tensor]:
        """Detection target of ``index`` without augmentation: boxes (N, 4) xyxy, labels, masks, image_id."""
        _, labels, masks = self.generate(index)
        boxes = []
        for m in masks:
            ys, xs = np.nonzero(m)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        return {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.from_numpy(labels),
            "masks": torch.from_numpy(masks.astype(np.uint8)),
            "image_id": torch.tensor(index),
        }

    def __getitem__(self, index: int):
        if not 0 <= index < self.length:
            raise IndexError(index)
        image_np, labels, masks = self.generate(index)
        image = torch.from_numpy(image_np).permute(2, 0, 1).float() / 255
        flip = self.hflip and bool(torch.rand(()) < 0.5)
        if self.task == "seg":
            semantic = np.zeros((self.size, self.size), np.int64)
            for lab, m in zip(labels, masks, strict=True):
                semantic[m] = lab
            sem = torch.from_numpy(semantic)
            return (image.flip(-1), sem.flip(-1)) if flip else (image, sem)
        target = self.target(index)
        if flip:
            image = image.flip(-1)
            target["masks"] = target["masks"].flip(-1)
            b = target["boxes"]
            target["boxes"] = torch.stack([self.size - b[:, 2], b[:, 1], self.size - b[:, 0], b[:, 3]], dim=1)
        return image, target


# ---------------------------------------------------------------------------------------------------------------
# COCO export / in-memory COCO ground truth
# ---------------------------------------------------------------------------------------------------------------
def _rle(mask: np.ndarray) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def to_coco_dict(dataset: Dataset, indices: list[int] | None = None) -> dict[str, Any]:
    """COCO instances dict (images, annotations with RLE masks, categories) of a detection dataset.

    The dataset needs ``classes``, ``target(i)`` and an image size (``size`` or the target's masks).
    """
    indices = list(range(len(dataset))) if indices is None else indices
    images, annotations = [], []
    for i in indices:
        target = dataset.target(i)
        masks = target["masks"].numpy().astype(bool)
        height, width = (
            dataset.image_size(i) if hasattr(dataset, "image_size") else (dataset.size, dataset.size)
        )
        image_id = int(target["image_id"])
        images.append({"id": image_id, "file_name": f"{image_id:06d}.png", "height": height, "width": width})
        for box, label, mask in zip(target["boxes"].tolist(), target["labels"].tolist(), masks, strict=True):
            x1, y1, x2, y2 = box
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(label),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": float(mask.sum()),
                    "iscrowd": 0,
                    "segmentation": _rle(mask),
                }
            )
    categories = [{"id": k + 1, "name": n, "supercategory": "shape"} for k, n in enumerate(dataset.classes)]
    # "info" and "licenses" as in COCO files: some pycocotools versions (2.0.10) read "info" in loadRes.
    info = {"description": "agentattn synthetic shapes", "version": "1.0"}
    return {
        "info": info,
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def export_coco(dataset: SyntheticShapes, root: str | Path, split: str | None = None) -> Path:
    """Write ``root/{split}/NNNNNN.png`` and ``root/annotations/instances_{split}.json``; return the json path.

    The result reads back with ``data="coco:ROOT"`` and with ``pycocotools.coco.COCO``.
    """
    from PIL import Image

    root, split = Path(root), split or dataset.split
    for i in range(len(dataset)):
        image = dataset.generate(i)[0]
        out = root / split / f"{i:06d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        png = io.BytesIO()
        Image.fromarray(image).save(png, format="PNG")  # not-atomic: into memory, written atomically below
        atomic_write_bytes(out, png.getvalue())
    path = root / "annotations" / f"instances_{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(to_coco_dict(dataset)).encode())
    return path


# ---------------------------------------------------------------------------------------------------------------
# Readers for the real datasets
# ---------------------------------------------------------------------------------------------------------------
def _first_existing(candidates: list[Path], what: str) -> Path:
    for c in candidates:
        if c.exists():
            return c
    raise ValueError(f"no {what} found; looked for {', '.join(str(c) for c in candidates)}")


class CocoDetection(Dataset):
    """COCO instances (boxes, labels 1..K over the sorted category ids, masks), crowd boxes dropped.

    Images are returned at their size as (3, H, W) floats; the detector's transform resizes them.
    """

    def __init__(self, root: str | Path, split: str = "train", hflip: bool = False) -> None:
        from pycocotools.coco import COCO

        root = Path(root)
        ann = _first_existing(
            [
                root / "annotations" / f"instances_{split}2017.json",
                root / "annotations" / f"instances_{split}.json",
            ],
            f"COCO annotations for split {split!r}",
        )
        self.image_dir = _first_existing(
            [root / f"{split}2017", root / split, root / "images" / split], "image dir"
        )
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):
            self.coco = COCO(str(ann))
        self.ids = sorted(self.coco.imgs)
        cat_ids = sorted(self.coco.cats)
        self.cat_to_label = {c: k + 1 for k, c in enumerate(cat_ids)}
        self.label_to_cat = {v: k for k, v in self.cat_to_label.items()}
        self.classes = tuple(self.coco.cats[c]["name"] for c in cat_ids)
        self.num_classes = len(cat_ids) + 1
        self.hflip = hflip
        self.split = split

    def __len__(self) -> int:
        return len(self.ids)

    def image_size(self, index: int) -> tuple[int, int]:
        info = self.coco.imgs[self.ids[index]]
        return int(info["height"]), int(info["width"])

    def target(self, index: int) -> dict[str, torch.Tensor]:
        image_id = self.ids[index]
        height, width = self.image_size(index)
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        boxes, labels, masks = [], [], []
        for a in anns:
            x, y, w, h = a["bbox"]
            x1, y1, x2, y2 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
            if x2 - x1 < 1 or y2 - y1 < 1:
                continue  # degenerate in the file: skipped like mmdet's _parse_ann_info
            boxes.append([x1, y1, x2, y2])
            labels.append(self.cat_to_label[a["category_id"]])
            masks.append(
                self.coco.annToMask(a) if a.get("segmentation") else np.zeros((height, width), np.uint8)
            )
        return {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": torch.from_numpy(np.stack(masks))
            if masks
            else torch.zeros((0, height, width), torch.uint8),
            "image_id": torch.tensor(image_id),
        }

    def __getitem__(self, index: int):
        from PIL import Image

        info = self.coco.imgs[self.ids[index]]
        with Image.open(self.image_dir / info["file_name"]) as im:
            image = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1).float() / 255
        target = self.target(index)
        if self.hflip and bool(torch.rand(()) < 0.5):
            width = image.shape[-1]
            image, target["masks"] = image.flip(-1), target["masks"].flip(-1)
            b = target["boxes"]
            target["boxes"] = torch.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], dim=1)
        return image, target


class ADE20KSegmentation(Dataset):
    """ADEChallengeData2016 (150 classes; mmseg's ``reduce_zero_label``: 0 → 255 ignored, k → k − 1).

    Training: resize so the image fits (4·crop, crop) with a random ratio in [0.5, 2], random crop ``crop``²
    (padded with the ignore label), random flip. Evaluation: the short side resized to ``crop`` (keep ratio);
    the labels stay at full size and the logits are resized to them.
    """

    classes = tuple(f"class{k}" for k in range(150))
    num_classes = 150

    def __init__(self, root: str | Path, split: str = "train", crop: int = 512) -> None:
        root = Path(root)
        if (root / "ADEChallengeData2016").is_dir():
            root = root / "ADEChallengeData2016"
        sub = {"train": "training", "val": "validation"}[split]
        image_dir = _first_existing([root / "images" / sub], "ADE20K image dir")
        self.label_dir = _first_existing([root / "annotations" / sub], "ADE20K annotation dir")
        self.images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if not self.images:
            raise ValueError(f"no images in {image_dir}")
        self.split, self.crop = split, crop

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        from PIL import Image

        path = self.images[index]
        with Image.open(path) as im:
            image = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1).float() / 255
        with Image.open(self.label_dir / (path.stem + ".png")) as im:
            label = torch.from_numpy(np.asarray(im).astype(np.int64).copy())
        label = torch.where(label == 0, IGNORE_INDEX, label - 1)
        height, width = image.shape[-2:]
        if self.split != "train":
            scale = self.crop / min(height, width)
            size = (round(height * scale), round(width * scale))
            return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0], label
        scale = min(4 * self.crop / max(height, width), self.crop / min(height, width)) * float(
            torch.empty(()).uniform_(0.5, 2.0)
        )
        size = (max(round(height * scale), 1), max(round(width * scale), 1))
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        label = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()
        pad_h, pad_w = max(self.crop - size[0], 0), max(self.crop - size[1], 0)
        image = F.pad(image, (0, pad_w, 0, pad_h))
        label = F.pad(label, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
        top = int(torch.randint(0, image.shape[1] - self.crop + 1, ()))
        left = int(torch.randint(0, image.shape[2] - self.crop + 1, ()))
        image = image[:, top : top + self.crop, left : left + self.crop]
        label = label[top : top + self.crop, left : left + self.crop]
        if bool(torch.rand(()) < 0.5):
            image, label = image.flip(-1), label.flip(-1)
        return image, label


# ---------------------------------------------------------------------------------------------------------------
# The data switch
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class DenseData:
    """Train and validation datasets plus what the model needs to know about them."""

    train: Dataset
    val: Dataset
    num_classes: int  # detection: with the background; segmentation: the label count
    classes: tuple[str, ...]
    source: str
    synthetic: bool


def collate_detection(batch: list) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """List of (image, target) → (images, targets) lists (images may differ in size)."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


def build_dense_data(
    spec: str,
    task: str = "det",
    img_size: int = 128,
    num_train: int = 2000,
    num_val: int = 200,
    seed: int = 0,
) -> DenseData:
    """Datasets for ``data``: ``synthetic`` (default), ``coco:PATH`` (det) or ``ade20k:PATH`` (seg).

    ``seed`` picks the synthetic dataset (its val split is fixed by it); the default 0 is the reference one.
    """
    kind, _, path = spec.partition(":")
    if task not in ("det", "seg"):
        raise ValueError(f"task must be 'det' or 'seg', got {task!r}")
    if kind == "synthetic":
        if path:
            raise ValueError(f"data 'synthetic' takes no path, got {spec!r}")
        train = SyntheticShapes("train", img_size, num_train, seed, task=task, hflip=True)
        val = SyntheticShapes("val", img_size, num_val, seed, task=task)
        # det: classes + background (torchvision); seg: background is label 0 of the same count
        return DenseData(train, val, train.num_classes, ("background", *SYNTHETIC_CLASSES), spec, True)
    if kind not in ("coco", "ade20k"):
        raise ValueError(f"data must be 'synthetic', 'coco:PATH' or 'ade20k:PATH', got {spec!r}")
    if not path:
        raise ValueError(f"data {spec!r} needs a path, e.g. '{kind}:/data/{kind}'")
    if not Path(path).is_dir():
        raise ValueError(f"data {spec!r}: {path} is not a directory")
    if kind == "coco":
        if task != "det":
            raise ValueError(f"data {spec!r} is a detection dataset (use task='det'), got task={task!r}")
        train, val = CocoDetection(path, "train", hflip=True), CocoDetection(path, "val")
        return DenseData(train, val, train.num_classes, ("background", *train.classes), spec, False)
    if kind == "ade20k":
        if task != "seg":
            raise ValueError(f"data {spec!r} is a segmentation dataset (use task='seg'), got task={task!r}")
        train, val = ADE20KSegmentation(path, "train", img_size), ADE20KSegmentation(path, "val", img_size)
        return DenseData(train, val, ADE20KSegmentation.num_classes, ADE20KSegmentation.classes, spec, False)
    raise ValueError(f"data must be 'synthetic', 'coco:PATH' or 'ade20k:PATH', got {spec!r}")
