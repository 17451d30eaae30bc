"""The fused Triton training path (``ops.triton_agent``): outputs and every gradient against float64 naive in fp32,
fp16 and bf16; the custom ops under ``torch.library.opcheck``, ``torch.compile(fullgraph=True)`` and
``torch.export``; and nothing of size (B, H, N, n) or (B, H, n, M) kept for the backward.

On CUDA the checks run natively; without a GPU they run on CPU under Triton's interpreter (``TRITON_INTERPRET=1``),
in a child process because Triton reads that variable when the kernels are defined.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from agentattn.ops import agent_attention, attention_backend, naive, triton_agent

ROOT = Path(__file__).resolve().parents[2]
needs_triton = pytest.mark.skipif(not triton_agent.available(), reason="Triton is not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# (B, H, N, M, n, d, d_v, B1 shape, B2 shape, padding, fully masked rows)
GRAD_CASES = [
    (2, 2, 37, 70, 5, 8, 8, (2, 5, 70), (1, 2, 37, 5), None, False),  # biases broadcast over the batch
    (
        1,
        2,
        1,
        200,
        49,
        16,
        24,
        (1, 2, 49, 200),
        (2, 1, 49),
        "tail",
        False,
    ),  # N = 1, d_v ≠ d, n not a power of 2
    (2, 1, 10, 9, 3, 33, 20, None, None, None, False),  # odd head dims, fewer keys than one block, no bias
    (
        2,
        3,
        130,
        64,
        17,
        24,
        24,
        (1, 1, 17, 64),
        (2, 1, 130, 17),
        "all",
        True,
    ),  # a sequence fully padded; -inf rows
]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FP32_BOUND = 1e-5  # max abs error / max |reference|


def _relative(x: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.abs().max().item() or 1.0
    return (x.double() - ref).abs().max().item() / scale


def _case_inputs(case, device: str, seed: int):
    b, h, n_q, n_k, n, d, dv, b1_shape, b2_shape, padding, masked_rows = case
    g = torch.Generator().manual_seed(seed)

    def t(*shape, s=1.0):
        return torch.randn(*shape, generator=g) * s

    inputs = {"q": t(b, h, n_q, d), "k": t(b, h, n_k, d), "v": t(b, h, n_k, dv), "agents": t(b, h, n, d)}
    inputs["agent_bias"] = None if b1_shape is None else t(*b1_shape, s=0.5)
    inputs["query_bias"] = None if b2_shape is None else t(*b2_shape, s=0.5)
    if masked_rows:  # a fully masked agent row and query row, and a partial one
        inputs["agent_bias"][0, 0, 2] = float("-inf")
        inputs["query_bias"][1, 0, 5] = float("-inf")
        inputs["query_bias"][0, 0, 7, 1:] = float("-inf")
    pad = None
    if padding is not None:
        pad = torch.zeros(b, n_k, dtype=torch.bool)
        pad[0, -7:] = True
        if padding == "all":
            pad[1] = True
    grad_out = t(b, h, n_q, dv)
    to = {k: None if x is None else x.to(device) for k, x in inputs.items()}
    return to, None if pad is None else pad.to(device), grad_out.to(device)


def _forward_backward(inputs, pad, grad_out, dtype, backend):
    """(output, {name: grad}) of ``agent_attention`` (``backend``), of the naive op in ``dtype`` (``"naive"``), or of
    the naive op in float64 (``None``)."""
    leaves = {
        k: None if x is None else x.to(torch.float64 if backend is None else dtype).detach().requires_grad_()
        for k, x in inputs.items()
    }
    if backend in (None, "naive"):
        out = naive.agent_attention(**leaves, key_padding_mask=pad)
    elif backend == "triton-3-splits":
        scale = inputs["q"].shape[-1] ** -0.5
        out = triton_agent.agent_attention_triton(**leaves, scale=scale, key_padding_mask=pad, splits=3)
    else:
        out = agent_attention(**leaves, key_padding_mask=pad, backend=backend)
    out.backward(grad_out.to(out.dtype))
    return out, {k: x.grad for k, x in leaves.items() if x is not None}


def run_gradient_cases(device: str) -> list[dict]:
    """Every case × dtype: the kernels' relative max error on the output and each gradient against float64 naive,
    beside that of the naive op run in the same dtype. Raises on a miss: fp32 within ``FP32_BOUND``; fp16 and bf16
    within twice the naive op's error (FlashAttention's test rule) or 4 ulps of the dtype, whichever is larger: the
    kernels round P and dS to 16 bits before their matmuls, as FlashAttention does."""
    rows = []
    for index, case in enumerate(GRAD_CASES):
        inputs, pad, grad_out = _case_inputs(case, device, seed=index)
        ref_out, ref_grads = _forward_backward(inputs, pad, grad_out, None, None)
        for dtype in DTYPES:
            out, grads = _forward_backward(inputs, pad, grad_out, dtype, "triton")
            base_out, base_grads = _forward_backward(inputs, pad, grad_out, dtype, "naive")
            for name, x, base, ref in [("out", out, base_out, ref_out)] + [
                (k, grads[k], base_grads[k], ref_grads[k]) for k in ref_grads
            ]:
                assert torch.isfinite(x).all(), f"case {index} {dtype} {name}: NaN/inf"
                err, base_err = _relative(x, ref), _relative(base, ref)
                low = max(2 * base_err, 4 * torch.finfo(dtype).eps)
                bound = FP32_BOUND if dtype == torch.float32 else low
                rows.append(
                    {"case": index, "dtype": str(dtype), "tensor": name, "err": err, "naive_err": base_err}
                )
                assert err <= bound, (
                    f"case {index} {dtype} {name}: {err:.2e} > {bound:.2e} (naive {base_err:.2e})"
                )
            if (
                dtype == torch.float32
            ):  # three key and query slices per (b, h) in both directions: the same result
                sliced = _forward_backward(inputs, pad, grad_out, dtype, "triton-3-splits")
                for name, x in [("out", sliced[0]), *sliced[1].items()]:
                    ref = ref_out if name == "out" else ref_grads[name]
                    assert _relative(x, ref) <= FP32_BOUND, f"case {index}, 3 splits, {name}"
            if case[-1]:  # fully masked rows: zero output there, zero bias gradient
                dead_agent = grads["agent_bias"][0, 0, 2]
                dead_query = out[1, :, 5]
                assert torch.equal(dead_agent, torch.zeros_like(dead_agent))
                assert torch.equal(dead_query, torch.zeros_like(dead_query))
    return rows


def run_custom_op_checks(device: str) -> dict:
    """opcheck on both custom ops; torch.compile(fullgraph=True) forward and backward equal eager; torch.export
    keeps the op as one node; and what autograd saves holds no (B, H, N, n) or (B, H, n, M) tensor."""
    inputs, pad, grad_out = _case_inputs(GRAD_CASES[1], device, seed=5)
    q, k, v, a, b1, b2 = (inputs[n] for n in ("q", "k", "v", "agents", "agent_bias", "query_bias"))
    scale = q.shape[-1] ** -0.5
    leaves = [x.detach().requires_grad_() for x in (q, k, v, a, b1, b2)]
    fwd_args = (*leaves[:4], leaves[4], leaves[5], pad, scale, 0)
    torch.library.opcheck(torch.ops.agentattn.agent_attention_fwd.default, fwd_args)
    out, values, lse1, lse2 = torch.ops.agentattn.agent_attention_fwd(*fwd_args)
    bwd_args = (grad_out, q, k, v, a, b1, b2, pad, out.detach(), values, lse1, lse2, scale, True, True, 0)
    torch.library.opcheck(torch.ops.agentattn.agent_attention_bwd.default, bwd_args)

    def loss(q, k, v, a, b1, b2):
        out = agent_attention(
            q, k, v, a, agent_bias=b1, query_bias=b2, key_padding_mask=pad, backend="triton"
        )
        return (out * grad_out).sum()

    eager = torch.autograd.grad(loss(*leaves), leaves)
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(*leaves), leaves)
    compile_err = max(_relative(x, y.double()) for x, y in zip(got, eager, strict=True))
    assert compile_err <= 1e-6, f"torch.compile changed the gradients: {compile_err:.2e}"

    class Layer(torch.nn.Module):
        def forward(self, q, k, v, a):
            return agent_attention(q, k, v, a, agent_bias=b1, query_bias=b2, backend="triton")

    program = torch.export.export(Layer(), (q, k, v, a))
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert "agentattn.agent_attention_fwd.default" in targets, targets
    exported_err = _relative(program.module()(q, k, v, a), Layer()(q, k, v, a).double())
    assert exported_err <= 1e-6

    # What autograd keeps beyond the inputs: with n = 5 agents and no other size 5 in play, a tensor with a dim of 5
    # would be a probability matrix. The explicit-matmul path keeps two, which shows that the check can fail.
    g = torch.Generator().manual_seed(6)
    big = [torch.randn(1, 2, size, dim, generator=g).to(device).requires_grad_()
           for size, dim in ((300, 16), (400, 16), (400, 24), (5, 16))]  # fmt: skip
    saved = _saved_shapes(lambda: agent_attention(*big, backend="triton"), big)
    assert saved and not [s for s in saved if 5 in s], saved
    assert {(1, 2, 300, 5), (1, 2, 5, 400)} <= set(
        _saved_shapes(lambda: agent_attention(*big, backend="matmul"), big)
    )
    # A whole layer (qkv, pooled agents, the learned position biases, DWC) inside attention_backend("triton"): its
    # output and every parameter gradient (the biases' summed over the batch) equal the explicit-matmul path's.
    from agentattn.layers import AgentAttention

    layer = AgentAttention(32, num_heads=2, agent_num=4, grid_size=6, num_prefix_tokens=1).to(device)
    x = torch.randn(2, 37, 32, generator=g).to(device)
    grads = {}
    for backend in ("triton", "matmul"):
        layer.zero_grad()
        with attention_backend(backend):
            out = layer(x)
        out.square().mean().backward()
        grads[backend] = [out.detach()] + [p.grad.clone() for p in layer.parameters()]
    layer_err = max(_relative(a, b.double()) for a, b in zip(grads["triton"], grads["matmul"], strict=True))
    assert layer_err <= FP32_BOUND, f"layer under attention_backend('triton'): {layer_err:.2e}"
    return {"targets": targets, "saved": saved, "compile_err": compile_err, "layer_err": layer_err}


def _saved_shapes(fn, inputs: list[torch.Tensor]) -> list[tuple[int, ...]]:
    """The shapes of the tensors that autograd saves for the backward while ``fn()`` runs, ``inputs`` left out."""
    inputs_kept = {x.data_ptr() for x in inputs}
    saved: list[tuple[int, ...]] = []

    def pack(t):
        if t.data_ptr() not in inputs_kept:
            saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


def _in_interpreter(call: str) -> str:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    code = f"import json; from tests.ops.test_triton_agent_training import *; print(json.dumps({call}))"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout.strip().splitlines()[-1]


@needs_triton
def test_gradients_match_naive_under_interpreter():
    rows = json.loads(_in_interpreter("run_gradient_cases('cpu')"))
    # out + 4..6 gradients per case, three dtypes each
    assert len(rows) == 3 * sum(5 + (c[7] is not None) + (c[8] is not None) for c in GRAD_CASES)


@needs_triton
def test_custom_ops_under_interpreter():
    result = json.loads(_in_interpreter("run_custom_op_checks('cpu')"))
    assert "agentattn.agent_attention_fwd.default" in result["targets"]


@needs_cuda
@needs_triton
def test_gradients_match_naive_on_cuda():
    run_gradient_cases("cuda")


@needs_cuda
@needs_triton
def test_custom_ops_on_cuda():
    run_custom_op_checks("cuda")


def test_fake_kernel_gives_the_shapes_without_triton_or_data():
    """The meta kernels need neither Triton nor a device: what torch.compile and torch.export trace through."""
    q, k = torch.empty(2, 3, 50, 24, device="meta"), torch.empty(2, 3, 70, 24, device="meta")
    v, a = torch.empty(2, 3, 70, 20, device="meta"), torch.empty(2, 3, 9, 24, device="meta")
    out, values, lse1, lse2 = torch.ops.agentattn.agent_attention_fwd(q, k, v, a, None, None, None, 0.2, 0)
    assert out.shape == (2, 3, 50, 20) and lse2.shape == (6, 50)
    assert values.shape == (6, 16, 32) and lse1.shape == (6, 16)
