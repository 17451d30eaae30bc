"""convert_to_agent on timm ViT/DeiT, Swin and AgentDeiT models (random weights, tiny sizes)."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

from agentattn.layers import AgentAttention
from agentattn.models.convert import GlobalAgentSwinBlock, convert_to_agent

VIT = dict(pretrained=False, img_size=32, depth=2, num_classes=10)
SWIN = dict(
    pretrained=False,
    img_size=64,
    embed_dim=16,
    depths=(1, 1, 2, 1),
    num_heads=(1, 2, 2, 4),
    window_size=2,
    num_classes=10,
)


def _qkv_proj(attn: nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in (attn.qkv.weight, attn.qkv.bias, attn.proj.weight, attn.proj.bias)]


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_vit_converts_and_keeps_weights(name):
    model = timm.create_model(name, **VIT)
    before = [_qkv_proj(b.attn) for b in model.blocks]
    assert convert_to_agent(model, agent_num=4) is model
    for blk, old in zip(model.blocks, before, strict=True):
        assert isinstance(blk.attn, AgentAttention)
        assert blk.attn.num_prefix_tokens == model.num_prefix_tokens
        assert blk.attn.grid_size == (2, 2) and blk.attn.agent_num == 4
        assert all(torch.equal(a, b) for a, b in zip(_qkv_proj(blk.attn), old, strict=True))
        assert not blk.attn.dwc.weight.any() and not blk.attn.dwc.bias.any()  # zero-initialised local term
    out = model(torch.randn(2, 3, 32, 32))
    out = out[0] if isinstance(out, tuple) else out
    assert out.shape == (2, 10)
    out.square().sum().backward()
    attn = model.blocks[0].attn
    assert attn.dwc.weight.grad is not None and attn.dwc.weight.grad.abs().sum() > 0
    assert attn.an_bias.grad is not None and attn.qkv.weight.grad is not None


def test_converted_deit_has_the_agent_deit_layout():
    # A converted DeiT is an Agent-DeiT: its state dict loads into the registered model (and back).
    deit = convert_to_agent(timm.create_model("deit_tiny_patch16_224", **VIT), agent_num=4)
    agent = timm.create_model(
        "agent_deit_tiny_patch16_224", img_size=32, depth=2, num_classes=10, agent_num=4
    )
    agent.load_state_dict(deit.state_dict(), strict=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(agent.eval()(x), deit.eval()(x), atol=1e-6)


def test_vit_subset_and_per_block_agent_num():
    model = timm.create_model("deit_tiny_patch16_224", **VIT)
    convert_to_agent(model, agent_num=[1, 9], blocks=[-1])
    assert type(model.blocks[0].attn).__name__ == "Attention"
    assert isinstance(model.blocks[1].attn, AgentAttention) and model.blocks[1].attn.agent_num == 9
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_vit_dynamic_img_size_non_square_and_deepcopy():
    model = timm.create_model("vit_tiny_patch16_224", dynamic_img_size=True, **VIT).eval()
    convert_to_agent(model, agent_num=4, learned_agents=True)
    assert model.blocks[0].attn.learned_agents
    clone = copy.deepcopy(model)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 48, 80))  # 3×5 patch grid, built for 2×2
        assert out.shape == (1, 10) and torch.isfinite(out).all()
        x = torch.randn(1, 3, 32, 48)
        assert torch.equal(clone(x), model(x))


def test_swin_blocks_attend_globally():
    model = timm.create_model("swin_tiny_patch4_window7_224", **SWIN)
    flat = [blk for stage in model.layers for blk in stage.blocks]
    before = [_qkv_proj(blk.attn) for blk in flat]
    convert_to_agent(model, agent_num=[4, 4, 4, 1], blocks=[0, 1, 2])
    converted = [blk for stage in model.layers for blk in stage.blocks]
    # new block modules that hold the old ones' norms and MLP (no __class__ swap), with the same parameter names
    assert all(converted[k].mlp is flat[k].mlp and converted[k].norm1 is flat[k].norm1 for k in range(3))
    assert converted[3] is flat[3]
    flat = converted
    for k, blk in enumerate(flat[:3]):
        assert isinstance(blk, GlobalAgentSwinBlock) and isinstance(blk.attn, AgentAttention)
        res = tuple(blk.input_resolution)
        assert tuple(blk.window_size) == res and tuple(blk.shift_size) == (0, 0) and blk.attn_mask is None
        assert blk.attn.grid_size == res
        assert all(torch.equal(a, b) for a, b in zip(_qkv_proj(blk.attn), before[k], strict=True))
    assert type(flat[3].attn).__name__ == "WindowAttention"  # stage 3, block 1 untouched
    assert not hasattr(flat[0].attn, "relative_position_bias_table")
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 10)
    out.square().sum().backward()
    assert flat[0].attn.dwc.weight.grad is not None


def test_swin_converted_model_changes_input_size():
    model = timm.create_model("swin_tiny_patch4_window7_224", **SWIN).eval()
    convert_to_agent(model, agent_num=4)
    model.set_input_size(img_size=(96, 96))
    blk = model.layers[0].blocks[0]
    # the window follows the new map; the biases stay at the construction grid and resample at run time
    assert tuple(blk.window_size) == (24, 24) and blk.attn.grid_size == (16, 16)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 96, 96)).shape == (1, 10)


def test_agent_deit_softmax_blocks_convert():
    model = timm.create_model(
        "agent_deit_tiny_patch16_224",
        img_size=32,
        embed_dim=32,
        depth=3,
        num_heads=2,
        attn_type="ABL",
        agent_num=4,
        num_classes=10,
    )
    qkv = model.blocks[1].attn.qkv.weight.detach().clone()
    convert_to_agent(model, agent_num=4)
    assert model.attn_type == "AAA" and all(isinstance(b.attn, AgentAttention) for b in model.blocks)
    assert torch.equal(model.blocks[1].attn.qkv.weight, qkv)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize(
    ("make", "kwargs", "match"),
    [
        (lambda: nn.Sequential(nn.Linear(4, 4)), {}, "supports"),
        (lambda: timm.create_model("vit_tiny_patch16_224", qk_norm=True, **VIT), {}, "qk_norm"),
        (lambda: timm.create_model("deit_tiny_patch16_224", **VIT), dict(agent_num=[4]), "agent_num"),
        (lambda: timm.create_model("deit_tiny_patch16_224", **VIT), dict(blocks=[5]), "blocks"),
        (lambda: timm.create_model("deit_tiny_patch16_224", **VIT), dict(blocks=3), "blocks"),
        (
            lambda: timm.create_model("swin_tiny_patch4_window7_224", **SWIN),
            dict(agent_num=[4, 4]),
            "agent_num",
        ),
    ],
)
def test_unsupported_raise_value_error(make, kwargs, match):
    with pytest.raises(ValueError, match=match):
        convert_to_agent(make(), **kwargs)
