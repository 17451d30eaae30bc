"""Fused agent attention for CUDA inference, in Triton: two kernels and a tiny combine.

    stage 1, agents gather (split-K):  per (b·h, split): online softmax of s·A·Kᵀ + B1 over a slice of the keys
                                       → partial (max, sum, acc); torch combines the splits into Va (B, H, n, d_v)
    stage 2, queries read:             per (b·h, block of queries): softmax(s·Q·Aᵀ + B2)·Va in one pass, since all
                                       n ≤ 256 agents fit in one tile

Why not two SDPA calls: stage 1 has only n ≈ 49 "queries" per (b, h), so a flash kernel launches B·H programs
and leaves most of the GPU idle; splitting the keys (flash-decoding) fills it. Stage 2 has n ≈ 49 keys, so it
needs no online softmax, and it reads its bias with strides instead of the 16-aligned padded copy that the
memory-efficient SDPA kernel makes of an (N, 49) mask on every call.

A row of B1 or B2 that is -inf everywhere (a softmax over nothing) gives a zero row, as on every path of
``agentattn.ops.agent_attention``: stage 1 keeps exp() at 0 for such a row and the combine divides its zero sum by
1; stage 2 does the same in registers. Both cost nothing noticeable (a select on a per-row vector).

Forward only: ``agentattn.ops.agent_attention`` routes here on CUDA when no gradient is needed. The kernels run
on CPU under Triton's interpreter (``TRITON_INTERPRET=1``), which is how CI checks their logic without a GPU.
"""

from __future__ import annotations

import functools

import torch

try:  # Triton ships with CUDA builds of torch; CPU-only installs may lack it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

MAX_AGENTS = 256
MAX_HEAD_DIM = 256


def available() -> bool:
    """Whether Triton is importable (the kernels also need a CUDA device, or ``TRITON_INTERPRET=1``)."""
    return triton is not None


def supports(q: torch.Tensor, v: torch.Tensor, agents: torch.Tensor) -> bool:
    """Whether the fused kernels handle these shapes and dtypes."""
    return (
        triton is not None
        and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and agents.shape[-2] <= MAX_AGENTS
        and q.shape[-1] <= MAX_HEAD_DIM
        and v.shape[-1] <= MAX_HEAD_DIM
    )


def _block(size: int) -> int:
    return max(16, triton.next_power_of_2(size))


if triton is not None:

    @triton.jit
    def _agents_gather_kernel(
        A, K, V, B1, M_out, L_out, ACC_out,
        stride_ab, stride_ah, stride_an, stride_ad,
        stride_kb, stride_kh, stride_km, stride_kd,
        stride_vb, stride_vh, stride_vm, stride_vd,
        stride_bb, stride_bh, stride_bn, stride_bm,
        heads, n_agents, n_keys, head_dim, value_dim, keys_per_split, scale,
        HAS_BIAS: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        pid_bh = tl.program_id(0)
        pid_split = tl.program_id(1)
        n_splits = tl.num_programs(1)
        b = pid_bh // heads
        h = pid_bh % heads
        offs_a = tl.arange(0, BLOCK_A)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = A + b * stride_ab + h * stride_ah + offs_a[:, None] * stride_an + offs_d[None, :] * stride_ad
        a = tl.load(a_ptrs, mask=(offs_a[:, None] < n_agents) & (offs_d[None, :] < head_dim), other=0.0)
        m_i = tl.full((BLOCK_A,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_A,), tl.float32)
        acc = tl.zeros((BLOCK_A, BLOCK_DV), tl.float32)
        start = pid_split * keys_per_split
        stop = tl.minimum(start + keys_per_split, n_keys)
        for key0 in range(start, stop, BLOCK_K):
            keys = key0 + offs_k
            key_ok = keys < stop
            k = tl.load(
                K + b * stride_kb + h * stride_kh + keys[None, :] * stride_km + offs_d[:, None] * stride_kd,
                mask=key_ok[None, :] & (offs_d[:, None] < head_dim),
                other=0.0,
            )  # (BLOCK_D, BLOCK_K): Kᵀ
            s = tl.dot(a, k, input_precision=PRECISION) * scale  # (BLOCK_A, BLOCK_K), fp32
            if HAS_BIAS:
                bias = tl.load(
                    B1
                    + b * stride_bb
                    + h * stride_bh
                    + offs_a[:, None] * stride_bn
                    + keys[None, :] * stride_bm,
                    mask=(offs_a[:, None] < n_agents) & key_ok[None, :],
                    other=0.0,
                )
                s += bias.to(tl.float32)
            s = tl.where(key_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(
                m_new == float("-inf"), 0.0, m_new
            )  # a row of -inf so far: keep exp() at 0, not NaN
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            vv = tl.load(
                V + b * stride_vb + h * stride_vh + keys[:, None] * stride_vm + offs_dv[None, :] * stride_vd,
                mask=key_ok[:, None] & (offs_dv[None, :] < value_dim),
                other=0.0,
            )
            acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv, input_precision=PRECISION)
            m_i = m_new
        row = pid_bh * n_splits + pid_split
        tl.store(M_out + row * BLOCK_A + offs_a, m_i)
        tl.store(L_out + row * BLOCK_A + offs_a, l_i)
        tl.store(ACC_out + row * BLOCK_A * BLOCK_DV + offs_a[:, None] * BLOCK_DV + offs_dv[None, :], acc)

    @triton.jit
    def _queries_read_kernel(
        Q, A, VA, B2, OUT,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_ab, stride_ah, stride_an, stride_ad,
        stride_bb, stride_bh, stride_bq, stride_bn,
        stride_ob, stride_oh, stride_on, stride_od,
        heads, n_queries, n_agents, head_dim, value_dim, scale,
        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        pid_bh = tl.program_id(0)
        pid_m = tl.program_id(1)
        b = pid_bh // heads
        h = pid_bh % heads
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_a = tl.arange(0, BLOCK_A)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        q_ok = offs_m < n_queries
        agent_ok = offs_a < n_agents
        q = tl.load(
            Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
            mask=q_ok[:, None] & (offs_d[None, :] < head_dim),
            other=0.0,
        )
        a_t = tl.load(
            A + b * stride_ab + h * stride_ah + offs_a[None, :] * stride_an + offs_d[:, None] * stride_ad,
            mask=agent_ok[None, :] & (offs_d[:, None] < head_dim),
            other=0.0,
        )  # (BLOCK_D, BLOCK_A): Aᵀ
        s = tl.dot(q, a_t, input_precision=PRECISION) * scale  # (BLOCK_M, BLOCK_A), fp32
        if HAS_BIAS:
            bias = tl.load(
                B2
                + b * stride_bb
                + h * stride_bh
                + offs_m[:, None] * stride_bq
                + offs_a[None, :] * stride_bn,
                mask=q_ok[:, None] & agent_ok[None, :],
                other=0.0,
            )
            s += bias.to(tl.float32)
        s = tl.where(agent_ok[None, :], s, float("-inf"))
        # A fully masked row (-inf throughout): exp() gives 0, not NaN, and its zero sum is divided by 1.
        m = tl.max(s, 1)
        p = tl.exp(s - tl.where(m == float("-inf"), 0.0, m)[:, None])
        total = tl.sum(p, 1)
        p = p / tl.where(total == 0.0, 1.0, total)[:, None]
        va = tl.load(VA + pid_bh * BLOCK_A * BLOCK_DV + offs_a[:, None] * BLOCK_DV + offs_dv[None, :])
        out = tl.dot(p.to(q.dtype), va.to(q.dtype), input_precision=PRECISION)
        tl.store(
            OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_dv[None, :] * stride_od,
            out.to(OUT.dtype.element_ty),
            mask=q_ok[:, None] & (offs_dv[None, :] < value_dim),
        )


@functools.lru_cache(maxsize=8)
def _program_target(device_index: int) -> int:
    """Programs that keep every SM busy: a few per multiprocessor."""
    return 4 * torch.cuda.get_device_properties(device_index).multi_processor_count


def _strides(t: torch.Tensor | None) -> tuple[int, int, int, int]:
    return (0, 0, 0, 0) if t is None else tuple(t.stride())


def agent_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    agents: torch.Tensor,
    *,
    scale: float,
    agent_bias: torch.Tensor | None = None,
    query_bias: torch.Tensor | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """Forward-only fused agent attention; arguments as in ``agentattn.ops.agent_attention`` (validated there).

    Args:
        q: (B, H, N, d); k: (B, H, M, d); v: (B, H, M, d_v); agents: (B, H, n, d), any strides.
        scale: the logit scale s.
        agent_bias: B1, already broadcastable to (B, H, n, M) (a key padding mask folded in as -inf).
        query_bias: B2, broadcastable to (B, H, N, n). A row of either that is -inf everywhere gives a zero row
            (zero agent values; a zero output row).
        splits: key slices per (b, h) in stage 1; by default enough to give every SM several programs.

    Returns:
        (B, H, N, d_v) in q's dtype. Logits, softmax and accumulation are fp32; fp32 inputs use IEEE fp32
        matmuls (not TF32), so the result matches the other paths to rounding.
    """
    if triton is None:
        raise RuntimeError("agent_attention_triton needs Triton, which is not installed")
    batch, heads, n_queries, head_dim = q.shape
    n_keys, value_dim = k.shape[-2], v.shape[-1]
    n_agents = agents.shape[-2]
    block_a, block_d, block_dv = _block(n_agents), _block(head_dim), _block(value_dim)
    block_k = 64 if max(block_d, block_dv) <= 128 else 32
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit operands
    bh = batch * heads
    if splits is None:
        target = _program_target(q.device.index or 0) if q.is_cuda else 4
        splits = max(1, min(triton.cdiv(target, bh), triton.cdiv(n_keys, block_k)))
    keys_per_split = triton.cdiv(triton.cdiv(n_keys, splits), block_k) * block_k
    splits = triton.cdiv(n_keys, keys_per_split)  # no empty slice
    b1 = None if agent_bias is None else agent_bias.expand(batch, heads, n_agents, n_keys)
    b2 = None if query_bias is None else query_bias.expand(batch, heads, n_queries, n_agents)

    f32 = {"device": q.device, "dtype": torch.float32}
    row_max = torch.empty(bh, splits, block_a, **f32)
    row_sum = torch.empty(bh, splits, block_a, **f32)
    partial = torch.empty(bh, splits, block_a, block_dv, **f32)
    _agents_gather_kernel[(bh, splits)](
        agents, k, v, b1 if b1 is not None else q, row_max, row_sum, partial,
        *agents.stride(), *k.stride(), *v.stride(), *_strides(b1),
        heads, n_agents, n_keys, head_dim, value_dim, keys_per_split, scale,
        HAS_BIAS=b1 is not None, BLOCK_A=block_a, BLOCK_K=block_k, BLOCK_D=block_d, BLOCK_DV=block_dv,
        PRECISION=precision,
    )  # fmt: skip
    # Combine the key slices: Va = Σ_s e^{m_s − m}·acc_s / Σ_s e^{m_s − m}·l_s, with m the max over slices.
    overall = row_max.amax(dim=1, keepdim=True)
    weight = torch.exp(row_max - overall.masked_fill(overall == float("-inf"), 0.0))  # (bh, S, A)
    # The sum is >= 1, or 0 for a row that is -inf throughout (and the padding rows): that one's zero acc / 1.
    total = (weight * row_sum).sum(1)  # (bh, A)
    agent_values = (weight[..., None] * partial).sum(1) / total.masked_fill(total == 0.0, 1.0)[..., None]
    # Padding rows beyond n_agents: their softmax weight is 0, but whatever they hold must not be NaN (0·NaN).
    agent_values[:, n_agents:] = 0.0  # (bh, BLOCK_A, BLOCK_DV), contiguous

    out = torch.empty(batch, heads, n_queries, value_dim, device=q.device, dtype=q.dtype)
    block_m = 64
    _queries_read_kernel[(bh, triton.cdiv(n_queries, block_m))](
        q, agents, agent_values, b2 if b2 is not None else q, out,
        *q.stride(), *agents.stride(), *_strides(b2), *out.stride(),
        heads, n_queries, n_agents, head_dim, value_dim, scale,
        HAS_BIAS=b2 is not None, BLOCK_M=block_m, BLOCK_A=block_a, BLOCK_D=block_d, BLOCK_DV=block_dv,
        PRECISION=precision,
    )  # fmt: skip
    return out
