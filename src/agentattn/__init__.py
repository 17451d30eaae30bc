"""agentattn: Agent Attention (Han et al., ECCV 2024) for PyTorch.

``import agentattn`` registers the Agent-DeiT, PVT, Swin and CSwin models with timm.
"""

from . import layers, models, ops
from .models.convert import convert_to_agent

__version__ = "0.1.0"

__all__ = ["__version__", "convert_to_agent", "layers", "models", "ops"]
