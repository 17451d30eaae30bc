"""``record_agent_attention``: the recorded weights are the layer's own, and recording changes nothing."""

from __future__ import annotations

import pytest
import timm
import torch

import agentattn  # noqa: F401  (registers the models)
from agentattn.layers import AgentAttention, record_agent_attention
from agentattn.ops import naive

from ..conftest import assert_close_rel


def _tiny_pvt(attn_type: str = "AAAA"):
    return timm.create_model(
        "agent_pvt_tiny_224", img_size=28, in_chans=1, num_classes=10, patch_size=2, depths=(1, 1, 1, 1),
        embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 2, 4), agent_num=(16, 9, 4, 1), sr_ratios=(1, 1, 1, 1),
        attn_type=attn_type,
    ).eval()  # fmt: skip


def test_recording_leaves_the_output_unchanged_and_covers_every_layer():
    model, x = _tiny_pvt(), torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        before = model(x)
        with record_agent_attention(model) as maps:
            during = model(x)
        after = model(x)
    assert torch.equal(before, during) and torch.equal(before, after)
    assert [m.layer for m in maps] == [f"block{i}.0.attn" for i in range(1, 5)]
    first = maps[0]
    assert first.agent_probs.shape == (3, 1, 16, 14 * 14) and first.query_probs.shape == (3, 1, 14 * 14, 16)
    assert first.agent_maps().shape == (3, 16, 14, 14) and first.query_maps().shape == (3, 16, 14, 14)
    for m in maps:
        torch.testing.assert_close(m.agent_probs.sum(-1), torch.ones(m.agent_probs.shape[:-1]))
        torch.testing.assert_close(m.query_probs.sum(-1), torch.ones(m.query_probs.shape[:-1]))
    assert all(
        layer._attention_sink is None for layer in model.modules() if hasattr(layer, "_attention_sink")
    )


def test_recorded_weights_reproduce_the_layer_output():
    torch.manual_seed(0)
    layer = AgentAttention(32, num_heads=2, agent_num=4, grid_size=(4, 4), num_prefix_tokens=1).eval()
    x = torch.randn(2, 17, 32)
    with torch.no_grad(), record_agent_attention(layer) as maps:
        out = layer(x)
    (m,) = maps
    # out = proj(query_probs @ agent_probs @ v + dwc(v)); rebuild it from the recorded weights.
    v = layer.qkv(x).reshape(2, 17, 3, 32)[:, :, 2]
    attn = m.query_probs @ (m.agent_probs @ layer.split_heads(v))  # (B, h, N, d)
    attn = attn.transpose(1, 2).reshape(2, 17, 32)
    local = layer.local_term(v, (4, 4), (4, 4))
    expected = layer.proj(torch.cat([attn[:, :1], attn[:, 1:] + local], dim=1))
    assert_close_rel(out, expected, 1e-5, "output from recorded weights")


def test_naive_weights_match_the_naive_op():
    torch.manual_seed(1)
    q, k, v, a = (
        torch.randn(2, 3, 20, 8),
        torch.randn(2, 3, 30, 8),
        torch.randn(2, 3, 30, 5),
        torch.randn(2, 3, 6, 8),
    )
    b1, b2 = torch.randn(1, 3, 6, 30), torch.randn(1, 3, 20, 6)
    mask = torch.zeros(2, 30, dtype=torch.bool)
    mask[1, 10:] = True
    agent_probs, query_probs = naive.agent_attention_weights(
        q, k, a, agent_bias=b1, query_bias=b2, key_padding_mask=mask
    )
    expected = naive.agent_attention(q, k, v, a, agent_bias=b1, query_bias=b2, key_padding_mask=mask)
    assert_close_rel(query_probs @ (agent_probs @ v), expected, 1e-6, "weights @ v")
    assert agent_probs[1, ..., 10:].abs().max() == 0  # padded keys get no weight


def test_a_model_without_agent_layers_is_an_error():
    with pytest.raises(ValueError, match="has no agent-attention layer"):
        with record_agent_attention(_tiny_pvt("BBBB")):
            pass


def test_the_sink_is_removed_when_the_block_raises():
    model = _tiny_pvt()
    with pytest.raises(RuntimeError, match="boom"):
        with record_agent_attention(model):
            raise RuntimeError("boom")
    assert all(getattr(m, "_attention_sink", None) is None for m in model.modules())
