"""What the causal ops (agent, linear, retention) and their naive references share: the compute dtype and the
argument checks of causal agent attention."""

from __future__ import annotations

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _check_args(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    agents: torch.Tensor,
    decay: torch.Tensor | None,
    agent_bias: torch.Tensor | None,
    chunk_size: int,
    scale: float | None,
    window_q: torch.Tensor | None = None,
    window_k: torch.Tensor | None = None,
) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, T, d), got shape {tuple(t.shape)}")
    for name, t in (
        ("q", q),
        ("k", k),
        ("v", v),
        ("agents", agents),
        ("decay", decay),
        ("agent_bias", agent_bias),
    ):
        if t is None:
            continue
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        if t.device != q.device:
            raise ValueError(
                f"{name} is on {t.device} but q is on {q.device}; all inputs must share one device"
            )
    for name, t in (("k", k), ("v", v), ("agents", agents)):
        if t.dtype != q.dtype:
            raise TypeError(
                f"{name} has dtype {t.dtype} but q has dtype {q.dtype}; q, k, v and agents must match"
            )
    batch, heads, tokens, head_dim = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q (B, H, T, d) = {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != (batch, heads, tokens):
        raise ValueError(
            f"v must have shape (B, H, T, d_v) = ({batch}, {heads}, {tokens}, d_v), got {tuple(v.shape)}"
        )
    if agents.dim() != 3 or agents.shape[0] != heads or agents.shape[2] != head_dim or agents.shape[1] < 1:
        raise ValueError(
            f"agents must have shape (H, n, d) = ({heads}, n>=1, {head_dim}), got {tuple(agents.shape)}"
        )
    num_agents = agents.shape[1]
    for name, t in (("decay", decay), ("agent_bias", agent_bias)):
        if t is not None and tuple(t.shape) != (heads, num_agents):
            raise ValueError(f"{name} must have shape (H, n) = ({heads}, {num_agents}), got {tuple(t.shape)}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if scale is not None and not scale > 0:
        raise ValueError(f"scale must be a positive number or None, got {scale}")
    _check_window(q, k, window_q, window_k)


def _check_window(
    q: torch.Tensor, k: torch.Tensor, window_q: torch.Tensor | None, window_k: torch.Tensor | None
) -> None:
    """window_q and window_k come together, each shaped, typed and placed like q and k."""
    if (window_q is None) != (window_k is None):
        raise ValueError("window_q and window_k must be given together (or neither)")
    for name, t, like in (("window_q", window_q, q), ("window_k", window_k, k)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.shape != like.shape or t.dtype != like.dtype or t.device != like.device:
            raise ValueError(
                f"{name} must match q/k: shape (B, H, T, d) = {tuple(like.shape)}, {like.dtype} on "
                f"{like.device}; got {tuple(t.shape)}, {t.dtype} on {t.device}"
            )
