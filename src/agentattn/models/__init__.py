"""timm model families with agent attention (registered on ``import agentattn``)."""
