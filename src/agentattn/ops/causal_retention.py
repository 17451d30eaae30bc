"""Causal retention (RetNet, Sun et al. 2023, arXiv 2307.08621): linear attention with a fixed per-head decay.

    o_t = Σ_{j<=t} γ_h^(t-j) (q_t · k_j) v_j          S_t = γ_h S_{t-1} + k_tᵀ v_t,   o_t = q_t S_t

The gated linear-attention baseline of the LM comparison: the bounded-state family with a forgetting gate, in its
simplest (data-independent) form. The caller scales q and normalises the output (RetNet: per-head GroupNorm).

- ``agentattn.ops.naive.causal_retention``: the explicit (T, T) decay-masked weight matrix.
- :func:`causal_retention`: chunked, O(T·C·d + T·d²): a decay mask inside a chunk, a (d, d_v) state across.
- :func:`causal_retention_prefill` / :func:`causal_retention_step`: recurrent form with a (d×d_v) state per head.

``gamma`` is (H,) in (0, 1]. Half-precision inputs are computed in float32 and cast back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._causal_common import _compute_dtype
from .causal_linear import _check as _check_qkv

__all__ = [
    "CausalRetentionState",
    "causal_retention",
    "causal_retention_prefill",
    "causal_retention_step",
    "retention_decays",
]


def retention_decays(num_heads: int) -> torch.Tensor:
    """RetNet's fixed decays, (H,): γ_h = 1 - 2^(-5 - h) (head h forgets over about 2^(5 + h) tokens)."""
    return 1.0 - torch.exp2(-5.0 - torch.arange(num_heads, dtype=torch.float32))


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gamma: torch.Tensor) -> None:
    _check_qkv(q, k, v)  # the linear form's checks: 4-D, one float dtype and device, matching shapes
    if gamma.shape != (q.shape[1],):
        raise ValueError(f"gamma must be (H,) = ({q.shape[1]},), got shape {tuple(gamma.shape)}")


def _decay_mask(gamma: torch.Tensor, size: int, dtype: torch.dtype) -> torch.Tensor:
    """(H, size, size): γ^(i-j) for j <= i, else 0 (computed in log space: no γ^-j overflow)."""
    index = torch.arange(size, device=gamma.device, dtype=dtype)
    distance = index[:, None] - index[None, :]  # (size, size)
    log_gamma = gamma.to(dtype).log()[:, None, None]
    return torch.where(distance >= 0, torch.exp(log_gamma * distance.clamp(min=0)), 0.0)


def causal_retention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gamma: torch.Tensor, chunk_size: int = 64
) -> torch.Tensor:
    """Chunked causal retention: q, k (B, H, T, d), v (B, H, T, d_v), gamma (H,) → (B, H, T, d_v)."""
    _check(q, k, v, gamma)
    out_dtype, cd = q.dtype, _compute_dtype(q.dtype)
    B, H, T, d = q.shape
    dv, C = v.shape[-1], chunk_size
    N = math.ceil(T / C)
    pad = N * C - T
    q, k, v = q.to(cd), k.to(cd), v.to(cd)
    if pad:  # zero keys and values add nothing; padded queries are cut off
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    qc, kc, vc = q.view(B, H, N, C, d), k.view(B, H, N, C, d), v.view(B, H, N, C, dv)
    log_gamma = gamma.to(cd).log()  # (H,)
    position = torch.arange(C, device=q.device, dtype=cd)
    # inside a chunk: the decay mask; key j of a chunk reaches its end with γ^(C-1-j), query i reads the state
    # left at the previous chunk's end with γ^(i+1)
    intra = (qc @ kc.transpose(-2, -1)) * _decay_mask(gamma, C, cd)[:, None]  # (B, H, N, C, C)
    key_to_end = torch.exp(log_gamma[:, None] * (C - 1 - position))  # (H, C)
    query_from_start = torch.exp(log_gamma[:, None] * (position + 1))  # (H, C)
    chunk_kv = (kc * key_to_end[:, None, :, None]).transpose(-2, -1) @ vc  # (B, H, N, d, dv)
    chunk_decay = torch.exp(log_gamma * C)  # (H,): the whole chunk's decay
    states = []  # the state before each chunk: S_c = γ^C S_{c-1} + kv_{c-1}
    state = torch.zeros(B, H, d, dv, device=q.device, dtype=cd)
    for c in range(N):
        states.append(state)
        state = state * chunk_decay[:, None, None] + chunk_kv[:, :, c]
    inter = (qc * query_from_start[:, None, :, None]) @ torch.stack(states, dim=2)  # (B, H, N, C, dv)
    out = intra @ vc + inter
    return out.reshape(B, H, N * C, dv)[:, :, :T].to(out_dtype)


@dataclass
class CausalRetentionState:
    """S: (B, H, d, d_v), the decayed Σ γ^(t-j) k_jᵀ v_j; t tokens seen. Size independent of t."""

    S: torch.Tensor
    t: int = 0

    def tensors(self) -> list[torch.Tensor]:
        return [self.S]

    def nbytes(self) -> int:
        return self.S.numel() * self.S.element_size()


@torch.no_grad()
def causal_retention_prefill(k: torch.Tensor, v: torch.Tensor, gamma: torch.Tensor) -> CausalRetentionState:
    """The state after reading k (B, H, T, d), v (B, H, T, d_v)."""
    _check(k, k, v, gamma)
    cd = _compute_dtype(k.dtype)
    T = k.shape[2]
    to_end = torch.exp(gamma.to(cd).log()[:, None] * torch.arange(T - 1, -1, -1, device=k.device, dtype=cd))
    S = (k.to(cd) * to_end[None, :, :, None]).transpose(-2, -1) @ v.to(cd)
    return CausalRetentionState(S=S, t=T)


@torch.no_grad()
def causal_retention_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gamma: torch.Tensor, state: CausalRetentionState
) -> torch.Tensor:
    """One token: q, k (B, H, 1, d), v (B, H, 1, d_v) → (B, H, 1, d_v); updates ``state`` in place."""
    _check(q, k, v, gamma)
    if q.shape[2] != 1:
        raise ValueError(
            f"causal_retention_step takes one token: q must be (B, H, 1, d), got {tuple(q.shape)}"
        )
    cd = state.S.dtype
    state.S.mul_(gamma.to(cd)[:, None, None]).add_(k.to(cd).transpose(-2, -1) @ v.to(cd))
    state.t += 1
    return (q.to(cd) @ state.S).to(q.dtype)
