"""Functional core: ``agent_attention`` (fast), its plain reference ``naive.agent_attention``, and the
elu+1 ``linear_attention`` baseline."""

from . import naive
from .agent import agent_attention
from .linear import linear_attention

__all__ = ["agent_attention", "linear_attention", "naive"]
