"""Agent biases: the official bias parameters and the B1/B2 tensors they make, for any grid.

Appendix A of the paper (official issue #19) decomposes the position bias into block, row and column parts.
Per layer the official code keeps (h heads, n agents):

    an_bias (h, n, 7, 7)      block bias agent→key, resized bilinearly to the key grid
    ah_bias (1, h, n, Hk, 1)  row bias agent→key
    aw_bias (1, h, n, 1, Wk)  column bias agent→key
    na_bias (h, n, 7, 7)      block bias query→agent, resized to the query grid
    ha_bias (1, h, Hq, 1, n)  row bias query→agent
    wa_bias (1, h, 1, Wq, n)  column bias query→agent
    ac_bias (1, h, n, P)      agent→prefix-key bias (Agent-DeiT's cls token, P = 1)
    ca_bias (1, h, P, n)      prefix-query→agent bias

and builds

    B1[h, a, (y, x)] = interp(an_bias)[h, a, y, x] + ah_bias[h, a, y] + aw_bias[h, a, x]     (1, h, n, P + Hk·Wk)
    B2[h, (y, x), a] = interp(na_bias)[h, a, y, x] + ha_bias[h, y, a] + wa_bias[h, x, a]     (1, h, P + Hq·Wq, n)

with the prefix columns/rows first. On a grid other than the construction one, the row and column biases are
summed into a full map and resized bilinearly, and the agent axis can be resampled onto another agent grid;
these are the two steps of the official downstream backbones (spec §2.5).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

BLOCK_BIAS_SIZE = 7  # the official block-bias tables are always 7×7

AGENT_BIAS_NAMES = ("an_bias", "na_bias", "ah_bias", "aw_bias", "ha_bias", "wa_bias")
PREFIX_BIAS_NAMES = ("ac_bias", "ca_bias")


def to_2tuple_grid(name: str, grid: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """Normalise a grid argument to (H, W) of positive ints; raise ValueError naming ``name`` otherwise."""
    if isinstance(grid, (tuple, list)) and torch.jit.is_tracing():
        # torch.jit.trace hands shapes over as 0-d tensors; the trace is fixed to this grid, as the biases are
        grid = tuple(int(g) if isinstance(g, torch.Tensor) and g.dim() == 0 else g for g in grid)
    if isinstance(grid, int) and not isinstance(grid, bool):
        grid = (grid, grid)
    if (
        not isinstance(grid, (tuple, list))
        or len(grid) != 2
        or not all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid)
    ):
        raise ValueError(f"{name} must be a positive int or a pair (H, W) of positive ints, got {grid!r}")
    return int(grid[0]), int(grid[1])


def agent_grid_for(agent_num: int | tuple[int, int]) -> tuple[int, int]:
    """The (rows, cols) pooling grid for ``agent_num`` agents.

    A square number n = p² gives (p, p), as in the official code. Any other n uses the most square factorisation
    rows × cols = n with rows <= cols (e.g. 12 → (3, 4), 7 → (1, 7)). A pair is taken as the grid itself.
    """
    if isinstance(agent_num, (tuple, list)):
        return to_2tuple_grid("agent_num", tuple(agent_num))
    if not isinstance(agent_num, int) or isinstance(agent_num, bool) or agent_num < 1:
        raise ValueError(f"agent_num must be a positive int or a pair (rows, cols), got {agent_num!r}")
    rows = math.isqrt(agent_num)
    while agent_num % rows:
        rows -= 1
    return rows, agent_num // rows


def init_agent_bias_parameters(
    module: nn.Module,
    num_heads: int,
    agent_num: int,
    key_grid: tuple[int, int],
    query_grid: tuple[int, int],
    num_prefix_tokens: int = 0,
) -> None:
    """Register the official agent-bias parameters on ``module`` (trunc_normal, std 0.02, as officially)."""
    kh, kw = key_grid
    qh, qw = query_grid
    shapes = {
        "an_bias": (num_heads, agent_num, BLOCK_BIAS_SIZE, BLOCK_BIAS_SIZE),
        "na_bias": (num_heads, agent_num, BLOCK_BIAS_SIZE, BLOCK_BIAS_SIZE),
        "ah_bias": (1, num_heads, agent_num, kh, 1),
        "aw_bias": (1, num_heads, agent_num, 1, kw),
        "ha_bias": (1, num_heads, qh, 1, agent_num),
        "wa_bias": (1, num_heads, 1, qw, agent_num),
    }
    if num_prefix_tokens > 0:
        shapes["ac_bias"] = (1, num_heads, agent_num, num_prefix_tokens)
        shapes["ca_bias"] = (1, num_heads, num_prefix_tokens, agent_num)
    for name, shape in shapes.items():
        param = nn.Parameter(torch.zeros(shape))
        trunc_normal_(param, std=0.02)
        module.register_parameter(name, param)


def _resize(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of the last two dims of a 4-D tensor (align_corners=False, as officially)."""
    if tuple(t.shape[-2:]) == size:
        return t
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)


def _resample_agent_axis(bias: torch.Tensor, agent_axis: int, src: tuple[int, int], dst: tuple[int, int]):
    """Resample the agent axis of a (1, h, *, *) bias from the ``src`` agent grid to the ``dst`` one."""
    if src == dst:
        return bias
    moved = bias.movedim(agent_axis, -1)  # (1, h, L, n)
    _, heads, length, _ = moved.shape
    grid = moved.reshape(heads, length, *src)  # (h, L, rows, cols)
    grid = F.interpolate(grid, size=dst, mode="bilinear", align_corners=False)
    return grid.reshape(1, heads, length, dst[0] * dst[1]).movedim(-1, agent_axis)


def agent_biases(
    params: nn.Module,
    key_grid: tuple[int, int],
    query_grid: tuple[int, int],
    agent_grid: tuple[int, int] | None = None,
    target_agent_grid: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Build (B1, B2) from the bias parameters held by ``params``.

    Args:
        params: a module holding ``an_bias`` … ``wa_bias`` (and ``ac_bias``/``ca_bias`` with prefix tokens).
        key_grid: (Hk, Wk) of the keys to attend to now.
        query_grid: (Hq, Wq) of the queries now.
        agent_grid: the (rows, cols) grid the n agents were pooled on; needed only with ``target_agent_grid``.
        target_agent_grid: resample the agent axis onto this grid (downstream backbones use more agents than
            their classification checkpoints were trained with).

    Returns:
        B1 of shape (1, h, n', P + Hk·Wk) and B2 of shape (1, h, P + Hq·Wq, n'), n' the number of agents after
        resampling, P the number of prefix tokens.
    """
    an_bias, na_bias = params.an_bias, params.na_bias
    ah_bias, aw_bias, ha_bias, wa_bias = params.ah_bias, params.aw_bias, params.ha_bias, params.wa_bias
    heads, num_agents = an_bias.shape[:2]
    built_key_grid = (ah_bias.shape[3], aw_bias.shape[4])
    built_query_grid = (ha_bias.shape[2], wa_bias.shape[3])

    # B1: agent → key.
    block1 = _resize(an_bias, key_grid)  # (h, n, Hk, Wk)
    rowcol1 = ah_bias + aw_bias  # (1, h, n, Hk0, Wk0)
    if built_key_grid != key_grid:
        rowcol1 = _resize(rowcol1[0], key_grid)
    bias1 = (block1 + rowcol1).reshape(1, heads, num_agents, key_grid[0] * key_grid[1])

    # B2: query → agent.
    block2 = (
        _resize(na_bias, query_grid).reshape(1, heads, num_agents, -1).transpose(-1, -2)
    )  # (1, h, HqWq, n)
    rowcol2 = ha_bias + wa_bias  # (1, h, Hq0, Wq0, n)
    if built_query_grid != query_grid:
        rowcol2 = _resize(rowcol2[0].permute(0, 3, 1, 2), query_grid).permute(0, 2, 3, 1)
    bias2 = block2 + rowcol2.reshape(1, heads, -1, num_agents)

    ac_bias = getattr(params, "ac_bias", None)
    if ac_bias is not None:
        bias1 = torch.cat([ac_bias, bias1], dim=-1)
        bias2 = torch.cat([params.ca_bias, bias2], dim=-2)

    if target_agent_grid is not None and agent_grid is not None:
        bias1 = _resample_agent_axis(bias1, 2, agent_grid, target_agent_grid)
        bias2 = _resample_agent_axis(bias2, 3, agent_grid, target_agent_grid)
    return bias1, bias2
