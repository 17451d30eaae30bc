"""The cases of the attention sweep (:mod:`agentattn.bench.attention`): the layers on shared weights, their analytic
FLOPs, a memory estimate to skip cases that cannot fit, and the timed call of one mode."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..layers import AgentAttention, LinearAttention, SoftmaxAttention
from .official import OfficialAgentAttention

TOKEN_BUDGET = (
    12608  # B·N of the DeiT-T config (B = 64, N = 197); larger N get a smaller batch (1 from 12545)
)
DEFAULT_TOKENS = (197, 785, 3137, 12545, 50177)
CASES = ("agentattn", "official", "softmax-sdpa", "softmax-explicit", "linear-elu")
COMPILED = "agentattn-compiled"
MODES = ("fwd", "fwd_bwd")


def build_case(name: str, dim: int, heads: int, agents: int, side: int) -> nn.Module:
    """One layer of the sweep with the weights of seed 0 (the same ``qkv``/``proj`` for every case)."""
    torch.manual_seed(0)
    ours = AgentAttention(dim, heads, agents, side, num_prefix_tokens=1)
    if name in ("agentattn", COMPILED):
        return ours
    shared = {k: v for k, v in ours.state_dict().items() if k.split(".")[0] in ("qkv", "proj", "dwc")}
    if name == "official":
        layer: nn.Module = OfficialAgentAttention(dim, heads, agents, side, num_prefix_tokens=1)
        layer.load_state_dict(ours.state_dict(), strict=True)
        return layer
    if name in ("softmax-sdpa", "softmax-explicit"):
        layer = SoftmaxAttention(dim, heads, materialize=name == "softmax-explicit")
        layer.load_state_dict({k: v for k, v in shared.items() if not k.startswith("dwc")}, strict=True)
        return layer
    if name == "linear-elu":
        layer = LinearAttention(dim, heads, side, num_prefix_tokens=1)
        layer.load_state_dict(shared, strict=True)
        return layer
    raise ValueError(f"unknown case {name!r}; expected one of {(*CASES, COMPILED)}")


def forward_flops(name: str, batch: int, tokens: int, dim: int, heads: int, agents: int) -> int:
    """Analytic forward FLOPs (multiply and add counted separately) of one case.

    Projections 2·B·N·C·4C; agent core 2·(2·B·H·n·N·d + 2·B·H·N·n·d) plus the 3×3 depthwise conv 2·9·B·(N-1)·C;
    softmax 2·2·B·H·N²·d; linear attention 2·2·B·H·N·d² (+ its normaliser and the same conv).
    """
    d = dim // heads
    proj = 2 * batch * tokens * dim * 4 * dim
    dwc = 2 * 9 * batch * (tokens - 1) * dim
    if name in ("agentattn", COMPILED, "official"):
        return proj + core_flops(batch, heads, tokens, tokens, agents, d) + dwc
    if name in ("softmax-sdpa", "softmax-explicit"):
        return proj + 2 * 2 * batch * heads * tokens * tokens * d
    if name == "linear-elu":
        return proj + 2 * 2 * batch * heads * tokens * d * d + 2 * 2 * batch * heads * tokens * d + dwc
    raise ValueError(f"unknown case {name!r}")


def core_flops(batch: int, heads: int, queries: int, keys: int, agents: int, head_dim: int) -> int:
    """FLOPs of the agent attention op, 2 × (2·B·H·n·M·d + 2·B·H·N·n·d) (multiply and add counted apart)."""
    return 2 * (
        2 * batch * heads * agents * keys * head_dim + 2 * batch * heads * queries * agents * head_dim
    )


def estimated_bytes(name: str, batch: int, tokens: int, dim: int, heads: int, mode: str) -> int:
    """A rough upper estimate of the working memory of one case, to skip cases that cannot fit."""
    activations = 12 * batch * tokens * dim * 4
    if name == "softmax-explicit":
        # logits, probabilities (and their gradients in training) of (B, h, N, N).
        activations += (2 if mode == "fwd" else 4) * batch * heads * tokens * tokens * 4
    elif name == "softmax-sdpa" and mode == "fwd_bwd":
        # the CPU backward of the fused kernel works in blocks; count a generous (B, h, N, 512) workspace.
        activations += 2 * batch * heads * tokens * 512 * 4
    return activations


def time_mode(layer: nn.Module, x: torch.Tensor, mode: str) -> Callable[[], object]:
    """A closure running one timed call of ``layer`` in ``mode`` ('fwd' or 'fwd_bwd'), setting eval/train."""
    if mode == "fwd":
        layer.eval()

        def call() -> object:
            with torch.inference_mode():
                return layer(x)

        return call
    layer.train()

    def step() -> object:
        layer.zero_grad(set_to_none=True)
        layer(x).sum().backward()
        return None

    return step
