"""nn.Modules built on ``agentattn.ops``, with the official parameter names, and their softmax/linear twins."""

from .agent_attention import AgentAttention, AgentAttentionBase, CSwinAgentAttention, PVTAgentAttention
from .agent_bias import agent_biases, agent_grid_for
from .attention_maps import AgentAttentionMaps, record_agent_attention
from .twins import LinearAttention, SoftmaxAttention

__all__ = [
    "AgentAttention",
    "AgentAttentionBase",
    "AgentAttentionMaps",
    "CSwinAgentAttention",
    "LinearAttention",
    "PVTAgentAttention",
    "SoftmaxAttention",
    "agent_biases",
    "agent_grid_for",
    "record_agent_attention",
]
