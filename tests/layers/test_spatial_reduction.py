"""PVT's spatial reduction: one rule (pad to a multiple of sr) for the agent layer and the model's softmax layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from agentattn.layers import PVTAgentAttention
from agentattn.layers.spatial_reduction import reduce_tokens, reduced_grid
from agentattn.models.agent_pvt import PVTAttention


def _parts(dim: int, sr: int) -> tuple[nn.Conv2d, nn.LayerNorm]:
    torch.manual_seed(0)
    return nn.Conv2d(dim, dim, kernel_size=sr, stride=sr), nn.LayerNorm(dim)


def test_divisible_grids_match_the_official_conv():
    conv, norm = _parts(8, 2)
    x = torch.randn(2, 6 * 4, 8)
    out, key_grid = reduce_tokens(x, (6, 4), 2, conv, norm)
    x_map = x.transpose(1, 2).reshape(2, 8, 6, 4)
    official = norm(conv(x_map).flatten(2).transpose(1, 2))  # the official sr conv, which floors
    assert key_grid == (3, 2) == reduced_grid((6, 4), 2)
    assert torch.equal(out, official)


def test_no_token_is_dropped_and_small_grids_work():
    conv, norm = _parts(8, 4)
    x = torch.randn(1, 5 * 7, 8)
    out, key_grid = reduce_tokens(x, (5, 7), 4, conv, norm)
    assert key_grid == (2, 2)
    moved = x.clone()
    moved[:, -1] += 1.0  # the last token: the official floor conv would never see it
    assert not torch.allclose(reduce_tokens(moved, (5, 7), 4, conv, norm)[0], out)
    tiny, tiny_grid = reduce_tokens(torch.randn(1, 2 * 3, 8), (2, 3), 4, conv, norm)
    assert tiny_grid == (1, 1) and tiny.shape == (1, 1, 8)
    padded = F.pad(x.transpose(1, 2).reshape(1, 8, 5, 7), (0, 1, 0, 3))
    assert torch.allclose(out, norm(conv(padded).flatten(2).transpose(1, 2)))


def test_the_agent_and_softmax_layers_reduce_alike():
    torch.manual_seed(1)
    agent = PVTAgentAttention(16, 2, 4, (5, 7), sr_ratio=4)
    softmax = PVTAttention(16, 2, (5, 7), sr_ratio=4, qkv_bias=True, attn_drop=0.0, proj_drop=0.0)
    softmax.load_state_dict({k: v for k, v in agent.state_dict().items() if k in softmax.state_dict()})
    x = torch.randn(2, 35, 16)
    expected, _ = reduce_tokens(x, (5, 7), 4, agent.sr, agent.norm)
    assert torch.equal(
        softmax._keys_values(x, (5, 7))[0], agent.kv(expected).unflatten(-1, (2, 16)).unbind(-2)[0]
    )
    assert agent(x).shape == (2, 35, 16) and torch.isfinite(agent(x)).all()
