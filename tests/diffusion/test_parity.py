"""Parity with the official AgentSD vectors (tests/data/vectors/agentsd, official commit 207ce3eb357b).

Rows of ``merged`` and ``agent`` are compared by token (the official row order comes from an unstable argsort),
the merge groups exactly, and the sub-layer output after unmerge within 1e-5 (absolute; values are O(1)).
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import DATA_DIR, assert_close_rel

pytest.importorskip("diffusers")
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from safetensors.torch import load_file

from agentattn.diffusion import bipartite_soft_matching_2d
from agentattn.diffusion.processor import (
    AgentSDAttnProcessor,
    BlockState,
    agent_sd_attention,
    agent_sd_attention_naive,
)

VECTORS = DATA_DIR / "vectors" / "agentsd"
CASES = [c["case_id"] for c in json.loads((VECTORS / "index.json").read_text())["cases"]]


def _attention() -> Attention:
    attn = Attention(320, heads=8, dim_head=40, bias=False, out_bias=True)
    attn.load_state_dict(load_file(VECTORS / "weights.safetensors"), strict=True)
    return attn.eval()


def _rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return x.gather(1, rows[..., None].expand(-1, -1, x.shape[-1]))


@pytest.mark.parametrize("case_id", CASES)
def test_official_vectors(case_id):
    meta = json.loads((VECTORS / f"{case_id}.json").read_text())
    ref = load_file(VECTORS / f"{case_id}.safetensors")
    x = ref["x"]
    metric = x if meta["metric_is_x"] else x * ref["metric_scale"] + ref["metric_shift"]
    plan = bipartite_soft_matching_2d(
        metric, meta["H"], meta["W"], meta["sx"], meta["sy"], meta["r"], meta["agent_r"], use_rand=False
    )
    assert plan.num_merged == meta["num_merged_tokens"]

    # merged tokens, row by row through the token each row belongs to; merge groups exactly
    merged = plan.merge(x)
    ref_row_token = ref["merged_row_token"]
    assert_close_rel(_rows(merged, plan.token_to_row.gather(1, ref_row_token)), ref["merged"], 1e-5, "merged")
    ours_group = plan.row_token.gather(1, plan.token_to_row)  # representative token of each token's group
    assert torch.equal(ours_group, ref_row_token.gather(1, ref["token_to_merged_row"]))

    # agent tokens
    if meta["agent_path_taken"]:
        assert plan.num_agents == meta["num_agent_tokens"]
        rows = plan.token_to_agent_row.gather(1, ref["agent_row_token"])
        assert_close_rel(_rows(plan.agents(x), rows), ref["agent"], 1e-5, "agent")
        ref_group = ref["agent_row_token"].gather(1, ref["token_to_agent_row"])
        assert torch.equal(plan.agent_row_token.gather(1, plan.token_to_agent_row), ref_group)
    else:
        assert (ref["token_to_agent_row"] == -1).all()
        assert plan.agents(x) is None or plan.num_agents * 2 >= plan.num_merged

    # the sub-layer output after unmerge, through the diffusers processor
    block = BlockState(downsample=1, plan=plan)
    proc = AgentSDAttnProcessor(AttnProcessor2_0(), block, True, meta["k_scale2"], meta["k_shortcut"], None)
    with torch.no_grad():
        out = proc(_attention(), x)
    assert (out - ref["out"]).abs().max().item() <= 1e-5
    assert block.calls == (
        {"agent": 1, "merged": 0} if meta["agent_path_taken"] else {"agent": 0, "merged": 1}
    )


@pytest.mark.parametrize("precision", [None, "fp32"])
def test_agent_attention_matches_naive(precision):
    attn = _attention()
    torch.manual_seed(3)
    x, agents = torch.randn(2, 50, 320), torch.randn(2, 9, 320)
    with torch.no_grad():
        fast = agent_sd_attention(attn, x, agents, 0.3, 0.075, precision)
        naive = agent_sd_attention_naive(attn, x, agents, 0.3, 0.075)
    assert_close_rel(fast, naive, 1e-5, "agent_sd_attention")


def test_merge_indices_cover_every_token():
    torch.manual_seed(0)
    metric = torch.randn(2, 6 * 10, 8)  # 6x10 grid: sx=sy=4 leaves a partial row and column of cells
    gen = torch.Generator().manual_seed(0)
    plan = bipartite_soft_matching_2d(metric, 6, 10, 4, 4, r=30, agent_r=55, use_rand=True, generator=gen)
    assert plan.dst_tokens.numel() == 2  # one per full 4x4 cell
    assert plan.num_merged == 60 - 30 and plan.num_agents == 60 - 55  # (60 - 55) * 2 < 60 - 30: agents exist
    x = torch.randn(2, 60, 5)
    # unmerge(merge(x)) is the mean of each group: every token appears once, group sizes add up to N
    rows = plan.token_to_row
    counts = torch.zeros(2, plan.num_merged, dtype=torch.long).scatter_add_(1, rows, torch.ones_like(rows))
    assert (counts >= 1).all() and (counts.sum(1) == 60).all()
    means = torch.stack([torch.zeros(plan.num_merged, 5).index_add_(0, rows[b], x[b]) for b in range(2)])
    assert_close_rel(plan.merge(x), means / counts[..., None], 1e-6, "group means")
    assert bipartite_soft_matching_2d(metric, 6, 10, 4, 4, r=0) is None
    with pytest.raises(ValueError, match="expected h\\*w"):
        bipartite_soft_matching_2d(metric, 6, 9, 4, 4, r=3)
