"""Softmax and linear-attention twins of the agent layers, with the same interface and projections.

They let an experiment swap the attention of one stage and keep everything else (``attn_type`` per stage):
``SoftmaxAttention`` is plain multi-head attention through SDPA; ``LinearAttention`` is elu+1 linear attention
with the same depthwise-conv term as the agent layer, so that the comparison isolates the attention itself.
Both take ``forward(x, grid_size=None)`` with x of shape (B, P + H·W, C).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models import register_notrace_module  # in every timm >= 1.0 (timm.layers only from 1.0.17)
from torch import nn

from ..ops import linear_attention
from .agent_bias import to_2tuple_grid


def _check_config(dim: int, num_heads: int, **rates: float) -> None:
    for name, value in (("dim", dim), ("num_heads", num_heads)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if dim % num_heads:
        raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
    for name, value in rates.items():
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value!r}")


def _check_tokens(x: torch.Tensor, dim: int, weight: torch.Tensor, expected: str) -> None:
    """x must be a floating (B, N, C = dim) tensor on the weight's device and in its dtype (unless autocast)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor {expected}, got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != dim:
        raise ValueError(f"x must be {expected} with C = dim = {dim}, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but the layer's parameters are on {weight.device}")
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(
            f"x has dtype {x.dtype} but the layer's parameters are {weight.dtype}; cast one of them "
            "or run under torch.autocast"
        )


# An fx leaf (timm's notrace registry): its forward reads Python values from shapes.
@register_notrace_module
class SoftmaxAttention(nn.Module):
    """Multi-head softmax attention (timm's ``Attention`` key names: ``qkv``, ``proj``)."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        materialize: bool = False,
    ) -> None:
        super().__init__()
        _check_config(dim, num_heads, attn_drop=attn_drop, proj_drop=proj_drop)
        self.dim, self.num_heads = dim, num_heads
        self.attn_drop = attn_drop
        self.materialize = materialize  # the explicit (B, H, N, N) matrix instead of SDPA: a memory baseline
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, grid_size: int | tuple[int, int] | None = None) -> torch.Tensor:
        """x: (B, N, C) → (B, N, C); ``grid_size`` is accepted for interface parity and ignored."""
        _check_tokens(x, self.dim, self.qkv.weight, "(B, N, C)")
        batch, tokens, channels = x.shape
        head_dim = channels // self.num_heads
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        dropout = self.attn_drop if self.training else 0.0
        if self.materialize:
            attn = ((q * head_dim**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, H, N, N)
            out = F.dropout(attn, dropout, self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(batch, tokens, channels)))


# An fx leaf (timm's notrace registry): its forward reads Python values from shapes.
@register_notrace_module
class LinearAttention(nn.Module):
    """elu+1 linear attention plus a depthwise 3×3 conv on the value map (keys ``qkv``, ``proj``, ``dwc``)."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        grid_size: int | tuple[int, int] = (14, 14),
        num_prefix_tokens: int = 0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        _check_config(dim, num_heads, proj_drop=proj_drop)
        if not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens must be a non-negative int, got {num_prefix_tokens!r}")
        self.dim, self.num_heads = dim, num_heads
        self.grid_size = to_2tuple_grid("grid_size", grid_size)
        self.num_prefix_tokens = num_prefix_tokens
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.dwc = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, grid_size: int | tuple[int, int] | None = None) -> torch.Tensor:
        """x: (B, P + H·W, C) → (B, P + H·W, C)."""
        grid = self.grid_size if grid_size is None else to_2tuple_grid("grid_size", grid_size)
        prefix = self.num_prefix_tokens
        _check_tokens(x, self.dim, self.qkv.weight, f"(B, {prefix} + H·W, C)")
        batch, tokens, channels = x.shape
        if tokens != prefix + grid[0] * grid[1]:
            raise ValueError(
                f"x has N = {tokens} tokens, but grid_size = {grid} with num_prefix_tokens = {prefix} expects "
                f"N = {prefix + grid[0] * grid[1]}; pass the token grid as grid_size=(H, W)"
            )
        head_dim = channels // self.num_heads
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        out = linear_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, channels)
        v_map = (
            v[:, :, prefix:].transpose(1, 2).reshape(batch, grid[0], grid[1], channels).permute(0, 3, 1, 2)
        )
        local = self.dwc(v_map).permute(0, 2, 3, 1).reshape(batch, grid[0] * grid[1], channels)
        out = torch.cat([out[:, :prefix], out[:, prefix:] + local], dim=1) if prefix else out + local
        return self.proj_drop(self.proj(out))
