"""Byte-level language modelling with causal agent attention and its softmax / linear twins.

``from agentattn.lm import AgentLM, AgentLMConfig``; data in :mod:`agentattn.lm.data`, training in
:mod:`agentattn.lm.train`, speed benchmark in :mod:`agentattn.lm.bench`, CLI ``agentattn lm``.
"""

from .model import ATTN_TYPES, AgentLM, AgentLMConfig, state_nbytes

__all__ = ["ATTN_TYPES", "AgentLM", "AgentLMConfig", "state_nbytes"]
