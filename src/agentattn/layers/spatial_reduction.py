"""PVT's spatial reduction of the keys and values, one rule for every layer that uses it (the agent and the
softmax attention of Agent-PVT)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["reduce_tokens", "reduced_grid"]


def reduced_grid(grid: tuple[int, int], sr_ratio: int) -> tuple[int, int]:
    """The key grid :func:`reduce_tokens` gives for ``grid``: (⌈H/sr⌉, ⌈W/sr⌉)."""
    return -(-grid[0] // sr_ratio), -(-grid[1] // sr_ratio)


def reduce_tokens(
    x: torch.Tensor, grid: tuple[int, int], sr_ratio: int, sr: nn.Module | None, norm: nn.Module | None
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Reduce a token map for the keys and values: (B, H·W, C) → (B, Hk·Wk, C) and (Hk, Wk) = (⌈H/sr⌉, ⌈W/sr⌉).

    The map is zero-padded on the right and bottom to a multiple of ``sr_ratio``, then goes through ``sr`` (the
    stride-``sr_ratio`` conv) and ``norm`` (LayerNorm over channels). No token is dropped, and a grid smaller than
    ``sr_ratio`` gives a 1×1 key map. The official conv floors the grid instead; the two agree whenever
    ``sr_ratio`` divides the grid, as at every trained resolution. With ``sr_ratio`` 1, ``x`` and ``grid`` pass
    through.
    """
    if sr_ratio == 1:
        return x, grid
    assert sr is not None and norm is not None, "sr_ratio > 1 needs the sr conv and its norm"
    x_map = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], grid[0], grid[1])  # (B, C, H, W)
    # (sr - g % sr) % sr, not -g % sr: dynamo traces no negative modulo
    pad_h, pad_w = (sr_ratio - grid[0] % sr_ratio) % sr_ratio, (sr_ratio - grid[1] % sr_ratio) % sr_ratio
    if pad_h or pad_w:
        x_map = F.pad(x_map, (0, pad_w, 0, pad_h))
    reduced = sr(x_map)  # (B, C, Hk, Wk)
    return norm(reduced.flatten(2).transpose(1, 2)), (reduced.shape[2], reduced.shape[3])
