"""Mixed precision: logits at ±1e4 in bf16/fp16 give finite outputs and gradients within a documented error of
fp64, on both paths of the op (fused SDPA without autograd, explicit matmuls with it) and in the layers.

The op computes its logits and softmax in fp32 for fp16/bf16 inputs (torch's softmax subtracts the row max):
with half-precision logits, |logit| ~ 1e4 is rounded by ±16 (fp16 ±4), enough to move the softmax's weight to
another key. ``test_half_precision_logits_would_fail`` shows that the bound here catches exactly that.
"""

from __future__ import annotations

import pytest
import torch

from agentattn.layers import AgentAttention
from agentattn.ops import agent_attention, naive

from . import figures

LOGIT = 1e4
# Documented: max error / max|fp64 reference| at |logits| up to 1e4 (fp64 on the same rounded inputs).
LARGE_LOGIT_BOUNDS = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-5}
# Gradients (relative to the largest reference gradient): the logits' rounding error grows with |logit|, so fp32
# gradients are good to about 1e4 · 2^-24 · a few at |logits| = 1e4.
LARGE_LOGIT_GRAD_BOUNDS = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-3}
NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def large_logit_inputs(dtype, crowded=False, b=2, h=2, n_q=64, m=80, n=9, d=16, seed=0):
    """q, k, v, agents with max|s·Q·Aᵀ| = max|s·A·Kᵀ| = 1e4 (in fp64 before rounding to ``dtype``).

    ``crowded``: all tokens share one large direction, so every logit is near 1e4 and they differ by tens (many
    similar keys); otherwise the logits spread over ±1e4 and each softmax is nearly one-hot.
    """
    g = torch.Generator().manual_seed(seed)
    q, k, agents = (torch.randn(b, h, L, d, generator=g, dtype=torch.float64) for L in (n_q, m, n))
    v = torch.randn(b, h, m, d, generator=g, dtype=torch.float64)
    if crowded:
        shared = torch.randn(d, generator=g, dtype=torch.float64) * 20
        q, k, agents = q + shared, k + shared, agents + shared
    s = d**-0.5
    q = q * LOGIT / (s * q @ agents.transpose(-1, -2)).abs().max()
    k = k * LOGIT / (s * agents @ k.transpose(-1, -2)).abs().max()
    return [t.to(dtype) for t in (q, k, v, agents)]


def _fwd_bwd(op, inputs, grad=True):
    leaves = [t.detach().clone().requires_grad_(grad) for t in inputs]
    with torch.set_grad_enabled(grad):
        out = op(*leaves)
    if not grad:
        return out, []
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return out, list(torch.autograd.grad((out * weight.to(out.dtype)).sum(), leaves))


def _rel(actual, expected, scale):
    return (actual.double() - expected).abs().max().item() / scale


@pytest.mark.parametrize("crowded", [False, True], ids=["spread", "crowded"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=NAMES.get)
def test_large_logits_finite_and_close_to_fp64(dtype, crowded):
    inputs = large_logit_inputs(dtype, crowded)
    q, _, _, agents = (t.double() for t in inputs)
    assert (q @ agents.transpose(-1, -2) * 16**-0.5).abs().max() > 0.9 * LOGIT  # the logits do reach ±1e4
    ref, ref_grads = _fwd_bwd(naive.agent_attention, [t.double() for t in inputs])
    grad_scale = max(g.abs().max().item() for g in ref_grads)
    bound = LARGE_LOGIT_BOUNDS[dtype]
    for path, grad in (("inference path", False), ("autograd path", True)):
        out, grads = _fwd_bwd(agent_attention, inputs, grad=grad)
        assert out.dtype == dtype and torch.isfinite(out).all(), f"{path}: non-finite output"
        err = _rel(out, ref, ref.abs().max().item())
        key = f"{NAMES[dtype]} {path} output"
        figures.MIXED[key] = max(figures.MIXED.get(key, 0.0), err)
        assert err <= bound, f"{NAMES[dtype]} {path}: output error {err:.3e} > {bound:g}"
        for name, got, want in zip("q k v agents".split(), grads, ref_grads, strict=True) if grad else ():
            assert torch.isfinite(got).all(), f"non-finite grad {name}"
            err = _rel(got, want, grad_scale)
            key = f"{NAMES[dtype]} gradients"
            figures.MIXED[key] = max(figures.MIXED.get(key, 0.0), err)
            limit = LARGE_LOGIT_GRAD_BOUNDS[dtype]
            assert err <= limit, f"{NAMES[dtype]} grad {name}: error {err:.3e} > {limit:g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=NAMES.get)
def test_half_precision_logits_would_fail(dtype):
    """The op computed in bf16 itself (logits rounded to bf16: ±32 at 1e4) misses the bound by far: the test can
    fail. (fp16 rounds 1e4 to ±4, which these crowded logits, tens apart, survive.)"""
    inputs = large_logit_inputs(dtype, crowded=True)
    ref, _ = _fwd_bwd(naive.agent_attention, [t.double() for t in inputs], grad=False)
    half, _ = _fwd_bwd(naive.agent_attention, inputs, grad=False)
    err = _rel(half, ref, ref.abs().max().item())
    figures.MIXED[f"{NAMES[dtype]} logits kept in {NAMES[dtype]} (not done)"] = err
    assert err > LARGE_LOGIT_BOUNDS[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=NAMES.get)
def test_layer_large_activations_half_and_autocast(dtype):
    """A layer in bf16/fp16 weights, and fp32 weights under CPU autocast, on inputs of magnitude 300."""
    torch.manual_seed(0)
    layer = AgentAttention(32, 2, 9, (6, 6), num_prefix_tokens=1)
    x = torch.randn(2, 37, 32) * 300
    for name, run in (
        ("weights", lambda: layer.to(dtype)(x.to(dtype).requires_grad_())),
        ("autocast", lambda: _autocast(layer.float(), x.requires_grad_(), dtype)),
    ):
        out = run()
        out.float().square().mean().backward()
        grads = [p.grad for p in layer.parameters()]
        assert torch.isfinite(out).all(), f"{name}: non-finite output"
        assert all(torch.isfinite(g).all() for g in grads), f"{name}: non-finite gradient"
        layer.zero_grad(set_to_none=True)


def _autocast(layer, x, dtype):
    with torch.autocast("cpu", dtype=dtype):
        return layer(x)


def test_uninitialised_reads_show_as_nan():
    """tests/conftest.py fills torch.empty with NaN (fla's trick), so a kernel reading unwritten memory fails."""
    assert torch.isnan(torch.empty(4, 3)).all()
    assert torch.isnan(torch.empty(2, dtype=torch.bfloat16)).all()
