"""Comparison of a detector with the agent backbone and with its softmax twin: params, FLOPs (one multiply-add =
one FLOP) and CPU/GPU latency. :mod:`agentattn.dense.engine` re-exports :func:`compare_detectors` and
:func:`backbone_flops`."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..device import resolve_device
from .detection import build_detector

__all__ = ["backbone_flops", "compare_detectors"]


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
