"""Causal elu+1 linear attention (Katharopoulos et al., 2020): the linear baseline of the LM comparison.

    o_t = φ(q_t)ᵀ S_t / (φ(q_t)ᵀ z_t + eps),   S_t = Σ_{j<=t} φ(k_j) v_jᵀ,   z_t = Σ_{j<=t} φ(k_j),   φ = elu + 1

- ``agentattn.ops.naive.causal_linear_attention``: the masked (T, T) weight matrix.
- :func:`causal_linear_attention`: chunked, O(T·C·d + T·d²), no T×T matrix.
- :func:`causal_linear_step` / :func:`causal_linear_prefill`: recurrent form with a (d×d_v + d) state per head.

Half-precision inputs are computed in float32 and cast back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._causal_common import _compute_dtype
from .linear import elu_feature_map

__all__ = [
    "CausalLinearState",
    "causal_linear_attention",
    "causal_linear_init_state",
    "causal_linear_prefill",
    "causal_linear_step",
]


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, T, d), got shape {tuple(t.shape)}")
        if not t.is_floating_point() or t.dtype != q.dtype:
            raise TypeError(f"{name} must be floating point with the dtype of q ({q.dtype}), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"q (B, H, T, d), k (B, H, T, d) and v (B, H, T, d_v) disagree: "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )


def causal_linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6, chunk_size: int = 64
) -> torch.Tensor:
    """Chunked causal linear attention: masked C×C products inside a chunk, a (d, d_v) state across chunks.

    q, k: (B, H, T, d), v: (B, H, T, d_v) → (B, H, T, d_v).
    """
    _check(q, k, v)
    out_dtype, cd = q.dtype, _compute_dtype(q.dtype)
    B, H, T, d = q.shape
    dv, C = v.shape[-1], chunk_size
    N = math.ceil(T / C)
    pad = N * C - T
    phi_q, phi_k, v = elu_feature_map(q.to(cd)), elu_feature_map(k.to(cd)), v.to(cd)
    if pad:  # padded keys get φ = 0 so they add nothing
        phi_q, phi_k, v = (F.pad(t, (0, 0, 0, pad)) for t in (phi_q, phi_k, v))
    qc, kc, vc = phi_q.view(B, H, N, C, d), phi_k.view(B, H, N, C, d), v.view(B, H, N, C, dv)
    kv = kc.transpose(-2, -1) @ vc  # (B, H, N, d, dv) per chunk
    # exclusive prefix sums (chunks < c) by shifting, not by subtracting: chunk c must not touch their rounding
    S = torch.cumsum(F.pad(kv, (0, 0, 0, 0, 1, 0))[:, :, :N], dim=2)
    zc = kc.sum(dim=3)  # (B, H, N, d)
    z = torch.cumsum(F.pad(zc, (0, 0, 1, 0))[:, :, :N], dim=2)
    mask = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    intra = (qc @ kc.transpose(-2, -1)).masked_fill(~mask, 0.0)  # (B, H, N, C, C)
    num = intra @ vc + qc @ S
    den = intra.sum(-1, keepdim=True) + qc @ z[..., None]
    return (num / (den + eps)).reshape(B, H, N * C, dv)[:, :, :T].to(out_dtype)


@dataclass
class CausalLinearState:
    """S: (B, H, d, d_v) = Σ φ(k) vᵀ, z: (B, H, d) = Σ φ(k); t tokens seen. Size independent of t."""

    S: torch.Tensor
    z: torch.Tensor
    t: int = 0

    def tensors(self) -> list[torch.Tensor]:
        return [self.S, self.z]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def causal_linear_init_state(
    batch: int, heads: int, head_dim: int, value_dim: int, device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> CausalLinearState:  # fmt: skip
    cd = _compute_dtype(dtype)
    return CausalLinearState(
        S=torch.zeros(batch, heads, head_dim, value_dim, device=device, dtype=cd),
        z=torch.zeros(batch, heads, head_dim, device=device, dtype=cd),
    )


@torch.no_grad()
def causal_linear_prefill(k: torch.Tensor, v: torch.Tensor) -> CausalLinearState:
    """The state after reading k (B, H, T, d), v (B, H, T, d_v)."""
    _check(k, k, v)
    cd = _compute_dtype(k.dtype)
    phi_k = elu_feature_map(k.to(cd))
    return CausalLinearState(S=phi_k.transpose(-2, -1) @ v.to(cd), z=phi_k.sum(dim=2), t=k.shape[2])


@torch.no_grad()
def causal_linear_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: CausalLinearState, eps: float = 1e-6
) -> torch.Tensor:
    """One token: q, k (B, H, 1, d), v (B, H, 1, d_v) → (B, H, 1, d_v); updates ``state`` in place."""
    _check(q, k, v)
    if q.shape[2] != 1:
        raise ValueError(f"causal_linear_step takes one token: q must be (B, H, 1, d), got {tuple(q.shape)}")
    cd = state.S.dtype
    phi_q, phi_k = elu_feature_map(q.to(cd)), elu_feature_map(k.to(cd))
    state.S += phi_k.transpose(-2, -1) @ v.to(cd)
    state.z += phi_k[:, :, 0]
    state.t += 1
    num = phi_q @ state.S
    den = phi_q @ state.z[..., None]
    return (num / (den + eps)).to(q.dtype)
