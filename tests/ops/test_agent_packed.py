"""The packed training op: outputs and every gradient against autograd through ``agent_attention``, gradcheck."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from agentattn.layers import AgentAttention
from agentattn.layers import agent_attention as layer_module
from agentattn.ops import agent_attention
from agentattn.ops.agent_packed import agent_attention_packed, packed_path_applies
from tests.conftest import assert_close_rel

# (B, heads, C, grid, agent grid, prefix): divisible and non-divisible pooling, with and without a cls token.
CASES = [
    (3, 2, 16, (6, 6), (3, 3), 1),
    (2, 3, 24, (5, 7), (2, 3), 0),
    (2, 3, 48, (14, 14), (7, 7), 1),
    (4, 4, 32, (7, 7), (3, 3), 0),
]


def _inputs(batch, heads, channels, grid, agent_grid, prefix, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens, n = prefix + grid[0] * grid[1], agent_grid[0] * agent_grid[1]
    qkv = torch.randn(batch, tokens, 3 * channels, generator=g, dtype=dtype).requires_grad_()
    bias1 = (torch.randn(1, heads, n, tokens, generator=g, dtype=dtype) * 0.5).requires_grad_()
    bias2 = (torch.randn(1, heads, tokens, n, generator=g, dtype=dtype) * 0.5).requires_grad_()
    return qkv, bias1, bias2


def _reference(qkv, bias1, bias2, heads, grid, agent_grid, prefix):
    """The same computation as plain autograd ops: split, pool, head split, ``agent_attention`` (matmuls)."""
    channels = qkv.shape[-1] // 3
    q, k, v = qkv.split(channels, dim=-1)
    q_map = q[:, prefix:].unflatten(1, grid).permute(0, 3, 1, 2)
    agents = F.adaptive_avg_pool2d(q_map, agent_grid).flatten(2).transpose(1, 2)

    def heads_of(x):
        return x.unflatten(-1, (heads, channels // heads)).transpose(1, 2)

    out = agent_attention(
        heads_of(q), heads_of(k), heads_of(v), heads_of(agents),
        agent_bias=bias1, query_bias=bias2, backend="matmul",
    )  # fmt: skip
    return out.transpose(1, 2).flatten(2), v[:, prefix:].unflatten(1, grid).permute(0, 3, 1, 2)


@pytest.mark.parametrize("case", CASES)
def test_outputs_and_gradients_match_autograd(case):
    batch, heads, channels, grid, agent_grid, prefix = case
    qkv, bias1, bias2 = _inputs(*case)
    out, v_map = agent_attention_packed(
        qkv, bias1, bias2, num_heads=heads, grid_size=grid, agent_grid=agent_grid, num_prefix_tokens=prefix
    )
    ref_out, ref_v_map = _reference(qkv, bias1, bias2, heads, grid, agent_grid, prefix)
    assert out.shape == (batch, prefix + grid[0] * grid[1], channels)
    assert v_map.is_contiguous(memory_format=torch.channels_last)
    assert_close_rel(out, ref_out, 1e-5, "out")
    assert torch.equal(v_map, ref_v_map)
    g_out, g_map = torch.randn_like(out), torch.randn_like(v_map)
    grads = torch.autograd.grad((out * g_out).sum() + (v_map * g_map).sum(), (qkv, bias1, bias2))
    ref_grads = torch.autograd.grad((ref_out * g_out).sum() + (ref_v_map * g_map).sum(), (qkv, bias1, bias2))
    for name, got, want in zip(("qkv", "agent_bias", "query_bias"), grads, ref_grads, strict=True):
        assert_close_rel(got, want, 1e-5, f"grad {name}")


def test_unused_value_map_and_frozen_biases():
    """Only ``out`` in the loss (no DWC gradient), biases without grad: qkv's gradient still matches."""
    qkv, bias1, bias2 = _inputs(*CASES[0])
    bias1, bias2 = bias1.detach(), bias2.detach()
    out, _ = agent_attention_packed(qkv, bias1, bias2, num_heads=2, grid_size=(6, 6), agent_grid=(3, 3),
                                    num_prefix_tokens=1)  # fmt: skip
    ref, _ = _reference(qkv, bias1, bias2, 2, (6, 6), (3, 3), 1)
    (grad,) = torch.autograd.grad(out.square().sum(), qkv)
    (want,) = torch.autograd.grad(ref.square().sum(), qkv)
    assert_close_rel(grad, want, 1e-5, "grad qkv")


@pytest.mark.parametrize("case", [(2, 2, 8, (4, 4), (2, 2), 1), (1, 2, 8, (3, 5), (2, 3), 0)])
def test_gradcheck_float64(case):
    _, heads, _, grid, agent_grid, prefix = case
    inputs = _inputs(*case, dtype=torch.float64)

    def fn(qkv, bias1, bias2):
        return agent_attention_packed(
            qkv,
            bias1,
            bias2,
            num_heads=heads,
            grid_size=grid,
            agent_grid=agent_grid,
            num_prefix_tokens=prefix,
        )

    assert torch.autograd.gradcheck(fn, inputs)


def test_bad_input_is_named():
    qkv, bias1, bias2 = _inputs(*CASES[0])
    kwargs = dict(num_heads=2, grid_size=(6, 6), agent_grid=(3, 3), num_prefix_tokens=1)
    with pytest.raises(ValueError, match="qkv must be"):
        agent_attention_packed(qkv[..., :-1], bias1, bias2, **kwargs)
    with pytest.raises(ValueError, match="expects 37"):
        agent_attention_packed(qkv[:, 1:], bias1, bias2, **kwargs)
    with pytest.raises(ValueError, match="agent_bias must have shape"):
        agent_attention_packed(qkv, bias1[..., 1:], bias2, **kwargs)
    with pytest.raises(TypeError, match="query_bias must match"):
        agent_attention_packed(qkv, bias1, bias2.double(), **kwargs)


def test_applies_only_to_cpu_training():
    qkv = torch.randn(2, 5, 12, requires_grad=True)
    assert packed_path_applies(qkv)
    assert not packed_path_applies(qkv.detach())
    with torch.no_grad():
        assert not packed_path_applies(qkv)
    assert not packed_path_applies(qkv.half())


@pytest.mark.parametrize("prefix", [0, 1])
def test_layer_training_step_matches_unpacked_path(monkeypatch, prefix):
    """AgentAttention in train mode (packed path) against the same layer forced onto the autograd path."""
    torch.manual_seed(0)
    layer = AgentAttention(32, num_heads=2, agent_num=9, grid_size=(6, 6), num_prefix_tokens=prefix).train()
    x = torch.randn(3, prefix + 36, 32, requires_grad=True)
    calls = []
    original = layer_module.agent_attention_packed
    monkeypatch.setattr(
        layer_module, "agent_attention_packed", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    out = layer(x)
    grads = torch.autograd.grad(out.square().sum(), [x, *layer.parameters()])
    assert calls, "the packed path was not taken"
    monkeypatch.setattr(layer_module, "packed_path_applies", lambda qkv: False)
    ref = layer(x)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, *layer.parameters()])
    assert_close_rel(out, ref, 1e-5, "out")
    names = ["x", *(name for name, _ in layer.named_parameters())]
    for name, got, want in zip(names, grads, ref_grads, strict=True):
        assert_close_rel(got, want, 1e-5, f"grad {name}")
