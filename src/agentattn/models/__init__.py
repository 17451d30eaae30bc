"""timm model families with agent attention; importing this package registers them with timm."""

from . import agent_cswin, agent_deit, agent_pvt, agent_swin
from ._builder import check_model_name
from .convert import convert_to_agent

__all__ = ["agent_cswin", "agent_deit", "agent_pvt", "agent_swin", "check_model_name", "convert_to_agent"]
