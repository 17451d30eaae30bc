"""Functional core: ``agent_attention`` (fast), the causal forms, the elu+1 ``linear_attention`` baseline, and their
plain references in ``naive``."""

from . import naive
from .agent import agent_attention, attention_backend
from .causal_agent import causal_agent_attention
from .linear import linear_attention

naive_causal_agent_attention = naive.causal_agent_attention  # the name before naive.py held every reference

__all__ = [
    "agent_attention",
    "attention_backend",
    "causal_agent_attention",
    "linear_attention",
    "naive",
    "naive_causal_agent_attention",
]
