"""Synthetic shapes, COCO export (read back by pycocotools and our reader), ADE20K reader, metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agentattn.dense.data import (
    ADE20KSegmentation,
    CocoDetection,
    SyntheticShapes,
    build_dense_data,
    export_coco,
)
from agentattn.dense.engine import evaluate_segmentation
from agentattn.dense.evaluation import _coco_eval


def test_synthetic_is_deterministic_with_a_fixed_val_split():
    a, b = SyntheticShapes("val", 64, 6, max_obj=30), SyntheticShapes("val", 64, 6, max_obj=30)
    train = SyntheticShapes("train", 64, 6, max_obj=30)
    for i in range(6):
        np.testing.assert_array_equal(a.generate(i)[0], b.generate(i)[0])
    assert any((a.generate(i)[0] != train.generate(i)[0]).any() for i in range(6))
    image, target = a[0]
    assert (
        image.shape == (3, 64, 64) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    )
    n = len(target["labels"])
    assert target["boxes"].shape == (n, 4) and target["masks"].shape == (n, 64, 64)
    for box, mask in zip(target["boxes"], target["masks"], strict=True):
        ys, xs = mask.nonzero(as_tuple=True)
        assert box.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
    seg = SyntheticShapes("val", 64, 6, max_obj=30, task="seg")
    img2, sem = seg[0]
    assert torch.equal(img2, image) and sem.shape == (64, 64) and set(sem.unique().tolist()) <= {0, 1, 2, 3}


def test_coco_export_reads_back(tmp_path):
    from pycocotools.coco import COCO

    ds = SyntheticShapes("val", 64, 5, max_obj=30)
    path = export_coco(ds, tmp_path)
    coco = COCO(str(path))
    assert len(coco.imgs) == 5 and len(coco.cats) == 3
    ann = coco.anns[1]
    img_id = ann["image_id"]
    np.testing.assert_array_equal(coco.annToMask(ann), ds.target(img_id)["masks"][0].numpy())
    # our reader and the evaluation: ground truth scored against itself is AP 1
    reader = CocoDetection(tmp_path, "val")
    assert len(reader) == 5 and reader.num_classes == 4
    image, target = reader[img_id]
    assert torch.allclose(image, ds[img_id][0], atol=1 / 255)
    assert torch.equal(target["boxes"], ds.target(img_id)["boxes"])
    gt = reader.coco.dataset
    # COCO files carry "info"; pycocotools 2.0.10's loadRes copies it and fails without it (seen on a GPU machine).
    assert "info" in gt and "licenses" in gt
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in gt["annotations"]]  # fmt: skip
    assert _coco_eval(gt, results, "bbox")["bbox_mAP_50"] == pytest.approx(1.0)


def test_ade20k_reader(tmp_path):
    from PIL import Image

    root = tmp_path / "ADEChallengeData2016"
    for sub in ("training", "validation"):
        (root / "images" / sub).mkdir(parents=True)
        (root / "annotations" / sub).mkdir(parents=True)
        Image.fromarray(np.full((40, 60, 3), 100, np.uint8)).save(root / "images" / sub / "a.jpg")
        label = np.zeros((40, 60), np.uint8)
        label[10:20] = 7
        Image.fromarray(label).save(root / "annotations" / sub / "a.png")
    train = ADE20KSegmentation(tmp_path, "train", crop=32)
    image, lab = train[0]
    assert image.shape == (3, 32, 32) and lab.shape == (32, 32)
    assert set(lab.unique().tolist()) <= {6, 255}
    val = ADE20KSegmentation(tmp_path, "val", crop=32)
    image, lab = val[0]
    assert image.shape[-2:] == (32, 48) and lab.shape == (40, 60)
    assert set(lab.unique().tolist()) == {6, 255}


def test_miou_macc_definitions():
    class Oracle(torch.nn.Module):  # predicts the labels of a fixed dataset, with class 2 wrong
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x):
            pred = torch.zeros(x.shape[0], 3, *x.shape[-2:])
            pred[:, 0, :, :8] = 1
            pred[:, 1, :, 8:] = 1
            return pred

    labels = torch.zeros(2, 16, 16, dtype=torch.long)
    labels[:, :, 8:12] = 1
    labels[:, :, 12:] = 2
    ds = torch.utils.data.TensorDataset(torch.zeros(2, 3, 16, 16), labels)
    m = evaluate_segmentation(Oracle(), ds, num_classes=3)
    # class 0: IoU 1, acc 1; class 1: IoU 0.5, acc 1; class 2: IoU 0, acc 0
    assert m["mIoU"] == pytest.approx(0.5) and m["mAcc"] == pytest.approx(2 / 3)


def test_bad_data_specs(tmp_path):
    with pytest.raises(
        ValueError, match="data must be 'synthetic', 'coco:PATH' or 'ade20k:PATH', got 'voc:/x'"
    ):
        build_dense_data("voc:/x")
    with pytest.raises(ValueError, match="not a directory"):
        build_dense_data(f"coco:{tmp_path / 'nope'}")
    with pytest.raises(ValueError, match="COCO annotations"):
        build_dense_data(f"coco:{tmp_path}")
    with pytest.raises(ValueError, match="size must be in"):
        SyntheticShapes("train", 512)


def test_lr_schedule_follows_steps_or_the_time_limit():
    """timm's MultiStepLRScheduler in mmdet's 1x shape, moved on by the time limit when that is further."""
    from agentattn.dense.engine import _schedule_position, mmdet_1x_scheduler

    def lr_at(step: int, progress: float | None = None) -> float:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = mmdet_1x_scheduler(optimizer, total=120, warmup=10)
        scheduler.step_update(_schedule_position(step, 120, 10, progress))
        return optimizer.param_groups[0]["lr"]

    assert lr_at(0) == pytest.approx(0.001)
    assert lr_at(10) == 1.0
    assert lr_at(80) == pytest.approx(0.1)
    assert lr_at(110) == pytest.approx(0.01)
    assert lr_at(20, progress=0.7) == pytest.approx(0.1)  # time limit 70 % spent
    assert lr_at(5, progress=0.7) == pytest.approx(0.001 + 0.999 * 5 / 10)  # warm-up follows the steps
