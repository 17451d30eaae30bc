"""Input checks shared by the naive and fast ops.

They run at the public boundary only, so that a bad shape fails with a message naming the argument and
the expected shape instead of deep inside a matmul.
"""

from __future__ import annotations

import math

import torch


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _check_broadcast(name: str, bias: torch.Tensor, target: tuple[int, ...], letters: str) -> None:
    if bias.dim() > len(target):
        raise ValueError(
            f"{name} must broadcast to {letters} = {target}, but it has {bias.dim()} dims: shape {_shape(bias)}"
        )
    for got, want in zip(reversed(bias.shape), reversed(target), strict=False):
        if got not in (1, want):
            raise ValueError(f"{name} must broadcast to {letters} = {target}, got shape {_shape(bias)}")


def check_agent_attention_args(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    agents: torch.Tensor,
    agent_bias: torch.Tensor | None,
    query_bias: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    dropout_p: float,
    scale: float | None,
) -> None:
    """Validate the arguments of ``agent_attention``; raise ``ValueError``/``TypeError`` naming the culprit."""
    for name, t in (("q", q), ("k", k), ("v", v), ("agents", agents)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            letters = {
                "q": "(B, H, N, d)",
                "k": "(B, H, M, d)",
                "v": "(B, H, M, d)",
                "agents": "(B, H, n, d)",
            }
            raise ValueError(f"{name} must be 4-D {letters[name]}, got shape {_shape(t)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        if t.dtype != q.dtype:
            raise TypeError(
                f"{name} has dtype {t.dtype} but q has dtype {q.dtype}; all inputs must share one dtype"
            )
        if t.device != q.device:
            raise ValueError(
                f"{name} is on {t.device} but q is on {q.device}; all inputs must share one device"
            )
    batch, heads, num_queries, head_dim = q.shape
    num_keys = k.shape[2]
    num_agents = agents.shape[2]
    if k.shape[:2] != (batch, heads) or k.shape[3] != head_dim:
        raise ValueError(
            f"k must have shape (B, H, M, d) = ({batch}, {heads}, M, {head_dim}), got {_shape(k)}"
        )
    if v.shape[:3] != (batch, heads, num_keys):
        raise ValueError(
            f"v must have shape (B, H, M, d_v) = ({batch}, {heads}, {num_keys}, d_v) to match k, got {_shape(v)}"
        )
    if agents.shape[:2] != (batch, heads) or agents.shape[3] != head_dim:
        raise ValueError(
            f"agents must have shape (B, H, n, d) = ({batch}, {heads}, n, {head_dim}), got {_shape(agents)}"
        )
    if num_agents == 0:
        raise ValueError("agents must hold at least one agent token (n >= 1), got n = 0")
    if num_keys == 0:
        raise ValueError("k and v must hold at least one key (M >= 1), got M = 0")
    if agent_bias is not None:
        if not agent_bias.is_floating_point():
            raise TypeError(f"agent_bias must be a floating-point tensor, got dtype {agent_bias.dtype}")
        _check_broadcast("agent_bias", agent_bias, (batch, heads, num_agents, num_keys), "(B, H, n, M)")
    if query_bias is not None:
        if not query_bias.is_floating_point():
            raise TypeError(f"query_bias must be a floating-point tensor, got dtype {query_bias.dtype}")
        _check_broadcast("query_bias", query_bias, (batch, heads, num_queries, num_agents), "(B, H, N, n)")
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(
                f"key_padding_mask must be a bool tensor (True = padded), got dtype {key_padding_mask.dtype}"
            )
        if tuple(key_padding_mask.shape) != (batch, num_keys):
            raise ValueError(
                f"key_padding_mask must have shape (B, M) = ({batch}, {num_keys}), got {_shape(key_padding_mask)}"
            )
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if scale is not None and not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be a positive finite number or None, got {scale}")


def check_tensors(names_and_tensors: tuple[tuple[str, torch.Tensor], ...], rank: int, letters: str) -> None:
    """Each tensor is a floating-point torch.Tensor of ``rank`` dims, with the dtype and device of the first."""
    first_name, first = names_and_tensors[0]
    for name, t in names_and_tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != rank:
            raise ValueError(f"{name} must be {rank}-D {letters}, got shape {_shape(t)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        if t.dtype != first.dtype:
            raise TypeError(
                f"{name} has dtype {t.dtype} but {first_name} has dtype {first.dtype}; use one dtype"
            )
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; use one device")
