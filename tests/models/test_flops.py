"""The FLOP counter: fvcore's conventions, operator by operator, and SDPA counted as its two matmuls."""

import torch
import torch.nn.functional as F
from torch import nn

from agentattn.measure import FlopCounter, count_flops


def _count(fn, *args):
    counter = FlopCounter()
    with torch.no_grad(), counter:
        fn(*args)
    return dict(counter.by_operator)


def test_linear_conv_norm_pool_upsample():
    assert _count(nn.Linear(8, 16), torch.rand(2, 5, 8)) == {"linear": 2 * 5 * 8 * 16}
    assert _count(nn.Linear(8, 16, bias=False), torch.rand(3, 8)) == {"linear": 3 * 8 * 16}
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)
    assert _count(conv, torch.rand(2, 4, 5, 7)) == {"conv": 2 * 6 * 5 * 7 * 2 * 9}
    assert _count(nn.LayerNorm(8), torch.rand(2, 3, 8)) == {"layer_norm": 5 * 48}
    assert _count(nn.LayerNorm(8, elementwise_affine=False), torch.rand(2, 3, 8)) == {"layer_norm": 4 * 48}
    assert _count(lambda x: F.adaptive_avg_pool2d(x, 3), torch.rand(1, 2, 9, 9)) == {
        "adaptive_avg_pool2d": 162
    }
    up = _count(lambda x: F.interpolate(x, size=(6, 4), mode="bilinear"), torch.rand(1, 2, 3, 3))
    assert up == {"upsample_bilinear2d": 4 * 2 * 6 * 4}


def test_sdpa_counts_as_its_two_matmuls():
    q, k, v = torch.rand(2, 3, 10, 8), torch.rand(2, 3, 12, 8), torch.rand(2, 3, 12, 5)
    explicit = _count(lambda: (q @ k.transpose(-1, -2)).softmax(-1) @ v)
    fused = _count(lambda: F.scaled_dot_product_attention(q, k, v))
    assert explicit == fused == {"matmul": 2 * 3 * 10 * 12 * (8 + 5)}


def test_count_flops_restores_training_mode():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4)).train()
    assert count_flops(model, (3, 2, 2)).total == 12 * 4
    assert model.training
