"""``agentattn explain``: figures from a saved run, for image files and dataset entries; clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from agentattn.cli import explain as explain_cli
from agentattn.train import TrainConfig, train

from ..train import TINY_KWARGS, TINY_MODEL, needs_fashion_mnist

pytestmark = needs_fashion_mnist


def _run(tmp_path_factory, attn_type: str):
    out = tmp_path_factory.mktemp(f"run{attn_type}")
    config = TrainConfig(
        model=TINY_MODEL, model_kwargs=dict(TINY_KWARGS, attn_type=attn_type), output=str(out), batch_size=32,
        train_subset=64, eval_subset=32, threads=2, progress=False,
    )  # fmt: skip
    train(config)
    return out / "last.pth"


@pytest.fixture(scope="module")
def agent_checkpoint(tmp_path_factory):
    return _run(tmp_path_factory, "AAAA")


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("agentattn explain: error: "), err
    return err


def test_explain_a_png_and_a_dataset_image(agent_checkpoint, tmp_path, capsys):
    picture = tmp_path / "shirt.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 32, 3), dtype=np.uint8)).save(picture)  # RGB, not 28×28
    out = tmp_path / "figs"
    code = explain_cli.main(
        [str(agent_checkpoint), str(picture), "fashion-mnist:test:5", "--output", str(out)]
    )
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{picture}: predicted ")
    for name in ("agents_shirt.png", "agents_fashion-mnist_test_5.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG")


def test_explain_a_deeper_layer(agent_checkpoint, tmp_path, capsys):
    code = explain_cli.main(
        [str(agent_checkpoint), "fashion-mnist:test:0", "--output", str(tmp_path), "--layer", "block2.0.attn"]
    )
    assert code == 0 and (tmp_path / "agents_fashion-mnist_test_0.png").is_file()
    assert explain_cli.main([str(agent_checkpoint), "fashion-mnist:test:0", "--layer", "block9.attn"]) == 1
    err = _error(capsys)
    assert "'block9.attn'" in err and "block1.0.attn" in err


def test_explain_bad_input(agent_checkpoint, tmp_path, capsys):
    assert explain_cli.main([str(tmp_path / "none.pth"), "fashion-mnist:test:0"]) == 1
    assert "none.pth: no such checkpoint file" in _error(capsys)
    assert explain_cli.main([str(agent_checkpoint), str(tmp_path / "missing.png")]) == 1
    assert "missing.png: no such file" in _error(capsys)
    (tmp_path / "junk.png").write_bytes(b"not an image")
    assert explain_cli.main([str(agent_checkpoint), str(tmp_path / "junk.png")]) == 1
    assert "junk.png: not a readable image" in _error(capsys)
    assert explain_cli.main([str(agent_checkpoint), "fashion-mnist:test:99999"]) == 1
    assert "the test split has 10000 images" in _error(capsys)
    assert explain_cli.main([str(agent_checkpoint), "fashion-mnist:val:1"]) == 1
    assert "fashion-mnist:train|test:INDEX" in _error(capsys)


def test_explain_a_model_without_agents(tmp_path_factory, capsys):
    checkpoint = _run(tmp_path_factory, "BBBB")
    assert explain_cli.main([str(checkpoint), "fashion-mnist:test:0"]) == 1
    assert "has no agent-attention layer" in _error(capsys)
