"""Agent-DeiT: official layouts, the reduced whole-model vector, timm contract, attn_type, other resolutions."""

from __future__ import annotations

import functools
import json

import pytest
import timm
import torch
from safetensors.torch import load_file

from agentattn.io import load_checkpoint
from agentattn.layers import AgentAttention, LinearAttention, SoftmaxAttention
from agentattn.models import agent_deit
from agentattn.models.agent_deit import AgentDeiT, parse_attn_type
from tests.conftest import DATA_DIR

VARIANTS = {
    "agent_deit_tiny_patch16_224": "agent_deit_t",
    "agent_deit_small_patch16_224": "agent_deit_s",
    "agent_deit_small_patch16_448": "agent_deit_s_448",
    "agent_deit_base_patch16_224": "agent_deit_b",
}
VECTOR = DATA_DIR / "vectors" / "models" / "agent_deit_reduced_a"
REDUCED = dict(embed_dim=64, depth=2, num_heads=2, num_classes=100, agent_num=49, drop_path_rate=0.0)
TINY = dict(img_size=32, embed_dim=32, depth=2, num_heads=2, num_classes=10, agent_num=4)


@functools.cache
def _full_size_on_meta(name: str) -> AgentDeiT:
    with torch.device("meta"):  # layout only: no memory, no init cost
        return timm.create_model(name)


def _reduced(**overrides) -> AgentDeiT:
    kwargs = dict(REDUCED, **overrides)
    return timm.create_model(
        "agent_deit_tiny_patch16_224",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(VECTOR / "checkpoint.pth")),
        **kwargs,
    ).eval()


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_layout_matches_manifest(name):
    manifest = json.loads((DATA_DIR / "manifests" / f"{VARIANTS[name]}.json").read_text())
    model = _full_size_on_meta(name)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    official = {e["key"]: e["shape"] for e in manifest["state_dict"]}
    assert ours == official
    assert sum(p.numel() for p in model.parameters()) == manifest["param_count"]
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, manifest["img_size"], manifest["img_size"])
    assert (
        cfg["custom_load"] is True and cfg["first_conv"] == "patch_embed.proj" and cfg["classifier"] == "head"
    )
    assert cfg["license"] and cfg["origin_url"].startswith("https://github.com/LeapLabTHU")


def test_registered():
    assert set(VARIANTS) <= set(timm.list_models("agent_deit_*"))


def test_base_has_four_agent_blocks():
    model = _full_size_on_meta("agent_deit_base_patch16_224")
    kinds = [type(b.attn) for b in model.blocks]
    assert kinds == [AgentAttention] * 4 + [SoftmaxAttention] * 8
    assert all(b.attn.agent_num == 81 for b in model.blocks[:4])
    assert model.attn_type == "AAAABBBBBBBB"
    drop = [float(getattr(b.drop_path1, "drop_prob", 0.0)) for b in model.blocks]
    assert drop[0] == 0.0 and drop[-1] == pytest.approx(0.3)


def test_reduced_vector_logits_and_features():
    model = _reduced()
    io = load_file(str(VECTOR / "io.safetensors"))
    with torch.no_grad():
        tokens = model.forward_features(io["images"])
        features = model.forward_head(tokens, pre_logits=True)
        logits = model.forward_head(tokens)
        direct = model(io["images"])
    assert (logits - io["logits"]).abs().max().item() <= 1e-4
    assert (features - io["features"]).abs().max().item() <= 1e-4
    assert torch.equal(direct, logits)


def test_num_classes_change_reinitialises_head():
    model = _reduced(num_classes=7)
    state = load_checkpoint(VECTOR / "checkpoint.pth")
    assert model.head.weight.shape == (7, 64)
    assert torch.equal(model.blocks[1].attn.qkv.weight, state["blocks.1.attn.qkv.weight"])
    assert torch.equal(model.pos_embed, state["pos_embed"])


@pytest.mark.parametrize("img_size", [96, 288, 384])
def test_loads_at_other_resolution(img_size):
    # 224-trained (14×14 grid) checkpoint into another grid: pos_embed and row/column biases resampled.
    side = img_size // 16
    model = _reduced(img_size=img_size)
    assert model.pos_embed.shape == (1, 1 + side * side, 64)
    assert model.blocks[0].attn.ah_bias.shape == (1, 2, 49, side, 1)
    assert model.blocks[0].attn.grid_size == (side, side)
    state = load_checkpoint(VECTOR / "checkpoint.pth")
    assert torch.equal(model.blocks[0].attn.an_bias, state["blocks.0.attn.an_bias"])
    with torch.no_grad():
        out = model(torch.randn(1, 3, img_size, img_size))
    assert out.shape == (1, 100) and torch.isfinite(out).all()


def test_forward_backward_mixed_attn_types():
    model = timm.create_model("agent_deit_tiny_patch16_224", **dict(TINY, depth=3, attn_type="ABL"))
    assert [type(b.attn) for b in model.blocks] == [AgentAttention, SoftmaxAttention, LinearAttention]
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    out.square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


def test_dynamic_img_size_resamples_biases():
    model = timm.create_model("agent_deit_tiny_patch16_224", dynamic_img_size=True, **TINY).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 48, 64))  # 3×4 grid; built for 2×2
    assert out.shape == (1, 10) and torch.isfinite(out).all()


def test_timm_contract():
    model = timm.create_model("agent_deit_tiny_patch16_224", **TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        model.set_grad_checkpointing(True)
        assert torch.allclose(model(x), ref)
        model.set_grad_checkpointing(False)
        final, inter = model.forward_intermediates(x, indices=[0, 1])
        assert [tuple(t.shape) for t in inter] == [(2, 32, 2, 2)] * 2
        assert torch.allclose(model.forward_head(final), ref)
        nlc = model.forward_intermediates(x, indices=1, output_fmt="NLC", intermediates_only=True)
        assert tuple(nlc[0].shape) == (2, 4, 32)
    assert "pos_embed" in model.no_weight_decay() and "stem" in model.group_matcher()
    model.reset_classifier(3)
    assert model.get_classifier().out_features == 3 and model(x).shape == (2, 3)


def test_features_only():
    model = timm.create_model("agent_deit_tiny_patch16_224", features_only=True, out_indices=(0, 1), **TINY)
    feats = model(torch.randn(2, 3, 32, 32))
    assert [tuple(f.shape) for f in feats] == [(2, 32, 2, 2)] * 2


@pytest.mark.parametrize(
    ("attn_type", "depth", "expected"),
    [
        ("A", 3, "AAA"),
        ("ABL", 3, "ABL"),
        ("A4B8", 12, "AAAABBBBBBBB"),
        ("A1L2", 3, "ALL"),
        ("B12", 12, "B" * 12),
    ],
)
def test_parse_attn_type(attn_type, depth, expected):
    assert parse_attn_type(attn_type, depth) == expected


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        (dict(attn_type="AX"), "attn_type"),
        (dict(attn_type="AAA"), "attn_type"),
        (dict(attn_type="A2B"), "attn_type"),
        (dict(attn_type=""), "attn_type"),
        (dict(agent_num=[4, 4, 4]), "agent_num"),
        (dict(agent_num=0), "agent_num"),
        (dict(qk_norm=True), "qk_norm"),
        (dict(patch_drop_rate=0.5), "patch_drop_rate"),
    ],
)
def test_bad_kwargs_raise(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        timm.create_model("agent_deit_tiny_patch16_224", **dict(TINY, **kwargs))


def test_checkpoint_filter_is_identity_at_same_size():
    model = timm.create_model("agent_deit_tiny_patch16_224", **TINY)
    state = model.state_dict()
    out = agent_deit.checkpoint_filter_fn(dict(state), model)
    assert all(torch.equal(out[k], v) for k, v in state.items())
