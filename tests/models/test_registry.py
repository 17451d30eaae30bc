"""timm-style registry tests: every registered agent model, on small inputs."""

from __future__ import annotations

import os
import pickle

import pytest
import timm
import torch

import agentattn  # noqa: F401  (registers the models)
from tests.conftest import assert_close_rel

NAMES = sorted(timm.list_models("agent_*"))
SMALL = 64  # input side for the tests: every family runs at any resolution


@pytest.mark.parametrize("name", NAMES)
def test_forward_backward_features(name):
    model = timm.create_model(name, pretrained=False, img_size=SMALL, num_classes=7)
    x = torch.randn(2, 3, SMALL, SMALL)
    out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"
    assert model.get_classifier().out_features == 7
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    assert model.pretrained_cfg["license"] and model.pretrained_cfg["origin_url"].startswith(
        "https://github.com/LeapLabTHU"
    )

    features = timm.create_model(name, pretrained=False, img_size=SMALL, features_only=True)
    maps = features(x)
    assert len(maps) == len(features.feature_info.channels())
    for fmap, channels, reduction in zip(
        maps, features.feature_info.channels(), features.feature_info.reduction(), strict=True
    ):
        assert fmap.shape[:2] == (2, channels)
        assert fmap.shape[-1] == -(-SMALL // reduction), (fmap.shape, reduction)


REDUCED = {
    "agent_deit_tiny_patch16_224": dict(depth=2),
    "agent_pvt_tiny_224": dict(depths=(1, 1, 1, 1)),
    "agent_swin_tiny_224": dict(depths=(1, 1, 1, 1)),
    "agent_cswin_tiny_224": dict(depth=(1, 1, 1, 1)),
}


@pytest.mark.parametrize("name", sorted(REDUCED))
def test_compile_matches_eager(name):
    torch._dynamo.reset()
    model = timm.create_model(name, pretrained=False, img_size=SMALL, **REDUCED[name]).eval()
    x = torch.randn(2, 3, SMALL, SMALL)
    compiled = torch.compile(model)
    with torch.no_grad():
        assert_close_rel(compiled(x), model(x), 1e-4, "logits")


class _WritesAFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_create_model_never_runs_pickled_code(tmp_path):
    marker = tmp_path / "pwned"
    source = timm.create_model("agent_deit_tiny_patch16_224", img_size=SMALL, depth=1)
    path = tmp_path / "evil.pth"
    torch.save(
        {"model": source.state_dict(), "config": _WritesAFile(marker)},
        path,
        pickle_protocol=pickle.DEFAULT_PROTOCOL,
    )
    with pytest.raises(ValueError, match="system"):
        timm.create_model(
            "agent_deit_tiny_patch16_224",
            pretrained=True,
            img_size=SMALL,
            depth=1,
            pretrained_cfg_overlay=dict(file=str(path)),
        )
    assert not marker.exists()
