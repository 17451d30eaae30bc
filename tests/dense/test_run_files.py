"""``agentattn dense train`` and ``dense eval`` trust no file: an earlier run's results are only replaced with
``--overwrite``, the log never follows a symlink, and every field of a ``model.pth`` is checked before use."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from agentattn.cli.main import main
from agentattn.dense.engine import load_dense_checkpoint

from .test_cli import TINY_ARGS


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dense") / "run"
    assert main(["dense", "train", *TINY_ARGS, "--output", str(out)]) == 0
    return out


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("agentattn dense: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_earlier_results_are_refused_and_overwrite_replaces_them(dense_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(dense_run, out)
    (out / "notes.txt").write_text("mine")
    before = (out / "metrics.jsonl").read_bytes()
    assert main(["dense", "train", *TINY_ARGS, "--output", str(out)]) == 1
    err = _one_line(capsys)
    assert (
        f"{out} already holds results of an earlier run" in err
        and "another output directory" in err
        and "set overwrite" in err
    )
    assert (out / "metrics.jsonl").read_bytes() == before
    assert main(["dense", "train", *TINY_ARGS, "--max-steps", "1", "--output", str(out), "--overwrite"]) == 0
    assert json.loads((out / "final.json").read_text())["metrics"]["steps"] == 1
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "step"] == [1]
    assert (out / "notes.txt").read_text() == "mine"


def test_a_symlinked_log_is_refused_and_its_target_untouched(tmp_path, capsys):
    target = tmp_path / "precious.txt"
    target.write_text("precious\n")
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").symlink_to(target)
    assert main(["dense", "train", *TINY_ARGS, "--output", str(out)]) == 1
    assert f"{out / 'metrics.jsonl'} is a symlink" in _one_line(capsys)
    assert target.read_text() == "precious\n"


def _first_weight(ckpt: dict) -> str:
    return next(iter(ckpt["model"]))


BAD_FIELDS = [
    ("config a list", lambda c: c.update(config=[1]), r"field config must be a dict with string keys, got \[1\]"),
    ("config missing", lambda c: c.pop("config"), r"field config is missing"),
    ("img_size a string", lambda c: c["config"].update(img_size="big"), r"field config\.img_size must be an int"),
    ("lr a string", lambda c: c["config"].update(lr="fast"), r"field config\.lr must be a finite number"),
    ("progress a number", lambda c: c["config"].update(progress=3), r"field config\.progress must be true or false"),
    ("time limit a list", lambda c: c["config"].update(time_limit_min=[1]),
     r"field config\.time_limit_min must be of type float or None"),
    ("backbone_kwargs a string", lambda c: c["config"].update(backbone_kwargs="x"),
     r"field config\.backbone_kwargs must be a dict"),
    ("backbone_kwargs holding a tensor", lambda c: c["config"].update(backbone_kwargs={"depths": torch.ones(2)}),
     r"field config\.backbone_kwargs must be plain values"),
    ("backbone_kwargs no model takes", lambda c: c["config"].update(backbone_kwargs={"depths": "abc"}),
     r"its model fields do not build a model"),
    ("backbone_kwargs naming a checkpoint", lambda c: c["config"].update(backbone_kwargs={"checkpoint_path": "/x"}),
     r"field config\.backbone_kwargs\.checkpoint_path is not an architecture argument"),
    ("detector_kwargs naming a URL", lambda c: c["config"].update(detector_kwargs={"weights_url": "http://x"}),
     r"field config\.detector_kwargs\.weights_url is not an architecture argument"),
    ("task unknown", lambda c: c["config"].update(task="cls"), r"field config: task must be 'det' or 'seg'"),
    ("num_classes missing", lambda c: c.pop("num_classes"), r"field num_classes is missing"),
    ("num_classes a string", lambda c: c.update(num_classes="5"), r"field num_classes must be an int in \[1, "),
    ("num_classes huge", lambda c: c.update(num_classes=10**12), r"field num_classes must be an int in \[1, "),
    ("synthetic a string", lambda c: c.update(synthetic="yes"), r"field synthetic must be true or false"),
    ("model a list", lambda c: c.update(model=[1]), r"field model must be a state dict"),
    ("model tensor of the wrong shape", lambda c: c["model"].update({_first_weight(c): torch.zeros(1)}),
     r"field model does not fit this model \(.*size mismatch"),
]  # fmt: skip


@pytest.mark.parametrize("name, mutate, match", BAD_FIELDS, ids=[b[0] for b in BAD_FIELDS])
def test_load_dense_checkpoint_checks_every_field(name, mutate, match, dense_run, tmp_path):
    ckpt = torch.load(dense_run / "model.pth", weights_only=True)
    mutate(ckpt)
    path = tmp_path / "model.pth"
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=match) as info:
        load_dense_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"{path}") and "\n" not in message and len(message) < 500


def test_dense_eval_of_a_malformed_checkpoint_is_one_line(dense_run, tmp_path, capsys):
    ckpt = torch.load(dense_run / "model.pth", weights_only=True)
    ckpt["config"]["img_size"] = "x" * 10**6
    path = tmp_path / "model.pth"
    torch.save(ckpt, path)
    assert main(["dense", "eval", "--checkpoint", str(path)]) == 1
    err = _one_line(capsys)
    assert f"{path}: field config.img_size must be an int" in err and len(err) < 500


def test_a_path_the_checkpoint_names_is_never_opened(dense_run, tmp_path, capsys):
    ckpt = torch.load(dense_run / "model.pth", weights_only=True)
    ckpt["config"]["pretrained_backbone"] = str(tmp_path / "not-there.pth")  # would fail if it were opened
    ckpt["config"]["data"] = f"coco:{tmp_path / 'coco'}"
    path = tmp_path / "model.pth"
    torch.save(ckpt, path)
    config, _, _ = load_dense_checkpoint(path)
    assert config.pretrained_backbone == str(tmp_path / "not-there.pth")  # recorded, not opened
    assert main(["dense", "eval", "--checkpoint", str(path)]) == 1
    assert f"{path} was trained on 'coco:{tmp_path / 'coco'}': pass that data with --data" in _one_line(
        capsys
    )


def test_dense_checkpoint_sizes_and_model_are_bounded(tmp_path):
    """A dense checkpoint cannot ask for a huge synthetic set or a model larger than its weights."""
    from agentattn.dense.engine import CHECKPOINT_FORMAT, DenseConfig, build_dense_model

    config = DenseConfig(img_size=64)
    model = build_dense_model(config, 3, True)
    base = {"format": CHECKPOINT_FORMAT, "config": dataclasses.asdict(config), "num_classes": 3,
            "synthetic": True, "model": model.state_dict()}  # fmt: skip
    torch.save(base, tmp_path / "ok.pth")
    load_dense_checkpoint(tmp_path / "ok.pth")
    for field, value, match in [("num_val", 10**9, "num_val"), ("img_size", 10**6, "img_size")]:
        torch.save({**base, "config": {**base["config"], field: value}}, tmp_path / "bad.pth")
        with pytest.raises(ValueError, match=match):
            load_dense_checkpoint(tmp_path / "bad.pth")
    bigger = {**base["config"], "backbone": "agent_pvt_medium_224"}
    torch.save({**base, "config": bigger}, tmp_path / "big.pth")
    with pytest.raises(ValueError, match="bytes of weights"):
        load_dense_checkpoint(tmp_path / "big.pth")
