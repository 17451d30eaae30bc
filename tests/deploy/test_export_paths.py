"""The export-only branches of the op and the layers compute what the eager ones do."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from agentattn.layers.agent_attention import adaptive_avg_pool2d
from agentattn.ops import agent_attention
from agentattn.ops.naive import agent_attention as naive_agent_attention
from tests.conftest import assert_close_rel


@pytest.fixture
def exporting(monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)


@pytest.mark.parametrize(
    ("size", "grid"), [((7, 7), (2, 2)), ((56, 56), (3, 3)), ((14, 10), (7, 5)), ((5, 9), (4, 3))]
)
def test_adaptive_pool_export_branch(exporting, size, grid):
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    assert_close_rel(adaptive_avg_pool2d(x, grid), F.adaptive_avg_pool2d(x, grid), 1e-12, f"{size}->{grid}")


def test_op_export_branch_is_the_matmul_path(exporting, monkeypatch):
    import agentattn.ops.agent as op

    monkeypatch.setattr(op, "_attend_sdpa", None)  # SDPA must not be called while exporting
    b, h, n, m, d, agents = 2, 3, 17, 13, 8, 4
    q, k, v, a = (torch.randn(b, h, s, d) for s in (n, m, m, agents))
    bias1, bias2 = torch.randn(1, h, agents, m), torch.randn(1, h, n, agents)
    with torch.no_grad():
        out = agent_attention(q, k, v, a, agent_bias=bias1, query_bias=bias2)
    ref = naive_agent_attention(q, k, v, a, agent_bias=bias1, query_bias=bias2)
    assert_close_rel(out, ref, 1e-5, "exporting op vs naive")
