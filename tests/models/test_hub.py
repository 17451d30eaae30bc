"""Hub directories in timm's format: save_for_hub, `agentattn convert --hub`, and the pretrained=True message."""

from __future__ import annotations

import json

import pytest
import timm
import torch

from agentattn.cli.main import main as cli_main
from agentattn.models.hub import save_for_hub

REDUCED = dict(depth=2, embed_dim=64, num_heads=2, agent_num=16)


def test_save_for_hub_round_trips_through_timm_local_dir(tmp_path):
    model = timm.create_model("agent_deit_tiny_patch16_224", num_classes=10, **REDUCED).eval()
    save_for_hub(model, tmp_path / "hub", model_args=REDUCED)

    assert sorted(p.name for p in (tmp_path / "hub").iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert config["architecture"] == "agent_deit_tiny_patch16_224"
    assert REDUCED.items() <= config["model_args"].items()
    card = (tmp_path / "hub" / "README.md").read_text()
    for field in (
        "library_name: timm",
        "license: apache-2.0",
        "# Model card for agent_deit_tiny_patch16_224",
        "Params (M): 0.2",
        "arxiv.org/abs/2312.08874",
        "imagenet-1k",
        "@inproceedings{han2024agent",
    ):
        assert field in card, field

    loaded = timm.create_model(f"local-dir:{tmp_path / 'hub'}", pretrained=True).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_convert_hub_from_an_official_style_checkpoint(tmp_path, capsys):
    model = timm.create_model("agent_deit_tiny_patch16_224").eval()
    checkpoint = tmp_path / "agent_deit_t.pth"
    torch.save({"model": model.state_dict(), "epoch": 299}, checkpoint)  # the official training-dict layout

    assert (
        cli_main(["convert", str(checkpoint), str(tmp_path / "out"), "--hub", "agent_deit_tiny_patch16_224"])
        == 0
    )
    assert "local-dir:" in capsys.readouterr().out
    loaded = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_convert_hub_refuses_unknown_models_and_missing_files(tmp_path, capsys):
    assert (
        cli_main(["convert", str(tmp_path / "none.pth"), str(tmp_path / "o"), "--hub", "no_such_model"]) == 1
    )
    assert "not a registered timm model" in capsys.readouterr().err
    assert (
        cli_main(["convert", str(tmp_path / "none.pth"), str(tmp_path / "o"), "--hub", "agent_pvt_tiny_224"])
        == 1
    )
    assert "no such checkpoint file" in capsys.readouterr().err


def test_pretrained_without_a_file_says_how_to_load_official_weights():
    with pytest.raises(RuntimeError, match=r"pretrained_cfg_overlay=dict\(file=PATH\).*local-dir") as info:
        timm.create_model("agent_swin_tiny_224", pretrained=True)
    assert "\n" not in str(info.value)
