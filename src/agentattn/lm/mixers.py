"""The attention mixers of :class:`~agentattn.lm.AgentLM`: agent, softmax (+ rotary), linear and retention, each
with a parallel ``forward`` for training and ``prefill`` / ``step`` for decoding, sharing the projections and the
causal depthwise conv on V."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.causal_agent import (
    causal_agent_attention,
    causal_agent_prefill,
    causal_agent_step,
)
from ..ops.causal_linear import (
    causal_linear_attention,
    causal_linear_prefill,
    causal_linear_step,
)
from ..ops.causal_retention import (
    causal_retention,
    causal_retention_prefill,
    causal_retention_step,
    retention_decays,
)
from .config import AgentLMConfig

# ----------------------------------------------------------------------------------------------------------------
# attention mixers: forward(x) for training, prefill(x) -> (y, state) and step(x_t, state) for decoding


@dataclass
class MixerState:
    """A mixer's decoding state: its attention state and, with the causal DWC, the last K - 1 values."""

    attn: Any  # KVCache | CausalLinearState | CausalRetentionState | CausalAgentState
    conv: torch.Tensor | None  # (B, K - 1, d_model), oldest first; None without the conv

    def tensors(self) -> list[torch.Tensor]:
        return [*self.attn.tensors(), *([] if self.conv is None else [self.conv])]

    def nbytes(self) -> int:
        return self.attn.nbytes() + (0 if self.conv is None else self.conv.numel() * self.conv.element_size())


AgentMixerState = MixerState  # the name before every mixer could have the conv


class _Mixer(nn.Module):
    """q/k/v and output projections, and the optional causal depthwise conv on V shared by every mixer.

    Subclasses implement ``_attend(q, k, v)`` (training), ``_prefill(q, k, v, capacity)`` → (y, attention
    state) and ``_step(q, k, v, state)`` on (B, H, T, hd) heads; this class adds the conv and projects.
    """

    def __init__(self, cfg: AgentLMConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.chunk_size = cfg.chunk_size
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.conv_kernel = cfg.conv_kernel
        self.dwc = (
            nn.Conv1d(cfg.d_model, cfg.d_model, cfg.conv_kernel, groups=cfg.d_model)
            if cfg.conv_kernel
            else None
        )
        self.rope_base: float | None = None  # set by a mixer that uses rotary q and k

    def _rotary(self, q: torch.Tensor, k: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """q and k (B, H, T, hd) rotated to positions start.. (unchanged without ``rope_base``)."""
        if self.rope_base is None:
            return q, k
        return rotate(q, start, self.rope_base), rotate(k, start, self.rope_base)

    def _heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v  # each (B, H, T, hd)

    def _merge(self, y: torch.Tensor) -> torch.Tensor:
        B, H, T, hd = y.shape
        return y.transpose(1, 2).reshape(B, T, H * hd)

    def _conv(self, v_seq: torch.Tensor) -> torch.Tensor:
        """Causal depthwise conv over time: v_seq (B, T, C) → (B, T, C), output t reading values t - K + 1 .. t.

        The tokens are viewed as a channels-last (B, C, 1, T) map, so oneDNN works on them without the two
        transposing copies of a (B, C, T) Conv1d; padding both ends by K - 1 and keeping the first T outputs makes
        the conv causal.
        """
        K = self.conv_kernel
        x = v_seq.transpose(1, 2).unsqueeze(2)  # (B, C, 1, T), channels-last strides
        out = F.conv2d(x, self.dwc.weight.unsqueeze(2), self.dwc.bias, padding=(0, K - 1), groups=x.shape[1])
        return out.squeeze(2).transpose(1, 2)[:, : v_seq.shape[1]]  # (B, T, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, C) → (B, T, C)."""
        q, k, v = self._heads(x)
        y = self._merge(self._attend(q, k, v))
        if self.dwc is not None:
            y = y + self._conv(self._merge(v))
        return self.proj(y)

    def prefill(self, x: torch.Tensor, capacity: int) -> tuple[torch.Tensor, MixerState]:
        q, k, v = self._heads(x)
        y, attn_state = self._prefill(q, k, v, capacity)
        y = self._merge(y)
        history = None
        if self.dwc is not None:
            v_seq = self._merge(v)
            y = y + self._conv(v_seq)
            keep = self.conv_kernel - 1  # the last K - 1 values, zero-padded in front
            history = F.pad(v_seq, (0, 0, keep, 0))[:, v_seq.shape[1] :].contiguous()
        return self.proj(y), MixerState(attn_state, history)

    def step(self, x: torch.Tensor, state: MixerState) -> torch.Tensor:
        q, k, v = self._heads(x)
        y = self._merge(self._step(q, k, v, state.attn))
        if self.dwc is not None:
            # One output of the causal conv, Σ_k w[c, k]·v[k, c] over the last K values, written out in time-major
            # layout (rows are contiguous vectors): a few µs, where a Conv1d call costs ~0.1 ms of oneDNN set-up.
            window = torch.cat([state.conv, self._merge(v)], dim=1)  # (B, K, C)
            y += (window * self.dwc.weight[:, 0].t()).sum(1, keepdim=True)
            if self.dwc.bias is not None:
                y += self.dwc.bias
            state.conv = window[:, 1:]
        return self.proj(y)


@dataclass
class KVCache:
    """Softmax decoding state: k, v (B, H, capacity, hd), of which the first t positions are filled."""

    k: torch.Tensor
    v: torch.Tensor
    t: int

    def tensors(self) -> list[torch.Tensor]:
        return [self.k, self.v]

    def nbytes(self) -> int:
        """Bytes of the filled part (what the cache holds at context t)."""
        return 2 * self.k[:, :, : self.t].numel() * self.k.element_size()


@functools.lru_cache(maxsize=16)
def _rotary_tables(
    start: int, length: int, half: int, base: float, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (length, hd/2) of the rotary angles at positions start .. start + length - 1. Cached: every
    layer of a model reads the same table, and a decoding step would otherwise rebuild it once per layer."""
    with torch.inference_mode(False), torch.no_grad():  # plain tensors, usable in a later training step too
        inv_freq = base ** (-torch.arange(half, device=device, dtype=torch.float32) / half)
        positions = torch.arange(start, start + length, device=device, dtype=torch.float32)
        angles = positions[:, None] * inv_freq[None]  # (T, hd/2)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(x: torch.Tensor, start: int, base: float) -> torch.Tensor:
    """Rotary position embedding (RoFormer; the half-split layout of GPT-NeoX and LLaMA) of x (B, H, T, hd) at
    positions start .. start + T - 1."""
    half = x.shape[-1] // 2
    if torch.compiler.is_compiling():
        cos, sin = _rotary_tables.__wrapped__(start, x.shape[2], half, base, x.device, x.dtype)
    else:
        cos, sin = _rotary_tables(start, x.shape[2], half, base, x.device, x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class SoftmaxMixer(_Mixer):
    """Multi-head causal softmax attention through SDPA, with rotary q/k by default; decodes with a KV cache."""

    def __init__(self, cfg: AgentLMConfig) -> None:
        super().__init__(cfg)
        self.rope_base = cfg.rope_base if cfg.positions == "rope" else None

    def _attend(self, q, k, v):
        q, k = self._rotary(q, k, 0)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def _prefill(self, q, k, v, capacity):
        q, k = self._rotary(q, k, 0)
        B, H, T, hd = k.shape
        cache = KVCache(k.new_zeros(B, H, max(capacity, T), hd), v.new_zeros(B, H, max(capacity, T), hd), T)
        cache.k[:, :, :T], cache.v[:, :, :T] = k, v
        return F.scaled_dot_product_attention(q, k, v, is_causal=True), cache

    def _step(self, q, k, v, cache):
        if cache.t >= cache.k.shape[2]:
            raise ValueError(f"KV cache is full ({cache.k.shape[2]} positions)")
        q, k = self._rotary(q, k, cache.t)
        cache.k[:, :, cache.t], cache.v[:, :, cache.t] = k[:, :, 0], v[:, :, 0]
        cache.t += 1
        return F.scaled_dot_product_attention(q, cache.k[:, :, : cache.t], cache.v[:, :, : cache.t])


class LinearMixer(_Mixer):
    """Causal elu+1 linear attention (Katharopoulos et al., 2020); decodes with a (hd × hd + hd) state per head."""

    def _attend(self, q, k, v):
        return causal_linear_attention(q, k, v, chunk_size=self.chunk_size)

    def _prefill(self, q, k, v, capacity):
        return causal_linear_attention(q, k, v, chunk_size=self.chunk_size), causal_linear_prefill(k, v)

    def _step(self, q, k, v, state):
        return causal_linear_step(q, k, v, state)


class RetentionMixer(_Mixer):
    """RetNet's retention: linear attention with a fixed decay γ_h per head (1 - 2^(-5-h)), q scaled by hd^-0.5
    and each head's output RMS-normalised (RetNet's GroupNorm); decodes with a (hd × hd) state per head."""

    def __init__(self, cfg: AgentLMConfig) -> None:
        super().__init__(cfg)
        self.head_norm = nn.RMSNorm(self.head_dim, eps=cfg.norm_eps)

    def _gamma(self, like: torch.Tensor) -> torch.Tensor:
        # Made per call (H numbers), not kept in a buffer: fixed by the head count, and nothing to restore after a
        # meta-device build (from_pretrained) or a load.
        return retention_decays(self.n_heads).to(like.device)

    def _attend(self, q, k, v):
        y = causal_retention(q * self.head_dim**-0.5, k, v, self._gamma(q), chunk_size=self.chunk_size)
        return self.head_norm(y)

    def _prefill(self, q, k, v, capacity):
        return self._attend(q, k, v), causal_retention_prefill(k, v, self._gamma(k))

    def _step(self, q, k, v, state):
        return self.head_norm(causal_retention_step(q * self.head_dim**-0.5, k, v, self._gamma(q), state))


class AgentMixer(_Mixer):
    """Causal agent attention (:mod:`agentattn.ops.causal_agent`).

    Parameters beyond the twins': ``agents`` (H, n, hd), ``log_decay`` (H, n) with λ = exp(log_decay) log-spaced
    from 1/2 to 1/2^10 per token at init (agents watch different time scales) and ``agent_bias`` (H, n).
    With ``window_positions="rope"`` the exact-window logits use rotary q and k; the agents never see positions.
    """

    def __init__(self, cfg: AgentLMConfig) -> None:
        super().__init__(cfg)
        self.rope_base = cfg.rope_base if cfg.window_positions == "rope" else None
        n = cfg.agent_num
        self.agents = nn.Parameter(torch.randn(cfg.n_heads, n, self.head_dim) * self.head_dim**-0.5)
        rates = torch.logspace(-1, -10, n, base=2.0) if n > 1 else torch.tensor([2.0**-5])
        self.log_decay = nn.Parameter(rates.log().repeat(cfg.n_heads, 1))
        self.agent_bias = nn.Parameter(torch.zeros(cfg.n_heads, n))

    def _window(self, q: torch.Tensor, k: torch.Tensor, start: int) -> dict[str, torch.Tensor]:
        """The op's window_q / window_k keywords: rotary q and k at positions start.., or nothing."""
        if self.rope_base is None:
            return {}
        window_q, window_k = self._rotary(q, k, start)
        return {"window_q": window_q, "window_k": window_k}

    def _attend(self, q, k, v):
        agents, decay = self.agents.to(q.dtype), self.log_decay.exp()
        return causal_agent_attention(
            q, k, v, agents, decay, self.agent_bias, chunk_size=self.chunk_size, **self._window(q, k, 0)
        )

    def _prefill(self, q, k, v, capacity):
        agents, decay = self.agents.to(q.dtype), self.log_decay.exp()
        window = self._window(q, k, 0)
        y = causal_agent_attention(
            q, k, v, agents, decay, self.agent_bias, chunk_size=self.chunk_size, **window
        )
        state = causal_agent_prefill(
            k, v, agents, decay, chunk_size=self.chunk_size, window_k=window.get("window_k")
        )
        return y, state

    def _step(self, q, k, v, state):
        # The unchecked step: q, k, v come from this layer; exp(log_decay) is only needed when a chunk is folded.
        decay = self.log_decay.exp() if state.folds_next else None
        agents = self.agents.to(q.dtype)
        return causal_agent_step(
            q, k, v, agents, state, decay, self.agent_bias, check_inputs=False, **self._window(q, k, state.t)
        )


MIXERS: dict[str, type[_Mixer]] = {
    "agent": AgentMixer,
    "softmax": SoftmaxMixer,
    "linear": LinearMixer,
    "retention": RetentionMixer,
}
