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
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io import quote
from .config import ATTN_TYPES, POSITIONS, AgentLMConfig
from .mixers import MIXERS, KVCache, MixerState, rotate

# AgentLMConfig, KVCache, MixerState and rotate are also read from here (their home before the split).
__all__ = [
    "ATTN_TYPES",
    "POSITIONS",
    "AgentLM",
    "AgentLMConfig",
    "Block",
    "KVCache",
    "MixerState",
    "rotate",
    "state_nbytes",
]


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
