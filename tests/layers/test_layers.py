"""The layers: parity with the official transcription on unseen configs, grids, agents, errors, compile."""

from __future__ import annotations

import pytest
import torch

from agentattn.bench.official import OfficialAgentAttention
from agentattn.layers import AgentAttention, CSwinAgentAttention, PVTAgentAttention
from agentattn.ops import naive
from tests.conftest import assert_close_rel


def randomise_(module, std=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


@pytest.mark.parametrize(
    "dim,heads,agents,window,prefix",
    [(48, 3, 16, 8, 1), (40, 5, 25, 10, 0), (24, 2, 4, 5, 1), (96, 4, 81, 9, 0), (32, 1, 1, 6, 1)],
)
def test_layer_matches_official_transcription_on_unseen_configs(dim, heads, agents, window, prefix):
    ours = randomise_(AgentAttention(dim, heads, agents, window, num_prefix_tokens=prefix)).eval()
    official = OfficialAgentAttention(dim, heads, agents, window, num_prefix_tokens=prefix).eval()
    official.load_state_dict(ours.state_dict(), strict=True)
    x = (torch.randn(2, prefix + window * window, dim) * 2.7 / dim**0.5).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y, y_ref = ours(x), official(x2)
    assert_close_rel(y, y_ref, 1e-5, "y")
    g = torch.randn(y.shape)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    assert_close_rel(x.grad, x2.grad, 1e-4, "grad_x")
    ref_grads = dict(official.named_parameters())
    for name, p in ours.named_parameters():
        assert_close_rel(p.grad, ref_grads[name].grad, 1e-4, f"grad {name}")


def layer_from_naive(layer: AgentAttention, x: torch.Tensor, grid) -> torch.Tensor:
    """The layer recomposed by hand from the naive op: an independent path through the same parameters."""
    b, n, c = x.shape
    h, d, p = layer.num_heads, layer.head_dim, layer.num_prefix_tokens
    q, k, v = layer.qkv(x).reshape(b, n, 3, c).permute(2, 0, 1, 3)
    q_map = q[:, p:].transpose(1, 2).reshape(b, c, *grid)
    agents = (
        torch.nn.functional.adaptive_avg_pool2d(q_map, layer.agent_grid).reshape(b, c, -1).transpose(1, 2)
    )
    split = lambda t: t.reshape(b, -1, h, d).transpose(1, 2)  # noqa: E731
    b1, b2 = layer.biases(grid, grid)
    out = naive.agent_attention(split(q), split(k), split(v), split(agents), agent_bias=b1, query_bias=b2)
    out = out.transpose(1, 2).reshape(b, n, c).clone()
    v_map = v[:, p:].transpose(1, 2).reshape(b, c, *grid)
    out[:, p:] += layer.dwc(v_map).reshape(b, c, -1).transpose(1, 2)
    return layer.proj(out)


@pytest.mark.parametrize("grid,agent_num,prefix", [((6, 10), 12, 0), ((9, 4), 6, 1), ((2, 2), 9, 0)])
def test_non_square_grids_and_agent_counts(grid, agent_num, prefix):
    layer = randomise_(AgentAttention(32, 2, agent_num, grid, num_prefix_tokens=prefix), std=0.2).eval()
    x = torch.randn(3, prefix + grid[0] * grid[1], 32) * 0.3
    assert_close_rel(layer(x), layer_from_naive(layer, x, grid), 1e-5, "layer vs naive composition")


def test_other_grid_at_run_time():
    layer = randomise_(AgentAttention(32, 2, 9, (8, 8), num_prefix_tokens=1), std=0.2).eval()
    x = torch.randn(2, 1 + 5 * 12, 32) * 0.3
    y = layer(x, grid_size=(5, 12))
    assert_close_rel(y, layer_from_naive(layer, x, (5, 12)), 1e-5, "interpolated grid")
    x8 = torch.randn(2, 65, 32)
    assert torch.equal(layer(x8), layer(x8, grid_size=(8, 8)))


def test_learned_agents():
    layer = randomise_(AgentAttention(16, 2, 4, (4, 4), learned_agents=True), std=0.3)
    assert "agent_tokens" in layer.state_dict() and layer.agent_tokens.shape == (4, 16)
    x = torch.randn(2, 16, 16)
    y = layer(x)
    y.sum().backward()
    assert layer.agent_tokens.grad is not None and layer.agent_tokens.grad.abs().sum() > 0
    with torch.no_grad():
        layer.agent_tokens.add_(1.0)
    assert not torch.allclose(layer(x), y)


def test_pvt_spatial_reduction_and_cswin_shapes():
    pvt = PVTAgentAttention(32, 2, 16, (8, 12), sr_ratio=2)
    assert pvt.ah_bias.shape == (1, 2, 16, 4, 1) and pvt.ha_bias.shape == (1, 2, 8, 1, 16)
    assert pvt(torch.randn(2, 96, 32)).shape == (2, 96, 32)
    assert {"sr.weight", "norm.weight"} <= set(pvt.state_dict())
    assert "sr.weight" not in PVTAgentAttention(32, 2, 16, 8).state_dict()
    cswin = CSwinAgentAttention(32, 2, 9, (6, 6))
    assert cswin(torch.randn(3, 2, 36, 32)).shape == (2, 36, 32)
    assert "get_v.weight" in cswin.state_dict() and "dwc.weight" not in cswin.state_dict()


@pytest.mark.parametrize(
    "layer,x",
    [
        (AgentAttention(16, 2, 4, (4, 4), num_prefix_tokens=1), torch.randn(0, 17, 16)),
        (PVTAgentAttention(16, 2, 4, (4, 4), sr_ratio=2), torch.randn(0, 16, 16)),
        (CSwinAgentAttention(16, 2, 4, (4, 4)), torch.randn(3, 0, 16, 16)),
    ],
)
def test_empty_batch(layer, x):
    y = layer(x)
    assert y.shape[0] == 0 and y.shape[-1] == 16


# -- bad input ---------------------------------------------------------------------------------------
LAYER_ERRORS = [
    (lambda: AgentAttention(16, 2, 4, (4, 4))(torch.randn(17, 16)), ValueError, r"x must be 3-D \(B, N, C\)"),
    (lambda: AgentAttention(16, 2, 4, (4, 4))(torch.randn(2, 16, 8)), ValueError, r"C = dim = 16"),
    (
        lambda: AgentAttention(16, 2, 4, (4, 4))(torch.randn(2, 15, 16)),
        ValueError,
        r"N = 15 tokens, but grid_size = \(4, 4\)",
    ),
    (
        lambda: AgentAttention(16, 2, 4, (4, 4), num_prefix_tokens=1)(torch.randn(2, 16, 16)),
        ValueError,
        r"expects N = 1 \+ 4·4 = 17",
    ),
    (
        lambda: AgentAttention(16, 2, 4, (4, 4))(torch.randn(2, 20, 16), grid_size=(4, 4)),
        ValueError,
        r"grid_size",
    ),
    (
        lambda: AgentAttention(16, 2, 4, (4, 4))(torch.randn(2, 16, 16), grid_size=(0, 4)),
        ValueError,
        r"grid_size must be",
    ),
    (
        lambda: AgentAttention(16, 2, 4, (4, 4))(torch.ones(2, 16, 16, dtype=torch.long)),
        TypeError,
        r"floating-point",
    ),
    (
        lambda: AgentAttention(16, 2, 4, (4, 4))(torch.randn(2, 16, 16, dtype=torch.float64)),
        TypeError,
        r"x has dtype torch.float64 but the layer's parameters are torch.float32",
    ),
    (
        lambda: CSwinAgentAttention(16, 2, 4, (4, 4))(torch.randn(2, 16, 16)),
        ValueError,
        r"qkv must be the stacked projection of shape \(3, B, H·W, C\)",
    ),
    (
        lambda: CSwinAgentAttention(16, 2, 4, (4, 4))(torch.randn(3, 2, 15, 16)),
        ValueError,
        r"qkv has N = 15 tokens",
    ),
    (lambda: AgentAttention(15, 2), ValueError, r"dim \(15\) must be divisible by num_heads \(2\)"),
    (lambda: AgentAttention(16, 0), ValueError, r"num_heads must be a positive int"),
    (lambda: AgentAttention(16, 2, 0), ValueError, r"agent_num must be"),
    (lambda: AgentAttention(16, 2, 4, (4, -1)), ValueError, r"grid_size must be"),
    (lambda: AgentAttention(16, 2, 4, 4, attn_drop=1.5), ValueError, r"attn_drop must be in \[0, 1\)"),
    (lambda: AgentAttention(16, 2, 4, 4, num_prefix_tokens=-1), ValueError, r"num_prefix_tokens"),
    (lambda: PVTAgentAttention(16, 2, 4, (4, 4), sr_ratio=0), ValueError, r"sr_ratio must be a positive int"),
]


@pytest.mark.parametrize("call,exc,match", LAYER_ERRORS)
def test_layer_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_bf16_layers_and_autocast():
    """bf16 weights and inputs, and fp32 weights under CPU autocast, stay close to fp32 (documented 3e-2)."""
    layer = randomise_(AgentAttention(64, 2, 16, (8, 8), num_prefix_tokens=1), std=0.1).eval()
    x = torch.randn(2, 65, 64)
    ref = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = layer(x)
    bf16 = layer.to(torch.bfloat16)(x.bfloat16())
    for name, out in (("autocast", auto), ("bf16", bf16)):
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        assert_close_rel(out.float(), ref, 3e-2, name)


# -- compile -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make,x",
    [
        (lambda: AgentAttention(32, 2, 9, (6, 6), num_prefix_tokens=1), torch.randn(2, 37, 32)),
        (lambda: PVTAgentAttention(32, 2, 4, (6, 6), sr_ratio=2), torch.randn(2, 36, 32)),
        (lambda: CSwinAgentAttention(32, 2, 9, (6, 6)), torch.randn(3, 2, 36, 32)),
    ],
    ids=["deit", "pvt_sr2", "cswin"],
)
def test_compile_fullgraph_matches_eager(make, x):
    torch._dynamo.reset()
    layer = randomise_(make(), std=0.2).eval()
    compiled = torch.compile(layer, fullgraph=True)
    with torch.no_grad():
        assert_close_rel(compiled(x), layer(x), 1e-5, "compiled eval")
    layer.train()
    x = x.clone().requires_grad_()
    y = compiled(x)
    y.sum().backward()
    grad_compiled = x.grad.clone()
    x.grad = None
    layer(x).sum().backward()
    assert_close_rel(y, layer(x), 1e-5, "compiled train")
    assert_close_rel(grad_compiled, x.grad, 1e-4, "compiled grad")


def test_inference_bias_cache_follows_parameter_changes():
    layer = randomise_(AgentAttention(16, 2, 4, (4, 4), num_prefix_tokens=1), std=0.3).eval()
    x = torch.randn(2, 17, 16)
    with torch.inference_mode():
        first = layer(x)
        assert layer.biases((4, 4), (4, 4))[0] is layer.biases((4, 4), (4, 4))[0]  # cached
    with torch.no_grad():
        layer.an_bias.add_(1.0)  # in place: the version counter moves
    with torch.inference_mode():
        assert not torch.allclose(layer(x), first)
        fresh = layer.biases((4, 4), (4, 4))
    uncached = layer.biases.__func__  # recompute with autograd on: never cached
    b1, b2 = uncached(layer, (4, 4), (4, 4))
    assert torch.equal(fresh[0], b1) and torch.equal(fresh[1], b2)
    with torch.inference_mode():
        before = layer(x)
    layer.na_bias = torch.nn.Parameter(torch.randn_like(layer.na_bias))  # replaced, not edited in place
    with torch.inference_mode():
        assert not torch.allclose(layer(x), before)
    other = randomise_(AgentAttention(16, 2, 4, (4, 4), num_prefix_tokens=1), std=0.3, seed=5)
    layer.load_state_dict(other.state_dict())
    with torch.inference_mode():
        assert torch.equal(layer(x), other.eval()(x))
