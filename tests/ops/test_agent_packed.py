"""The packed training op: outputs and every gradient against autograd through ``agent_attention``, gradcheck."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from agentattn.layers import AgentAttention
from agentattn.layers import agent_attention as layer_module
from agentattn.ops import agent_attention, naive
from agentattn.ops.agent_packed import agent_attention_packed, packed_path_applies
from tests.conftest import assert_close_rel

# (B, heads, C, grid, agent grid, prefix): divisible and non-divisible pooling, with and without a cls token.
CASES = [
    (3, 2, 16, (6, 6), (3, 3), 1),
    (2, 3, 24, (5, 7), (2, 3), 0),
    (2, 3, 48, (14, 14), (7, 7), 1),
    (4, 4, 32, (7, 7), (3, 3), 0),
]


def _inputs(batch, heads, channels, grid, agent_grid, prefix, dtype=torch.float32, seed=0, kernel=3):
    g = torch.Generator().manual_seed(seed)
    tokens, n = prefix + grid[0] * grid[1], agent_grid[0] * agent_grid[1]
    qkv = torch.randn(batch, tokens, 3 * channels, generator=g, dtype=dtype).requires_grad_()
    bias1 = (torch.randn(1, heads, n, tokens, generator=g, dtype=dtype) * 0.5).requires_grad_()
    bias2 = (torch.randn(1, heads, tokens, n, generator=g, dtype=dtype) * 0.5).requires_grad_()
    weight = (torch.randn(channels, 1, kernel, kernel, generator=g, dtype=dtype) * 0.3).requires_grad_()
    conv_bias = (torch.randn(channels, generator=g, dtype=dtype) * 0.1).requires_grad_()
    return qkv, bias1, bias2, weight, conv_bias


def _reference(qkv, bias1, bias2, weight, conv_bias, heads, grid, agent_grid, prefix, attention=None):
    """The same computation as plain autograd ops: split, pool, head split, ``agent_attention`` (matmuls, or the
    ``attention`` given), DWC."""
    channels = qkv.shape[-1] // 3
    q, k, v = qkv.split(channels, dim=-1)
    q_map = q[:, prefix:].unflatten(1, grid).permute(0, 3, 1, 2)
    agents = F.adaptive_avg_pool2d(q_map, agent_grid).flatten(2).transpose(1, 2)

    def heads_of(x):
        return x.unflatten(-1, (heads, channels // heads)).transpose(1, 2)

    if attention is None:
        attention = functools.partial(agent_attention, backend="matmul")
    out = attention(
        heads_of(q), heads_of(k), heads_of(v), heads_of(agents), agent_bias=bias1, query_bias=bias2,
    ).transpose(1, 2).flatten(2)  # fmt: skip
    v_map = v[:, prefix:].unflatten(1, grid).permute(0, 3, 1, 2)
    local = F.conv2d(v_map, weight, conv_bias, padding=weight.shape[-1] // 2, groups=channels)
    return out + F.pad(local.flatten(2).transpose(1, 2), (0, 0, prefix, 0))


def _packed(inputs, heads, grid, agent_grid, prefix):
    return agent_attention_packed(
        *inputs, num_heads=heads, grid_size=grid, agent_grid=agent_grid, num_prefix_tokens=prefix
    )


NAMES = ("qkv", "agent_bias", "query_bias", "dwc_weight", "dwc_bias")


@pytest.mark.parametrize("case", CASES)
def test_outputs_and_gradients_match_autograd(case):
    batch, heads, channels, grid, agent_grid, prefix = case
    inputs = _inputs(*case)
    out = _packed(inputs, heads, grid, agent_grid, prefix)
    ref = _reference(*inputs, heads, grid, agent_grid, prefix)
    assert out.shape == (batch, prefix + grid[0] * grid[1], channels)
    assert_close_rel(out, ref, 1e-5, "out")
    g_out = torch.randn_like(out)
    grads = torch.autograd.grad((out * g_out).sum(), inputs)
    ref_grads = torch.autograd.grad((ref * g_out).sum(), inputs)
    for name, got, want in zip(NAMES, grads, ref_grads, strict=True):
        assert_close_rel(got, want, 1e-5, f"grad {name}")


def test_frozen_biases_no_conv_bias_and_a_5x5_kernel():
    """Biases and conv weight without grad, no conv bias, k = 5: qkv's gradient still matches."""
    qkv, bias1, bias2, weight, _ = _inputs(*CASES[0], kernel=5)
    inputs = (qkv, bias1.detach(), bias2.detach(), weight.detach(), None)
    out = _packed(inputs, 2, (6, 6), (3, 3), 1)
    ref = _reference(*inputs, 2, (6, 6), (3, 3), 1)
    assert_close_rel(out, ref, 1e-5, "out")
    (grad,) = torch.autograd.grad(out.square().sum(), qkv)
    (want,) = torch.autograd.grad(ref.square().sum(), qkv)
    assert_close_rel(grad, want, 1e-5, "grad qkv")


@pytest.mark.parametrize("case", [(2, 2, 8, (4, 4), (2, 2), 1), (1, 2, 8, (3, 5), (2, 3), 0)])
def test_gradcheck_float64(case):
    _, heads, _, grid, agent_grid, prefix = case
    inputs = _inputs(*case, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *x: _packed(x, heads, grid, agent_grid, prefix), inputs)


def _mask_rows(bias1, bias2, rows):
    """Set rows of B1 (1, h, n, M) / B2 (1, h, N, n) to -inf in place: partial rows always, fully masked ones by
    ``rows``. Returns the fully masked rows as bool (1, h, n) and (1, h, N)."""
    inf = float("inf")
    with torch.no_grad():
        bias1[0, 0, 0, ::3] = -inf  # partial rows: ordinary softmaxes over their finite entries
        bias2[0, 1, 5, 1:] = -inf
        if rows in ("agent_bias", "both"):
            bias1[0, 1, 4] = -inf
            bias1[0, 0, -1] = -inf
        if rows in ("query_bias", "both"):
            bias2[0, 0, 0] = -inf  # the cls query of head 0: no DWC term, so a zero output slice
            bias2[0, 1, 20] = -inf
        if rows == "all":
            bias1.fill_(-inf)
            bias2.fill_(-inf)
    return (bias1 == -inf).all(-1), (bias2 == -inf).all(-1)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("rows", ["agent_bias", "query_bias", "both", "all"])
def test_fully_masked_bias_rows_match_the_naive_reference(rows, grad):
    """A row of B1 or B2 at -inf everywhere attends to nothing, as in every path of ``agent_attention``: against
    the naive op (outputs and every gradient), finite gradients, zero gradients on those rows."""
    case = CASES[0]
    _, heads, channels, grid, agent_grid, prefix = case
    inputs = _inputs(*case)
    dead1, dead2 = _mask_rows(inputs[1], inputs[2], rows)
    with torch.set_grad_enabled(grad):
        out = _packed(inputs, heads, grid, agent_grid, prefix)
        ref = _reference(*inputs, heads, grid, agent_grid, prefix, attention=naive.agent_attention)
    assert torch.isfinite(out).all()
    assert_close_rel(out, ref, 1e-5, "out")
    d = channels // heads
    if rows != "agent_bias":  # the cls query's attention output in head 0 is zero, and it has no DWC term
        assert torch.equal(out[:, 0, :d], torch.zeros_like(out[:, 0, :d]))
    if not grad:
        return
    g_out = torch.randn_like(out)
    grads = torch.autograd.grad((out * g_out).sum(), inputs)
    ref_grads = torch.autograd.grad((ref * g_out).sum(), inputs)
    for name, got, want in zip(NAMES, grads, ref_grads, strict=True):
        assert torch.isfinite(got).all(), f"NaN/inf in grad {name}"
        assert_close_rel(got, want, 1e-5, f"grad {name}", floor=ref.abs().max().item())
    assert torch.equal(grads[1][dead1], torch.zeros_like(grads[1][dead1]))
    assert torch.equal(grads[2][dead2], torch.zeros_like(grads[2][dead2]))


def test_gradcheck_float64_with_fully_masked_rows():
    case = (2, 2, 8, (4, 4), (2, 2), 1)
    _, heads, _, grid, agent_grid, prefix = case
    inputs = _inputs(*case, dtype=torch.float64)
    with torch.no_grad():
        inputs[1][0, 1, 2] = float("-inf")
        inputs[2][0, 0, 3] = float("-inf")
        inputs[2][0, 1, 4, 1:] = float("-inf")
    assert torch.autograd.gradcheck(lambda *x: _packed(x, heads, grid, agent_grid, prefix), inputs)


def test_bad_input_is_named():
    qkv, bias1, bias2, weight, conv_bias = _inputs(*CASES[0])
    kwargs = dict(num_heads=2, grid_size=(6, 6), agent_grid=(3, 3), num_prefix_tokens=1)
    with pytest.raises(ValueError, match="qkv must be"):
        agent_attention_packed(qkv[..., :-1], bias1, bias2, weight, conv_bias, **kwargs)
    with pytest.raises(ValueError, match="expects 37"):
        agent_attention_packed(qkv[:, 1:], bias1, bias2, weight, conv_bias, **kwargs)
    with pytest.raises(ValueError, match="agent_bias must have shape"):
        agent_attention_packed(qkv, bias1[..., 1:], bias2, weight, conv_bias, **kwargs)
    with pytest.raises(TypeError, match="query_bias must match"):
        agent_attention_packed(qkv, bias1, bias2.double(), weight, conv_bias, **kwargs)
    with pytest.raises(ValueError, match="dwc_weight must be"):
        agent_attention_packed(qkv, bias1, bias2, weight[..., :2, :2], conv_bias, **kwargs)
    with pytest.raises(ValueError, match="dwc_bias must have shape"):
        agent_attention_packed(qkv, bias1, bias2, weight, conv_bias[1:], **kwargs)


def test_applies_only_to_cpu_training():
    qkv = torch.randn(2, 5, 12, requires_grad=True)
    assert packed_path_applies(qkv)
    assert not packed_path_applies(qkv.detach())
    with torch.no_grad():
        assert not packed_path_applies(qkv)
    assert not packed_path_applies(qkv.half())


def _agent_layer(prefix):
    return AgentAttention(32, num_heads=2, agent_num=9, grid_size=(6, 6), num_prefix_tokens=prefix)


def _downstream_swin_layer(prefix):
    """Agent-Swin's layer pooling onto a downstream agent grid (more agents than it was built with)."""
    return AgentAttention(32, num_heads=2, agent_num=9, grid_size=(6, 6), target_agent_grid=(4, 5))


@pytest.mark.parametrize(
    "make_layer, prefix", [(_agent_layer, 0), (_agent_layer, 1), (_downstream_swin_layer, 0)]
)
def test_layer_training_step_matches_unpacked_path(monkeypatch, make_layer, prefix):
    """A layer in train mode (packed path) against the same layer forced onto the autograd path."""
    torch.manual_seed(0)
    layer = make_layer(prefix).train()
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
