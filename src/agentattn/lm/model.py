"""``AgentLM``: a small GPT-style byte-level decoder whose attention is agent, softmax, linear or retention.

The ``attn_type`` twins share everything but the attention mixer: embedding, pre-norm blocks (RMSNorm, attention,
GELU MLP), q/k/v/output projections, the causal depthwise conv on V, init and output head.

- ``softmax``: causal SDPA with rotary position embeddings by default (Transformer++); ``positions="none"`` gives
  the NoPE variant.
- ``linear``: elu+1 linear attention (no positions: a rotation would break its positive feature map).
- ``retention``: RetNet's fixed-decay linear attention, the gated bounded-state baseline.
- ``agent``: causal agent attention; its agents carry a per-agent recency decay.

The causal depthwise conv on V (the 1-D analogue of the paper's DWC, kernel ``conv_kernel``, 0 = off) is an
option of every mixer, so that its share of a mixer's quality can be measured (mixer × DWC on/off).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..io import quote
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

ATTN_TYPES = ("agent", "softmax", "linear", "retention")
POSITIONS = ("rope", "none")


@dataclass
class AgentLMConfig:
    """Model hyper-parameters; every field but ``attn_type`` has a working default.

    attn_type: "agent" (causal agent attention), "softmax" (SDPA, is_causal), "linear" (elu+1) or "retention"
    (RetNet's fixed per-head decay).
    positions: softmax only: "rope" (rotary embeddings on q and k, base ``rope_base``) or "none" (NoPE).
    conv_kernel: every mixer: the causal depthwise conv on V added to the attention output (0 = off).
    num_agents: agent attention only. chunk_size: the chunk of the chunked forms (agent: its exact window of
    C..2C tokens; linear and retention: a speed knob only).
    """

    attn_type: str
    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    max_seq_len: int = 256
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    num_agents: int = 16
    chunk_size: int = 32
    conv_kernel: int = 4
    norm_eps: float = 1e-5
    positions: str = "rope"
    rope_base: float = 10000.0

    def __post_init__(self) -> None:
        if self.attn_type not in ATTN_TYPES:
            raise ValueError(f"attn_type must be one of {ATTN_TYPES}, got {self.attn_type!r}")
        for name in (
            "vocab_size",
            "d_model",
            "n_layers",
            "n_heads",
            "max_seq_len",
            "num_agents",
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
        if self.attn_type == "softmax" and self.positions == "rope" and (self.d_model // self.n_heads) % 2:
            raise ValueError(f"rotary embeddings need an even head dim, got {self.d_model // self.n_heads}")
        if not self.rope_base > 1.0:
            raise ValueError(f"rope_base must be > 1, got {self.rope_base}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AgentLMConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown AgentLMConfig fields: {unknown}")
        return cls(**values)


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


def rotate(x: torch.Tensor, start: int, base: float) -> torch.Tensor:
    """Rotary position embedding (RoFormer; the half-split layout of GPT-NeoX and LLaMA) of x (B, H, T, hd) at
    positions start .. start + T - 1."""
    half = x.shape[-1] // 2
    inv_freq = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    positions = torch.arange(start, start + x.shape[2], device=x.device, dtype=torch.float32)
    angles = positions[:, None] * inv_freq[None]  # (T, hd/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class SoftmaxMixer(_Mixer):
    """Multi-head causal softmax attention through SDPA, with rotary q/k by default; decodes with a KV cache."""

    def __init__(self, cfg: AgentLMConfig) -> None:
        super().__init__(cfg)
        self.rope_base = cfg.rope_base if cfg.positions == "rope" else None

    def _positioned(self, q: torch.Tensor, k: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rope_base is None:
            return q, k
        return rotate(q, start, self.rope_base), rotate(k, start, self.rope_base)

    def _attend(self, q, k, v):
        q, k = self._positioned(q, k, 0)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def _prefill(self, q, k, v, capacity):
        q, k = self._positioned(q, k, 0)
        B, H, T, hd = k.shape
        cache = KVCache(k.new_zeros(B, H, max(capacity, T), hd), v.new_zeros(B, H, max(capacity, T), hd), T)
        cache.k[:, :, :T], cache.v[:, :, :T] = k, v
        return F.scaled_dot_product_attention(q, k, v, is_causal=True), cache

    def _step(self, q, k, v, cache):
        if cache.t >= cache.k.shape[2]:
            raise ValueError(f"KV cache is full ({cache.k.shape[2]} positions)")
        q, k = self._positioned(q, k, cache.t)
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
    """

    def __init__(self, cfg: AgentLMConfig) -> None:
        super().__init__(cfg)
        n = cfg.num_agents
        self.agents = nn.Parameter(torch.randn(cfg.n_heads, n, self.head_dim) * self.head_dim**-0.5)
        rates = torch.logspace(-1, -10, n, base=2.0) if n > 1 else torch.tensor([2.0**-5])
        self.log_decay = nn.Parameter(rates.log().repeat(cfg.n_heads, 1))
        self.agent_bias = nn.Parameter(torch.zeros(cfg.n_heads, n))

    def _attend(self, q, k, v):
        agents, decay = self.agents.to(q.dtype), self.log_decay.exp()
        return causal_agent_attention(q, k, v, agents, decay, self.agent_bias, chunk_size=self.chunk_size)

    def _prefill(self, q, k, v, capacity):
        agents, decay = self.agents.to(q.dtype), self.log_decay.exp()
        y = causal_agent_attention(q, k, v, agents, decay, self.agent_bias, chunk_size=self.chunk_size)
        return y, causal_agent_prefill(k, v, agents, decay, chunk_size=self.chunk_size)

    def _step(self, q, k, v, state):
        # The unchecked step: q, k, v come from this layer; exp(log_decay) is only needed when a chunk is folded.
        decay = self.log_decay.exp() if state.folds_next else None
        agents = self.agents.to(q.dtype)
        return causal_agent_step(q, k, v, agents, state, decay, self.agent_bias, check_inputs=False)


MIXERS: dict[str, type[_Mixer]] = {
    "agent": AgentMixer,
    "softmax": SoftmaxMixer,
    "linear": LinearMixer,
    "retention": RetentionMixer,
}


class Block(nn.Module):
    def __init__(self, cfg: AgentLMConfig) -> None:
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = MIXERS[cfg.attn_type](cfg)
        self.norm2 = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        hidden = int(cfg.mlp_ratio * cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, hidden, bias=False),
            nn.GELU(),
            nn.Linear(hidden, cfg.d_model, bias=False),
        )
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.mlp(self.norm2(x)))

    def prefill(self, x: torch.Tensor, capacity: int) -> tuple[torch.Tensor, Any]:
        y, state = self.attn.prefill(self.norm1(x), capacity)
        x = x + y
        return x + self.mlp(self.norm2(x)), state

    def step(self, x: torch.Tensor, state: Any) -> torch.Tensor:
        x = x + self.attn.step(self.norm1(x), state)
        return x + self.mlp(self.norm2(x))


def state_nbytes(state: list[Any]) -> int:
    """Bytes held by a decoding state (per layer: agent memory + window, linear S/z, or the filled KV cache)."""
    return sum(layer.nbytes() for layer in state)


class AgentLM(nn.Module):
    """GPT-style byte-level language model; ``forward(idx)`` (B, T) int64 → logits (B, T, vocab_size).

    Decoding: :meth:`prefill` runs the parallel form over a prompt and returns the per-layer state (agent: memory
    + ring buffer, linear: S/z, softmax: KV cache); :meth:`step` feeds one token. :meth:`generate` uses both.
    """

    def __init__(self, cfg: AgentLMConfig) -> None:
        super().__init__()
        self.config = cfg
        init_seed = int(
            torch.randint(0, 2**62, (1,), device="cpu").item()
        )  # drawn first: shared weights match across twins
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm_f = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self._init_weights(init_seed)

    def _init_weights(self, seed: int) -> None:
        # GPT-2: N(0, 0.02) for linears and embeddings, residual output projections scaled by 1/sqrt(2·layers).
        # Drawn from one generator seeded by torch's RNG, in name order, skipping mixer-specific parameters, so
        # that twins built after the same torch.manual_seed start from identical shared weights.
        gen = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith(("qkv.weight", "mlp.0.weight", "lm_head.weight", "tok_emb.weight")):
                std = 0.02
            elif name.endswith(("attn.proj.weight", "mlp.2.weight")):
                std = 0.02 / math.sqrt(2 * self.config.n_layers)
            else:
                continue
            if p.is_meta:  # a meta-device build (size checks) has no values to draw
                continue
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen, device="cpu") * std)
        # The causal conv (PyTorch's default init, U(±1/sqrt(K))) from its own stream: twins with and without it
        # start from the same shared weights.
        conv_gen = torch.Generator().manual_seed(seed + 1)
        bound = 1.0 / math.sqrt(max(self.config.conv_kernel, 1))
        for name, p in self.named_parameters():
            if name.endswith(("attn.dwc.weight", "attn.dwc.bias")) and not p.is_meta:
                with torch.no_grad():
                    p.copy_((torch.rand(p.shape, generator=conv_gen) * 2 - 1) * bound)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _check_idx(self, idx: torch.Tensor, what: str = "idx") -> None:
        if not isinstance(idx, torch.Tensor):
            raise TypeError(f"{what} must be a torch.Tensor of token ids, got {type(idx).__name__}")
        if idx.dtype != torch.long:
            raise TypeError(f"{what} must be int64 (torch.long) token ids, got dtype {idx.dtype}")
        if idx.dim() != 2:
            raise ValueError(f"{what} must have shape (B, T), got {tuple(idx.shape)}")
        device = self.tok_emb.weight.device
        if idx.device != device:
            raise ValueError(f"{what} is on {idx.device} but the model is on {device}; move one of them")
        if idx.shape[1] > self.config.max_seq_len:
            raise ValueError(
                f"{what} has {idx.shape[1]} tokens, more than max_seq_len = {self.config.max_seq_len}"
            )
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.config.vocab_size):
            raise ValueError(f"{what} holds token ids outside [0, {self.config.vocab_size})")

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx: (B, T) int64, T <= max_seq_len → logits (B, T, vocab_size)."""
        return self.lm_head(self.hidden_states(idx))

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        """idx: (B, T) int64 → the final normalised states (B, T, C), before ``lm_head``: for a loss on a few
        positions (``lm_head(h[mask])``) without the (B, T, vocab_size) logits."""
        self._check_idx(idx)
        x = self.drop(self.tok_emb(idx))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.norm_f(x)

    @torch.no_grad()
    def prefill(self, idx: torch.Tensor, capacity: int | None = None) -> tuple[torch.Tensor, list[Any]]:
        """Read a prompt (B, T) in parallel → (logits of the last position (B, vocab), per-layer state).

        ``capacity`` sizes the softmax KV cache (default max_seq_len); the other states have a fixed size.
        """
        self._check_idx(idx, "prompt")
        if idx.shape[1] == 0:
            raise ValueError("prompt must hold at least one token")
        capacity = self.config.max_seq_len if capacity is None else capacity
        x = self.tok_emb(idx)
        states = []
        for block in self.blocks:
            x, state = block.prefill(x, capacity)
            states.append(state)
        return self.lm_head(self.norm_f(x[:, -1])), states

    @torch.no_grad()
    def step(self, token: torch.Tensor, states: list[Any]) -> torch.Tensor:
        """Feed one token (B,) int64 → logits (B, vocab) of the next; updates ``states`` in place."""
        x = self.tok_emb(token)[:, None]  # (B, 1, C)
        for block, state in zip(self.blocks, states, strict=True):
            x = block.step(x, state)
        return self.lm_head(self.norm_f(x[:, 0]))

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        callback: Any = None,
    ) -> torch.Tensor:
        """Continue idx (B, T) by ``max_new_tokens`` tokens → (B, T + max_new_tokens). Greedy at temperature 0.

        Agent and linear models decode with their recurrent state and can run past max_seq_len; the softmax
        model uses a KV cache and, once max_seq_len is reached, re-reads the last max_seq_len tokens per step
        (nanoGPT's cropping). ``callback(token (B,))`` is called for every new token (for streaming).
        """
        self._check_idx(idx, "prompt")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if max_new_tokens == 0:
            return idx
        was_training = self.training
        self.eval()
        max_len = self.config.max_seq_len
        capacity = min(idx.shape[1] + max_new_tokens, max_len)
        logits, states = self.prefill(idx, capacity)
        out = [idx]
        for i in range(max_new_tokens):
            token = self._sample(logits, temperature, top_k, generator)
            out.append(token[:, None])
            if callback is not None:
                callback(token)
            if i == max_new_tokens - 1:
                break
            if self.config.attn_type == "softmax" and states[0].attn.t >= max_len:
                logits, states = self.prefill(torch.cat(out, dim=1)[:, -max_len:], max_len)
            else:
                logits = self.step(token, states)
        self.train(was_training)
        return torch.cat(out, dim=1)

    @staticmethod
    def _sample(
        logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
    ) -> torch.Tensor:
        if temperature == 0.0:
            return logits.argmax(dim=-1)
        logits = logits.float() / temperature
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[:, 0]

    # -- safetensors I/O -----------------------------------------------------------------------------------------

    def save(self, path: str | Path, extra_metadata: dict[str, str] | None = None) -> None:
        """Write weights + config (JSON in the safetensors metadata) atomically."""
        from ..io import save_safetensors

        meta = {"format": "agentattn.lm", "config": json.dumps(asdict(self.config))}
        meta.update(extra_metadata or {})
        save_safetensors(self.state_dict(), path, metadata=meta)

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> AgentLM:
        """Rebuild a model written by :meth:`save` (strict key and shape check)."""
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            state = load_file(str(path), device=str(map_location))
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"{path} is not a readable safetensors file: {err}") from None
        if meta.get("format") != "agentattn.lm" or "config" not in meta:
            raise ValueError(f"{path} is not an agentattn LM checkpoint (no 'config' metadata)")
        from ..models.record import check_json_like, check_model_fits_weights

        try:
            values = json.loads(meta["config"])
        except (ValueError, RecursionError) as err:
            raise ValueError(f"{path}: its 'config' metadata is not JSON ({quote(str(err), 120)})") from None
        if type(values) is not dict:
            raise ValueError(f"{path}: its 'config' metadata is a {type(values).__name__}, not a JSON object")
        check_json_like(values, f"{path}: config")
        try:
            config = AgentLMConfig.from_dict(values)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"{path}: its 'config' metadata is not a valid AgentLMConfig ({quote(str(err))})"
            ) from None
        # The config may describe a model far larger than the file's weights: check on the meta device first.
        check_model_fits_weights(lambda: cls(config), state, str(path))
        model = cls(config)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            detail = next((ln.strip() for ln in str(err).splitlines()[1:] if ln.strip()), str(err))
            raise ValueError(f"{path}: the weights do not fit its config ({quote(detail)})") from None
        return model.to(map_location)
