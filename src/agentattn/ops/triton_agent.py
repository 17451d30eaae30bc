"""Fused agent attention in Triton, forward and backward, registered as a ``torch.library`` custom op.

    forward (two launches)
      stage 1, agents gather (split-K):  per (b·h, key slice): online softmax of s·A·Kᵀ + B1 (key padding as -inf)
                                         → partial (max, sum, acc)
      stage 2, queries read:             per (b·h, block of queries): combine the slices into Va (and its
                                         log-sum-exp L1), then softmax(s·Q·Aᵀ + B2)·Va in one pass (all n ≤ 256
                                         agents fit in one tile); stores the log-sum-exp L2 (B, H, N)
    backward (FlashAttention-style: the probabilities are recomputed from L1 and L2, never stored; two launches)
      stage 2:  per (b·h, slice of query blocks): dQ; partial dA and dVa; dB2 (atomic add, so a bias broadcast
                over the batch or heads gets the sum of its uses)
      stage 1:  per (b·h, key slice): sums the dVa partials; dK, dV; partial dA; dB1 (atomic add)
      torch sums the dA partials (a few per (b, h)).

Saved for the backward: the inputs, the output, Va (fp32), L1 and L2: no (B, H, N, n) or (B, H, n, M) tensor.
Why not two SDPA calls: stage 1 has only n ≈ 49 "queries" per (b, h), so a flash kernel launches B·H programs
and leaves most of the GPU idle; splitting the keys (flash-decoding) fills it. Stage 2 has n ≈ 49 keys, so it
needs no online softmax, and it reads its bias with strides instead of a padded copy.

A row of B1 or B2 that is -inf everywhere (a softmax over nothing; also an agent of a sequence whose keys are all
padded) gives a zero row and no gradient, as on every path of ``agentattn.ops.agent_attention``. Logits, softmax
and accumulation are fp32; fp32 inputs use IEEE fp32 matmuls (not TF32).

``torch.ops.agentattn.agent_attention_fwd`` / ``agent_attention_bwd`` are custom ops with fake (meta) kernels
and an autograd formula, so ``torch.compile(fullgraph=True)`` and ``torch.export`` see one node each. The kernels
run on CPU under Triton's interpreter (``TRITON_INTERPRET=1``), which is how CI checks them without a GPU.
"""

from __future__ import annotations

import functools
import math
import os

import torch

try:  # Triton ships with CUDA builds of torch; CPU-only installs may lack it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

MAX_AGENTS = 256
MAX_HEAD_DIM = 256
_BLOCK_M = 64  # queries per program step (stage 2)


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
    return max(16, 1 << max(0, size - 1).bit_length())


if triton is not None:

    @triton.jit
    def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        # Triton's interpreter multiplies bf16 tiles wrongly (3.8); fp32 tiles give the same products (a bf16
        # product is exact in fp32) and the same fp32 accumulation, so CPU checks stand for the GPU's.
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        return tl.dot(a, b, input_precision=PRECISION)

    @triton.jit
    def _gather_fwd_kernel(
        A, K, V, B1, PAD, M_out, L_out, ACC_out,
        stride_ab, stride_ah, stride_an, stride_ad,
        stride_kb, stride_kh, stride_km, stride_kd,
        stride_vb, stride_vh, stride_vm, stride_vd,
        stride_bb, stride_bh, stride_bn, stride_bm,
        stride_pb, stride_pm,
        heads, n_agents, n_keys, head_dim, value_dim, keys_per_split, scale,
        HAS_BIAS: tl.constexpr, HAS_PAD: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
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
            s = _dot(a, k, PRECISION, UPCAST) * scale  # (BLOCK_A, BLOCK_K), fp32
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
            if HAS_PAD:
                padded = tl.load(PAD + b * stride_pb + keys * stride_pm, mask=key_ok, other=1)
                key_ok = key_ok & (padded == 0)
            s = tl.where(key_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(
                m_new == float("-inf"), 0.0, m_new
            )  # a row of -inf so far: exp() gives 0, not NaN
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            vv = tl.load(
                V + b * stride_vb + h * stride_vh + keys[:, None] * stride_vm + offs_dv[None, :] * stride_vd,
                mask=(keys[:, None] < stop) & (offs_dv[None, :] < value_dim),
                other=0.0,
            )
            acc = acc * alpha[:, None] + _dot(p.to(vv.dtype), vv, PRECISION, UPCAST)
            m_i = m_new
        row = pid_bh * n_splits + pid_split
        tl.store(M_out + row * BLOCK_A + offs_a, m_i)
        tl.store(L_out + row * BLOCK_A + offs_a, l_i)
        tl.store(ACC_out + row * BLOCK_A * BLOCK_DV + offs_a[:, None] * BLOCK_DV + offs_dv[None, :], acc)

    @triton.jit
    def _read_fwd_kernel(
        Q, A, M_PART, L_PART, ACC_PART, B2, OUT, LSE, VA_OUT, LSE1_OUT,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_ab, stride_ah, stride_an, stride_ad,
        stride_bb, stride_bh, stride_bq, stride_bn,
        stride_ob, stride_oh, stride_on, stride_od,
        heads, n_queries, n_agents, head_dim, value_dim, n_splits, scale,
        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
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
        # Combine stage 1's key slices here rather than in extra launches (every program of this (b, h) does the
        # same few loads, from L2): Va = Σ_s e^{m_s − m}·acc_s / Σ_s e^{m_s − m}·l_s, m the max over slices.
        part = pid_bh * n_splits * BLOCK_A
        m_all = tl.full((BLOCK_A,), float("-inf"), tl.float32)
        for split in range(0, n_splits):
            m_all = tl.maximum(m_all, tl.load(M_PART + part + split * BLOCK_A + offs_a))
        m_all = tl.where(m_all == float("-inf"), 0.0, m_all)  # a row masked throughout: exp() gives 0
        total1 = tl.zeros((BLOCK_A,), tl.float32)
        va = tl.zeros((BLOCK_A, BLOCK_DV), tl.float32)
        for split in range(0, n_splits):
            w = tl.exp(tl.load(M_PART + part + split * BLOCK_A + offs_a) - m_all)
            total1 += w * tl.load(L_PART + part + split * BLOCK_A + offs_a)
            acc = tl.load(ACC_PART + (part + split * BLOCK_A + offs_a[:, None]) * BLOCK_DV + offs_dv[None, :])
            va += w[:, None] * acc
        # The sum is >= 1, or 0 for a row that is -inf throughout: that one's zero acc / 1. Padding rows are zeroed.
        va = tl.where(agent_ok[:, None], va / tl.where(total1 == 0.0, 1.0, total1)[:, None], 0.0)
        if pid_m == 0:  # saved for the backward: Va (fp32) and L1 (-inf on masked and padding rows)
            tl.store(VA_OUT + pid_bh * BLOCK_A * BLOCK_DV + offs_a[:, None] * BLOCK_DV + offs_dv[None, :], va)
            lse1 = tl.where(agent_ok, m_all + tl.log(total1), float("-inf"))
            tl.store(LSE1_OUT + pid_bh * BLOCK_A + offs_a, lse1)
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
        s = _dot(q, a_t, PRECISION, UPCAST) * scale  # (BLOCK_M, BLOCK_A), fp32
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
        # A fully masked row (-inf throughout): exp() gives 0, not NaN, its zero sum is divided by 1, L2 = -inf.
        m = tl.max(s, 1)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        p = tl.exp(s - m_safe[:, None])
        total = tl.sum(p, 1)
        p = p / tl.where(total == 0.0, 1.0, total)[:, None]
        out = _dot(p.to(q.dtype), va.to(q.dtype), PRECISION, UPCAST)
        tl.store(
            OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_dv[None, :] * stride_od,
            out.to(OUT.dtype.element_ty),
            mask=q_ok[:, None] & (offs_dv[None, :] < value_dim),
        )
        tl.store(LSE + pid_bh * n_queries + offs_m, m_safe + tl.log(total), mask=q_ok)  # log 0 = -inf

    @triton.jit
    def _read_bwd_kernel(
        Q, A, VA, B2, OUT, DOUT, LSE, DQ, DB2, DA_PART, DVA_PART,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_ab, stride_ah, stride_an, stride_ad,
        stride_bb, stride_bh, stride_bq, stride_bn,
        stride_ob, stride_oh, stride_on, stride_od,
        stride_gb, stride_gh, stride_gn, stride_gd,
        stride_xb, stride_xh, stride_xn, stride_xd,
        stride_db, stride_dh, stride_dq, stride_dn,
        heads, n_queries, n_agents, head_dim, value_dim, queries_per_split, scale,
        HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):  # fmt: skip
        # Strides: q (b h n d), agents, B2, out, dout (g), dq (x), dB2 (d; 0 along broadcast dims).
        pid_bh = tl.program_id(0)
        pid_split = tl.program_id(1)
        n_splits = tl.num_programs(1)
        b = pid_bh // heads
        h = pid_bh % heads
        offs_a = tl.arange(0, BLOCK_A)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        agent_ok = offs_a < n_agents
        a = tl.load(
            A + b * stride_ab + h * stride_ah + offs_a[:, None] * stride_an + offs_d[None, :] * stride_ad,
            mask=agent_ok[:, None] & (offs_d[None, :] < head_dim),
            other=0.0,
        )  # (BLOCK_A, BLOCK_D)
        va = tl.load(VA + pid_bh * BLOCK_A * BLOCK_DV + offs_a[:, None] * BLOCK_DV + offs_dv[None, :])
        va = va.to(a.dtype)  # (BLOCK_A, BLOCK_DV)
        d_agents = tl.zeros((BLOCK_A, BLOCK_D), tl.float32)
        d_values = tl.zeros((BLOCK_A, BLOCK_DV), tl.float32)
        start = pid_split * queries_per_split
        stop = tl.minimum(start + queries_per_split, n_queries)
        for m0 in range(start, stop, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            q_ok = offs_m < stop
            q = tl.load(
                Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=q_ok[:, None] & (offs_d[None, :] < head_dim),
                other=0.0,
            )
            dv_mask = q_ok[:, None] & (offs_dv[None, :] < value_dim)
            o = tl.load(
                OUT
                + b * stride_ob
                + h * stride_oh
                + offs_m[:, None] * stride_on
                + offs_dv[None, :] * stride_od,
                mask=dv_mask,
                other=0.0,
            )
            do = tl.load(
                DOUT
                + b * stride_gb
                + h * stride_gh
                + offs_m[:, None] * stride_gn
                + offs_dv[None, :] * stride_gd,
                mask=dv_mask,
                other=0.0,
            )
            delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)  # (BLOCK_M,)
            s = _dot(q, tl.trans(a), PRECISION, UPCAST) * scale  # (BLOCK_M, BLOCK_A)
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
            lse = tl.load(LSE + pid_bh * n_queries + offs_m, mask=q_ok, other=float("-inf"))
            dead = lse == float("-inf")  # a fully masked row (or past the end): no probability, no gradient
            p = tl.where(dead[:, None], 0.0, tl.exp(s - tl.where(dead, 0.0, lse)[:, None]))
            dp = _dot(do.to(a.dtype), tl.trans(va), PRECISION, UPCAST)  # (BLOCK_M, BLOCK_A)
            ds = p * (dp - delta[:, None])
            dq = _dot(ds.to(a.dtype), a, PRECISION, UPCAST) * scale
            tl.store(
                DQ
                + b * stride_xb
                + h * stride_xh
                + offs_m[:, None] * stride_xn
                + offs_d[None, :] * stride_xd,
                dq.to(DQ.dtype.element_ty),
                mask=q_ok[:, None] & (offs_d[None, :] < head_dim),
            )
            d_agents += _dot(tl.trans(ds).to(a.dtype), q, PRECISION, UPCAST) * scale
            d_values += _dot(tl.trans(p).to(a.dtype), do.to(a.dtype), PRECISION, UPCAST)
            if BIAS_GRAD:
                tl.atomic_add(
                    DB2
                    + b * stride_db
                    + h * stride_dh
                    + offs_m[:, None] * stride_dq
                    + offs_a[None, :] * stride_dn,
                    ds,
                    mask=q_ok[:, None] & agent_ok[None, :],
                )
        row = pid_bh * n_splits + pid_split
        tl.store(DA_PART + row * BLOCK_A * BLOCK_D + offs_a[:, None] * BLOCK_D + offs_d[None, :], d_agents)
        tl.store(
            DVA_PART + row * BLOCK_A * BLOCK_DV + offs_a[:, None] * BLOCK_DV + offs_dv[None, :], d_values
        )

    @triton.jit
    def _gather_bwd_kernel(
        A, K, V, B1, PAD, VA, DVA_PART, LSE, DK, DV, DB1, DA_PART,
        stride_ab, stride_ah, stride_an, stride_ad,
        stride_kb, stride_kh, stride_km, stride_kd,
        stride_vb, stride_vh, stride_vm, stride_vd,
        stride_bb, stride_bh, stride_bn, stride_bm,
        stride_pb, stride_pm,
        stride_xb, stride_xh, stride_xm, stride_xd,
        stride_yb, stride_yh, stride_ym, stride_yd,
        stride_db, stride_dh, stride_dn, stride_dm,
        heads, n_agents, n_keys, head_dim, value_dim, keys_per_split, n_read_splits, scale,
        HAS_BIAS: tl.constexpr, HAS_PAD: tl.constexpr, BIAS_GRAD: tl.constexpr, BLOCK_A: tl.constexpr,
        BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):  # fmt: skip
        # Strides: agents, k, v, B1, padding mask, dk (x), dv (y), dB1 (d; 0 along broadcast dims).
        pid_bh = tl.program_id(0)
        pid_split = tl.program_id(1)
        n_splits = tl.num_programs(1)
        b = pid_bh // heads
        h = pid_bh % heads
        offs_a = tl.arange(0, BLOCK_A)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        offs_k = tl.arange(0, BLOCK_K)
        agent_ok = offs_a < n_agents
        a = tl.load(
            A + b * stride_ab + h * stride_ah + offs_a[:, None] * stride_an + offs_d[None, :] * stride_ad,
            mask=agent_ok[:, None] & (offs_d[None, :] < head_dim),
            other=0.0,
        )  # (BLOCK_A, BLOCK_D)
        # dVa: the sum of stage 2's partials (a few per (b, h)), done here rather than in extra launches.
        tile = offs_a[:, None] * BLOCK_DV + offs_dv[None, :]
        d_va = tl.zeros((BLOCK_A, BLOCK_DV), tl.float32)
        for split in range(0, n_read_splits):
            d_va += tl.load(DVA_PART + (pid_bh * n_read_splits + split) * BLOCK_A * BLOCK_DV + tile)
        va = tl.load(VA + pid_bh * BLOCK_A * BLOCK_DV + tile)
        delta = tl.sum(d_va * va, 1)  # (BLOCK_A,): rowsum(dVa ∘ Va), FlashAttention's D
        d_va = d_va.to(a.dtype)  # (BLOCK_A, BLOCK_DV)
        lse = tl.load(LSE + pid_bh * BLOCK_A + offs_a)
        dead = lse == float("-inf")
        lse = tl.where(dead, 0.0, lse)
        d_agents = tl.zeros((BLOCK_A, BLOCK_D), tl.float32)
        start = pid_split * keys_per_split
        stop = tl.minimum(start + keys_per_split, n_keys)
        for key0 in range(start, stop, BLOCK_K):
            keys = key0 + offs_k
            in_range = keys < stop
            k = tl.load(
                K + b * stride_kb + h * stride_kh + keys[:, None] * stride_km + offs_d[None, :] * stride_kd,
                mask=in_range[:, None] & (offs_d[None, :] < head_dim),
                other=0.0,
            )  # (BLOCK_K, BLOCK_D)
            vv = tl.load(
                V + b * stride_vb + h * stride_vh + keys[:, None] * stride_vm + offs_dv[None, :] * stride_vd,
                mask=in_range[:, None] & (offs_dv[None, :] < value_dim),
                other=0.0,
            )  # (BLOCK_K, BLOCK_DV)
            s = _dot(a, tl.trans(k), PRECISION, UPCAST) * scale  # (BLOCK_A, BLOCK_K)
            if HAS_BIAS:
                bias = tl.load(
                    B1
                    + b * stride_bb
                    + h * stride_bh
                    + offs_a[:, None] * stride_bn
                    + keys[None, :] * stride_bm,
                    mask=agent_ok[:, None] & in_range[None, :],
                    other=0.0,
                )
                s += bias.to(tl.float32)
            key_ok = in_range
            if HAS_PAD:
                padded = tl.load(PAD + b * stride_pb + keys * stride_pm, mask=in_range, other=1)
                key_ok = key_ok & (padded == 0)
            live = (~dead)[:, None] & key_ok[None, :]
            p = tl.where(live, tl.exp(tl.where(live, s, 0.0) - lse[:, None]), 0.0)  # (BLOCK_A, BLOCK_K)
            dv = _dot(tl.trans(p).to(a.dtype), d_va, PRECISION, UPCAST)  # (BLOCK_K, BLOCK_DV)
            tl.store(
                DV + b * stride_yb + h * stride_yh + keys[:, None] * stride_ym + offs_dv[None, :] * stride_yd,
                dv.to(DV.dtype.element_ty),
                mask=in_range[:, None] & (offs_dv[None, :] < value_dim),
            )
            dp = _dot(d_va, tl.trans(vv).to(a.dtype), PRECISION, UPCAST)  # (BLOCK_A, BLOCK_K)
            ds = p * (dp - delta[:, None])
            dk = _dot(tl.trans(ds).to(a.dtype), a, PRECISION, UPCAST) * scale  # (BLOCK_K, BLOCK_D)
            tl.store(
                DK + b * stride_xb + h * stride_xh + keys[:, None] * stride_xm + offs_d[None, :] * stride_xd,
                dk.to(DK.dtype.element_ty),
                mask=in_range[:, None] & (offs_d[None, :] < head_dim),
            )
            d_agents += _dot(ds.to(a.dtype), k, PRECISION, UPCAST) * scale
            if BIAS_GRAD:
                tl.atomic_add(
                    DB1
                    + b * stride_db
                    + h * stride_dh
                    + offs_a[:, None] * stride_dn
                    + keys[None, :] * stride_dm,
                    ds,
                    mask=agent_ok[:, None] & in_range[None, :],
                )
        row = pid_bh * n_splits + pid_split
        tl.store(DA_PART + row * BLOCK_A * BLOCK_D + offs_a[:, None] * BLOCK_D + offs_d[None, :], d_agents)


@functools.lru_cache(maxsize=8)
def _program_target(device_index: int) -> int:
    """Programs that keep every SM busy: a few per multiprocessor."""
    return 4 * torch.cuda.get_device_properties(device_index).multi_processor_count


def _splits(device: torch.device, bh: int, length: int, block: int, splits: int | None) -> tuple[int, int]:
    """(slices, items per slice) to cut ``length`` items into, in whole blocks, so that bh·slices programs keep
    every SM busy; no empty slice."""
    length = max(length, 1)
    if splits is None:
        target = _program_target(device.index or 0) if device.type == "cuda" else 4
        splits = max(1, min(_cdiv(target, bh), _cdiv(length, block)))
    per_split = _cdiv(_cdiv(length, splits), block) * block
    return _cdiv(length, per_split), per_split


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _strides(t: torch.Tensor | None, dims: int = 4) -> tuple[int, ...]:
    return (0,) * dims if t is None else tuple(t.stride())


def _as_4d(bias: torch.Tensor) -> torch.Tensor:
    return bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))


def _broadcast_strides(t: torch.Tensor, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Strides of ``t`` (4-D) seen at ``shape``: 0 along its broadcast (size-1) dims, so that an atomic add sums
    the gradient of every use."""
    return tuple(
        0 if size == 1 and full != 1 else st
        for size, full, st in zip(t.shape, shape, t.stride(), strict=True)
    )


def _blocks(q: torch.Tensor, v: torch.Tensor, agents: torch.Tensor) -> tuple[int, int, int, int, str, bool]:
    """Tile sizes, matmul precision, and whether to multiply bf16 tiles in fp32 (under the interpreter)."""
    block_a, block_d, block_dv = _block(agents.shape[-2]), _block(q.shape[-1]), _block(v.shape[-1])
    block_k = 64 if max(block_d, block_dv) <= 128 else 32
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit operands
    upcast = q.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"
    return block_a, block_d, block_dv, block_k, precision, upcast


def _kernel_masks(
    q: torch.Tensor,
    k: torch.Tensor,
    agents: torch.Tensor,
    agent_bias: torch.Tensor | None,
    query_bias: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """What the kernels read: B1 as a (B, H, n, M) view, B2 as a (B, H, N, n) view (stride 0 along broadcast dims,
    no copy), the (B, M) padding mask as uint8."""
    batch, heads, n_queries = q.shape[:3]
    n_keys, n_agents = k.shape[-2], agents.shape[-2]
    b1 = None if agent_bias is None else _as_4d(agent_bias).expand(batch, heads, n_agents, n_keys)
    b2 = None if query_bias is None else _as_4d(query_bias).expand(batch, heads, n_queries, n_agents)
    pad = None if key_padding_mask is None else key_padding_mask.view(torch.uint8)
    return b1, b2, pad


def _forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    agents: torch.Tensor,
    agent_bias: torch.Tensor | None,
    query_bias: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    scale: float,
    splits: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns out (B, H, N, d_v) in q's dtype; Va (B·H, BLOCK_A, BLOCK_DV) fp32, zero beyond (n, d_v);
    L1 (B·H, BLOCK_A) and L2 (B·H, N) fp32, -inf on fully masked rows (and L1's padding rows)."""
    batch, heads, n_queries, head_dim = q.shape
    n_keys, value_dim, n_agents = k.shape[-2], v.shape[-1], agents.shape[-2]
    block_a, block_d, block_dv, block_k, precision, upcast = _blocks(q, v, agents)
    bh = batch * heads
    n_splits, keys_per_split = _splits(q.device, bh, n_keys, block_k, splits)
    b1, b2, pad = _kernel_masks(q, k, agents, agent_bias, query_bias, key_padding_mask)

    f32 = {"device": q.device, "dtype": torch.float32}
    row_max = torch.empty(bh, n_splits, block_a, **f32)
    row_sum = torch.empty(bh, n_splits, block_a, **f32)
    partial = torch.empty(bh, n_splits, block_a, block_dv, **f32)
    _gather_fwd_kernel[(bh, n_splits)](
        agents, k, v, b1 if b1 is not None else q, pad if pad is not None else q, row_max, row_sum, partial,
        *agents.stride(), *k.stride(), *v.stride(), *_strides(b1), *_strides(pad, 2),
        heads, n_agents, n_keys, head_dim, value_dim, keys_per_split, scale,
        HAS_BIAS=b1 is not None, HAS_PAD=pad is not None, BLOCK_A=block_a, BLOCK_K=block_k, BLOCK_D=block_d,
        BLOCK_DV=block_dv, PRECISION=precision, UPCAST=upcast,
    )  # fmt: skip
    out = torch.empty(batch, heads, n_queries, value_dim, device=q.device, dtype=q.dtype)
    lse2 = torch.empty(bh, n_queries, **f32)
    agent_values = torch.empty(bh, block_a, block_dv, **f32)
    lse1 = torch.empty(bh, block_a, **f32)
    _read_fwd_kernel[(bh, _cdiv(n_queries, _BLOCK_M))](
        q, agents, row_max, row_sum, partial, b2 if b2 is not None else q, out, lse2, agent_values, lse1,
        *q.stride(), *agents.stride(), *_strides(b2), *out.stride(),
        heads, n_queries, n_agents, head_dim, value_dim, n_splits, scale,
        HAS_BIAS=b2 is not None, BLOCK_M=_BLOCK_M, BLOCK_A=block_a, BLOCK_D=block_d, BLOCK_DV=block_dv,
        PRECISION=precision, UPCAST=upcast,
    )  # fmt: skip
    return out, agent_values, lse1, lse2


def _backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    agents: torch.Tensor,
    agent_bias: torch.Tensor | None,
    query_bias: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    out: torch.Tensor,
    agent_values: torch.Tensor,
    lse1: torch.Tensor,
    lse2: torch.Tensor,
    scale: float,
    bias_grads: tuple[bool, bool],
    splits: int | None,
) -> tuple[torch.Tensor, ...]:
    """(dq, dk, dv, dagents, dB1, dB2); a bias gradient not asked for is an empty tensor."""
    batch, heads, n_queries, head_dim = q.shape
    n_keys, value_dim, n_agents = k.shape[-2], v.shape[-1], agents.shape[-2]
    block_a, block_d, block_dv, block_k, precision, upcast = _blocks(q, v, agents)
    bh = batch * heads
    f32 = {"device": q.device, "dtype": torch.float32}
    b1, b2, pad = _kernel_masks(q, k, agents, agent_bias, query_bias, key_padding_mask)
    grad_b1, grad_b2 = torch.empty(0, **f32), torch.empty(0, **f32)
    if bias_grads[0] and agent_bias is not None:
        grad_b1 = torch.zeros(_as_4d(agent_bias).shape, **f32)
    if bias_grads[1] and query_bias is not None:
        grad_b2 = torch.zeros(_as_4d(query_bias).shape, **f32)

    # Stage 2: the queries' read.
    dq = torch.empty_like(q)
    q_splits, queries_per_split = _splits(q.device, bh, n_queries, _BLOCK_M, splits)
    da_read = torch.empty(bh, q_splits, block_a, block_d, **f32)
    dva_part = torch.empty(bh, q_splits, block_a, block_dv, **f32)
    db2_strides = (
        _broadcast_strides(grad_b2, (batch, heads, n_queries, n_agents)) if grad_b2.numel() else (0,) * 4
    )
    _read_bwd_kernel[(bh, q_splits)](
        q, agents, agent_values, b2 if b2 is not None else q, out, grad_out, lse2, dq,
        grad_b2 if grad_b2.numel() else q, da_read, dva_part,
        *q.stride(), *agents.stride(), *_strides(b2), *out.stride(), *grad_out.stride(), *dq.stride(),
        *db2_strides,
        heads, n_queries, n_agents, head_dim, value_dim, queries_per_split, scale,
        HAS_BIAS=b2 is not None, BIAS_GRAD=bool(grad_b2.numel()), BLOCK_M=_BLOCK_M, BLOCK_A=block_a,
        BLOCK_D=block_d, BLOCK_DV=block_dv, PRECISION=precision, UPCAST=upcast,
    )  # fmt: skip

    # Stage 1: the agents' gather.
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    k_splits, keys_per_split = _splits(q.device, bh, n_keys, block_k, splits)
    da_gather = torch.empty(bh, k_splits, block_a, block_d, **f32)
    db1_strides = (
        _broadcast_strides(grad_b1, (batch, heads, n_agents, n_keys)) if grad_b1.numel() else (0,) * 4
    )
    _gather_bwd_kernel[(bh, k_splits)](
        agents, k, v, b1 if b1 is not None else q, pad if pad is not None else q, agent_values, dva_part, lse1,
        dk, dv, grad_b1 if grad_b1.numel() else q, da_gather,
        *agents.stride(), *k.stride(), *v.stride(), *_strides(b1), *_strides(pad, 2),
        *dk.stride(), *dv.stride(), *db1_strides,
        heads, n_agents, n_keys, head_dim, value_dim, keys_per_split, q_splits, scale,
        HAS_BIAS=b1 is not None, HAS_PAD=pad is not None, BIAS_GRAD=bool(grad_b1.numel()), BLOCK_A=block_a,
        BLOCK_K=block_k, BLOCK_D=block_d, BLOCK_DV=block_dv, PRECISION=precision, UPCAST=upcast,
    )  # fmt: skip
    d_agents = da_read.sum(1) + da_gather.sum(1)  # (bh, BLOCK_A, BLOCK_D)
    d_agents = d_agents[:, :n_agents, :head_dim].reshape(agents.shape).to(agents.dtype).contiguous()
    if grad_b1.numel():
        grad_b1 = grad_b1.reshape(agent_bias.shape).to(agent_bias.dtype)
    if grad_b2.numel():
        grad_b2 = grad_b2.reshape(query_bias.shape).to(query_bias.dtype)
    return dq, dk, dv, d_agents, grad_b1, grad_b2


# The custom ops: one graph node each for torch.compile / torch.export, with fake kernels and autograd.
@torch.library.custom_op("agentattn::agent_attention_fwd", mutates_args=())
def agent_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    agents: torch.Tensor,
    agent_bias: torch.Tensor | None,
    query_bias: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    scale: float,
    splits: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, Va, L1, L2): see :func:`_forward`; ``splits`` <= 0 picks the key slices per (b, h) itself."""
    if triton is None:
        raise RuntimeError("the fused agent-attention kernels need Triton, which is not installed")
    return _forward(
        q, k, v, agents, agent_bias, query_bias, key_padding_mask, scale, splits if splits > 0 else None
    )


@agent_attention_fwd.register_fake
def _(q, k, v, agents, agent_bias, query_bias, key_padding_mask, scale, splits):
    bh, n_queries, block_a = q.shape[0] * q.shape[1], q.shape[2], _block(agents.shape[-2])
    out = q.new_empty(*q.shape[:3], v.shape[-1])
    agent_values = q.new_empty(bh, block_a, _block(v.shape[-1]), dtype=torch.float32)
    return (
        out,
        agent_values,
        q.new_empty(bh, block_a, dtype=torch.float32),
        q.new_empty(bh, n_queries, dtype=torch.float32),
    )


@torch.library.custom_op("agentattn::agent_attention_bwd", mutates_args=())
def agent_attention_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    agents: torch.Tensor,
    agent_bias: torch.Tensor | None,
    query_bias: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    out: torch.Tensor,
    agent_values: torch.Tensor,
    lse1: torch.Tensor,
    lse2: torch.Tensor,
    scale: float,
    agent_bias_grad: bool,
    query_bias_grad: bool,
    splits: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dagents, dB1, dB2): see :func:`_backward`."""
    if triton is None:
        raise RuntimeError("the fused agent-attention kernels need Triton, which is not installed")
    return _backward(
        grad_out.contiguous() if grad_out.stride(-1) != 1 else grad_out, q, k, v, agents, agent_bias, query_bias,
        key_padding_mask, out, agent_values, lse1, lse2, scale, (agent_bias_grad, query_bias_grad),
        splits if splits > 0 else None,
    )  # fmt: skip


@agent_attention_bwd.register_fake
def _(grad_out, q, k, v, agents, agent_bias, query_bias, key_padding_mask, out, agent_values, lse1, lse2, scale,
      agent_bias_grad, query_bias_grad, splits):  # fmt: skip
    def bias_grad(bias, wanted):
        return (
            bias.new_empty(bias.shape) if wanted and bias is not None else q.new_empty(0, dtype=torch.float32)
        )

    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(agents),
            bias_grad(agent_bias, agent_bias_grad), bias_grad(query_bias, query_bias_grad))  # fmt: skip


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, agents, agent_bias, query_bias, key_padding_mask, scale, splits = inputs
    out, agent_values, lse1, lse2 = output
    ctx.save_for_backward(
        q, k, v, agents, agent_bias, query_bias, key_padding_mask, out, agent_values, lse1, lse2
    )
    ctx.scale, ctx.splits = scale, splits
    ctx.bias_grads = tuple(b is not None and b.requires_grad for b in (agent_bias, query_bias))
    ctx.mark_non_differentiable(agent_values, lse1, lse2)


def _backward_formula(ctx, grad_out, _grad_values, _grad_lse1, _grad_lse2):
    q, k, v, agents, agent_bias, query_bias, key_padding_mask, out, agent_values, lse1, lse2 = (
        ctx.saved_tensors
    )
    dq, dk, dv, d_agents, db1, db2 = torch.ops.agentattn.agent_attention_bwd(
        grad_out, q, k, v, agents, agent_bias, query_bias, key_padding_mask, out, agent_values, lse1, lse2,
        ctx.scale, ctx.bias_grads[0], ctx.bias_grads[1], ctx.splits,
    )  # fmt: skip
    return (
        dq,
        dk,
        dv,
        d_agents,
        db1 if ctx.bias_grads[0] else None,
        db2 if ctx.bias_grads[1] else None,
        None,
        None,
        None,
    )


torch.library.register_autograd(
    "agentattn::agent_attention_fwd", _backward_formula, setup_context=_setup_context
)


def agent_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    agents: torch.Tensor,
    *,
    scale: float,
    agent_bias: torch.Tensor | None = None,
    query_bias: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """Fused agent attention, forward and backward; arguments as in ``agentattn.ops.agent_attention`` (validated
    there).

    Args:
        q: (B, H, N, d); k: (B, H, M, d); v: (B, H, M, d_v); agents: (B, H, n, d), any strides.
        scale: the logit scale s.
        agent_bias: B1, broadcastable to (B, H, n, M); its gradient is the sum over the dims it broadcasts along.
        query_bias: B2, broadcastable to (B, H, N, n).
        key_padding_mask: (B, M) bool, True for a padded key. An agent whose keys are all padded, or a row of either
            bias that is -inf everywhere, gives a zero row and no gradient.
        splits: key (and, in the backward, query) slices per (b, h); by default enough to give every SM several
            programs. The result does not depend on it beyond rounding.

    Returns:
        (B, H, N, d_v) in q's dtype. Differentiable in q, k, v, agents and both biases; no dropout.
    """
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    out, _, _, _ = torch.ops.agentattn.agent_attention_fwd(
        q, k, v, agents, agent_bias, query_bias, key_padding_mask, float(scale), splits or 0
    )
    return out
