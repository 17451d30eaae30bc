"""Agent-CSwin: official layouts, the reduced whole-model vector, any resolution, features and the timm contract."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn.functional as F
import torch.utils._device
from safetensors.torch import load_file

import agentattn.models.agent_cswin  # noqa: F401  (registers the models)
from agentattn.layers import CSwinAgentAttention
from agentattn.models.agent_cswin import (
    AgentCSwinTransformer,
    CSwinLinearAttention,
    LePEAttention,
    checkpoint_filter_fn,
)
from tests.conftest import DATA_DIR

MANIFESTS = {
    "agent_cswin_tiny_224": "agent_cswin_t",
    "agent_cswin_small_224": "agent_cswin_s",
    "agent_cswin_base_224": "agent_cswin_b",
    "agent_cswin_base_384": "agent_cswin_b_384",
}
VECTOR_DIR = DATA_DIR / "vectors" / "models" / "agent_cswin_reduced_a"
CHECKPOINT = VECTOR_DIR / "checkpoint.pth"
# Small architecture for the fast tests: all four stages, depth 1, split sizes that make stage 3 two-branch
# and padded at 80 px (stage-3 map 5×5, stripes of 3).
TINY = dict(embed_dim=8, depth=(1, 1, 1, 1), num_heads=(2, 2, 4, 4), split_size=(1, 2, 3, 7), num_classes=7)


def reduced_kwargs() -> dict:
    meta = json.loads((VECTOR_DIR / "meta.json").read_text())
    return dict(meta["effective_constructor"]["kwargs"])


def load_reduced(**overrides) -> AgentCSwinTransformer:
    model = timm.create_model(
        "agent_cswin_tiny_224",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(CHECKPOINT)),
        **dict(reduced_kwargs(), **overrides),
    )
    return model.eval()


def official_state_dict() -> dict[str, torch.Tensor]:
    from agentattn.io import load_checkpoint

    return load_checkpoint(CHECKPOINT)


# -- layouts -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_layout_matches_the_official_manifest(name, monkeypatch):
    ref = json.loads((DATA_DIR / "manifests" / f"{MANIFESTS[name]}.json").read_text())
    # Shapes only: build on the meta device (no memory, no init cost). conftest wraps torch.empty, and the
    # device context recognises factory functions from a cached table, so put the builtin back first.
    monkeypatch.setattr(torch, "empty", torch._C._VariableFunctions.empty)
    constructors = getattr(torch.utils._device, "_device_constructors", None)
    if hasattr(constructors, "cache_clear"):
        constructors.cache_clear()
    with torch.device("meta"):
        model = timm.create_model(name)
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == {
        e["key"]: e["shape"] for e in ref["state_dict"]
    }
    assert sum(p.numel() for p in model.parameters()) == ref["param_count"]
    branches = {b["block"]: len(b["branches"]) for b in ref["blocks"]}
    for block_name, count in branches.items():
        stage, idx = block_name.split(".")
        assert getattr(model, stage)[int(idx)].branch_num == count, block_name


def test_pretrained_cfgs():
    for name in MANIFESTS:
        cfg = timm.models.get_pretrained_cfg(name).to_dict()
        assert cfg["custom_load"] is True and cfg["license"] == "apache-2.0"
        assert cfg["first_conv"] == "stage1_conv_embed.0" and cfg["classifier"] == "head"
        assert cfg["origin_url"].endswith("LeapLabTHU/Agent-Attention")
    assert timm.models.get_pretrained_cfg("agent_cswin_base_384").input_size == (3, 384, 384)


# -- the reduced whole-model vector ----------------------------------------------------------------------------
def test_reduced_vector_logits_and_features():
    model = load_reduced()
    io = load_file(VECTOR_DIR / "io.safetensors")
    with torch.no_grad():
        features = model.forward_features(io["images"])
        assert features.shape == (2, 7, 7, 256)
        pooled = model.forward_head(features, pre_logits=True)
        logits = model.forward_head(features)
    assert (logits - io["logits"]).abs().max().item() <= 1e-4
    assert (pooled - io["features"]).abs().max().item() <= 1e-4
    with torch.no_grad():
        assert torch.equal(model(io["images"]), logits)


def test_loading_is_the_identity_on_the_state_dict():
    model = load_reduced()
    official = official_state_dict()
    assert model.state_dict().keys() == official.keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, official[key]), key


def test_ema_weights_are_used_when_asked(tmp_path):
    official = official_state_dict()
    ema = {k: v + 0.25 for k, v in official.items()}
    path = tmp_path / "ema.pth"
    torch.save({"model": official, "state_dict_ema": ema, "max_accuracy_e": 1.0, "epoch": 3}, path)
    model = AgentCSwinTransformer(**reduced_kwargs())
    model.load_pretrained(str(path), use_ema=True)
    assert torch.equal(model.stage1[0].attns[0].ah_bias, ema["stage1.0.attns.0.ah_bias"])
    model.load_pretrained(str(path))
    assert torch.equal(model.stage1[0].attns[0].ah_bias, official["stage1.0.attns.0.ah_bias"])
    # Through timm: the in1k_ema tag asks for the EMA weights.
    via_timm = timm.create_model(
        "agent_cswin_tiny_224.in1k_ema",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path)),
        **reduced_kwargs(),
    )
    assert torch.equal(via_timm.stage1[0].attns[0].ah_bias, ema["stage1.0.attns.0.ah_bias"])


def test_num_classes_change_reinitialises_the_head():
    model = load_reduced(num_classes=10)
    official = official_state_dict()
    assert model.head.weight.shape == (10, 256)
    assert torch.equal(model.stage4[0].qkv.weight, official["stage4.0.qkv.weight"])
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


# -- any resolution --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("img_size", [288, 384])
def test_224_checkpoint_loads_at_a_larger_img_size(img_size):
    model = load_reduced(img_size=img_size, la_split_size=None)
    side = img_size // 4
    assert model.stage1[0].attns[0].ah_bias.shape == (1, 2, 9, side, 1)
    assert model.stage3[0].branch_num == 2  # stripes of 7 over 18 or 24: padded at 288
    with torch.no_grad():
        out = model(torch.randn(1, 3, img_size, img_size))
    assert out.shape == (1, 100) and torch.isfinite(out).all()


def test_smaller_img_size_clamps_the_split_and_keeps_lepe_weights():
    """At 112 px the stage-3 map is 7×7 = split size: one branch (official rule); get_v halves are concatenated."""
    official = official_state_dict()
    model = load_reduced(img_size=112, la_split_size=None)
    block = model.stage3[0]
    assert block.branch_num == 1 and block.attns[0].get_v.weight.shape == (128, 1, 3, 3)
    expected = torch.cat(
        [official["stage3.0.attns.0.get_v.weight"], official["stage3.0.attns.1.get_v.weight"]]
    )
    assert torch.equal(block.attns[0].get_v.weight, expected)
    assert model(torch.randn(1, 3, 112, 112)).shape == (1, 100)
    # and back: a one-branch state dict splits into the two branches of a 224 model
    back = checkpoint_filter_fn(model.state_dict(), AgentCSwinTransformer(**reduced_kwargs()))
    assert torch.equal(back["stage3.0.attns.1.get_v.weight"], official["stage3.0.attns.1.get_v.weight"])


def test_run_time_input_of_another_shape():
    model = load_reduced()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 160, 200))  # maps 40×50, 20×25, 10×13 (padded stripes), 5×7
    assert out.shape == (1, 100) and torch.isfinite(out).all()


def test_agent_branch_gets_the_run_time_grid(monkeypatch):
    seen = []
    original = CSwinAgentAttention.forward

    def spy(self, qkv, grid_size=None):
        seen.append(grid_size)
        return original(self, qkv, grid_size=grid_size)

    monkeypatch.setattr(CSwinAgentAttention, "forward", spy)
    model = AgentCSwinTransformer(img_size=64, **TINY).eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 96, 72))
    assert seen == [(24, 18), (12, 9)]


def _reference_stripes(qkv, grid, idx, split, heads, conv):
    """CSwin LePE attention computed stripe by stripe on the unpadded map (the last stripe is narrower)."""
    _, batch, _, channels = qkv.shape
    maps = qkv.transpose(-2, -1).reshape(3, batch, channels, *grid)
    out = torch.zeros(batch, channels, *grid)
    length = grid[1] if idx == 0 else grid[0]
    for start in range(0, length, split):
        stripe = slice(start, start + split)
        sl = (slice(None), slice(None)) + ((slice(None), stripe) if idx == 0 else (stripe, slice(None)))
        q, k, v = (m[sl] for m in maps)  # (B, C, h, w)
        h, w = q.shape[-2:]
        lepe = conv(v)

        def split_heads(t, n=h * w):
            return t.reshape(batch, heads, channels // heads, n).transpose(-2, -1)

        att = torch.softmax(
            split_heads(q) @ split_heads(k).transpose(-2, -1) * (channels // heads) ** -0.5, -1
        )
        o = att @ split_heads(v) + split_heads(lepe)
        out[sl] = o.transpose(-2, -1).reshape(batch, channels, h, w)
    return out.flatten(2).transpose(1, 2)


@pytest.mark.parametrize("idx,grid", [(0, (6, 8)), (1, (8, 6)), (0, (5, 5)), (1, (4, 4))])
def test_lepe_padding_equals_narrower_last_stripe(idx, grid):
    layer = LePEAttention(dim=8, num_heads=2, idx=idx, split_size=3).eval()
    qkv = torch.randn(3, 2, grid[0] * grid[1], 8)
    with torch.no_grad():
        out = layer(qkv, grid)
        ref = _reference_stripes(qkv, grid, idx, 3, 2, layer.get_v)
    assert (out - ref).abs().max().item() <= 1e-5


def test_lepe_single_window_is_full_attention():
    layer = LePEAttention(dim=8, num_heads=2, idx=-1, split_size=7).eval()
    qkv = torch.randn(3, 1, 20, 8)
    with torch.no_grad():
        out = layer(qkv, (4, 5))
        q, k, v = (t.unflatten(-1, (2, 4)).transpose(1, 2) for t in qkv)
        lepe = layer.get_v(qkv[2].transpose(1, 2).reshape(1, 8, 4, 5)).flatten(2).transpose(1, 2)
        ref = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(1, 20, 8) + lepe
    assert (out - ref).abs().max().item() <= 1e-5


# -- training, features, the timm contract ---------------------------------------------------------------------
def test_forward_backward_tiny():
    model = AgentCSwinTransformer(img_size=80, drop_path_rate=0.1, **TINY)
    assert model.stage3[0].branch_num == 2
    x = torch.randn(2, 3, 80, 80, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 7)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert model.stage1[0].attns[0].an_bias.grad is not None
    assert model.stage3[0].attns[1].get_v.weight.grad is not None


def test_grad_checkpointing_matches():
    model = AgentCSwinTransformer(img_size=64, **TINY)
    x = torch.randn(1, 3, 64, 64)
    ref = model(x)
    model.set_grad_checkpointing(True)
    out = model(x)
    out.sum().backward()
    assert torch.allclose(out, ref, atol=1e-6)


@pytest.mark.parametrize("attn_type", ["LLBB", "BBAA", "ALBB", "BBBB"])
def test_attn_type_twins(attn_type):
    model = AgentCSwinTransformer(img_size=64, attn_type=attn_type, **TINY)
    for i, letter in enumerate(attn_type):
        kind = {"A": CSwinAgentAttention, "B": LePEAttention, "L": CSwinLinearAttention}[letter]
        assert isinstance(getattr(model, f"stage{i + 1}")[0].attns[0], kind)
    assert model(torch.randn(1, 3, 64, 48)).shape == (1, 7)


def test_features_only():
    model = timm.create_model("agent_cswin_tiny_224", features_only=True, img_size=64, **TINY)
    assert model.feature_info.channels() == [8, 16, 32, 64]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    feats = model(torch.randn(2, 3, 96, 64))
    assert [tuple(f.shape) for f in feats] == [(2, 8, 24, 16), (2, 16, 12, 8), (2, 32, 6, 4), (2, 64, 3, 2)]
    some = timm.create_model(
        "agent_cswin_tiny_224", features_only=True, out_indices=(1, 2), img_size=64, **TINY
    )
    assert [f.shape[1] for f in some(torch.randn(1, 3, 64, 64))] == [16, 32]
    assert some.model.stage4 is not None and len(some.model.stage4) == 0  # pruned after the last tap


def test_features_only_pretrained():
    model = timm.create_model(
        "agent_cswin_tiny_224",
        features_only=True,
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(CHECKPOINT)),
        **reduced_kwargs(),
    )
    feats = model(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == [32, 64, 128, 256]


def test_forward_intermediates():
    model = AgentCSwinTransformer(img_size=64, **TINY).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert torch.equal(final, model.forward_features(x))
        assert [tuple(t.shape) for t in inter] == [
            (1, 8, 16, 16),
            (1, 16, 8, 8),
            (1, 32, 4, 4),
            (1, 64, 2, 2),
        ]
        nhwc = model.forward_intermediates(
            x, indices=[3], output_fmt="NHWC", norm=True, intermediates_only=True
        )
        assert torch.allclose(nhwc[0], final)
        early = model.forward_intermediates(x, indices=2, stop_early=True, intermediates_only=True)
        assert [t.shape[1] for t in early] == [32, 64]


def test_timm_contract():
    model = AgentCSwinTransformer(img_size=64, **TINY)
    assert model.get_classifier() is model.head and model.no_weight_decay() == set()
    model.reset_classifier(3)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 64)
    groups = timm.models.group_parameters(model, model.group_matcher())
    assert set(groups) and sum(len(v) for v in groups.values()) == len(list(model.parameters()))
    coarse = timm.models.group_parameters(model, model.group_matcher(coarse=True))
    assert sum(len(v) for v in coarse.values()) == len(list(model.parameters()))


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(attn_type="AAXB"), "attn_type"),
        (dict(attn_type="AAB"), "attn_type"),
        (dict(agent_num=(9, 16, 49)), "agent_num"),
        (dict(depth=(1, 1, 1)), "depth"),
        (dict(split_size="1-2-x-7"), "split_size"),
        (dict(la_split_size="8-4-2-1"), "la_split_size"),
        (dict(patch_size=16), "patch_size"),
        (dict(img_size=0), "img_size"),
    ],
)
def test_bad_kwargs_raise_value_error(kwargs, name):
    with pytest.raises(ValueError, match=name):
        AgentCSwinTransformer(**dict(dict(img_size=64, **TINY), **kwargs))
