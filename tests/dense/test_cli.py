"""``agentattn dense train|eval``: a tiny end-to-end run, and one-line errors."""

from __future__ import annotations

import json

from agentattn.cli.main import main

TINY_ARGS = ["--backbone-kwargs", "depths=(1,1,1,1)", "embed_dims=(16,32,48,64)", "num_heads=(1,1,2,2)",
             "--img-size", "64", "--num-train", "8", "--num-val", "4", "--batch-size", "4", "--max-steps", "2",
             "--no-progress", "--detector-kwargs", "box_detections_per_img=5", "rpn_post_nms_top_n_test=20"]  # fmt: skip


def test_train_then_eval(tmp_path, capsys):
    assert main(["dense", "train", *TINY_ARGS, "--output", str(tmp_path)]) == 0
    final = json.loads((tmp_path / "final.json").read_text())
    assert final["metrics"]["steps"] == 2 and 0 <= final["metrics"]["bbox_mAP_50"] <= 1
    assert "segm_mAP" in final["metrics"]
    capsys.readouterr()
    assert (
        main(
            ["dense", "eval", "--checkpoint", str(tmp_path / "model.pth"), "--json", str(tmp_path / "e.json")]
        )
        == 0
    )
    again = json.loads((tmp_path / "e.json").read_text())
    assert again["bbox_mAP"] == final["metrics"]["bbox_mAP"]


def test_errors_are_one_line(tmp_path, capsys):
    assert main(["dense", "train", "--data", f"coco:{tmp_path}/none", "--output", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("agentattn dense: error:") and err.count("\n") == 1 and "not a directory" in err
    assert main(["dense", "train", "--backbone", "resnet50", "--output", str(tmp_path)]) == 1
    assert "hierarchical zoo model" in capsys.readouterr().err
    assert main(["dense", "eval", "--checkpoint", str(tmp_path / "missing.pth")]) == 1
    assert "no such checkpoint" in capsys.readouterr().err
