"""Fully masked rows: a row of B1 or B2 that is -inf everywhere behaves like a row whose keys are all padded.

On every backend of ``agent_attention`` (and the naive reference), with and without gradients: zero agent values /
zero output rows where a row is fully masked, the naive reference everywhere (partial -inf rows are ordinary
softmaxes), and finite gradients for every input, zero for the fully masked bias rows. The Triton kernels and the
packed training op are checked in ``test_triton_agent`` and ``test_agent_packed``.
"""

from __future__ import annotations

import pytest
import torch

from agentattn.ops import agent as agent_module
from agentattn.ops import agent_attention, naive
from tests.conftest import assert_close_rel

FP32_REL = 1e-5
INF = float("inf")
B, H, N, M, N_AGENTS, D = 2, 3, 11, 13, 5, 8

# case -> (B1 rows, B2 rows, padded keys): which rows are set to -inf (index tuples into B1 (B, H, n, M) and
# B2 (B, H, N, n) without the last axis), which keys are padded. Every case also holds partial -inf rows.
CASES = {
    "agent_bias": ([(0, 1, 2), (1, slice(None), 4)], [], None),
    "query_bias": ([], [(0, 2, 5), (1, 0, 1), (1, 0, 7)], None),
    "both": ([(0, 1, 2), (1, slice(None), 4)], [(0, 2, 5), (1, 0, 1), (1, 0, 7)], None),
    "all_agent_rows": ([(slice(None),)], [], None),
    "all_query_rows": ([], [(slice(None),)], None),
    "all_rows": ([(slice(None),)], [(slice(None),)], None),
    # B1 -inf on the keys that are not padded: fully masked only together with the key padding mask.
    "bias_and_padding": ([], [(1, 2, 7)], (1, slice(7, None))),
    # A sequence with every key padded next to fully masked rows of both biases.
    "all_padded_and_rows": ([(0, 1, 2)], [(0, 2, 5), (1, 0, 1)], (1, slice(None))),
}


def make_case(case: str, seed: int = 0):
    """Inputs (q, k, v, agents, B1, B2) requiring grad, the key padding mask, and the fully masked rows of B1
    and B2 as bool tensors (B, H, n) and (B, H, N)."""
    agent_rows, query_rows, padding = CASES[case]
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, size, D, generator=g) for size in (N, M, M))
    agents = torch.randn(B, H, N_AGENTS, D, generator=g)
    b1 = torch.randn(B, H, N_AGENTS, M, generator=g) * 0.5
    b2 = torch.randn(B, H, N, N_AGENTS, generator=g) * 0.5
    # Partial rows, which must stay ordinary softmaxes over their finite entries.
    b1[0, 0, 0, ::2] = -INF
    b1[1, 2, 1, 1:] = -INF
    b2[0, 1, :, 1:3] = -INF
    b2[1, 2, 3, :-1] = -INF
    for row in agent_rows:
        b1[row] = -INF
    for row in query_rows:
        b2[row] = -INF
    mask = None
    if padding is not None:
        mask = torch.zeros(B, M, dtype=torch.bool)
        mask[padding] = True
        if case == "bias_and_padding":
            b1[1, 2, 3, :7] = -INF  # fully masked: keys 7.. are padded
            b1[1, 0, 0, :6] = -INF  # partial: key 6 is neither padded nor -inf
    effective_b1 = b1 if mask is None else b1.masked_fill(mask[:, None, None, :], -INF)
    dead1 = (effective_b1 == -INF).all(-1)
    dead2 = (b2 == -INF).all(-1)
    inputs = tuple(t.requires_grad_() for t in (q, k, v, agents, b1, b2))
    return inputs, mask, dead1, dead2


def expected_output(inputs, mask):
    """The rule written out in float64 with explicit exponentials: a fully masked row's weights are 0."""
    q, k, v, agents, b1, b2 = (t.detach().double() for t in inputs)
    s = D**-0.5

    def weights(logits):
        dead = (logits == -INF).all(-1, keepdim=True)
        top = logits.amax(-1, keepdim=True).masked_fill(dead, 0.0)
        e = torch.exp(logits - top)
        return torch.where(dead, 0.0, e / e.sum(-1, keepdim=True).masked_fill(dead, 1.0))

    l1 = s * agents @ k.transpose(-1, -2) + b1
    if mask is not None:
        l1 = l1.masked_fill(mask[:, None, None, :], -INF)
    l2 = s * q @ agents.transpose(-1, -2) + b2
    return weights(l2) @ (weights(l1) @ v)


def _fast(backend):
    def fn(*args, **kwargs):
        return agent_attention(*args, backend=backend, **kwargs)

    return fn


BACKENDS = {
    "naive": naive.agent_attention,
    "auto": agent_attention,
    "sdpa": _fast("sdpa"),
    "matmul": _fast("matmul"),
    # The rows patched without looking first, as on CUDA and in compiled or exported graphs (see as_on_cuda).
    "sdpa_unchecked": _fast("sdpa"),
    "matmul_unchecked": _fast("matmul"),
}


def as_on_cuda(monkeypatch):
    """Take the op's CUDA branches on CPU: fully masked rows patched without looking first, and the NaN term of
    the SDPA path added (which the zeroing of the output rows then shares)."""
    monkeypatch.setattr(agent_module, "check_rows_first", lambda q: False)
    monkeypatch.setattr(agent_module, "_may_hold_nan", lambda q, query_mask: True)


def run(fn, inputs, mask, grad: bool):
    """Output and, with ``grad``, the gradients of every input for a fixed random output gradient."""
    q, k, v, agents, b1, b2 = inputs
    if not grad:
        with torch.no_grad():
            return fn(q, k, v, agents, agent_bias=b1, query_bias=b2, key_padding_mask=mask), None
    out = fn(q, k, v, agents, agent_bias=b1, query_bias=b2, key_padding_mask=mask)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    return out, torch.autograd.grad((out * weight).sum(), inputs)


NAMES = ("q", "k", "v", "agents", "agent_bias", "query_bias")


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("case", list(CASES))
def test_fully_masked_rows(monkeypatch, case, backend, grad):
    if backend.endswith("_unchecked"):
        as_on_cuda(monkeypatch)
    inputs, mask, dead1, dead2 = make_case(case)
    assert dead1.any() or dead2.any() or mask.all(-1).any()  # the case does hold a fully masked row
    out, grads = run(BACKENDS[backend], inputs, mask, grad)
    ref, ref_grads = run(naive.agent_attention, inputs, mask, grad)

    assert torch.isfinite(out).all(), "NaN/inf in the output"
    assert torch.equal(out[dead2], torch.zeros_like(out[dead2])), "a fully masked B2 row gives a zero output"
    if mask is not None:
        all_padded = mask.all(-1)
        assert torch.equal(out[all_padded], torch.zeros_like(out[all_padded]))
    assert_close_rel(ref, expected_output(inputs, mask), FP32_REL, "naive against the written-out rule")
    assert_close_rel(out, ref, FP32_REL, "output")
    if not grad:
        return
    floor = ref.abs().max().item()
    for name, got, want in zip(NAMES, grads, ref_grads, strict=True):
        assert torch.isfinite(got).all(), f"NaN/inf in grad {name}"
        assert_close_rel(got, want, FP32_REL, f"grad {name}", floor=floor)
    grad_b1, grad_b2 = grads[4], grads[5]
    assert torch.equal(grad_b1[dead1], torch.zeros_like(grad_b1[dead1])), "grad of a fully masked B1 row"
    assert torch.equal(grad_b2[dead2], torch.zeros_like(grad_b2[dead2])), "grad of a fully masked B2 row"


def test_fully_masked_agent_rows_gather_nothing():
    """In the reference's weights: zero rows exactly where B1 (padding included) or B2 is -inf throughout, and
    partial rows are ordinary softmaxes (sum to 1)."""
    for case in CASES:
        (q, k, _, agents, b1, b2), mask, dead1, dead2 = make_case(case)
        agent_probs, query_probs = naive.agent_attention_weights(
            q, k, agents, agent_bias=b1, query_bias=b2, key_padding_mask=mask
        )
        dead1 = dead1 | (mask.all(-1)[:, None, None] if mask is not None else False)
        for probs, dead in ((agent_probs, dead1), (query_probs, dead2)):
            assert torch.isfinite(probs).all()
            sums = probs.sum(-1)
            assert torch.equal(sums[dead], torch.zeros_like(sums[dead])), case
            assert_close_rel(sums[~dead], torch.ones_like(sums[~dead]), 1e-6, case)


@pytest.mark.parametrize("backend", ["naive", "auto", "sdpa", "matmul"])
def test_a_fully_masked_bias_is_the_same_as_every_key_padded(backend):
    """B1 at -inf everywhere = every key padded; B2 at -inf everywhere = zero output too. Zero, with zero grads."""
    fn = BACKENDS[backend]
    (q, k, v, agents, b1, b2), _, _, _ = make_case("agent_bias")
    all_padded = torch.ones(B, M, dtype=torch.bool)
    masked = torch.full_like(b1, -INF).requires_grad_()
    for kwargs in (
        {"key_padding_mask": all_padded, "query_bias": b2},
        {"agent_bias": masked, "query_bias": b2},
        {"agent_bias": b1, "query_bias": torch.full_like(b2, -INF)},
    ):
        out = fn(q, k, v, agents, **kwargs)
        assert torch.equal(out, torch.zeros_like(out))
        grads = torch.autograd.grad(out.sum(), [q, k, v, agents])
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


@pytest.mark.parametrize("backend", ["naive", "auto", "sdpa", "matmul"])
def test_broadcast_biases_with_fully_masked_rows(backend):
    """Rows masked through broadcasting: a (1, H, n, 1) B1 entry at -inf masks every key of that agent, a (N, 1) B2
    entry every agent of that query."""
    g = torch.Generator().manual_seed(2)
    q, k, v, agents = (torch.randn(B, H, size, D, generator=g) for size in (N, M, M, N_AGENTS))
    b1 = torch.randn(1, H, N_AGENTS, 1, generator=g)
    b1[0, 1, 3] = -INF
    b2 = torch.randn(N, 1, generator=g)
    b2[4] = -INF
    inputs = tuple(t.requires_grad_() for t in (q, k, v, agents, b1, b2))
    out, grads = run(BACKENDS[backend], inputs, None, grad=True)
    ref, ref_grads = run(naive.agent_attention, inputs, None, grad=True)
    assert torch.equal(out[:, :, 4], torch.zeros_like(out[:, :, 4]))
    assert_close_rel(ref, expected_output(inputs, None), FP32_REL, "naive")
    assert_close_rel(out, ref, FP32_REL, "output")
    for name, got, want in zip(NAMES, grads, ref_grads, strict=True):
        assert torch.isfinite(got).all(), name
        assert_close_rel(got, want, FP32_REL, f"grad {name}", floor=ref.abs().max().item())
    assert grads[4][0, 1, 3].item() == 0.0 and grads[5][4].item() == 0.0


@pytest.mark.parametrize("backend", ["naive", "sdpa", "matmul"])
def test_a_finite_bias_that_the_cast_makes_infinite_is_masked(backend):
    """Biases are cast to q's dtype: an fp32 bias of -1e6 is -inf in fp16, so that row is fully masked, as if it
    had been -inf (judged against the same inputs in fp32 with explicit -inf)."""
    (q, k, v, agents, b1, b2), _, _, dead2 = make_case("both")
    b1, b2 = b1.detach().clamp_min(-1e6), b2.detach().clamp_min(-1e6)  # finite, -inf only after the cast
    half = [t.detach().half() for t in (q, k, v, agents)]
    out = BACKENDS[backend](*half, agent_bias=b1, query_bias=b2)
    assert torch.isfinite(out).all()
    assert torch.equal(out[dead2], torch.zeros_like(out[dead2]))
    q, k, v, agents = (t.detach() for t in (q, k, v, agents))
    ref = naive.agent_attention(q, k, v, agents, agent_bias=b1.half().float(), query_bias=b2.half().float())
    assert_close_rel(out, ref, 2e-2, "fp16 against fp32")


@pytest.mark.parametrize("backend", ["naive", "sdpa", "matmul", "sdpa_unchecked", "matmul_unchecked"])
def test_nan_still_propagates_through_a_fully_masked_row(monkeypatch, backend):
    """A NaN query in a fully masked B2 row stays NaN (NaN in -> NaN out); the other rows are unaffected."""
    if backend.endswith("_unchecked"):
        as_on_cuda(monkeypatch)
    (q, k, v, agents, b1, b2), _, _, _ = make_case("query_bias")
    q = q.detach().clone()
    q[0, 2, 5, 0] = float("nan")  # the fully masked row (0, 2, 5)
    out = BACKENDS[backend](
        q, k.detach(), v.detach(), agents.detach(), agent_bias=b1.detach(), query_bias=b2.detach()
    )
    assert torch.isnan(out[0, 2, 5]).all()
    others = torch.ones(B, H, N, dtype=torch.bool)
    others[0, 2, 5] = False
    assert torch.isfinite(out[others]).all()


def _plain_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, scale=None):
    """SDPA as a plain softmax: NaN on a fully masked row (as torch 2.4's math kernel, and some fused kernels)."""
    logits = q @ k.transpose(-2, -1) * scale
    if attn_mask is not None:
        logits = logits + attn_mask
    return logits.softmax(-1) @ v


@pytest.mark.parametrize("checked", [True, False], ids=["checked", "unchecked"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_sdpa_path_does_not_rely_on_the_kernel(monkeypatch, grad, checked):
    """The SDPA path unmasks fully masked rows itself: recent CPU kernels return zeros there, others NaN."""
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", _plain_sdpa)
    if not checked:
        as_on_cuda(monkeypatch)
    inputs, mask, _, dead2 = make_case("both")
    out, grads = run(BACKENDS["sdpa"], inputs, mask, grad)
    ref, ref_grads = run(naive.agent_attention, inputs, mask, grad)
    assert torch.equal(out[dead2], torch.zeros_like(out[dead2]))
    assert_close_rel(out, ref, FP32_REL, "output")
    for name, got, want in zip(NAMES, grads, ref_grads, strict=True) if grad else ():
        assert torch.isfinite(got).all(), name
        assert_close_rel(got, want, FP32_REL, f"grad {name}", floor=ref.abs().max().item())


def test_fully_masked_rows_helper():
    """The look-first shortcut only skips masks without a fully masked row (it tests both ends of each row)."""
    from agentattn.ops._masked_rows import fully_masked_rows

    mask = torch.zeros(2, 1, 4, 6)
    mask[0, 0, 1, :3] = -INF  # left padding folded in
    mask[1, 0, 2, 3:] = -INF  # right padding
    mask[1, 0, 3, [0, 5]] = -INF  # -inf at both ends, finite inside
    assert fully_masked_rows(mask, check_first=True) is None
    assert not fully_masked_rows(mask, check_first=False).any()  # always computed without the look
    # NaN is not -inf: that row is not fully masked, and it does not hide another one.
    mask[0, 0, 0, 0] = float("nan")
    mask[1, 0, 1] = -INF
    expected = torch.zeros(2, 1, 4, 1, dtype=torch.bool)
    expected[1, 0, 1] = True
    for check_first in (True, False):
        assert torch.equal(fully_masked_rows(mask, check_first), expected)
    assert fully_masked_rows(None, True) is None
