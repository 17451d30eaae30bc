"""Causal retention (RetNet's fixed-decay linear attention): chunked and recurrent forms against the naive one."""

from __future__ import annotations

import pytest
import torch

from agentattn.ops import naive
from agentattn.ops.causal_retention import (
    causal_retention,
    causal_retention_prefill,
    causal_retention_step,
    retention_decays,
)
from tests.conftest import assert_close_rel

B, H, D, DV = 2, 3, 8, 5


def _inputs(T: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(T)
    q, k = (torch.randn(B, H, T, D, generator=g, dtype=dtype) for _ in range(2))
    return q, k, torch.randn(B, H, T, DV, generator=g, dtype=dtype)


def test_decays_are_retnets():
    assert torch.allclose(retention_decays(4), 1 - 2.0 ** torch.tensor([-5.0, -6.0, -7.0, -8.0]))


@pytest.mark.parametrize("T, chunk", [(1, 4), (7, 4), (16, 4), (37, 8), (37, 64)])
def test_chunked_matches_naive_outputs_and_grads(T, chunk):
    gamma = retention_decays(H).double()
    leaves = [t.requires_grad_() for t in _inputs(T)]
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = causal_retention(*leaves, gamma, chunk_size=chunk)
    ref = naive.causal_retention(*ref_leaves, gamma)
    assert_close_rel(out, ref, 1e-10, "output")
    weight = torch.randn_like(ref)
    (out * weight).sum().backward()
    (ref * weight).sum().backward()
    for name, a, b in zip("qkv", leaves, ref_leaves, strict=True):
        assert_close_rel(a.grad, b.grad, 1e-10, f"d{name}")


def test_fp32_matches_fp64():
    gamma = retention_decays(H)
    q, k, v = _inputs(50)
    ref = naive.causal_retention(q, k, v, gamma.double())
    assert_close_rel(
        causal_retention(q.float(), k.float(), v.float(), gamma, chunk_size=16), ref, 1e-5, "fp32"
    )


@pytest.mark.parametrize("prefix", [1, 9, 20])
def test_prefill_then_steps_matches_naive(prefix):
    gamma = retention_decays(H).double()
    q, k, v = _inputs(29)
    ref = naive.causal_retention(q, k, v, gamma)
    state = causal_retention_prefill(k[:, :, :prefix], v[:, :, :prefix], gamma)
    steps = [
        causal_retention_step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], gamma, state)
        for t in range(prefix, 29)
    ]
    assert state.t == 29 and state.nbytes() == B * H * D * DV * 8  # fixed size, whatever the length
    assert_close_rel(torch.cat(steps, dim=2), ref[:, :, prefix:], 1e-10, "decode")


def test_causality_bit_identical():
    gamma = retention_decays(H)
    q, k, v = _inputs(24, torch.float32)
    out = causal_retention(q, k, v, gamma, chunk_size=8)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    q2[:, :, 13:], k2[:, :, 13:], v2[:, :, 13:] = 5.0, -3.0, 7.0  # change the future only
    assert torch.equal(causal_retention(q2, k2, v2, gamma, chunk_size=8)[:, :, :13], out[:, :, :13])


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda q, k, v, g: (q[0], k, v, g), ValueError, "q must be 4-D"),
        (lambda q, k, v, g: (q, k[:, :, :3], v, g), ValueError, "disagree"),
        (lambda q, k, v, g: (q, k, v, g[:2]), ValueError, r"gamma must be \(H,\)"),
        (lambda q, k, v, g: (q, k.float(), v, g), TypeError, "dtype of q"),
    ],
)
def test_bad_input(mutate, exc, match):
    args = mutate(*_inputs(5), retention_decays(H).double())
    with pytest.raises(exc, match=match):
        causal_retention(*args)
