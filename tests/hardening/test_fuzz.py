"""Property-based tests: the fast op and every layer against the naive reference in float64, on random shapes,
dtypes (fp32, bf16, fp16), biases, masks, learned or pooled agents and prefix tokens; gradcheck in float64.

Inputs are drawn in float64 and rounded to the tested dtype once; the reference runs in float64 on exactly
those rounded values, so the error measured is the computation's, not the input rounding's. Errors are relative
to max|reference| (gradients: to the largest reference gradient, since some are zero in exact arithmetic).
The bounds (ERROR_BOUNDS) are the documented accuracy of each dtype; the largest errors seen are printed in the
"hardening figures" summary.
"""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call

import agentattn.layers.agent_attention as agent_layers
from agentattn.layers import (
    AgentAttention,
    CSwinAgentAttention,
    LinearAttention,
    PVTAgentAttention,
    SoftmaxAttention,
)
from agentattn.ops import agent_attention, linear_attention, naive

from . import figures

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Documented accuracy: max error / max|fp64 reference| (outputs; gradients use the same bound).
ERROR_BOUNDS = {"fp32": 1e-5, "bf16": 2e-2, "fp16": 4e-3}


def _rel_error(actual: torch.Tensor, expected: torch.Tensor, scale: float | None = None) -> float:
    if expected.numel() == 0:
        return 0.0
    scale = expected.abs().max().item() if scale is None else scale
    return (actual.double() - expected).abs().max().item() / max(scale, 1e-30)


def _check(dtype: str, what: str, actual, expected, scale=None) -> None:
    err = _rel_error(actual, expected, scale)
    figures.record_error(dtype, what, err)
    assert err <= ERROR_BOUNDS[dtype], f"{dtype} {what}: error {err:.3e} > {ERROR_BOUNDS[dtype]:g} × max|ref|"


@st.composite
def op_inputs(draw):
    b, h = draw(st.integers(0, 3)), draw(st.integers(1, 3))
    n_q, m, n = draw(st.integers(1, 40)), draw(st.integers(1, 40)), draw(st.integers(1, 12))
    d = draw(st.sampled_from([1, 2, 4, 8, 16, 32]))
    d_v = draw(st.sampled_from([d, 1, 5]))
    bias1 = draw(st.sampled_from([None, (b, h, n, m), (1, h, n, m), (n, m), (1, 1, 1, m)]))
    bias2 = draw(st.sampled_from([None, (b, h, n_q, n), (1, h, n_q, n), (n_q, n), (n,)]))
    mask = draw(st.sampled_from([None, "random", "one row all padded"]))
    scale = draw(st.one_of(st.none(), st.floats(0.05, 2.0)))
    std = draw(st.sampled_from([0.1, 1.0, 3.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(b=b, h=h, n_q=n_q, m=m, n=n, d=d, d_v=d_v, bias1=bias1, bias2=bias2, mask=mask, scale=scale,
                std=std, seed=seed)  # fmt: skip


def _make_op_tensors(p: dict, dtype: torch.dtype):
    g = torch.Generator().manual_seed(p["seed"])

    def rnd(*shape, std=p["std"]):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype)

    b, h = p["b"], p["h"]
    tensors = {
        "q": rnd(b, h, p["n_q"], p["d"]),
        "k": rnd(b, h, p["m"], p["d"]),
        "v": rnd(b, h, p["m"], p["d_v"], std=1.0),
        "agents": rnd(b, h, p["n"], p["d"]),
    }
    if p["bias1"] is not None:
        tensors["agent_bias"] = rnd(*p["bias1"], std=0.5)
    if p["bias2"] is not None:
        tensors["query_bias"] = rnd(*p["bias2"], std=0.5)
    mask = None
    if p["mask"] is not None:
        mask = torch.rand(b, p["m"], generator=g) < 0.4
        if p["mask"] == "one row all padded" and b:
            mask[0] = True
    return tensors, mask


def _op_with_grads(op, tensors, mask, scale, seed):
    leaves = {k: t.detach().clone().requires_grad_() for k, t in tensors.items()}
    out = op(leaves["q"], leaves["k"], leaves["v"], leaves["agents"], scale=scale, key_padding_mask=mask,
             agent_bias=leaves.get("agent_bias"), query_bias=leaves.get("query_bias"))  # fmt: skip
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    grads = torch.autograd.grad((out * weight.to(out.dtype)).sum(), list(leaves.values()), allow_unused=True)
    return out, dict(zip(leaves, grads, strict=True))


@given(p=op_inputs(), dtype=st.sampled_from(list(DTYPES)))
def test_fast_op_matches_naive_fp64(p, dtype):
    figures.FUZZ_CASES["op vs naive"] += 1
    tensors, mask = _make_op_tensors(p, DTYPES[dtype])
    ref_out, ref_grads = _op_with_grads(
        naive.agent_attention, {k: t.double() for k, t in tensors.items()}, mask, p["scale"], p["seed"]
    )
    out, grads = _op_with_grads(agent_attention, tensors, mask, p["scale"], p["seed"])
    assert out.dtype == DTYPES[dtype] and out.shape == ref_out.shape
    _check(dtype, "op output (autograd path)", out, ref_out)
    with torch.inference_mode():
        q, k, v, agents = (tensors[n] for n in ("q", "k", "v", "agents"))
        fused = agent_attention(q, k, v, agents, scale=p["scale"], key_padding_mask=mask,
                                agent_bias=tensors.get("agent_bias"), query_bias=tensors.get("query_bias"))  # fmt: skip
    _check(dtype, "op output (inference path)", fused, ref_out)
    grad_scale = max(
        (g.abs().max().item() for g in ref_grads.values() if g is not None and g.numel()), default=0
    )
    for name, ref in ref_grads.items():
        if ref is not None and grads[name] is not None:
            _check(dtype, "op gradients", grads[name], ref, scale=grad_scale)


# -- layers -----------------------------------------------------------------------------------------------------


@st.composite
def layer_configs(draw):
    family = draw(st.sampled_from(["agent", "pvt", "cswin", "softmax", "linear"]))
    heads, head_dim = draw(st.integers(1, 3)), draw(st.sampled_from([2, 4, 8]))
    sr = draw(st.integers(1, 3)) if family == "pvt" else 1
    grid = (draw(st.integers(sr, 6)), draw(st.integers(sr, 6)))
    prefix = draw(st.integers(0, 2)) if family in ("agent", "linear") else 0
    return dict(
        family=family, dim=heads * head_dim, heads=heads, grid=grid, sr=sr, prefix=prefix,
        agent_num=draw(st.integers(1, 16)), learned=draw(st.booleans()), batch=draw(st.integers(0, 3)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )  # fmt: skip


def make_layer(c: dict) -> torch.nn.Module:
    dim, heads, grid, n = c["dim"], c["heads"], c["grid"], c["agent_num"]
    layer = {
        "agent": lambda: AgentAttention(
            dim, heads, n, grid, num_prefix_tokens=c["prefix"], learned_agents=c["learned"]
        ),
        "pvt": lambda: PVTAgentAttention(dim, heads, n, grid, sr_ratio=c["sr"], learned_agents=c["learned"]),
        "cswin": lambda: CSwinAgentAttention(dim, heads, n, grid, learned_agents=c["learned"]),
        "softmax": lambda: SoftmaxAttention(dim, heads),
        "linear": lambda: LinearAttention(dim, heads, grid, num_prefix_tokens=c["prefix"]),
    }[c["family"]]()
    g = torch.Generator().manual_seed(c["seed"])
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return layer.eval()


def layer_input(c: dict, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(c["seed"] + 1)
    tokens = c["prefix"] + c["grid"][0] * c["grid"][1]
    shape = (3, c["batch"], tokens, c["dim"]) if c["family"] == "cswin" else (c["batch"], tokens, c["dim"])
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def _layer_with_grads(layer, x):
    x = x.detach().clone().requires_grad_()
    out = layer(x)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    params = [p for p in layer.parameters()]
    grads = torch.autograd.grad((out * weight.to(out.dtype)).sum(), [x, *params], allow_unused=True)
    return out, grads


@given(c=layer_configs(), dtype=st.sampled_from(list(DTYPES)))
def test_layers_match_naive_fp64(c, dtype):
    figures.FUZZ_CASES["layers vs naive"] += 1
    layer = make_layer(c).to(DTYPES[dtype])
    x = layer_input(c, DTYPES[dtype])
    reference = copy.deepcopy(layer).double()
    with mock.patch.object(agent_layers, "agent_attention", naive.agent_attention):
        ref_out, ref_grads = _layer_with_grads(reference, x.double())
    out, grads = _layer_with_grads(layer, x)
    assert out.dtype == DTYPES[dtype] and out.shape == ref_out.shape
    _check(dtype, "layer output", out, ref_out)
    grad_scale = max((g.abs().max().item() for g in ref_grads if g is not None and g.numel()), default=0.0)
    for got, want in zip(grads, ref_grads, strict=True):
        if got is not None and want is not None:
            _check(dtype, "layer gradients", got, want, scale=grad_scale)


# -- gradcheck in float64 ---------------------------------------------------------------------------------------


def test_gradcheck_op():
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)  # noqa: E731
    q, k, v, agents = rnd(2, 1, 3, 2), rnd(2, 1, 4, 2), rnd(2, 1, 4, 3), rnd(2, 1, 2, 2)
    b1, b2 = rnd(1, 1, 2, 4), rnd(2, 1, 3, 2)
    mask = torch.tensor([[False, True, False, False], [True] * 4])  # the second sequence is all padding
    for op in (agent_attention, naive.agent_attention):
        fn = lambda *t, op=op: op(*t[:4], agent_bias=t[4], query_bias=t[5], key_padding_mask=mask, scale=0.7)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (q, k, v, agents, b1, b2))
    assert torch.autograd.gradcheck(lambda *t: linear_attention(*t), (q, k, v))
    figures.FUZZ_CASES["gradcheck"] += 3


GRADCHECK_LAYERS = [
    dict(family="agent", dim=4, heads=2, grid=(2, 3), sr=1, prefix=1, agent_num=4, learned=False, batch=2, seed=1),
    dict(family="agent", dim=4, heads=2, grid=(2, 2), sr=1, prefix=0, agent_num=3, learned=True, batch=1, seed=2),
    dict(family="pvt", dim=4, heads=2, grid=(4, 2), sr=2, prefix=0, agent_num=4, learned=False, batch=1, seed=3),
    dict(family="cswin", dim=4, heads=1, grid=(2, 3), sr=1, prefix=0, agent_num=2, learned=False, batch=1, seed=4),
    dict(family="softmax", dim=4, heads=2, grid=(2, 2), sr=1, prefix=0, agent_num=1, learned=False, batch=2, seed=5),
    dict(family="linear", dim=4, heads=2, grid=(2, 2), sr=1, prefix=1, agent_num=1, learned=False, batch=1, seed=6),
]  # fmt: skip


@pytest.mark.parametrize("c", GRADCHECK_LAYERS, ids=lambda c: f"{c['family']}-learned{int(c['learned'])}")
def test_gradcheck_layers(c):
    """Gradients of every layer family with respect to the input and every parameter, in float64."""
    layer = make_layer(c).double()
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in layer.parameters())
    x = layer_input(c).requires_grad_()

    def fn(x, *flat):
        return functional_call(layer, dict(zip(names, flat, strict=True)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *params), fast_mode=True)
    figures.FUZZ_CASES["gradcheck"] += 1


def test_profile_is_bounded_and_derandomised_by_default():
    import os

    if os.environ.get("HYPOTHESIS_PROFILE", "ci") == "ci":
        current = settings()
        assert current.derandomize and current.max_examples <= 50 and current.database is None
