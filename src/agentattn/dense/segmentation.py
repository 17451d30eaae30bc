"""Semantic segmentation heads on agent backbones: Semantic FPN and UperNet (the paper's ADE20K settings).

    image (B, 3, H, W) in [0, 1] ─ normalise ─ AgentBackbone (C2..C5)
        fpn:     FPN (P2..P5) ─ per level conv3×3-GN-ReLU (+ ×2 upsample) down to 1/4 ─ sum ─ conv1×1
        upernet: PPM on C5 (pool 1, 2, 3, 6) + FPN laterals ─ top-down ─ conv3×3 per level ─ upsample to 1/4,
                 concat ─ conv3×3 ─ conv1×1
    ─ bilinear upsample to (H, W) → logits (B, num_classes, H, W)

Semantic FPN follows Kirillov et al. 2019 (mmseg ``FPNHead``: 128 head channels on a 256-wide FPN); UperNet
follows mmseg's ``UPerHead`` (pool scales 1, 2, 3, 6; 512 channels). GroupNorm replaces BatchNorm so that
batches of 1–2 images on one device train stably.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FeaturePyramidNetwork

from .backbones import AgentBackbone

__all__ = ["SEGMENTER_KINDS", "Segmenter", "SemanticFPNHead", "UperNetHead", "build_segmenter"]

SEGMENTER_KINDS = ("fpn", "upernet")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _conv_gn_relu(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    groups = 32 if cout % 32 == 0 else 1
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.GroupNorm(groups, cout), nn.ReLU(inplace=True)
    )


def _up(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class SemanticFPNHead(nn.Module):
    """Semantic FPN: FPN, then each level upsampled to the finest one by conv + ×2 steps, summed, classified.

    Shape:
        ``forward(feats)``: list of (B, C_k, H_k, W_k), finest first → (B, num_classes, H_0, W_0).
    """

    def __init__(
        self,
        in_channels: list[int],
        num_classes: int,
        fpn_channels: int = 256,
        channels: int = 128,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.fpn = FeaturePyramidNetwork(in_channels, fpn_channels)
        self.scale_heads = nn.ModuleList()
        for level in range(len(in_channels)):
            layers: list[nn.Module] = []
            for j in range(max(level, 1)):
                layers.append(_conv_gn_relu(fpn_channels if j == 0 else channels, channels))
                if level > 0:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*layers))
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        pyramid = list(self.fpn({str(k): f for k, f in enumerate(feats)}).values())
        size = pyramid[0].shape[-2:]
        out = self.scale_heads[0](pyramid[0])
        for head, p in zip(self.scale_heads[1:], pyramid[1:], strict=True):
            y = head(p)
            out = out + (y if y.shape[-2:] == size else _up(y, size))  # odd sizes: ×2 steps overshoot by ≤1
        return self.classifier(self.dropout(out))


class UperNetHead(nn.Module):
    """UperNet (UPerHead): pyramid pooling on the coarsest map, FPN fusion, concat of all levels.

    Shape:
        ``forward(feats)``: list of (B, C_k, H_k, W_k), finest first → (B, num_classes, H_0, W_0).
    """

    def __init__(
        self,
        in_channels: list[int],
        num_classes: int,
        channels: int = 512,
        pool_scales: tuple[int, ...] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.pool_scales = pool_scales
        self.ppm = nn.ModuleList(_conv_gn_relu(in_channels[-1], channels, 1) for _ in pool_scales)
        self.bottleneck = _conv_gn_relu(in_channels[-1] + len(pool_scales) * channels, channels)
        self.lateral = nn.ModuleList(_conv_gn_relu(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(_conv_gn_relu(channels, channels) for _ in in_channels[:-1])
        self.fuse = _conv_gn_relu(len(in_channels) * channels, channels)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        top = feats[-1]
        pooled = [top] + [
            _up(conv(F.adaptive_avg_pool2d(top, s)), top.shape[-2:])
            for conv, s in zip(self.ppm, self.pool_scales, strict=True)
        ]
        laterals = [lat(f) for lat, f in zip(self.lateral, feats[:-1], strict=True)] + [
            self.bottleneck(torch.cat(pooled, 1))
        ]
        for k in range(len(laterals) - 1, 0, -1):
            laterals[k - 1] = laterals[k - 1] + _up(laterals[k], laterals[k - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1], strict=True)] + [laterals[-1]]
        size = outs[0].shape[-2:]
        fused = self.fuse(torch.cat([outs[0]] + [_up(o, size) for o in outs[1:]], 1))
        return self.classifier(self.dropout(fused))


class Segmenter(nn.Module):
    """Backbone + head; normalises [0, 1] images with the ImageNet mean/std first.

    Shape:
        ``forward(images)``: (B, in_chans, H, W) in [0, 1] → logits (B, num_classes, H, W).
    """

    def __init__(self, backbone: AgentBackbone, head: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.num_classes = num_classes
        chans = backbone.in_chans
        mean = IMAGENET_MEAN if chans == 3 else (0.5,) * chans
        std = IMAGENET_STD if chans == 3 else (0.5,) * chans
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != self.backbone.in_chans:
            raise ValueError(
                f"images must be (B, {self.backbone.in_chans}, H, W), got shape {tuple(images.shape)}"
            )
        feats = list(self.backbone((images - self.mean) / self.std).values())
        return _up(self.head(feats), images.shape[-2:])


def build_segmenter(
    kind: str,
    backbone: str = "agent_pvt_tiny_224",
    num_classes: int = 150,
    pretrained_backbone: str | None = None,
    *,
    agent_grids: Any = None,
    backbone_kwargs: dict[str, Any] | None = None,
    **head_kwargs: Any,
) -> Segmenter:
    """A :class:`Segmenter` with a 'fpn' (Semantic FPN) or 'upernet' head on an agent backbone.

    Args:
        kind: 'fpn' or 'upernet'.
        backbone: a hierarchical zoo model name.
        num_classes: number of labels (the ignore label 255 is not one).
        pretrained_backbone: optional classification checkpoint (loaded unchanged).
        agent_grids, backbone_kwargs: see :class:`AgentBackbone`.
        **head_kwargs: head widths (``fpn_channels``/``channels`` for fpn, ``channels``/``pool_scales`` for
            upernet), ``dropout``.
    """
    if kind not in SEGMENTER_KINDS:
        raise ValueError(f"kind must be one of {SEGMENTER_KINDS}, got {kind!r}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    body = AgentBackbone(
        backbone, pretrained=pretrained_backbone, agent_grids=agent_grids, **(backbone_kwargs or {})
    )
    head_cls = SemanticFPNHead if kind == "fpn" else UperNetHead
    return Segmenter(body, head_cls(body.out_channels_list, num_classes, **head_kwargs), num_classes)
