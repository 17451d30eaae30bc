"""B1/B2 construction: the official formula on any grid, interpolation to other grids, agent-axis resampling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from agentattn.layers import AgentAttention, agent_biases, agent_grid_for
from tests.conftest import assert_close_rel


def _randomise(layer, std=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return layer


def explicit_biases(layer, grid):
    """Spec §1.1 written index by index (loops), for the construction grid."""
    h, n = layer.num_heads, layer.agent_num
    H, W = grid
    an = F.interpolate(layer.an_bias, size=grid, mode="bilinear", align_corners=False)
    na = F.interpolate(layer.na_bias, size=grid, mode="bilinear", align_corners=False)
    b1 = torch.zeros(1, h, n, H * W)
    b2 = torch.zeros(1, h, H * W, n)
    for head in range(h):
        for a in range(n):
            for y in range(H):
                for x in range(W):
                    b1[0, head, a, y * W + x] = (
                        an[head, a, y, x] + layer.ah_bias[0, head, a, y, 0] + layer.aw_bias[0, head, a, 0, x]
                    )
                    b2[0, head, y * W + x, a] = (
                        na[head, a, y, x] + layer.ha_bias[0, head, y, 0, a] + layer.wa_bias[0, head, 0, x, a]
                    )
    return b1, b2


@pytest.mark.parametrize("grid,agent_num", [((5, 8), 6), ((7, 7), 9), ((3, 11), 4)])
def test_biases_match_the_formula_on_non_square_grids(grid, agent_num):
    layer = _randomise(AgentAttention(16, num_heads=2, agent_num=agent_num, grid_size=grid))
    b1, b2 = layer.biases(grid, grid)
    e1, e2 = explicit_biases(layer, grid)
    assert_close_rel(b1, e1, 1e-6, "B1")
    assert_close_rel(b2, e2, 1e-6, "B2")


def test_prefix_biases_come_first():
    layer = _randomise(AgentAttention(16, num_heads=2, agent_num=4, grid_size=(3, 3), num_prefix_tokens=2))
    b1, b2 = layer.biases((3, 3), (3, 3))
    assert b1.shape == (1, 2, 4, 2 + 9) and b2.shape == (1, 2, 2 + 9, 4)
    assert torch.equal(b1[..., :2], layer.ac_bias)
    assert torch.equal(b2[:, :, :2], layer.ca_bias)


def test_other_grid_resizes_rowcol_sum_and_block_bias():
    """Downstream rule (spec §2.5): row+column sum resized as one map, block bias resized from 7×7."""
    layer = _randomise(AgentAttention(8, num_heads=1, agent_num=4, grid_size=(6, 6)))
    grid = (9, 13)
    b1, b2 = layer.biases(grid, grid)
    rowcol1 = F.interpolate((layer.ah_bias + layer.aw_bias)[0], size=grid, mode="bilinear")
    e1 = (F.interpolate(layer.an_bias, size=grid, mode="bilinear") + rowcol1).reshape(1, 1, 4, -1)
    rowcol2 = F.interpolate(
        (layer.ha_bias + layer.wa_bias)[0].permute(0, 3, 1, 2), size=grid, mode="bilinear"
    )
    e2 = (
        (F.interpolate(layer.na_bias, size=grid, mode="bilinear") + rowcol2)
        .reshape(1, 1, 4, -1)
        .transpose(-1, -2)
    )
    assert_close_rel(b1, e1, 1e-6, "B1")
    assert_close_rel(b2, e2, 1e-6, "B2")


def test_constant_biases_stay_constant_under_any_resampling():
    layer = AgentAttention(8, num_heads=1, agent_num=9, grid_size=(4, 4))
    with torch.no_grad():
        for p in layer.parameters():
            p.fill_(0.25)
    b1, b2 = agent_biases(layer, (10, 3), (5, 6), agent_grid=(3, 3), target_agent_grid=(5, 7))
    assert b1.shape == (1, 1, 35, 30) and b2.shape == (1, 1, 30, 35)
    assert torch.allclose(b1, torch.full_like(b1, 0.75)) and torch.allclose(b2, torch.full_like(b2, 0.75))


def test_agent_axis_resampling_is_identity_on_the_same_grid():
    layer = _randomise(AgentAttention(8, num_heads=2, agent_num=9, grid_size=(4, 4)))
    same = agent_biases(layer, (4, 4), (4, 4), agent_grid=(3, 3), target_agent_grid=(3, 3))
    plain = agent_biases(layer, (4, 4), (4, 4))
    assert all(torch.equal(a, b) for a, b in zip(same, plain, strict=True))


def test_agent_axis_resampling_is_bilinear_over_the_agent_grid():
    layer = _randomise(AgentAttention(8, num_heads=2, agent_num=4, grid_size=(3, 3)))
    b1, _ = agent_biases(layer, (3, 3), (3, 3), agent_grid=(2, 2), target_agent_grid=(4, 4))
    base, _ = agent_biases(layer, (3, 3), (3, 3))
    grid = base[0].permute(0, 2, 1).reshape(2, 9, 2, 2)  # (h, keys, rows, cols)
    want = F.interpolate(grid, size=(4, 4), mode="bilinear").reshape(2, 9, 16).permute(0, 2, 1)[None]
    assert_close_rel(b1, want, 1e-6, "agent axis")


@pytest.mark.parametrize(
    "n,grid", [(49, (7, 7)), (9, (3, 3)), (12, (3, 4)), (7, (1, 7)), (100, (10, 10)), ((2, 5), (2, 5))]
)
def test_agent_grid_for(n, grid):
    assert agent_grid_for(n) == grid


@pytest.mark.parametrize("bad", [0, -4, 2.5, True, (0, 3), (1, 2, 3)])
def test_agent_grid_for_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="agent_num"):
        agent_grid_for(bad)
