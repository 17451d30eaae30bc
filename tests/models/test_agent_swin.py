"""Agent-Swin: official layouts, the reduced whole-model vector, any resolution, features and the timm contract."""

from __future__ import annotations

import json

import pytest
import timm
import timm.optim
import torch
from safetensors.torch import load_file
from torch import nn

import agentattn.models.agent_swin  # noqa: F401  (registers the models)
from agentattn.layers import AgentAttention, LinearAttention
from agentattn.models.agent_swin import (
    AgentSwinBlock,
    AgentSwinTransformer,
    checkpoint_filter_fn,
    parse_attn_type,
    swin_shift_mask,
)
from tests.conftest import DATA_DIR, assert_close_rel

MANIFESTS = {
    "agent_swin_tiny_224": "agent_swin_t",
    "agent_swin_small_224": "agent_swin_s",
    "agent_swin_small_288": "agent_swin_s_288",
    "agent_swin_base_224": "agent_swin_b",
    "agent_swin_base_384": "agent_swin_b_384",
}
VECTOR_DIR = DATA_DIR / "vectors" / "models" / "agent_swin_reduced_a"
CHECKPOINT = VECTOR_DIR / "checkpoint.pth"


def reduced_kwargs() -> dict:
    """The official constructor kwargs of the reduced vector, passed verbatim (agent numbers are strings)."""
    meta = json.loads((VECTOR_DIR / "meta.json").read_text())
    return dict(meta["effective_constructor"]["kwargs"])


def small_model(**overrides) -> AgentSwinTransformer:
    """The reduced architecture with random weights (1.5M parameters)."""
    kwargs = dict(reduced_kwargs(), **overrides)
    return timm.create_model("agent_swin_tiny_224", **kwargs)


def load_reduced(**overrides) -> AgentSwinTransformer:
    kwargs = dict(reduced_kwargs(), **overrides)
    model = timm.create_model(
        "agent_swin_tiny_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(CHECKPOINT)), **kwargs
    )
    return model.eval()


# -- layouts -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_layout_matches_the_official_manifest(name):
    ref = json.loads((DATA_DIR / "manifests" / f"{MANIFESTS[name]}.json").read_text())
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = timm.create_model(name)
    params = {k: list(v.shape) for k, v in model.named_parameters()}
    assert params == {e["key"]: e["shape"] for e in ref["state_dict"] if e["kind"] == "parameter"}
    assert sum(p.numel() for p in model.parameters()) == ref["param_count"]
    # The official buffers exist under the same names and shapes; they are re-created, so not persistent.
    buffers = {k: list(v.shape) for k, v in model.named_buffers()}
    assert buffers == {e["key"]: e["shape"] for e in ref["state_dict"] if e["kind"] == "buffer"}
    assert set(model.state_dict()) == set(params)
    # Per-block attention kind, window and shift as read off the official model.
    for blk in ref["blocks"]:
        block = model.get_submodule(blk["block"])
        official_kind = {"AgentAttention": "A", "WindowAttention": "B"}[blk["attn_class"]]
        assert block.attn_kind == official_kind, blk["block"]
        assert block.window_size == (blk["window_size"],) * 2, blk["block"]
        assert block.shift_size == (blk["shift_size"],) * 2, blk["block"]
        assert (block.attn_mask is not None) == blk["has_attn_mask_buffer"], blk["block"]
        if official_kind == "A":
            assert block.attn.agent_num == blk["agent_num"]
    cfg = model.pretrained_cfg
    assert tuple(cfg["input_size"]) == (3, ref["img_size"], ref["img_size"])
    assert cfg["custom_load"] and cfg["first_conv"] == "patch_embed.proj" and cfg["classifier"] == "head"
    assert cfg["license"] and cfg["origin_url"].startswith("https://github.com/LeapLabTHU/")


def test_registry_names():
    assert sorted(timm.list_models("agent_swin*")) == sorted(MANIFESTS)


def test_drop_path_is_linear_over_all_blocks():
    model = timm.create_model("agent_swin_tiny_224", embed_dim=32, num_heads=(1, 2, 4, 8))
    rates = [
        b.drop_path1.drop_prob if hasattr(b.drop_path1, "drop_prob") else 0.0
        for stage in model.layers
        for b in stage.blocks
    ]
    assert rates == pytest.approx(torch.linspace(0, 0.2, 12).tolist())


# -- the reduced official vector --------------------------------------------------------------------------------
def test_reduced_vector_logits_and_features():
    io = load_file(str(VECTOR_DIR / "io.safetensors"))
    model = load_reduced()
    assert sum(p.numel() for p in model.parameters()) == 1525518
    with torch.no_grad():
        logits = model(io["images"])
        features = model.forward_head(model.forward_features(io["images"]), pre_logits=True)
    assert (logits - io["logits"]).abs().max().item() <= 1e-4
    assert (features - io["features"]).abs().max().item() <= 1e-4


def test_num_classes_change_reinitialises_the_head():
    reference = load_reduced()
    model = load_reduced(num_classes=10)
    assert model.head.weight.shape == (10, 256)
    torch.testing.assert_close(model.patch_embed.proj.weight, reference.patch_embed.proj.weight)
    torch.testing.assert_close(
        model.layers[0].blocks[0].attn.an_bias, reference.layers[0].blocks[0].attn.an_bias
    )
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


@pytest.mark.parametrize("img_size", [288, 384, 160])
def test_loads_at_another_resolution_and_runs(img_size):
    model = load_reduced(img_size=img_size)
    side = img_size // 4
    attn = model.layers[0].blocks[0].attn
    assert attn.ah_bias.shape == (1, 1, 9, side, 1) and attn.wa_bias.shape == (1, 1, 1, side, 9)
    with torch.no_grad():
        out = model(torch.randn(1, 3, img_size, img_size))
    assert out.shape == (1, 100) and torch.isfinite(out).all()


def test_filter_is_identity_at_the_same_size_and_drops_buffers():
    model = small_model()
    official = {k: v.clone() for k, v in model.state_dict().items()}
    official["layers.3.blocks.0.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
    official["layers.2.blocks.1.attn_mask"] = torch.zeros(4, 49, 49)
    out = checkpoint_filter_fn(official, model)
    assert set(out) == set(model.state_dict())
    for key, value in out.items():
        assert torch.equal(value, official[key]), key


def test_filter_resizes_relative_position_tables():
    src = small_model(window_size=56)  # window blocks 7
    dst = small_model(img_size=288, window_size=72)  # window blocks 9, agent sides 72/36/18
    out = checkpoint_filter_fn(src.state_dict(), dst)
    assert out["layers.3.blocks.0.attn.relative_position_bias_table"].shape == (17 * 17, 8)
    assert out["layers.0.blocks.0.attn.ah_bias"].shape == (1, 1, 9, 72, 1)
    dst.load_state_dict(out, strict=True)


# -- any resolution, arbitrary H×W ------------------------------------------------------------------------------
@pytest.mark.parametrize("hw", [(100, 150), (37, 61)])
def test_arbitrary_input_sizes_forward_backward(hw):
    model = small_model(attn_type="ABMB1", num_classes=5)
    x = torch.randn(2, 3, *hw, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 5)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(p.grad is not None for n, p in model.named_parameters()), "unused parameters"


def test_dynamic_shift_mask_equals_the_stored_one():
    block = AgentSwinBlock(32, (14, 14), num_heads=2, attn_kind="B", window_size=7, shift_size=3).eval()
    assert block.attn_mask.shape == (4, 49, 49)
    torch.testing.assert_close(block.attn_mask, swin_shift_mask(14, 14, (7, 7), (3, 3)))
    x = torch.randn(2, 14, 14, 32)
    with torch.no_grad():
        stored = block(x)
        block.attn_mask = None  # forces the on-the-fly mask
        dynamic = block(x)
    torch.testing.assert_close(stored, dynamic, rtol=0, atol=0)


def test_window_block_pads_and_clamps():
    block = AgentSwinBlock(32, (5, 9), num_heads=2, attn_kind="B", window_size=7, shift_size=3)
    assert block.window_size == (5, 5) and block.shift_size == (0, 0)  # official clamp to min(resolution)
    block = AgentSwinBlock(32, (14, 14), num_heads=2, attn_kind="B", window_size=7, shift_size=3).eval()
    x = torch.randn(1, 10, 17, 32)
    with torch.no_grad():
        assert block(x).shape == x.shape


def test_agent_block_at_the_construction_grid_is_the_plain_layer():
    block = AgentSwinBlock(32, (8, 8), num_heads=2, attn_kind="A", agent_num=16).eval()
    x = torch.randn(2, 8, 8, 32)
    with torch.no_grad():
        attn_out = block.attn(block.norm1(x).reshape(2, 64, 32))
        expected = x + attn_out.reshape(2, 8, 8, 32)
        expected = expected + block.mlp(block.norm2(expected))
        assert_close_rel(block(x), expected, 1e-6, "block")


# -- features -------------------------------------------------------------------------------------------------
def test_features_only():
    model = timm.create_model("agent_swin_tiny_224", features_only=True, **reduced_kwargs())
    assert model.feature_info.channels() == [32, 64, 128, 256]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        feats = model(torch.randn(2, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [
        (2, 32, 16, 24),
        (2, 64, 8, 12),
        (2, 128, 4, 6),
        (2, 256, 2, 3),
    ]
    model = timm.create_model(
        "agent_swin_tiny_224", features_only=True, out_indices=(1, 2), **reduced_kwargs()
    )
    assert model.feature_info.channels() == [64, 128]
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 70, 50))  # odd maps: PatchMerging pads
    assert [tuple(f.shape) for f in feats] == [(1, 64, 9, 7), (1, 128, 5, 4)]


def test_forward_intermediates_matches_forward_features():
    model = small_model().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert_close_rel(final, model.forward_features(x), 1e-6, "final")
        assert [t.shape[1] for t in inter] == [32, 64, 128, 256]
        only = model.forward_intermediates(x, indices=[0, 2], intermediates_only=True, stop_early=True)
    torch.testing.assert_close(only[0], inter[0])
    torch.testing.assert_close(only[1], inter[2])


def test_downstream_agent_shape_resamples_the_agent_axis():
    reference = small_model().eval()
    model = small_model(downstream_agent_shape=(9, 12, 14, 7)).eval()
    model.load_state_dict(reference.state_dict(), strict=True)  # same parameters as the classifier
    with torch.no_grad():
        out = model(torch.randn(1, 3, 96, 128))
    assert out.shape == (1, 100)
    attn = model.layers[1].blocks[0].attn
    b1, b2 = attn.biases((6, 8), (6, 8))
    assert b1.shape == (1, 2, 144, 48) and b2.shape == (1, 2, 48, 144)


# -- attention types and argument checks ----------------------------------------------------------------------
def test_parse_attn_type():
    assert parse_attn_type("AAMB2", (2, 2, 4, 2))[2] == ["A", "A", "B", "B"]
    assert parse_attn_type(["A", "L", "M1", "B"], (1, 1, 2, 1)) == [["A"], ["L"], ["A", "B"], ["B"]]
    for bad in ("AAXB", "AAM", "AAB", "AAAB3", "AAM9B9"):
        with pytest.raises(ValueError, match="attn_type"):
            parse_attn_type(bad, (2, 2, 2, 2))


def test_linear_and_window_twins():
    model = small_model(attn_type="LBLA")
    kinds = [type(stage.blocks[0].attn) for stage in model.layers]
    assert (
        kinds[0] is LinearAttention and kinds[2] is LinearAttention and issubclass(kinds[3], AgentAttention)
    )
    assert "relative_position_bias_table" in dict(model.layers[1].blocks[0].attn.named_parameters())
    out = model(torch.randn(1, 3, 48, 80))
    out.mean().backward()


@pytest.mark.parametrize(
    ("kwargs", "arg"),
    [
        (dict(attn_type="AAQB"), "attn_type"),
        (dict(agent_num=[9, 16, 49]), "agent_num"),
        (dict(agent_num=["9", "x", "49", "49"]), "agent_num"),
        (dict(num_heads=[1, 2, 4]), "num_heads"),
        (dict(downstream_agent_shape=(9, 12)), "downstream_agent_shape"),
        (dict(global_pool="max"), "global_pool"),
        (dict(ape=True), "ape"),
    ],
)
def test_bad_kwargs_raise_value_error(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        small_model(**kwargs)


# -- timm contract ---------------------------------------------------------------------------------------------
def test_timm_contract():
    model = small_model()
    assert model.get_classifier() is model.head
    nwd = model.no_weight_decay()
    assert nwd == {"layers.3.blocks.0.attn.relative_position_bias_table"}
    groups = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, layer_decay=0.9)
    assert len(groups.param_groups) > 4
    matcher = model.group_matcher()
    assert "stem" in matcher and "blocks" in matcher
    model.reset_classifier(3)
    assert model.head.out_features == 3
    model.reset_classifier(0, "")
    x = torch.randn(1, 3, 32, 32)
    assert model(x).shape == (1, 1, 1, 256)  # no pooling, no head: the NHWC map
    model.reset_classifier(7, "avg")
    model.set_grad_checkpointing(True)
    model.train()
    model(x).sum().backward()
    assert model.patch_embed.proj.weight.grad is not None


def test_official_use_checkpoint_kwarg_turns_on_checkpointing():
    model = small_model(use_checkpoint=True)
    assert all(stage.grad_checkpointing for stage in model.layers)
    assert isinstance(model.head, nn.Linear)
