"""Segmenters: Semantic FPN and UperNet forward + backward at odd sizes, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from agentattn.dense import build_segmenter
from tests.dense._tiny import TINY


@pytest.mark.parametrize("kind,name", [("fpn", "agent_pvt_tiny_224"), ("upernet", "agent_swin_tiny_224")])
def test_forward_backward_odd_size(kind, name):
    model = build_segmenter(kind, name, num_classes=5, backbone_kwargs=TINY[name], channels=32)
    x = torch.rand(2, 3, 67, 45)
    logits = model(x)
    assert logits.shape == (2, 5, 67, 45)
    labels = torch.randint(0, 5, (2, 67, 45))
    labels[:, :3] = 255
    loss = F.cross_entropy(logits, labels, ignore_index=255)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.head.parameters())


def test_bad_segmentation_input():
    model = build_segmenter(
        "fpn", "agent_pvt_tiny_224", num_classes=3, backbone_kwargs=TINY["agent_pvt_tiny_224"]
    )
    with pytest.raises(ValueError, match=r"images must be \(B, 3, H, W\)"):
        model(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match="kind must be one of"):
        build_segmenter("deeplab", "agent_pvt_tiny_224", num_classes=3)
