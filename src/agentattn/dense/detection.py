"""torchvision detectors (Mask R-CNN, Faster R-CNN, RetinaNet) with an FPN on an agent-attention backbone.

    images ─ GeneralizedRCNNTransform (resize to min_size/max_size, normalise, pad to /32)
           ─ AgentBackbone (stage maps C2..C5) ─ FPN (P2..P5 + max-pool P6; RetinaNet: P3..P5 + P6, P7)
           ─ torchvision RPN + RoI heads (box, mask) or the RetinaNet head

The models are torchvision's own classes with a check of the inputs in front (:func:`check_detection_inputs`),
so they train and evaluate like any torchvision detector: ``model(images, targets)`` returns the loss dict in
train mode, ``model(images)`` the detections in eval mode. Labels follow torchvision: ``num_classes`` counts
the background, and object labels are 1 … num_classes − 1.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from .backbones import AgentBackbone

__all__ = ["DETECTOR_KINDS", "FPNBackbone", "build_detector", "check_detection_inputs"]

DETECTOR_KINDS = ("maskrcnn", "fasterrcnn", "retinanet")


class FPNBackbone(nn.Module):
    """An :class:`AgentBackbone` followed by torchvision's FPN.

    Shape:
        ``forward(x)``: (B, 3, H, W) → OrderedDict of (B, out_channels, H_k, W_k), finest first; keys "0", "1",
        ... for the backbone levels, then "pool" (max-pool P6) or "p6", "p7" (RetinaNet).
    """

    def __init__(self, body: AgentBackbone, out_channels: int = 256, extra: str = "pool") -> None:
        super().__init__()
        if extra not in ("pool", "p6p7"):
            raise ValueError(f"extra must be 'pool' or 'p6p7', got {extra!r}")
        self.body = body
        extra_blocks = LastLevelMaxPool() if extra == "pool" else LastLevelP6P7(out_channels, out_channels)
        self.fpn = FeaturePyramidNetwork(body.out_channels_list, out_channels, extra_blocks=extra_blocks)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(self.body(x))


def check_detection_inputs(
    images: list[torch.Tensor] | torch.Tensor,
    targets: list[dict[str, torch.Tensor]] | None,
    in_chans: int,
    num_classes: int,
    need_masks: bool,
) -> list[dict[str, torch.Tensor]] | None:
    """Validate detector inputs; clip boxes that stick out of their image.

    Args:
        images: list of (C, H, W) float tensors (or a (B, C, H, W) batch).
        targets: per image ``boxes`` (N, 4) xyxy in pixels, ``labels`` (N,) int64 in [1, num_classes), and with
            ``need_masks`` ``masks`` (N, H, W). N = 0 (an image without objects) is fine.

    Returns:
        the targets, with boxes partly outside the image clipped to it (new dicts; inputs are not modified).

    Raises:
        ValueError: channel count, dtype, shapes, labels out of range, degenerate boxes, or boxes entirely
            outside their image, naming the image and box.
    """
    for i, img in enumerate(images):
        if img.dim() != 3 or img.shape[0] != in_chans:
            raise ValueError(
                f"images[{i}] must be ({in_chans}, H, W) for this backbone (in_chans={in_chans}), "
                f"got shape {tuple(img.shape)}"
            )
        if not img.is_floating_point():
            raise ValueError(f"images[{i}] must be a float tensor in [0, 1], got dtype {img.dtype}")
    if targets is None:
        return None
    if len(targets) != len(images):
        raise ValueError(f"got {len(images)} images but {len(targets)} targets")
    return [
        _checked_target(i, img, tgt, num_classes, need_masks)
        for i, (img, tgt) in enumerate(zip(images, targets, strict=True))
    ]


def _checked_target(
    i: int, img: torch.Tensor, tgt: dict[str, torch.Tensor], num_classes: int, need_masks: bool
) -> dict[str, torch.Tensor]:
    """Check ``targets[i]`` against its (C, H, W) image; a new dict with boxes (N, 4) clipped to the image."""
    height, width = img.shape[-2:]
    for key in ("boxes", "labels") + (("masks",) if need_masks else ()):
        if key not in tgt:
            raise ValueError(f"targets[{i}] has no {key!r} (keys: {sorted(tgt)})")
    boxes, labels = tgt["boxes"], tgt["labels"]
    if boxes.dim() != 2 or boxes.shape[-1] != 4 or not boxes.is_floating_point():
        raise ValueError(
            f"targets[{i}]['boxes'] must be a float (N, 4) tensor (x1, y1, x2, y2), got "
            f"{tuple(boxes.shape)} {boxes.dtype}"
        )
    if labels.shape != (boxes.shape[0],) or labels.dtype != torch.int64:
        raise ValueError(
            f"targets[{i}]['labels'] must be int64 of shape ({boxes.shape[0]},), got "
            f"{tuple(labels.shape)} {labels.dtype}"
        )
    if labels.numel() and (labels.min() < 1 or labels.max() >= num_classes):
        raise ValueError(
            f"targets[{i}]['labels'] must be in [1, {num_classes - 1}] (0 is the background), "
            f"got {labels.tolist()}"
        )
    bad = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
    if bad.any():
        j = int(bad.nonzero()[0])
        raise ValueError(
            f"targets[{i}]['boxes'][{j}] = {boxes[j].tolist()} has no area (need x2 > x1, y2 > y1)"
        )
    outside = (boxes[:, 2] <= 0) | (boxes[:, 3] <= 0) | (boxes[:, 0] >= width) | (boxes[:, 1] >= height)
    if outside.any():
        j = int(outside.nonzero()[0])
        raise ValueError(
            f"targets[{i}]['boxes'][{j}] = {boxes[j].tolist()} lies entirely outside its {height}×{width} image"
        )
    tgt = dict(tgt)
    tgt["boxes"] = torch.stack(
        [boxes[:, 0].clamp(0, width), boxes[:, 1].clamp(0, height), boxes[:, 2].clamp(0, width),
         boxes[:, 3].clamp(0, height)], dim=1,
    )  # fmt: skip
    if need_masks and tgt["masks"].shape != (boxes.shape[0], height, width):
        raise ValueError(
            f"targets[{i}]['masks'] must be ({boxes.shape[0]}, {height}, {width}) like its image, "
            f"got {tuple(tgt['masks'].shape)}"
        )
    return tgt


def _checked(cls: type[nn.Module], need_masks: bool) -> type[nn.Module]:
    """A subclass of a torchvision detector that runs :func:`check_detection_inputs` first."""

    def forward(self, images, targets=None):
        in_chans = self.backbone.body.in_chans
        targets = check_detection_inputs(
            images, targets, in_chans, self.num_classes, need_masks and self.training
        )
        return cls.forward(self, images, targets)

    return type(f"Agent{cls.__name__}", (cls,), {"forward": forward, "__doc__": cls.__doc__})


AgentMaskRCNN = _checked(MaskRCNN, need_masks=True)
AgentFasterRCNN = _checked(FasterRCNN, need_masks=False)
AgentRetinaNet = _checked(RetinaNet, need_masks=False)


def build_detector(
    kind: str,
    backbone: str = "agent_pvt_tiny_224",
    num_classes: int = 91,
    pretrained_backbone: str | None = None,
    *,
    agent_grids: Any = None,
    backbone_kwargs: dict[str, Any] | None = None,
    fpn_channels: int = 256,
    anchor_sizes: tuple[int, ...] | None = None,
    representation_size: int | None = None,
    mask_head_channels: int | None = None,
    **detector_kwargs: Any,
) -> nn.Module:
    """A torchvision detector with an FPN on an agent backbone.

    Args:
        kind: 'maskrcnn', 'fasterrcnn' or 'retinanet'.
        backbone: a hierarchical zoo model name, e.g. ``agent_pvt_tiny_224``.
        num_classes: classes including the background (torchvision convention).
        pretrained_backbone: optional classification checkpoint for the backbone (loaded unchanged).
        agent_grids: downstream agent grids (None, 'official' or per stage; see :class:`AgentBackbone`).
        backbone_kwargs: more :class:`AgentBackbone` / model arguments (``attn_type``, ``depths``,
            ``drop_path_rate``, ``out_norms`` ...).
        fpn_channels: FPN width.
        anchor_sizes: one base anchor size per pyramid level (5 levels), e.g. (16, 32, 64, 128, 256) for small
            images; default torchvision's (32 … 512).
        representation_size: width of the R-CNN box head's two FC layers (torchvision: 1024).
        mask_head_channels: width of the Mask R-CNN mask head's four convs and deconv (torchvision: 256).
        **detector_kwargs: go to the torchvision model (``min_size``, ``max_size``, ``box_score_thresh`` ...).

    Returns:
        an ``AgentMaskRCNN`` / ``AgentFasterRCNN`` / ``AgentRetinaNet`` (torchvision subclasses).
    """
    if kind not in DETECTOR_KINDS:
        raise ValueError(f"kind must be one of {DETECTOR_KINDS}, got {kind!r}")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2 (it counts the background), got {num_classes!r}")
    bkw = dict(backbone_kwargs or {})
    if kind == "retinanet":
        bkw.setdefault("out_indices", (1, 2, 3))
    body = AgentBackbone(backbone, pretrained=pretrained_backbone, agent_grids=agent_grids, **bkw)
    fpn = FPNBackbone(body, fpn_channels, extra="p6p7" if kind == "retinanet" else "pool")
    num_levels = len(body.out_indices) + (2 if kind == "retinanet" else 1)
    _set_anchor_generator(detector_kwargs, kind, num_levels, anchor_sizes)
    num_classes_arg = _set_heads(
        detector_kwargs, kind, num_classes, fpn_channels, representation_size, mask_head_channels
    )
    cls = {"maskrcnn": AgentMaskRCNN, "fasterrcnn": AgentFasterRCNN, "retinanet": AgentRetinaNet}[kind]
    model = cls(fpn, num_classes=num_classes_arg, **detector_kwargs)
    model.num_classes = num_classes
    return model


def _set_anchor_generator(
    detector_kwargs: dict[str, Any], kind: str, num_levels: int, anchor_sizes: tuple[int, ...] | None
) -> None:
    """Put an anchor generator for ``num_levels`` pyramid levels into ``detector_kwargs`` where torchvision's
    default does not fit (given sizes, fewer or more than 5 R-CNN levels, RetinaNet's 3 + 2 levels)."""
    ratios = ((0.5, 1.0, 2.0),) * num_levels
    if anchor_sizes is not None:
        if len(anchor_sizes) != num_levels:
            raise ValueError(
                f"anchor_sizes must give one size per pyramid level ({num_levels}), got {anchor_sizes!r}"
            )
        if kind == "retinanet":
            sizes = tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in anchor_sizes)
        else:
            sizes = tuple((s,) for s in anchor_sizes)
        key = "anchor_generator" if kind == "retinanet" else "rpn_anchor_generator"
        detector_kwargs[key] = AnchorGenerator(sizes, ratios)
    elif kind != "retinanet" and num_levels != 5:
        detector_kwargs.setdefault(
            "rpn_anchor_generator", AnchorGenerator(tuple((32 * 2**i,) for i in range(num_levels)), ratios)
        )
    if kind == "retinanet" and "anchor_generator" not in detector_kwargs:
        sizes = tuple((x, int(x * 2 ** (1 / 3)), int(x * 2 ** (2 / 3))) for x in (32, 64, 128, 256, 512))
        detector_kwargs["anchor_generator"] = AnchorGenerator(sizes[:num_levels], ratios)


def _set_heads(
    detector_kwargs: dict[str, Any],
    kind: str,
    num_classes: int,
    fpn_channels: int,
    representation_size: int | None,
    mask_head_channels: int | None,
) -> int | None:
    """Put narrower R-CNN box / mask heads into ``detector_kwargs`` when asked for; returns the ``num_classes``
    for the torchvision class (None once a predictor is given: torchvision refuses both)."""
    num_classes_arg: int | None = num_classes
    if kind != "retinanet" and representation_size is not None:
        from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

        detector_kwargs["box_head"] = TwoMLPHead(fpn_channels * 7 * 7, representation_size)
        detector_kwargs["box_predictor"] = FastRCNNPredictor(representation_size, num_classes)
        num_classes_arg = None
    if kind == "maskrcnn" and (num_classes_arg is None or mask_head_channels is not None):
        from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

        width = mask_head_channels or 256
        detector_kwargs.setdefault("mask_head", MaskRCNNHeads(fpn_channels, (width,) * 4, 1))
        detector_kwargs.setdefault("mask_predictor", MaskRCNNPredictor(width, width, num_classes))
        num_classes_arg = None
    return num_classes_arg
