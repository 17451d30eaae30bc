"""Dense backbones: equivalence with the classifier at 224, spec §2.5 bias resampling, any size, bad input."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn.functional as F

import agentattn.models  # noqa: F401  (registers the zoo)
from agentattn.dense import AgentBackbone
from agentattn.dense.backbones import OFFICIAL_AGENT_GRIDS, backbone_family
from tests.conftest import DATA_DIR, assert_close_rel
from tests.dense._tiny import TINY

NAMES = sorted(TINY)


def _classifier(name: str, **kw) -> torch.nn.Module:
    return timm.create_model(name, num_classes=5, **TINY[name], **kw).eval()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("fmt", ["bare", "official"])
def test_backbone_at_224_gives_the_classifier_stage_features(name, fmt, tmp_path):
    clf = _classifier(name)
    state = clf.state_dict()
    path = tmp_path / "ckpt.pth"
    torch.save(state if fmt == "bare" else {"model": state, "epoch": 3}, path)
    bb = AgentBackbone(name, pretrained=str(path), out_norms=False, **TINY[name]).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = clf.forward_intermediates(x, intermediates_only=True)
        got = list(bb(x).values())
    assert len(got) == 4
    for k, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert_close_rel(g, e, 1e-5, f"{name} stage {k}")


def test_official_checkpoint_loads_unchanged_and_output_norms_apply():
    vec = DATA_DIR / "vectors" / "models" / "agent_swin_reduced_a"
    kwargs = json.loads((vec / "meta.json").read_text())["effective_constructor"]["kwargs"]
    kwargs = {
        k: v
        for k, v in kwargs.items()
        if k in ("embed_dim", "depths", "num_heads", "window_size", "mlp_ratio")
    }
    clf = timm.create_model("agent_swin_tiny_224", num_classes=100, **kwargs).eval()
    clf.load_pretrained(str(vec / "checkpoint.pth"))
    bb = AgentBackbone("agent_swin_tiny_224", pretrained=str(vec / "checkpoint.pth"), **kwargs).eval()
    assert bb.out_norms  # official Swin backbone: norm{i} on each output
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        raw = clf.forward_intermediates(x, intermediates_only=True)
        out = list(bb(x).values())
    for i, (o, r) in enumerate(zip(out, raw, strict=True)):
        norm = getattr(bb, f"norm{i}")
        assert_close_rel(o, norm(r.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), 1e-5, f"norm{i}")


# -- spec §2.5: a direct transcription of the two-step resampling ----------------------------------------------
def _spec_biases(layer, key_hw, query_hw, target):
    """Spec §2.5 word for word: (i) block 7×7 and row+column sum resized to the map, (ii) agent axis as a p×p grid
    resized to the downstream grid."""
    heads, n = layer.an_bias.shape[:2]
    p = int(n**0.5)
    an = F.interpolate(layer.an_bias, size=key_hw, mode="bilinear", align_corners=False)  # (h, n, H, W)
    rc = (layer.ah_bias + layer.aw_bias)[0]  # (h, n, Hcls, Wcls)
    rc = F.interpolate(rc, size=key_hw, mode="bilinear", align_corners=False)
    b1 = (an + rc).reshape(heads, n, -1)  # (h, n, HW)
    na = F.interpolate(layer.na_bias, size=query_hw, mode="bilinear", align_corners=False)  # (h, n, H, W)
    rc2 = (layer.ha_bias + layer.wa_bias)[0].permute(0, 3, 1, 2)  # (h, n, Hcls, Wcls)
    rc2 = F.interpolate(rc2, size=query_hw, mode="bilinear", align_corners=False)
    b2 = (na + rc2).reshape(heads, n, -1)  # (h, n, HW), agent-major like b1
    out = []
    for b in (b1, b2):
        grid = b.permute(0, 2, 1).reshape(heads, -1, p, p)  # agents as a p×p grid
        grid = F.interpolate(grid, size=target, mode="bilinear", align_corners=False)
        out.append(grid.reshape(heads, -1, target[0] * target[1]))  # (h, HW, n')
    return out[0].permute(0, 2, 1)[None], out[1][None]  # B1 (1, h, n', HW), B2 (1, h, HW, n')


def _spec_attention(layer, q, k, v, grid, target):
    """Agent attention with the spec's downstream agents/biases, written out (no fused op)."""
    b, n_tok, c = q.shape
    h, d = layer.num_heads, c // layer.num_heads
    agents = F.adaptive_avg_pool2d(q.transpose(1, 2).reshape(b, c, *grid), target).flatten(2).transpose(1, 2)
    split = lambda t: t.reshape(b, -1, h, d).transpose(1, 2)  # noqa: E731
    qh, kh, vh, ah = split(q), split(k), split(v), split(agents)
    b1, b2 = _spec_biases(layer, grid, grid, target)
    s = d**-0.5
    va = torch.softmax(ah * s @ kh.transpose(-1, -2) + b1, -1) @ vh
    out = torch.softmax(qh * s @ ah.transpose(-1, -2) + b2, -1) @ va
    out = out.transpose(1, 2).reshape(b, n_tok, c)
    return out + layer.dwc(v.transpose(1, 2).reshape(b, c, *grid)).flatten(2).transpose(1, 2)


@pytest.mark.parametrize("grid,target", [((21, 13), (4, 5)), ((9, 30), (6, 6)), ((7, 7), (3, 3))])
def test_pvt_downstream_layer_matches_spec_transcription(grid, target):
    bb = AgentBackbone("agent_pvt_tiny_224", agent_grids=[target] * 4, **TINY["agent_pvt_tiny_224"])
    layer = bb.body.block2[0].attn  # 2 heads, 16 agents (4×4) trained at 28×28
    with torch.no_grad():
        for name in ("an_bias", "na_bias", "ah_bias", "aw_bias", "ha_bias", "wa_bias"):
            getattr(layer, name).normal_()  # make the bias terms matter
    got1, got2 = layer.biases(grid, grid)
    exp1, exp2 = _spec_biases(layer, grid, grid, target)
    assert_close_rel(got1, exp1, 1e-5, "B1")
    assert_close_rel(got2, exp2, 1e-5, "B2")
    x = torch.randn(2, grid[0] * grid[1], layer.dim)
    q = layer.q(x)
    k, v = layer.kv(x).chunk(2, dim=-1)
    expected = layer.proj(_spec_attention(layer, q, k, v, grid, target))
    assert_close_rel(layer(x, grid_size=grid), expected, 1e-5, "downstream PVT layer")


@pytest.mark.parametrize("name", ["agent_swin_tiny_224", "agent_cswin_tiny_224"])
def test_swin_cswin_downstream_biases_match_spec(name):
    target = (5, 3)
    bb = AgentBackbone(name, agent_grids=[target] * 4, **TINY[name])
    layer = (
        bb.body.layers[0].blocks[0].attn
        if "swin_" in name and "cswin" not in name
        else bb.body.stage1[0].attns[0]
    )
    with torch.no_grad():
        for n in ("an_bias", "na_bias", "ah_bias", "aw_bias", "ha_bias", "wa_bias"):
            getattr(layer, n).normal_()
    grid = (19, 11)
    got1, got2 = layer.biases(grid, grid)
    exp1, exp2 = _spec_biases(layer, grid, grid, target)
    assert_close_rel(got1, exp1, 1e-5, "B1")
    assert_close_rel(got2, exp2, 1e-5, "B2")
    q = torch.randn(1, grid[0] * grid[1], layer.dim)
    assert layer.make_agents(q, grid).shape == (1, target[0] * target[1], layer.dim)


# -- shapes ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_odd_size_feature_shapes(name):
    bb = AgentBackbone(name, agent_grids="official", **TINY[name]).eval()
    h, w = 333, 517
    with torch.no_grad():
        feats = bb(torch.randn(1, 3, h, w))
    if backbone_family(name) == "cswin":  # conv stem 7×7/4 pad 2, then 3×3/2 pad 1 merges
        sizes = [((h - 3) // 4 + 1, (w - 3) // 4 + 1)]
        for _ in range(3):
            sizes.append(((sizes[-1][0] + 1) // 2, (sizes[-1][1] + 1) // 2))
    else:  # every patch embedding / merge pads: ceil division
        sizes = [(-(-h // s), -(-w // s)) for s in bb.strides]
    assert [tuple(f.shape) for f in feats.values()] == [
        (1, c, *hw) for c, hw in zip(bb.out_channels_list, sizes, strict=True)
    ]
    assert all(torch.isfinite(f).all() for f in feats.values())


@pytest.mark.parametrize("name", NAMES)
def test_timm_features_only_shapes(name):
    model = timm.create_model(name, features_only=True, **TINY[name]).eval()
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 96, 160))
    assert [f.shape[1] for f in feats] == model.feature_info.channels()
    assert [(f.shape[2], f.shape[3]) for f in feats] == [
        (96 // r, 160 // r) for r in model.feature_info.reduction()
    ]


def test_out_indices_and_official_grids():
    bb = AgentBackbone(
        "agent_pvt_tiny_224", agent_grids="official", out_indices=(1, 3), **TINY["agent_pvt_tiny_224"]
    )
    assert bb.agent_grids == list(OFFICIAL_AGENT_GRIDS["pvt"])
    assert bb.body.block1[0].attn.target_agent_grid == (12, 12)
    out = bb(torch.randn(1, 3, 64, 64))
    assert list(out) == ["0", "1"] and [f.shape[1] for f in out.values()] == [32, 64]


# -- bad input ------------------------------------------------------------------------------------------------
def test_bad_input_is_rejected_clearly():
    bb = AgentBackbone("agent_pvt_tiny_224", **TINY["agent_pvt_tiny_224"])
    with pytest.raises(ValueError, match=r"images must be \(B, 3, H, W\)"):
        bb(torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match="hierarchical zoo model"):
        AgentBackbone("agent_deit_tiny_patch16_224")
    with pytest.raises(ValueError, match="agent_grids"):
        AgentBackbone("agent_pvt_tiny_224", agent_grids=(12, 16), **TINY["agent_pvt_tiny_224"])
    with pytest.raises(ValueError, match="out_indices"):
        AgentBackbone("agent_pvt_tiny_224", out_indices=(4,), **TINY["agent_pvt_tiny_224"])


def test_meta_device_flops_equal_a_real_count():
    from agentattn.dense.engine import backbone_flops
    from agentattn.measure import count_flops

    bb = AgentBackbone("agent_pvt_tiny_224", agent_grids=(4, 5, 3, 2), **TINY["agent_pvt_tiny_224"])
    assert backbone_flops(bb, (72, 100)) == count_flops(bb, (3, 72, 100)).total > 0
