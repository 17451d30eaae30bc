"""Causal agent attention: chunked and recurrent forms against the naive O(T²) reference, causality, stability."""

from __future__ import annotations

import pytest
import torch

from agentattn.ops import causal_agent_attention, naive
from agentattn.ops.causal_agent import causal_agent_init_state, causal_agent_prefill, causal_agent_step
from agentattn.ops.causal_linear import (
    causal_linear_attention,
    causal_linear_init_state,
    causal_linear_prefill,
    causal_linear_step,
)
from tests.conftest import assert_close_rel

H, D, N_AGENTS = 2, 8, 5


def _inputs(B=2, T=37, dtype=torch.float32, scale=1.0, dv=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, T, D, generator=g) * scale for _ in range(2))
    v = torch.randn(B, H, T, dv, generator=g) * scale
    agents = torch.randn(H, N_AGENTS, D, generator=g) * scale
    decay = torch.rand(H, N_AGENTS, generator=g) * 0.5
    bias = torch.randn(H, N_AGENTS, generator=g)
    return [t.to(dtype) for t in (q, k, v, agents)] + [decay, bias]


def _steps(q, k, v, agents, decay, bias, chunk_size, state=None, start=0):
    B, _, T, d = q.shape
    if state is None:
        state = causal_agent_init_state(B, H, agents.shape[1], d, v.shape[-1], chunk_size, dtype=q.dtype)
    outs = [
        causal_agent_step(
            q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], agents, state, decay, bias
        )
        for t in range(start, T)
    ]
    return torch.cat(outs, dim=2), state


@pytest.mark.parametrize("T, chunk", [(1, 4), (3, 4), (8, 4), (9, 4), (37, 4), (50, 16), (40, 64)])
@pytest.mark.parametrize("with_prior", [True, False])
def test_chunked_matches_naive_outputs_and_grads(T, chunk, with_prior):
    q, k, v, agents, decay, bias = _inputs(T=T, dv=6)
    if not with_prior:
        decay = bias = None
    leaves = [t.clone().requires_grad_() for t in (q, k, v, agents)]
    extra = [] if decay is None else [decay.clone().requires_grad_(), bias.clone().requires_grad_()]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves + extra]
    ref = naive.causal_agent_attention(*ref_leaves[:4], *(ref_leaves[4:] or [None, None]), chunk_size=chunk)
    out = causal_agent_attention(*leaves, *(extra or [None, None]), chunk_size=chunk)
    assert out.dtype == torch.float32
    assert_close_rel(out, ref, 1e-5, "output")
    w = torch.randn_like(ref)
    (ref * w).sum().backward()
    (out * w.float()).sum().backward()
    names = ["q", "k", "v", "agents", "decay", "agent_bias"]
    for name, a, r in zip(names, leaves + extra, ref_leaves, strict=False):
        grad = torch.zeros_like(a) if a.grad is None else a.grad  # None: the input is unused at this T
        assert_close_rel(grad, r.grad, 1e-5, f"grad {name}", floor=1.0)  # floor: O(1) inputs


def test_naive_fp32_matches_fp64():
    q, k, v, agents, decay, bias = _inputs(T=30)
    ref = naive.causal_agent_attention(
        q.double(), k.double(), v.double(), agents.double(), decay, bias, chunk_size=4
    )
    assert_close_rel(
        naive.causal_agent_attention(q, k, v, agents, decay, bias, chunk_size=4), ref, 1e-5, "naive"
    )


def test_recurrent_matches_naive():
    q, k, v, agents, decay, bias = _inputs(T=41)
    ref = naive.causal_agent_attention(q, k, v, agents, decay, bias, chunk_size=4)
    out, _ = _steps(q, k, v, agents, decay, bias, 4)
    assert_close_rel(out, ref, 1e-5, "token-by-token")


@pytest.mark.parametrize("prefix", [1, 4, 8, 9, 13, 30])
def test_prefill_then_steps_matches_naive(prefix):
    q, k, v, agents, decay, bias = _inputs(T=37)
    ref = naive.causal_agent_attention(q, k, v, agents, decay, bias, chunk_size=4)
    state = causal_agent_prefill(k[:, :, :prefix], v[:, :, :prefix], agents, decay, chunk_size=4)
    assert state.t == prefix
    out, _ = _steps(q, k, v, agents, decay, bias, 4, state, start=prefix)
    assert_close_rel(out, ref[:, :, prefix:], 1e-5, f"decode after a {prefix}-token prefill")


def _rotary(x: torch.Tensor) -> torch.Tensor:
    from agentattn.lm.model import rotate

    return rotate(x, 0, 100.0)


@pytest.mark.parametrize("T", [3, 9, 37])
def test_window_keys_in_all_three_forms(T):
    """Separate exact-window q/k (rotary ones here): chunked, prefill + steps and naive agree, grads included."""
    q, k, v, agents, decay, bias = _inputs(T=T)
    wq, wk = _rotary(q), _rotary(k)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, agents, wq, wk)]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    r = ref_leaves
    ref = naive.causal_agent_attention(*r[:4], decay, bias, chunk_size=4, window_q=r[4], window_k=r[5])
    out = causal_agent_attention(
        *leaves[:4], decay, bias, chunk_size=4, window_q=leaves[4], window_k=leaves[5]
    )
    assert_close_rel(out, ref, 1e-5, "chunked with window keys")
    w = torch.randn_like(ref)
    (ref * w).sum().backward()
    (out * w.float()).sum().backward()
    for name, a, b in zip(["q", "k", "v", "agents", "window_q", "window_k"], leaves, ref_leaves, strict=True):
        grad = torch.zeros_like(a) if a.grad is None else a.grad
        assert_close_rel(grad, b.grad, 1e-5, f"grad {name}", floor=1.0)
    plain = naive.causal_agent_attention(q, k, v, agents, decay, bias, chunk_size=4)
    assert not torch.allclose(plain, ref.float(), atol=1e-3), "the window keys were ignored"
    for prefix in (0, 5, min(T, 13)):
        state = causal_agent_prefill(
            k[:, :, :prefix], v[:, :, :prefix], agents, decay, chunk_size=4, window_k=wk[:, :, :prefix]
        )
        outs = [
            causal_agent_step(
                *(x[:, :, t : t + 1] for x in (q, k, v)), agents, state, decay, bias,
                window_q=wq[:, :, t : t + 1], window_k=wk[:, :, t : t + 1],
            )
            for t in range(prefix, T)
        ]  # fmt: skip
        if outs:
            assert_close_rel(torch.cat(outs, 2), ref[:, :, prefix:], 1e-5, f"steps after {prefix}")


def test_window_keys_must_match_the_state():
    q, k, v, agents, _, _ = _inputs(T=6)
    one = [x[:, :, :1] for x in (q, k, v)]
    with pytest.raises(ValueError, match="window_q and window_k must be given together"):
        causal_agent_attention(q, k, v, agents, window_q=q)
    with pytest.raises(ValueError, match="window_k must match q/k"):
        causal_agent_attention(q, k, v, agents, window_q=q, window_k=k[:, :, :-1])
    plain = causal_agent_init_state(2, H, N_AGENTS, D, D, 4)
    with pytest.raises(ValueError, match="made without separate window keys"):
        causal_agent_step(*one, agents, plain, window_q=one[0], window_k=one[1])
    separate = causal_agent_init_state(2, H, N_AGENTS, D, D, 4, separate_window_keys=True)
    with pytest.raises(ValueError, match="made with separate window keys"):
        causal_agent_step(*one, agents, separate)


@pytest.mark.parametrize("t", [0, 11, 30])
def test_causality_bit_identical(t):
    """Perturbing positions > t leaves outputs <= t bit-identical (chunked and recurrent)."""
    q, k, v, agents, decay, bias = _inputs(T=40)
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, :, t + 1 :] = torch.randn_like(x[:, :, t + 1 :]) * 10
    a = causal_agent_attention(q, k, v, agents, decay, bias, chunk_size=4)
    b = causal_agent_attention(q2, k2, v2, agents, decay, bias, chunk_size=4)
    assert torch.equal(a[:, :, : t + 1], b[:, :, : t + 1])
    assert not torch.equal(a[:, :, t + 1 :], b[:, :, t + 1 :])
    ra, _ = _steps(q, k, v, agents, decay, bias, 4)
    rb, _ = _steps(q2, k2, v2, agents, decay, bias, 4)
    assert torch.equal(ra[:, :, : t + 1], rb[:, :, : t + 1])


def test_leaky_pooling_is_caught():
    """The causality check can fail: agents pooled from all queries (the copy-paste 'causal' snippet) leak."""
    q, k, v, *_ = _inputs(T=24)

    def leaky(q, k, v):
        pooled = q.mean(dim=2)[0]  # (H, d): mixes every position, later ones included
        return causal_agent_attention(
            q, k, v, pooled[:, None].expand(H, N_AGENTS, D).contiguous(), chunk_size=4
        )

    q2 = q.clone()
    q2[:, :, -1] += 5.0
    assert not torch.equal(leaky(q, k, v)[:, :, :10], leaky(q2, k, v)[:, :, :10])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_scaled_x50_is_stable(dtype):
    q, k, v, agents, decay, bias = _inputs(T=70, dtype=dtype, scale=50.0)
    ref = naive.causal_agent_attention(
        q.double(), k.double(), v.double(), agents.double(), decay, bias, chunk_size=8
    )
    assert torch.isfinite(ref).all()
    chunked = causal_agent_attention(q, k, v, agents, decay, bias, chunk_size=8)
    steps, _ = _steps(q, k, v, agents, decay, bias, 8)
    plain = naive.causal_agent_attention(q, k, v, agents, decay, bias, chunk_size=8)
    for name, out in (("chunked", chunked), ("recurrent", steps), ("naive", plain)):
        assert out.dtype == dtype
        assert torch.isfinite(out).all(), f"{name}: inf or NaN"
        # budget: one rounding step of bf16 (2^-8), far above what fp32 accumulation leaves
        assert_close_rel(out, ref, 4e-3, f"{name} {dtype} vs fp64")


def test_half_precision_grads_are_finite():
    q, k, v, agents, decay, bias = _inputs(T=40, dtype=torch.bfloat16, scale=50.0)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, agents)]
    causal_agent_attention(*leaves, decay, bias, chunk_size=8).float().sum().backward()
    for t in leaves:
        assert torch.isfinite(t.grad).all()


def test_state_size_does_not_depend_on_length():
    q, k, v, agents, decay, bias = _inputs(T=300)
    sizes = {
        causal_agent_prefill(k[:, :, :T], v[:, :, :T], agents, decay, chunk_size=8).nbytes()
        for T in (1, 17, 300)
    }
    _, state = _steps(q[:, :, :50], k[:, :, :50], v[:, :, :50], agents, decay, bias, 8)
    sizes.add(state.nbytes())
    assert len(sizes) == 1
    lin = {causal_linear_prefill(k[:, :, :T], v[:, :, :T]).nbytes() for T in (1, 300)}
    assert len(lin) == 1


def test_causal_linear_forms_agree():
    q, k, v, *_ = _inputs(T=45)
    ref = naive.causal_linear_attention(q.double(), k.double(), v.double())
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out = causal_linear_attention(*leaves, chunk_size=8)
    assert_close_rel(out, ref, 1e-5, "chunked linear")
    naive.causal_linear_attention(*ref_leaves).sum().backward()
    out.sum().backward()
    for name, a, r in zip("qkv", leaves, ref_leaves, strict=True):
        assert_close_rel(a.grad, r.grad, 1e-5, f"linear grad {name}", floor=1e-3)
    state = causal_linear_prefill(k[:, :, :7], v[:, :, :7])
    steps = [
        causal_linear_step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], state)
        for t in range(7, 45)
    ]
    assert_close_rel(torch.cat(steps, 2), ref[:, :, 7:], 1e-5, "linear decode")
    fresh = causal_linear_init_state(2, H, D, D)
    first = causal_linear_step(q[:, :, :1], k[:, :, :1], v[:, :, :1], fresh)
    assert_close_rel(first, ref[:, :, :1], 1e-5, "linear first step")


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda a: a.update(q=a["q"][0]), ValueError, "q must be 4-D"),
        (lambda a: a.update(k=a["k"][:, :, :-1]), ValueError, "k must have the shape of q"),
        (lambda a: a.update(v=a["v"][:, :1]), ValueError, "v must have shape"),
        (lambda a: a.update(agents=a["agents"][0]), ValueError, r"agents must have shape \(H, n, d\)"),
        (lambda a: a.update(decay=a["decay"][:, :2]), ValueError, r"decay must have shape \(H, n\)"),
        (lambda a: a.update(k=a["k"].double()), TypeError, "k has dtype torch.float64"),
        (lambda a: a.update(v=a["v"].long()), TypeError, "v must be a floating-point tensor"),
        (lambda a: a.update(agents=a["agents"].to("meta")), ValueError, "agents is on meta"),
        (lambda a: a.update(chunk_size=0), ValueError, "chunk_size must be a positive int"),
    ],
)
def test_bad_input(mutate, exc, match):
    q, k, v, agents, decay, bias = _inputs(T=10)
    args = {"q": q, "k": k, "v": v, "agents": agents, "decay": decay, "agent_bias": bias, "chunk_size": 4}
    mutate(args)
    for fn in (causal_agent_attention, naive.causal_agent_attention):
        with pytest.raises(exc, match=match):
            fn(**args)


def test_step_rejects_mismatched_state():
    q, k, v, agents, decay, bias = _inputs(B=2, T=3)
    state = causal_agent_init_state(3, H, N_AGENTS, D, D, 4)
    with pytest.raises(ValueError, match="state was made for"):
        causal_agent_step(q[:, :, :1], k[:, :, :1], v[:, :, :1], agents, state, decay, bias)
    with pytest.raises(ValueError, match="one token"):
        causal_agent_step(q, k, v, agents, causal_agent_init_state(2, H, N_AGENTS, D, D, 4), decay, bias)
