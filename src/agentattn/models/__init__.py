"""timm model families with agent attention; importing this package registers them with timm."""

from . import agent_cswin, agent_deit, agent_pvt, agent_swin
from .convert import convert_to_agent

__all__ = ["agent_cswin", "agent_deit", "agent_pvt", "agent_swin", "convert_to_agent"]
