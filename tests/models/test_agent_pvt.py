"""Agent-PVT: official layouts, the reduced whole-model vector, any resolution, features and the timm contract."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import load_file

import agentattn.models.agent_pvt  # noqa: F401  (registers the models)
from agentattn.layers import PVTAgentAttention
from agentattn.models.agent_pvt import AgentPVT, PVTAttention, PVTLinearAttention
from tests.conftest import DATA_DIR

MANIFESTS = {
    "agent_pvt_tiny_224": "agent_pvt_t",
    "agent_pvt_small_224": "agent_pvt_s",
    "agent_pvt_medium_224": "agent_pvt_m",
    "agent_pvt_medium_256": "agent_pvt_m_256",
    "agent_pvt_large_224": "agent_pvt_b",  # the official cfg file of Agent-PVT-L is agent_pvt_b.yaml
}
VECTOR_DIR = DATA_DIR / "vectors" / "models" / "agent_pvt_reduced_a"
CHECKPOINT = VECTOR_DIR / "checkpoint.pth"
# Small architecture for the fast tests: all four stages, depth 1, the official heads/ratios pattern.
TINY = dict(embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4), depths=(1, 1, 1, 1), num_classes=7)


def reduced_kwargs() -> dict:
    """The official constructor kwargs of the reduced vector (norm_layer is the default, eps 1e-6)."""
    meta = json.loads((VECTOR_DIR / "meta.json").read_text())
    kwargs = dict(meta["constructor"]["kwargs"])
    assert kwargs.pop("norm_layer").endswith("eps=1e-06)")
    return kwargs


def load_reduced(**overrides) -> AgentPVT:
    kwargs = dict(reduced_kwargs(), **overrides)
    model = timm.create_model(
        "agent_pvt_tiny_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(CHECKPOINT)), **kwargs
    )
    return model.eval()


def official_state_dict() -> dict[str, torch.Tensor]:
    from agentattn.models.pretrained import load_pretrained

    holder = AgentPVT(**reduced_kwargs())
    load_pretrained(holder, str(CHECKPOINT))
    return holder.state_dict()


# -- layouts -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_layout_matches_the_official_manifest(name):
    ref = json.loads((DATA_DIR / "manifests" / f"{MANIFESTS[name]}.json").read_text())
    model = timm.create_model(name)
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == {
        e["key"]: e["shape"] for e in ref["state_dict"]
    }
    assert sum(p.numel() for p in model.parameters()) == ref["param_count"]
    assert model.pretrained_cfg["input_size"] == (3, ref["img_size"], ref["img_size"])
    assert model.pretrained_cfg["custom_load"] is True
    assert model.pretrained_cfg["first_conv"] == "patch_embed1.proj"
    assert model.pretrained_cfg["classifier"] == "head"
    blocks = {b["block"]: b for b in ref["blocks"]}
    attn = model.block3[0].attn
    assert isinstance(attn, PVTAgentAttention) and attn.agent_num == blocks["block3.0"]["agent_num"]
    assert attn.grid_size == tuple(blocks["block3.0"]["tokens_hw"])


def test_softmax_and_linear_twins_have_official_keys():
    model = AgentPVT(**TINY, attn_type="ABBL")
    assert isinstance(model.block1[0].attn, PVTAgentAttention)
    assert isinstance(model.block2[0].attn, PVTAttention) and model.block2[0].attn.sr_ratio == 4
    assert isinstance(model.block3[0].attn, PVTAttention) and model.block3[0].attn.sr_ratio == 2
    assert isinstance(model.block4[0].attn, PVTLinearAttention)
    keys = set(model.state_dict())
    for name in ("q.weight", "kv.weight", "proj.weight", "sr.weight", "norm.weight"):
        assert f"block2.0.attn.{name}" in keys
    assert not any(k.startswith("block2.0.attn.") and k.endswith("_bias") for k in keys)
    assert {"block4.0.attn.dwc.weight", "block4.0.attn.kv.weight"} <= keys
    assert "block4.0.attn.sr.weight" not in keys  # 'L' takes its sr from agent_sr_ratios (1)


def test_agent_num_and_sr_accept_official_string_forms():
    a = AgentPVT(**TINY, agent_num=["9", "16", "49", "49"], agent_sr_ratios="1211")
    b = AgentPVT(**TINY, agent_num="9-16-49-49", agent_sr_ratios=[1, 2, 1, 1])
    for model in (a, b):
        assert [blk[0].attn.agent_num for blk in (model.block1, model.block2, model.block3, model.block4)] == [
            9, 16, 49, 49,
        ]  # fmt: skip
        assert model.block2[0].attn.sr_ratio == 2 and model.block2[0].attn.ah_bias.shape[3] == 28 // 2
    assert AgentPVT(**TINY, agent_num=16).block1[0].attn.agent_num == 16


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(attn_type="AAAX"), "attn_type"),
        (dict(attn_type="AAA"), "attn_type"),
        (dict(agent_num=[9, 16, 49]), "agent_num"),
        (dict(agent_num=["9", "x", "49", "49"]), "agent_num"),
        (dict(agent_sr_ratios="11"), "agent_sr_ratios"),
        (dict(depths=(1, 1, 1)), "embed_dims"),
        (dict(downstream_agent_shape=(12, 16)), "downstream_agent_shape"),
        (dict(global_pool="max"), "global_pool"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        AgentPVT(**dict(TINY, **kwargs))


# -- the reduced whole-model vector ----------------------------------------------------------------------------
def test_reduced_vector_logits_and_features_match():
    io = load_file(str(VECTOR_DIR / "io.safetensors"))
    model = load_reduced()
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(io["images"]), pre_logits=True)
        logits = model(io["images"])
    assert (logits - io["logits"]).abs().max().item() <= 1e-4
    assert (feats - io["features"]).abs().max().item() <= 1e-4
    assert model.pretrained_cfg["file"] == str(CHECKPOINT)


@pytest.mark.parametrize("fmt", ["safetensors", "bare_pth"])
def test_converted_and_bare_checkpoints_load_the_same(fmt, tmp_path):
    from agentattn.io import save_safetensors

    ref = official_state_dict()
    path = tmp_path / f"weights.{'safetensors' if fmt == 'safetensors' else 'pth'}"
    if fmt == "safetensors":
        save_safetensors(ref, path)
    else:
        torch.save(ref, path)
    model = timm.create_model(
        "agent_pvt_tiny_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **reduced_kwargs()
    )
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())


def test_num_classes_change_on_load_keeps_the_backbone_and_reinitialises_the_head():
    ref = official_state_dict()
    model = load_reduced(num_classes=10)
    assert model.head.weight.shape == (10, 128)
    state = model.state_dict()
    for key, value in ref.items():
        if not key.startswith("head."):
            assert torch.equal(state[key], value), key
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


@pytest.mark.parametrize("img_size", [288, 384])
def test_checkpoint_loads_at_another_resolution_and_runs(img_size):
    ref = official_state_dict()
    model = load_reduced(img_size=img_size)
    side = img_size // 4
    assert model.pos_embed1.shape == (1, side * side, 32)
    assert model.block1[0].attn.ah_bias.shape == (1, 1, 9, side, 1)
    assert model.block4[0].attn.wa_bias.shape == (1, 4, 1, side // 8, 49)
    assert torch.equal(model.block1[0].attn.an_bias, ref["block1.0.attn.an_bias"])  # 7×7 tables need nothing
    with torch.no_grad():
        out = model(torch.randn(1, 3, img_size, img_size))
    assert out.shape == (1, 100) and torch.isfinite(out).all()


def test_loading_at_the_trained_size_is_the_identity():
    ref = official_state_dict()
    model = load_reduced(img_size=224)
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())
    # and the runtime resampling is skipped on the construction grid.
    assert model._pos_embed(0, (56, 56)) is model.pos_embed1


# -- any resolution --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hw", [(64, 64), (70, 45), (33, 100), (20, 20)])
def test_arbitrary_input_sizes_run(hw):
    model = AgentPVT(**TINY, img_size=64, attn_type="AABL").eval()
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        out = model(x)
        feats = model.forward_intermediates(x, intermediates_only=True)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    h, w = hw
    for i, f in enumerate(feats):
        stride = 4 * 2**i
        assert f.shape == (2, TINY["embed_dims"][i], -(-h // stride), -(-w // stride))


def test_softmax_stages_with_grids_smaller_than_sr_run():
    model = AgentPVT(**TINY, img_size=64, attn_type="BBBB").eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 20, 20))  # stage grids 5, 3, 2, 1 < sr 8, 4, 2 (padded)
    assert torch.isfinite(out).all()


def test_runtime_grid_resamples_pos_embed_and_agent_biases():
    model = AgentPVT(**TINY, img_size=64).eval()
    pos = model._pos_embed(0, (20, 12))
    assert pos.shape == (1, 240, 16)
    big = AgentPVT(**TINY, img_size=(80, 48)).eval()
    assert big.pos_embed1.shape == (1, 20 * 12, 16) and big.block1[0].attn.grid_size == (20, 12)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 80, 48))
    assert torch.isfinite(out).all()


def test_downstream_agent_grid():
    model = AgentPVT(**TINY, img_size=64, downstream_agent_shape=[(4, 4), 4, 3, (2, 3)]).eval()
    plain = AgentPVT(**TINY, img_size=64)
    assert [(k, v.shape) for k, v in model.state_dict().items()] == [
        (k, v.shape) for k, v in plain.state_dict().items()
    ]
    model.load_state_dict(plain.state_dict())
    attn = model.block1[0].attn
    q = torch.randn(1, 256, 16)
    assert attn.make_agents(q, (16, 16)).shape == (1, 16, 16)
    b1, b2 = attn.biases((16, 16), (16, 16))
    assert b1.shape == (1, 1, 16, 256) and b2.shape == (1, 1, 256, 16)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 96, 72))).all()


# -- training, features, timm contract -------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_forward_backward_small(name):
    model = timm.create_model(name, img_size=64, depths=(1, 1, 1, 1), num_classes=5)
    model.train()
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 5)
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.block1[0].attn.an_bias.grad.abs().sum() > 0


def test_features_only_and_forward_intermediates():
    model = timm.create_model("agent_pvt_tiny_224", features_only=True, img_size=64, **TINY)
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.feature_info.channels() == list(TINY["embed_dims"])
    feats = model(torch.randn(1, 3, 64, 64))
    assert [f.shape[-1] for f in feats] == [16, 8, 4, 2]

    part = timm.create_model(
        "agent_pvt_tiny_224", features_only=True, out_indices=(1, 2), img_size=64, **TINY
    )
    assert part.feature_info.reduction() == [8, 16]
    assert not hasattr(part.model, "block4")  # pruned after the last requested stage
    assert [f.shape[1] for f in part(torch.randn(1, 3, 64, 64))] == [32, 48]

    full = AgentPVT(**TINY, img_size=64).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, inter = full.forward_intermediates(x, indices=[0, 3])
        torch.testing.assert_close(final, full.forward_features(x))
        torch.testing.assert_close(inter[1], final)
        nhwc = full.forward_intermediates(x, indices=1, output_fmt="NHWC", intermediates_only=True)
    assert nhwc[0].shape == (1, 2, 2, 64)


def test_timm_contract():
    model = AgentPVT(**TINY, img_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        model.set_grad_checkpointing(True)
        torch.testing.assert_close(model(x), ref)
    model.set_grad_checkpointing(False)
    assert model.no_weight_decay() == set()  # as officially: the pos embeds are weight-decayed
    assert model.get_classifier() is model.head
    groups = timm.models.group_parameters(model, model.group_matcher())
    assert "pos_embed1" in groups[0] and "patch_embed1.proj.weight" in groups[0]
    assert "block1.0.attn.an_bias" in groups[1] and "head.weight" in groups[len(groups) - 1]
    assert (
        len(timm.models.group_parameters(model, model.group_matcher(coarse=True))) == 6
    )  # stem, 4 stages, head
    with torch.no_grad():
        model.reset_classifier(0)
        assert model(x).shape == (2, 64)
        model.reset_classifier(3)
        assert model(x).shape == (2, 3)
        model.reset_classifier(0, global_pool="")
        assert model(x).shape == (2, 64, 2, 2)
