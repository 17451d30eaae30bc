"""agentattn: Agent Attention (Han et al., ECCV 2024) for PyTorch."""

__version__ = "0.1.0"
