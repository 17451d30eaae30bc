"""``explain``: figures of what the agents of a trained model attend to, for given images.

Images are files (PNG, JPEG, anything PIL reads) or dataset entries ``fashion-mnist:SPLIT:INDEX``. They are
prepared the way the model's training data was: grayscale and Fashion-MNIST statistics for a model trained
on Fashion-MNIST, the model's pretrained config (RGB, mean/std, input size) otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..layers.attention_maps import AgentAttentionMaps, record_agent_attention
from ..train.data import FASHION_MNIST_DIR, FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist
from .figures import plot_agent_attention

__all__ = ["Explanation", "explain", "load_images", "preprocessing_for"]


@dataclass
class Explanation:
    """The figure of one image and the model's prediction for it."""

    source: str
    figure: Path
    predicted: int
    probability: float


def preprocessing_for(model: nn.Module, meta: dict[str, Any]) -> dict[str, Any]:
    """``{"in_chans", "img_size", "mean", "std"}`` for the model's inputs (from the run record, else timm's cfg)."""
    data = str(meta.get("data") or "")
    if meta and data.startswith("fashion-mnist"):
        return dict(
            in_chans=1, img_size=meta["img_size"], mean=(FASHION_MNIST_MEAN,), std=(FASHION_MNIST_STD,)
        )
    cfg = getattr(model, "pretrained_cfg", None) or {}
    in_chans = meta.get("in_chans") or cfg.get("input_size", (3,))[0]
    img_size = meta.get("img_size") or cfg.get("input_size", (3, 224, 224))[-1]
    mean = tuple(cfg.get("mean", (0.485, 0.456, 0.406)))[:in_chans]
    std = tuple(cfg.get("std", (0.229, 0.224, 0.225)))[:in_chans]
    return dict(in_chans=in_chans, img_size=img_size, mean=mean, std=std)


def _dataset_image(spec: str) -> tuple[torch.Tensor, int]:
    # fashion-mnist:SPLIT:INDEX -> ((H, W) uint8, label)
    parts = spec.split(":")
    if len(parts) != 3 or parts[1] not in ("train", "test") or not parts[2].isdigit():
        raise ValueError(f"image {spec!r}: dataset images are written fashion-mnist:train|test:INDEX")
    images, labels = load_fashion_mnist(FASHION_MNIST_DIR, parts[1])
    index = int(parts[2])
    if index >= len(labels):
        raise ValueError(
            f"image {spec!r}: the {parts[1]} split has {len(labels)} images (0..{len(labels) - 1})"
        )
    return images[index], int(labels[index])


def load_images(
    sources: Sequence[str], in_chans: int, img_size: int, mean: Sequence[float], std: Sequence[float]
) -> tuple[torch.Tensor, list[int | None]]:
    """Model inputs for image files or ``fashion-mnist:SPLIT:INDEX`` entries.

    Returns:
        ((B, in_chans, img_size, img_size) float32 normalised, the known labels (None for files)).

    Raises:
        ValueError: a missing or unreadable image, or a bad dataset entry.
    """
    from PIL import Image, UnidentifiedImageError

    tensors, labels = [], []
    for source in sources:
        if source.startswith("fashion-mnist:"):
            pixels, label = _dataset_image(source)
            x = pixels.float().div(255.0)[None].repeat(in_chans, 1, 1)
        else:
            path = Path(source)
            if not path.is_file():
                raise ValueError(f"image {path}: no such file")
            try:
                with Image.open(path) as img:
                    img = img.convert("L" if in_chans == 1 else "RGB")
                    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
            except (UnidentifiedImageError, OSError) as err:
                raise ValueError(f"image {path}: not a readable image ({err})") from err
            x = x[None] if x.dim() == 2 else x.permute(2, 0, 1)
            label = None
        x = F.interpolate(x[None], size=(img_size, img_size), mode="bilinear", antialias=True)[0]
        mean_t = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        std_t = torch.tensor(std, dtype=torch.float32)[:, None, None]
        tensors.append((x - mean_t) / std_t)
        labels.append(label)
    return torch.stack(tensors), labels


@torch.no_grad()
def explain(
    model: nn.Module,
    images: torch.Tensor,
    out_dir: str | Path,
    names: Sequence[str],
    class_names: Sequence[str] = (),
    labels: Sequence[int | None] = (),
    layer: str | None = None,
) -> list[Explanation]:
    """Write one agent-attention figure per image; return what was written and predicted.

    Args:
        model: a model with agent-attention layers, in eval mode.
        images: (B, C, H, W) prepared inputs (:func:`load_images`).
        out_dir: where ``agents_<name>.png`` go (created).
        names: one short name per image, for the file names.
        class_names, labels: for the figure titles (optional).
        layer: qualified name of the layer to show (default: the first agent layer, the finest grid).

    Raises:
        ValueError: no agent-attention layer, or an unknown ``layer``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    with record_agent_attention(model) as records:
        probs = model(images).float().softmax(dim=-1)
    available = list(dict.fromkeys(r.layer for r in records))
    chosen = layer or available[0]
    recorded: list[AgentAttentionMaps] = [r for r in records if r.layer == chosen]
    if not recorded:
        raise ValueError(f"layer {chosen!r} has no agent attention; choose one of {available}")
    maps = recorded[0]
    out = []
    for i, name in enumerate(names):
        predicted = int(probs[i].argmax())
        label = labels[i] if i < len(labels) else None

        def cls(k: int) -> str:
            return class_names[k] if k < len(class_names) else str(k)

        title = f"predicted {cls(predicted)} ({100 * float(probs[i, predicted]):.0f}%)"
        if label is not None:
            title = f"true {cls(label)}, {title}"
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        figure = plot_agent_attention(images[i], maps, i, out_dir / f"agents_{safe}.png", title)
        out.append(Explanation(name, figure, predicted, float(probs[i, predicted])))
    return out
