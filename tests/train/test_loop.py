"""The loop learns, writes its metrics and checkpoint, and ``agentattn eval`` reads that checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from agentattn.cli import eval as eval_cli
from agentattn.io import atomic_torch_save
from agentattn.train import TrainConfig, load_training_checkpoint, train

from . import TINY_KWARGS, TINY_MODEL, needs_fashion_mnist

pytestmark = needs_fashion_mnist


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    config = TrainConfig(
        model=TINY_MODEL,
        model_kwargs=dict(TINY_KWARGS, drop_path_rate=0.0),
        output=str(out),
        epochs=1,
        batch_size=32,
        lr=3e-3,
        min_lr=3e-3,  # a flat lr: the test is about the loss going down, not the schedule
        label_smoothing=0.0,
        ema_decay=0.9,
        train_subset=1280,
        eval_subset=300,
        seed=0,
        threads=2,
        progress=False,
    )
    return train(config), out


def test_loss_decreases(tiny_run):
    _, out = tiny_run
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if r["kind"] == "step"]
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.3, f"loss went from {first:.3f} to {last:.3f}"
    epochs = [r for r in lines if r["kind"] == "epoch"]
    assert len(epochs) == 1 and epochs[0]["eval_top1"] > 30.0  # 10 classes: chance is 10%
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"epoch", "train_loss", "eval_top1", "eval_top5", "ema_top1", "img_per_s"} <= set(header)


def test_checkpoint_contents(tiny_run):
    result, out = tiny_run
    ckpt = load_training_checkpoint(out / "last.pth")  # the safe loader: plain containers and tensors only
    assert ckpt["model_name"] == TINY_MODEL and ckpt["epoch"] == 1 and ckpt["step_in_epoch"] == 0
    assert {"model", "optimizer", "scheduler", "state_dict_ema", "rng", "metrics_bytes"} <= set(ckpt)
    state = result.model.state_dict()
    assert all((ckpt["model"][k] == v).all() for k, v in state.items())
    assert not list(out.glob(".*tmp*"))


def test_eval_on_saved_checkpoint(tiny_run, capsys, tmp_path):
    _, out = tiny_run
    epoch = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    args = ["--checkpoint", str(out / "last.pth"), "--subset", "300", "--json", str(tmp_path / "r.json")]
    assert eval_cli.main(args) == 0
    text = capsys.readouterr().out
    assert "top-1" in text and "top-5" in text and "img/s" in text and "Ankle boot" in text
    result = json.loads((tmp_path / "r.json").read_text())
    # The same 300 test images (same seed) as the run's end-of-epoch evaluation.
    assert result["images"] == 300 and result["top1"] == pytest.approx(epoch["eval_top1"])
    assert sum(map(sum, result["confusion"])) == 300
    assert eval_cli.main([*args, "--ema"]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["top1"] == pytest.approx(epoch["ema_top1"])


def test_atomic_save_keeps_the_old_file_when_a_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    atomic_torch_save({"format": "old", "w": torch.ones(3)}, path)

    def crash(obj, f):  # a partial write, then the process "dies"
        f.write(b"PK\x03\x04partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"format": "new"}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["format"] == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]  # no temp file left behind
