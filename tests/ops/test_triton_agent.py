"""The fused Triton kernels (``ops.triton_agent``) against the naive op, forward and backward, and their custom ops.

On CUDA the kernels run natively. Without a GPU (CI) the same checks run on CPU under Triton's interpreter
(``TRITON_INTERPRET=1``), in a child process because Triton reads that variable when the kernels are defined.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from agentattn.ops import agent_attention, naive, triton_agent

ROOT = Path(__file__).resolve().parents[2]
needs_triton = pytest.mark.skipif(not triton_agent.available(), reason="Triton is not installed")

# (B, H, N, M, n, d, d_v, biases, key padding, non-contiguous q/k/v, splits)
CASES = [
    (2, 3, 37, 70, 5, 8, 8, True, False, False, None),
    (1, 2, 130, 200, 49, 16, 24, True, True, False, 3),  # several key slices, d_v ≠ d, n not a power of 2
    (2, 1, 10, 9, 3, 32, 32, False, False, True, None),  # fewer keys than one block, strided inputs
    (1, 2, 65, 129, 17, 64, 64, True, False, True, 2),
]


def run_cases(device: str) -> list[float]:
    """Relative max errors of the fused kernels against float64 naive, one per case (raises on a mismatch)."""
    errors = []
    g = torch.Generator().manual_seed(0)
    for b, h, n_q, n_k, n, d, dv, biases, padding, strided, splits in CASES:

        def t(*shape):
            return torch.randn(*shape, generator=g).to(device)

        q, k, v, a = t(b, h, n_q, d), t(b, h, n_k, d), t(b, h, n_k, dv), t(b, h, n, d)
        if strided:  # (B, N, H, d) storage seen through a transpose, as after a qkv projection
            q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
        b1 = t(h, n, n_k) if biases else None
        b2 = t(1, h, n_q, n) if biases else None
        pad = None
        if padding:
            pad = torch.zeros(b, n_k, dtype=torch.bool, device=device)
            pad[0, -20:] = True
        out = agent_attention(
            q, k, v, a, agent_bias=b1, query_bias=b2, key_padding_mask=pad, backend="triton"
        )
        if splits is not None:  # the slice count must not change the result
            direct = triton_agent.agent_attention_triton(
                q, k, v, a, scale=d**-0.5, agent_bias=b1, query_bias=b2, key_padding_mask=pad, splits=splits
            )
            assert (direct - out).abs().max() <= 1e-5 * out.abs().max()

        def dbl(x):
            return None if x is None else x.double()

        ref = naive.agent_attention(
            dbl(q), dbl(k), dbl(v), dbl(a), agent_bias=dbl(b1), query_bias=dbl(b2), key_padding_mask=pad
        )
        err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
        assert err <= 1e-5, f"case {(b, h, n_q, n_k, n, d, dv)}: relative max error {err:.2e}"
        errors.append(err)
    return errors


def run_masked_row_cases(device: str) -> int:
    """Fully masked rows of B1 and B2 (-inf everywhere, or -inf on the keys that are not padded): zero rows there,
    the float64 naive reference everywhere; several key slices, including partial rows with a whole slice at -inf.
    Returns the number of cases run (raises on a mismatch)."""
    g = torch.Generator().manual_seed(1)
    b, h, n_q, n_k, n, d = 2, 2, 40, 150, 5, 16
    inf = float("inf")
    count = 0
    for rows in ("agent", "query", "both", "all_agent", "all_query", "padding"):
        for splits in (None, 3):
            q, k, v, a = (torch.randn(b, h, size, d, generator=g) for size in (n_q, n_k, n_k, n))
            b1 = torch.randn(b, h, n, n_k, generator=g)
            b2 = torch.randn(1, h, n_q, n, generator=g)
            b1[0, 1, 0, :64] = -inf  # partial rows: a whole key slice at -inf, and all agents but one
            b2[0, 0, 3, 1:] = -inf
            pad = None
            if rows in ("agent", "both"):
                b1[1, 0, 2] = -inf
            if rows in ("query", "both"):
                b2[0, 1, 7] = -inf
            if rows == "all_agent":
                b1[:] = -inf
            if rows == "all_query":
                b2[:] = -inf
            if rows == "padding":  # -inf on the unpadded keys only
                pad = torch.zeros(b, n_k, dtype=torch.bool)
                pad[1, 100:] = True
                b1[1, 1, 4, :100] = -inf
            q, k, v, a, b1, b2 = (t.to(device) for t in (q, k, v, a, b1, b2))
            pad = None if pad is None else pad.to(device)
            if splits is None:
                out = agent_attention(
                    q, k, v, a, agent_bias=b1, query_bias=b2, key_padding_mask=pad, backend="triton"
                )
            else:
                out = triton_agent.agent_attention_triton(
                    q,
                    k,
                    v,
                    a,
                    scale=d**-0.5,
                    agent_bias=b1,
                    query_bias=b2,
                    key_padding_mask=pad,
                    splits=splits,
                )
            ref = naive.agent_attention(
                q.double(), k.double(), v.double(), a.double(), agent_bias=b1.double(),
                query_bias=b2.double(), key_padding_mask=pad,
            )  # fmt: skip
            assert torch.isfinite(out).all(), f"{rows}, splits {splits}: NaN/inf"
            dead2 = (b2 == -inf).all(-1).expand(b, h, n_q)
            assert torch.equal(out[dead2], torch.zeros_like(out[dead2])), f"{rows}: nonzero masked row"
            scale = ref.abs().max().item() or 1.0  # all-zero reference (every row masked): absolute
            err = (out.double() - ref).abs().max().item() / scale
            assert err <= 1e-5, f"{rows}, splits {splits}: relative max error {err:.2e}"
            count += 1
    return count


@needs_triton
def test_fully_masked_rows_under_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    code = "from tests.ops.test_triton_agent import run_masked_row_cases; print(run_masked_row_cases('cpu'))"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "12"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@needs_triton
def test_fully_masked_rows_on_cuda():
    assert run_masked_row_cases("cuda") == 12


@needs_triton
def test_fused_kernels_match_naive_under_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    code = "from tests.ops.test_triton_agent import run_cases; print(run_cases('cpu'))"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = eval(proc.stdout.strip().splitlines()[-1])
    assert len(errors) == len(CASES)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@needs_triton
def test_fused_kernels_match_naive_on_cuda():
    run_cases("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@needs_triton
def test_cuda_auto_backend_follows_the_work_threshold(monkeypatch):
    from agentattn.ops import agent as agent_module

    calls = []
    original = triton_agent.agent_attention_triton
    monkeypatch.setattr(
        triton_agent, "agent_attention_triton", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    large = torch.randn(1, 2, agent_module.CUDA_LARGE_WORK // 2, 16, device="cuda")
    small = large[:, :, :1000]
    with torch.no_grad():
        agent_attention(small, small, small, small[:, :, :4])
        assert calls == []
        agent_attention(large, large, large, large[:, :, :4])
        assert calls == [1]


def test_backend_argument_is_checked():
    x = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="backend must be one of"):
        agent_attention(x, x, x, x, backend="flash")
    with pytest.raises(ValueError, match="has no dropout"):
        agent_attention(x, x, x, x, dropout_p=0.1, training=True, backend="triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match="needs Triton, a CUDA tensor"):
            agent_attention(x.detach(), x.detach(), x.detach(), x.detach(), backend="triton")


@pytest.mark.parametrize("backend", ["sdpa", "matmul"])
def test_forced_backends_match_naive(backend):
    g = torch.Generator().manual_seed(1)
    q, k, v, a = (torch.randn(2, 2, 30, 8, generator=g) for _ in range(4))
    out = agent_attention(q, k, v, a[:, :, :6], backend=backend)
    ref = naive.agent_attention(q.double(), k.double(), v.double(), a[:, :, :6].double())
    assert (out.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
