"""``AgentLMConfig``: the hyper-parameters of :class:`~agentattn.lm.AgentLM` and of its twins, with their checks."""

from __future__ import annotations

from dataclasses import InitVar, dataclass, fields
from typing import Any

__all__ = ["ATTN_TYPES", "POSITIONS", "SAVED_BEFORE_DEFAULTS", "AgentLMConfig"]

ATTN_TYPES = ("agent", "softmax", "linear", "retention")
POSITIONS = ("rope", "none")
# Fields whose default changed: a saved config without them was made with these values.
SAVED_BEFORE_DEFAULTS = {"window_positions": "none"}
DEFAULT_AGENT_NUM = 16


@dataclass
class AgentLMConfig:
    """Model hyper-parameters; every field but ``attn_type`` has a working default.

    attn_type: "agent" (causal agent attention), "softmax" (SDPA, is_causal), "linear" (elu+1) or "retention"
    (RetNet's fixed per-head decay).
    positions: softmax only: "rope" (rotary embeddings on q and k, base ``rope_base``) or "none" (NoPE).
    window_positions: agent only: "rope" (the default) puts rotary embeddings on q and k of the exact-window
    logits, while the agent logits stay position-free; "none" leaves positions to the decays and the conv. A
    config saved before this option existed reads as "none", the model it was trained as.
    conv_kernel: every mixer: the causal depthwise conv on V added to the attention output (0 = off).
    agent_num: agent attention only, as the vision models name it (``num_agents``, its old name, is still
    accepted by the constructor, ``from_dict`` and saved configs).
    chunk_size: the chunk of the chunked forms (agent: its exact window of C..2C tokens; linear and retention: a
    speed knob only).
    """

    attn_type: str
    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    max_seq_len: int = 256
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    agent_num: int = DEFAULT_AGENT_NUM
    chunk_size: int = 32
    conv_kernel: int = 4
    norm_eps: float = 1e-5
    positions: str = "rope"
    rope_base: float = 10000.0
    window_positions: str = "rope"
    num_agents: InitVar[int | None] = None  # the old name of agent_num

    def __post_init__(self, num_agents: int | None) -> None:
        if num_agents is not None:
            if self.agent_num not in (DEFAULT_AGENT_NUM, num_agents):
                raise ValueError(
                    f"agent_num ({self.agent_num}) and its old name num_agents ({num_agents}) differ"
                )
            self.agent_num = num_agents
        if self.attn_type not in ATTN_TYPES:
            raise ValueError(f"attn_type must be one of {ATTN_TYPES}, got {self.attn_type!r}")
        for name in (
            "vocab_size",
            "d_model",
            "n_layers",
            "n_heads",
            "max_seq_len",
            "agent_num",
            "chunk_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.conv_kernel < 0:
            raise ValueError(f"conv_kernel must be >= 0, got {self.conv_kernel}")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        if self.window_positions not in POSITIONS:
            raise ValueError(f"window_positions must be one of {POSITIONS}, got {self.window_positions!r}")
        rotary = (self.attn_type == "softmax" and self.positions == "rope") or (
            self.attn_type == "agent" and self.window_positions == "rope"
        )
        if rotary and (self.d_model // self.n_heads) % 2:
            off = "positions" if self.attn_type == "softmax" else "window_positions"
            raise ValueError(
                f"rotary embeddings need an even head dim, got {self.d_model // self.n_heads} ({off}='none' turns "
                "them off)"
            )
        if not self.rope_base > 1.0:
            raise ValueError(f"rope_base must be > 1, got {self.rope_base}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AgentLMConfig:
        """A saved config (e.g. a checkpoint's): old names are read, and one saved before ``window_positions``
        existed gets "none", the model it was trained as."""
        known = {f.name for f in fields(cls)} | {"num_agents"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown AgentLMConfig fields: {unknown}")
        return cls(**{**SAVED_BEFORE_DEFAULTS, **values})


# The InitVar's default would stay behind as a class attribute (None); the old name reads the field instead.
del AgentLMConfig.num_agents
AgentLMConfig.num_agents = property(lambda self: self.agent_num, doc="The old name of ``agent_num``.")  # type: ignore[assignment]
