"""A diffusers attention processor that runs AgentSD's merged agent attention (spec §5.3).

The processor wraps whatever processor the layer had (usually ``AttnProcessor2_0``). When its transformer block
has a merge plan for the current forward (set by the block's pre-hook, see :mod:`.patch`), it merges the
already-normalised tokens, attends, and unmerges, so the block around it runs unchanged:

    merged, agents = merge(x)                                    # (B, N - r, C), (B, n, C)
    Q, K, V = to_q/to_k/to_v(merged);  A = to_q(agents)          # heads split: (B, h, ·, d)
    O = softmax(Q·Aᵀ·s^k_scale2) · softmax(A·Kᵀ·s) · V + k_shortcut·V,  s = d^-0.5
    out = unmerge(to_out(O))                                     # (B, N, C)

The agent path runs only where the official condition holds (agents exist and ``2·n < N - r``); otherwise the
wrapped processor attends over the merged tokens (plain ToMe). Without a plan it is the wrapped processor.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .merge import TokenMerge


@dataclass
class BlockState:
    """What one patched ``BasicTransformerBlock`` shares with its processors and hooks.

    ``downsample`` is the block's UNet level (1 = full latent resolution); ``plan`` is set by the block's
    pre-hook for the duration of one forward (None where the block is not merged in that call).
    """

    downsample: int
    plan: TokenMerge | None = None
    calls: dict[str, int] = field(default_factory=lambda: {"agent": 0, "merged": 0})


def agent_sd_attention(
    attn: torch.nn.Module,
    x: torch.Tensor,
    agents: torch.Tensor,
    k_scale2: float = 0.3,
    k_shortcut: float = 0.075,
    attn_precision: str | None = None,
) -> torch.Tensor:
    """AgentSD self-attention of a diffusers ``Attention`` layer over merged tokens.

    Args:
        attn: the ``Attention`` layer (``to_q``, ``to_k``, ``to_v``, ``to_out``, ``heads``, ``scale``).
        x: (B, N, C) merged tokens (queries, keys and values all come from them).
        agents: (B, n, C) agent tokens, projected with ``to_q``.
        k_scale2: the query→agent softmax uses the scale s**k_scale2.
        k_shortcut: weight of the value shortcut that stands in for the untrained DWC.
        attn_precision: "fp32" computes the attention in float32 (recommended for SD 2.1 in half precision).

    Returns:
        (B, N, C_out), after ``to_out``.
    """
    b, n, _ = x.shape
    q, k, v, a = attn.to_q(x), attn.to_k(x), attn.to_v(x), attn.to_q(agents)
    heads = attn.heads
    head_dim = k.shape[-1] // heads
    q, k, v, a = (t.view(b, -1, heads, head_dim).transpose(1, 2) for t in (q, k, v, a))  # (B, h, ·, d)
    if attn.norm_q is not None:
        q, a = attn.norm_q(q), attn.norm_q(a)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    dtype = q.dtype
    if attn_precision == "fp32":
        q, k, v, a = q.float(), k.float(), v.float(), a.float()
    s = attn.scale
    agent_v = F.scaled_dot_product_attention(a, k, v, scale=s)  # (B, h, n, d): agents gather from all tokens
    out = F.scaled_dot_product_attention(q, a, agent_v, scale=s**k_scale2)  # (B, h, N, d): tokens read agents
    out = out + k_shortcut * v
    out = out.transpose(1, 2).reshape(b, n, heads * head_dim).to(dtype)
    out = attn.to_out[0](out)
    out = attn.to_out[1](out)
    return out / attn.rescale_output_factor


def agent_sd_attention_naive(
    attn: torch.nn.Module,
    x: torch.Tensor,
    agents: torch.Tensor,
    k_scale2: float = 0.3,
    k_shortcut: float = 0.075,
) -> torch.Tensor:
    """Reference for :func:`agent_sd_attention`: explicit matmuls and softmaxes, as the official forward."""
    b, n, _ = x.shape
    h = attn.heads
    q, k, v, a = (t.view(b, t.shape[1], h, -1).transpose(1, 2) for t in
                  (attn.to_q(x), attn.to_k(x), attn.to_v(x), attn.to_q(agents)))  # fmt: skip
    agent_v = (a @ k.transpose(-1, -2) * attn.scale).softmax(-1) @ v  # (B, h, n, d)
    out = (q @ a.transpose(-1, -2) * attn.scale**k_scale2).softmax(-1) @ agent_v + k_shortcut * v
    return attn.to_out[1](attn.to_out[0](out.transpose(1, 2).reshape(b, n, -1)))


class AgentSDAttnProcessor:
    """Merging wrapper around an attention layer's own processor.

    Args:
        original: the processor it replaces (restored by :func:`agentattn.diffusion.remove_patch`).
        block: the state shared with the block's hooks.
        use_agents: run agent attention where the condition holds (self-attention); False for cross-attention,
            which only merges its queries (ToMe).
        k_scale2, k_shortcut, attn_precision: see :func:`agent_sd_attention`.
    """

    def __init__(
        self,
        original: Any,
        block: BlockState,
        use_agents: bool,
        k_scale2: float,
        k_shortcut: float,
        attn_precision: str | None,
    ) -> None:
        self.original = original
        self.block = block
        self.use_agents = use_agents
        self.k_scale2 = k_scale2
        self.k_shortcut = k_shortcut
        self.attn_precision = attn_precision

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        plan = self.block.plan
        extra = dict(kwargs)
        if temb is not None:
            extra["temb"] = temb
        if plan is None or hidden_states.ndim != 3:
            return self.original(
                attn,
                hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                attention_mask=attention_mask,
                **extra,
            )
        if attention_mask is not None and encoder_hidden_states is None:
            # A self-attention mask indexes the unmerged tokens: run this call unmerged rather than misapply it.
            warnings.warn("AgentSD: self-attention mask given; this call runs unmerged", stacklevel=2)
            return self.original(
                attn,
                hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                attention_mask=attention_mask,
                **extra,
            )
        merged = plan.merge(hidden_states)
        agents = plan.agents(hidden_states) if self.use_agents and encoder_hidden_states is None else None
        if agents is not None and agents.shape[1] * 2 < merged.shape[1] and self._plain_layer(attn):
            self.block.calls["agent"] += 1
            out = agent_sd_attention(
                attn, merged, agents, self.k_scale2, self.k_shortcut, self.attn_precision
            )
        else:
            self.block.calls["merged"] += 1
            out = self.original(
                attn,
                merged,
                encoder_hidden_states=encoder_hidden_states,
                attention_mask=attention_mask,
                **extra,
            )
        return plan.unmerge(out)

    @staticmethod
    def _plain_layer(attn: torch.nn.Module) -> bool:
        """Whether the layer has nothing the agent path leaves out (spatial/group norm, residual)."""
        return (
            getattr(attn, "spatial_norm", None) is None
            and getattr(attn, "group_norm", None) is None
            and not getattr(attn, "residual_connection", False)
        )
