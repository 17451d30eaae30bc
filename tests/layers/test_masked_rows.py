"""Fully masked bias rows through the layers: every module-level path (packed CPU training op, generic autograd
path, no-grad inference, attention recording) gives the naive reference's answer, with finite gradients."""

from __future__ import annotations

import pytest
import torch

from agentattn.layers import AgentAttention, record_agent_attention
from agentattn.layers import agent_attention as layer_module
from agentattn.ops import naive
from tests.conftest import assert_close_rel

INF = float("inf")


def _layer_with_masked_rows(monkeypatch, prefix: int):
    """An AgentAttention whose B1 and B2 carry -inf rows: fully masked ones (agents 4 of head 1 and 0 of head 0;
    queries 0 of head 0 and 7 of head 1) and partial ones."""
    torch.manual_seed(0)
    layer = AgentAttention(32, num_heads=2, agent_num=9, grid_size=(6, 6), num_prefix_tokens=prefix).train()
    tokens = prefix + 36
    extra1 = torch.zeros(1, 2, 9, tokens)
    extra2 = torch.zeros(1, 2, tokens, 9)
    extra1[0, 1, 4] = -INF
    extra1[0, 0, 0] = -INF
    extra1[0, 0, 2, ::3] = -INF  # partial
    extra2[0, 0, 0] = -INF
    extra2[0, 1, 7] = -INF
    extra2[0, 1, 9, 1:] = -INF  # partial
    original = layer.biases

    def biases(key_grid, query_grid):
        b1, b2 = original(key_grid, query_grid)
        return b1 + extra1, b2 + extra2

    monkeypatch.setattr(layer, "biases", biases)
    return layer


@pytest.mark.parametrize("prefix", [0, 1])
def test_layer_paths_match_the_naive_reference(monkeypatch, prefix):
    layer = _layer_with_masked_rows(monkeypatch, prefix)
    x = torch.randn(3, prefix + 36, 32, requires_grad=True)
    leaves = [x, *layer.parameters()]
    names = ["x", *(name for name, _ in layer.named_parameters())]

    def forward_backward():
        out = layer(x)
        return out, torch.autograd.grad(out.square().sum(), leaves)

    calls = []
    packed = layer_module.agent_attention_packed
    monkeypatch.setattr(
        layer_module, "agent_attention_packed", lambda *a, **k: calls.append(1) or packed(*a, **k)
    )
    results = {"packed": forward_backward()}
    assert calls, "the packed path was not taken"
    monkeypatch.setattr(layer_module, "packed_path_applies", lambda qkv: False)
    results["generic"] = forward_backward()
    with torch.no_grad():
        no_grad = layer(x)
    monkeypatch.setattr(layer_module, "agent_attention", naive.agent_attention)
    ref, ref_grads = forward_backward()

    assert torch.isfinite(ref).all() and all(torch.isfinite(g).all() for g in ref_grads)
    assert_close_rel(no_grad, ref, 1e-5, "no-grad output")
    for path, (out, grads) in results.items():
        assert_close_rel(out, ref, 1e-5, f"{path} output")
        for name, got, want in zip(names, grads, ref_grads, strict=True):
            assert torch.isfinite(got).all(), f"{path}: NaN/inf in grad {name}"
            assert_close_rel(got, want, 1e-5, f"{path} grad {name}", floor=ref.abs().max().item())


def test_recorded_maps_are_zero_on_fully_masked_rows(monkeypatch):
    layer = _layer_with_masked_rows(monkeypatch, 1).eval()
    with torch.no_grad(), record_agent_attention(layer) as maps:
        layer(torch.randn(2, 37, 32))
    (record,) = maps
    assert torch.isfinite(record.agent_probs).all() and torch.isfinite(record.query_probs).all()
    assert torch.equal(record.agent_probs[:, 1, 4], torch.zeros_like(record.agent_probs[:, 1, 4]))
    assert torch.equal(record.query_probs[:, 1, 7], torch.zeros_like(record.query_probs[:, 1, 7]))
    assert_close_rel(record.query_probs[:, 1, 9].sum(-1), torch.ones(2), 1e-6, "partial row")
