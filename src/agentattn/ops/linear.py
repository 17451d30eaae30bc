"""Linear attention with the elu+1 feature map (Katharopoulos et al., 2020): the cheap baseline agent attention
is compared with.

    O = φ(Q)·(φ(K)ᵀ·V) / (φ(Q)·Σ_m φ(K_m)),   φ(x) = elu(x) + 1
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._validation import check_tensors


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """φ(x) = elu(x) + 1 > 0."""
    return F.elu(x) + 1.0


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Non-causal linear attention in O(N·d²).

    Args:
        q: (B, H, N, d); k: (B, H, M, d); v: (B, H, M, d_v).
    Returns:
        (B, H, N, d_v).
    """
    check_tensors((("q", q), ("k", k), ("v", v)), 4, "(B, H, L, d)")
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a positive finite number, got {eps}")
    if k.shape[:2] != q.shape[:2] or k.shape[-1] != q.shape[-1] or v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"q (B, H, N, d), k (B, H, M, d) and v (B, H, M, d_v) disagree: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    phi_q, phi_k = elu_feature_map(q), elu_feature_map(k)
    kv = phi_k.transpose(-2, -1) @ v  # (B, H, d, d_v)
    normaliser = phi_q @ phi_k.sum(dim=-2, keepdim=True).transpose(-2, -1)  # (B, H, N, 1)
    return (phi_q @ kv) / (normaliser + eps)
