"""``--data imagefolder:PATH`` on a few generated PNGs: train one epoch, then evaluate the checkpoint."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from agentattn.cli import eval as eval_cli
from agentattn.cli import train as train_cli
from agentattn.train.data import build_data

from . import TINY_CLI


def _make_folder(root, per_class: int = 8) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, colour in enumerate(((200, 30, 30), (30, 30, 200), (30, 200, 30))):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = np.clip(rng.normal(colour, 40, size=(40, 48, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


def test_imagefolder_train_and_eval(tmp_path, capsys):
    _make_folder(tmp_path / "images")
    data = build_data(f"imagefolder:{tmp_path / 'images'}", img_size=32)
    assert data.num_classes == 3 and data.in_chans == 3 and data.class_names == ["class0", "class1", "class2"]
    x, y = data.train[0]
    assert x.shape == (3, 32, 32) and y == 0

    out = tmp_path / "run"
    code = train_cli.main(
        [
            *TINY_CLI,
            "--data",
            f"imagefolder:{tmp_path / 'images'}",
            "--img-size",
            "32",
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--output",
            str(out),
            "--threads",
            "2",
            "--no-progress",
        ]
    )
    assert code == 0, capsys.readouterr().err
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs[-1]["kind"] == "epoch" and epochs[-1]["global_step"] == 3
    capsys.readouterr()
    # The checkpoint records the folder, but a path read from a file is never opened: eval asks for it.
    assert eval_cli.main(["--checkpoint", str(out / "last.pth"), "--split", "val"]) == 1
    assert "pass it with --data" in capsys.readouterr().err
    folder = f"imagefolder:{tmp_path / 'images'}"
    assert eval_cli.main(["--checkpoint", str(out / "last.pth"), "--split", "val", "--data", folder]) == 0
    text = capsys.readouterr().out
    assert "split val, 24 images" in text and "class2" in text
