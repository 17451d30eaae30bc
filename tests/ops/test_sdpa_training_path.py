"""The GPU training path (SDPA under autograd), exercised on CPU by enabling it for the CPU device.

On CUDA, ``agent_attention`` trains small problems (below ``CUDA_LARGE_WORK``) through
``scaled_dot_product_attention`` (memory-efficient kernel, additive mask with gradient) instead of explicit matmuls. No GPU is available in CI, so the same dispatch is switched on
for CPU here, where SDPA runs its math kernel: outputs and gradients must match the naive reference.
"""

from __future__ import annotations

import pytest
import torch

from agentattn.ops import agent as agent_module
from agentattn.ops import naive
from tests.conftest import assert_close_rel


def _inputs(device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    b, h, n_q, n_k, n, d = 2, 3, 17, 13, 4, 8
    t = {
        "q": torch.randn(b, h, n_q, d, generator=g),
        "k": torch.randn(b, h, n_k, d, generator=g),
        "v": torch.randn(b, h, n_k, d, generator=g),
        "agents": torch.randn(b, h, n, d, generator=g),
        "agent_bias": torch.randn(1, h, n, n_k, generator=g),
        "query_bias": torch.randn(1, h, n_q, n, generator=g),
    }
    return {k: v.to(device, dtype).requires_grad_() for k, v in t.items()}


@pytest.mark.parametrize("padding", [False, True])
def test_sdpa_training_path_matches_naive(monkeypatch, padding):
    monkeypatch.setattr(agent_module, "SDPA_TRAINING_DEVICES", ("cpu", "cuda"))
    calls = []
    original = agent_module._attend_sdpa
    monkeypatch.setattr(agent_module, "_attend_sdpa", lambda *a: calls.append(1) or original(*a))
    t = _inputs()
    mask = torch.zeros(2, 13, dtype=torch.bool)
    if padding:
        mask[0, -3:] = True
    kwargs = {"key_padding_mask": mask if padding else None}
    out = agent_module.agent_attention(**t, **kwargs)
    assert len(calls) == 2, "both attention steps must go through SDPA under autograd"
    ref_t = {k: v.detach().double().requires_grad_() for k, v in t.items()}
    ref = naive.agent_attention(**ref_t, **kwargs)
    assert_close_rel(out, ref, 1e-5, "output")
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad.double())
    for name in t:
        assert_close_rel(t[name].grad, ref_t[name].grad, 1e-5, f"grad {name}")


def test_cpu_training_keeps_explicit_matmuls(monkeypatch):
    calls = []
    original = agent_module._attend_sdpa
    monkeypatch.setattr(agent_module, "_attend_sdpa", lambda *a: calls.append(1) or original(*a))
    agent_module.agent_attention(**_inputs()).sum().backward()
    assert calls == []


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (the CPU test above covers the logic)"
)
def test_cuda_bf16_training_matches_naive():
    t = _inputs("cuda", torch.bfloat16)
    out = agent_module.agent_attention(**t)
    ref_t = {k: v.detach().double().requires_grad_() for k, v in t.items()}
    ref = naive.agent_attention(**ref_t)
    assert_close_rel(out, ref, 2e-2, "bf16 output")
    out.float().sum().backward()
    ref.sum().backward()
    for name in t:
        assert_close_rel(t[name].grad, ref_t[name].grad, 5e-2, f"bf16 grad {name}")
