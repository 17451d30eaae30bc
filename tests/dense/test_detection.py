"""Detectors on agent backbones: forward + backward of each kind, odd sizes, empty targets, bad input."""

from __future__ import annotations

import pytest
import torch

from agentattn.dense import build_detector
from tests.dense._tiny import TINY

SMALL_HEADS = dict(fpn_channels=32, representation_size=32, rpn_pre_nms_top_n_train=50, rpn_post_nms_top_n_train=20,
                   rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20, box_batch_size_per_image=16,
                   box_detections_per_img=5)  # fmt: skip


def _detector(kind: str, name: str = "agent_pvt_tiny_224", **kw):
    heads = dict(SMALL_HEADS)
    if kind == "maskrcnn":
        heads["mask_head_channels"] = 8
    if kind == "retinanet":
        heads = {"fpn_channels": 32, "detections_per_img": 5, "topk_candidates": 20}
    return build_detector(kind, name, num_classes=4, backbone_kwargs=TINY[name], min_size=64, max_size=96,
                          anchor_sizes=(8, 16, 32, 64, 128), **heads, **kw)  # fmt: skip


def _targets(h: int, w: int, with_masks: bool = True) -> list[dict[str, torch.Tensor]]:
    masks = torch.zeros(2, h, w, dtype=torch.uint8)
    masks[0, 5:30, 4:40] = 1
    masks[1, 20:50, 30:60] = 1
    full = {
        "boxes": torch.tensor([[4.0, 5, 40, 30], [30, 20, 60, 50]]),
        "labels": torch.tensor([1, 3]),
        "masks": masks,
    }
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
             "masks": torch.zeros(0, h, w, dtype=torch.uint8)}  # fmt: skip
    return [full, empty]  # the second image has no objects: must train without error


@pytest.mark.parametrize("kind", ["maskrcnn", "fasterrcnn", "retinanet"])
def test_forward_backward_each_kind_with_an_empty_image(kind):
    torch.manual_seed(0)
    model = _detector(kind)
    model.train()
    images = [torch.rand(3, 64, 80), torch.rand(3, 64, 80)]
    losses = model(images, _targets(64, 80))
    expected = {"maskrcnn": "loss_mask", "fasterrcnn": "loss_box_reg", "retinanet": "bbox_regression"}[kind]
    assert expected in losses
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    body = model.backbone.body.body
    assert (
        body.patch_embed1.proj.weight.grad is not None
        and torch.isfinite(body.patch_embed1.proj.weight.grad).all()
    )
    assert body.block1[0].attn.an_bias.grad is not None
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 64, 80)])
    assert set(out[0]) >= {"boxes", "scores", "labels"}


@pytest.mark.parametrize("name", ["agent_swin_tiny_224", "agent_cswin_tiny_224"])
def test_other_backbones_odd_size(name):
    model = _detector("maskrcnn", name, agent_grids="official")
    model.train()
    images = [torch.rand(3, 67, 93)]
    loss = sum(model(images, _targets(67, 93)[:1]).values())
    loss.backward()
    assert torch.isfinite(loss)


def test_odd_size_333x517_inference():
    model = _detector("maskrcnn").eval()
    model.transform.min_size, model.transform.max_size = (333,), 517
    with torch.no_grad():
        out = model([torch.rand(3, 333, 517)])
    assert out[0]["masks"].shape[-2:] == (333, 517)


def test_bad_detection_input():
    model = _detector("maskrcnn")
    model.train()
    img = [torch.rand(3, 64, 80)]
    with pytest.raises(ValueError, match=r"images\[0\] must be \(3, H, W\)"):
        model([torch.rand(1, 64, 80)], _targets(64, 80)[:1])
    t = _targets(64, 80)[:1]
    t[0]["boxes"] = torch.tensor([[100.0, 5, 140, 30], [30, 20, 60, 50]])
    with pytest.raises(ValueError, match="entirely outside"):
        model(img, t)
    t[0]["boxes"] = torch.tensor([[10.0, 5, 10, 30], [30, 20, 60, 50]])
    with pytest.raises(ValueError, match="has no area"):
        model(img, t)
    t = _targets(64, 80)[:1]
    t[0]["labels"] = torch.tensor([0, 4])
    with pytest.raises(ValueError, match=r"labels'\] must be in \[1, 3\]"):
        model(img, t)
    t = _targets(64, 80)[:1]
    t[0]["masks"] = t[0]["masks"][:, :10]
    with pytest.raises(ValueError, match="masks"):
        model(img, t)
    with pytest.raises(ValueError, match="kind must be one of"):
        build_detector("yolo", "agent_pvt_tiny_224", num_classes=3)


def test_boxes_partly_outside_are_clipped():
    from agentattn.dense.detection import check_detection_inputs

    t = _targets(64, 80)[:1]
    t[0]["boxes"] = torch.tensor([[-5.0, 5, 40, 30], [30, 20, 95, 70]])
    out = check_detection_inputs([torch.rand(3, 64, 80)], t, 3, 4, need_masks=True)
    assert out[0]["boxes"].tolist() == [[0.0, 5, 40, 30], [30, 20, 80, 64]]
    assert t[0]["boxes"][0, 0] == -5  # the caller's targets are not modified
