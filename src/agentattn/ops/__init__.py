"""Functional core: ``agent_attention`` (fast), its plain reference ``naive.agent_attention``, and the
elu+1 ``linear_attention`` baseline."""

from . import naive
from .agent import agent_attention, attention_backend
from .causal_agent import causal_agent_attention, naive_causal_agent_attention
from .linear import linear_attention

__all__ = [
    "agent_attention",
    "attention_backend",
    "causal_agent_attention",
    "linear_attention",
    "naive",
    "naive_causal_agent_attention",
]
