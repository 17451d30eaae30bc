"""Look inside agent attention: what each agent gathers, and what each query reads.

    with record_agent_attention(model) as maps:
        model(images)
    maps[0].agent_probs   # (B, h, n, P + Hk·Wk): agent i's softmax over the keys
    maps[0].query_probs   # (B, h, P + Hq·Wq, n): query j's softmax over the agents

The weights are recomputed by the plain reference (``agentattn.ops.naive.agent_attention_weights``) from the
very q, k, agents and biases the layer uses, so the model's own output is untouched.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..ops.naive import agent_attention_weights
from .agent_attention import AgentAttentionBase

__all__ = ["AgentAttentionMaps", "record_agent_attention"]


@dataclass
class AgentAttentionMaps:
    """The two attention matrices of one agent-attention call, on the CPU, in float32."""

    layer: str  # the module's qualified name in the model
    agent_probs: torch.Tensor  # (B, h, n, P + Hk·Wk)
    query_probs: torch.Tensor  # (B, h, P + Hq·Wq, n)
    query_grid: tuple[int, int]
    key_grid: tuple[int, int]
    agent_grid: tuple[int, int]
    num_prefix_tokens: int

    def agent_maps(self) -> torch.Tensor:
        """Head-averaged agent→key weights on the key grid: (B, n, Hk, Wk) (prefix keys dropped)."""
        probs = self.agent_probs.mean(dim=1)[..., self.num_prefix_tokens :]
        return probs.unflatten(-1, self.key_grid)

    def query_maps(self) -> torch.Tensor:
        """Head-averaged query→agent weights, one map per agent on the query grid: (B, n, Hq, Wq)."""
        probs = self.query_probs.mean(dim=1)[:, self.num_prefix_tokens :]  # (B, Hq·Wq, n)
        return probs.transpose(1, 2).unflatten(-1, self.query_grid)


@contextmanager
def record_agent_attention(model: nn.Module) -> Iterator[list[AgentAttentionMaps]]:
    """Record the attention matrices of every agent-attention layer of ``model`` during the ``with`` block.

    Yields a list that fills with one :class:`AgentAttentionMaps` per layer call, in call order.

    Raises:
        ValueError: ``model`` has no agent-attention layer.
    """
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, AgentAttentionBase)]
    if not layers:
        raise ValueError(f"model {type(model).__name__} has no agent-attention layer to record")
    names = {id(m): name for name, m in layers}
    records: list[AgentAttentionMaps] = []

    def sink(layer, q, k, agents, bias1, bias2, query_grid, key_grid) -> None:
        with torch.no_grad():
            agent_probs, query_probs = agent_attention_weights(
                q.float(), k.float(), agents.float(), scale=layer.scale, agent_bias=bias1.float(),
                query_bias=bias2.float(),
            )  # fmt: skip
        records.append(
            AgentAttentionMaps(
                layer=names[id(layer)],
                agent_probs=agent_probs.cpu(),
                query_probs=query_probs.cpu(),
                query_grid=tuple(query_grid),
                key_grid=tuple(key_grid),
                agent_grid=tuple(layer.agent_grid),
                num_prefix_tokens=layer.num_prefix_tokens,
            )
        )

    for _, m in layers:
        m._attention_sink = sink
    try:
        yield records
    finally:
        for _, m in layers:
            m._attention_sink = None
