"""Plain references for every op, written straight from the math, as flash-linear-attention keeps them.

Slow and memory-hungry on purpose: every intermediate is materialised, so the fast paths can be checked against
them (outputs and gradients), in float64 if need be:

- :func:`agent_attention` for ``agentattn.ops.agent`` (and the packed and Triton paths);
- :func:`causal_agent_attention`, :func:`causal_linear_attention` and :func:`causal_retention` for the chunked and
  recurrent forms in ``ops/causal_agent.py``, ``ops/causal_linear.py`` and ``ops/causal_retention.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._causal_common import _check_args as _check_causal_agent_args
from ._causal_common import _compute_dtype as _causal_compute_dtype
from ._masked_rows import softmax_or_zero
from ._validation import check_agent_attention_args
from .causal_linear import _check as _check_causal_linear_args
from .causal_linear import elu_feature_map
from .causal_retention import _check as _check_causal_retention_args
from .causal_retention import _decay_mask


def agent_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    agents: torch.Tensor,
    *,
    scale: float | None = None,
    agent_bias: torch.Tensor | None = None,
    query_bias: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """Reference agent attention: softmax(s·Q·Aᵀ + B2) · softmax(s·A·Kᵀ + B1) · V.

    Args:
        q: (B, H, N, d) queries.
        k: (B, H, M, d) keys.
        v: (B, H, M, d_v) values.
        agents: (B, H, n, d) agent tokens.
        scale: logit scale s; ``d ** -0.5`` when None.
        agent_bias: B1, broadcastable to (B, H, n, M).
        query_bias: B2, broadcastable to (B, H, N, n).
        key_padding_mask: (B, M) bool, True marks a padded key, which the agents ignore. An agent whose
            keys are all padded gathers zeros.
        dropout_p: dropout on both attention matrices, applied only when ``training``.

    Returns:
        (B, H, N, d_v).

    A fully masked row (a row of B1, after the cast to q's dtype and with the padded keys counted as -inf, or a row
    of B2, that is -inf everywhere) is taken as a row whose keys are all padded: that agent gathers zero values, or
    that query's output row is zero; no gradient flows through the row (its bias gradient is zero) and every
    gradient stays finite. Rows with some finite entries are ordinary softmaxes. The fast paths give the same.
    """
    check_agent_attention_args(q, k, v, agents, agent_bias, query_bias, key_padding_mask, dropout_p, scale)
    agent_probs, query_probs = agent_attention_weights(
        q,
        k,
        agents,
        scale=scale,
        agent_bias=agent_bias,
        query_bias=query_bias,
        key_padding_mask=key_padding_mask,
    )
    p = dropout_p if training else 0.0
    agent_values = F.dropout(agent_probs, p, training=p > 0) @ v  # (B, H, n, d_v)
    query_probs = F.dropout(query_probs, p, training=p > 0)
    return query_probs @ agent_values  # (B, H, N, d_v)


def agent_attention_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    agents: torch.Tensor,
    *,
    scale: float | None = None,
    agent_bias: torch.Tensor | None = None,
    query_bias: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two attention matrices of agent attention, materialised (for inspection and the reference).

    Args: as :func:`agent_attention` (q (B, H, N, d), k (B, H, M, d), agents (B, H, n, d)).

    Returns:
        ``(agent_probs, query_probs)``: (B, H, n, M), what each agent gathers from each key; and (B, H, N, n),
        what each query reads from each agent. Rows sum to 1, or are 0 where the logits are -inf throughout (an
        agent whose keys are all padded or whose B1 row is -inf at every unpadded key, a query whose B2 row is
        -inf everywhere).
    """
    check_agent_attention_args(q, k, k, agents, agent_bias, query_bias, key_padding_mask, 0.0, scale)
    s = q.shape[-1] ** -0.5 if scale is None else scale

    # Agent aggregation: n agents attend over the M keys.
    agent_logits = (agents * s) @ k.transpose(-2, -1)  # (B, H, n, M)
    if agent_bias is not None:
        agent_logits = agent_logits + agent_bias.to(q.dtype)
    if key_padding_mask is not None:
        padded = key_padding_mask[:, None, None, :]  # (B, 1, 1, M)
        agent_logits = agent_logits.masked_fill(padded, float("-inf"))
    agent_probs = softmax_or_zero(agent_logits)  # a row with every key padded or at -inf gathers nothing

    # Agent broadcast: N queries attend over the n agents.
    query_logits = (q * s) @ agents.transpose(-2, -1)  # (B, H, N, n)
    if query_bias is not None:
        query_logits = query_logits + query_bias.to(q.dtype)
    return agent_probs, softmax_or_zero(query_logits)  # a row of B2 at -inf throughout reads nothing


def causal_agent_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    agents: torch.Tensor,
    decay: torch.Tensor | None = None,
    agent_bias: torch.Tensor | None = None,
    *,
    chunk_size: int = 64,
    scale: float | None = None,
    window_q: torch.Tensor | None = None,
    window_k: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference: the full (B, H, T, T) causal weight matrix, then ``W @ v``. O(T²·n) memory; for tests.

    Args:
        q, k: (B, H, T, d). v: (B, H, T, d_v). agents: (H, n, d) learned agent tokens.
        decay: (H, n) recency rates λ >= 0 of the agent memory (None: 0). agent_bias: (H, n) read bias (None: 0).
        chunk_size: C; the exact window is the current chunk up to t plus the previous chunk.
        scale: logit scale s (None: d^-0.5).
        window_q, window_k: (B, H, T, d) or None: queries and keys of the exact-window logits (default q, k).
    Returns:
        (B, H, T, d_v) in the dtype of q.
    """
    _check_causal_agent_args(q, k, v, agents, decay, agent_bias, chunk_size, scale, window_q, window_k)
    if window_q is None:
        window_q, window_k = q, k
    out_dtype, cd = q.dtype, _causal_compute_dtype(q.dtype)
    q, k, v, agents = q.to(cd), k.to(cd), v.to(cd), agents.to(cd)
    tokens, head_dim = q.shape[2], q.shape[3]
    s = head_dim**-0.5 if scale is None else scale
    pos = torch.arange(tokens, device=q.device)
    chunk = pos // chunk_size
    mem = chunk[None, :] <= chunk[:, None] - 2  # (T, T) [t, j]: j is in the agents' memory at time t
    local = (chunk[None, :] >= chunk[:, None] - 1) & (pos[None, :] <= pos[:, None])  # exact window
    has_mem = mem.any(-1)  # (T,)
    # write: agent i over keys j, normalised over Mem(t), with recency prior -λ_i (t - j)
    write = s * torch.einsum("bhjd,hnd->bhnj", k, agents)  # (B, H, n, T)
    write = write[:, :, :, None, :].expand(-1, -1, -1, tokens, -1)  # (B, H, n, T, T) [.., t, j]
    if decay is not None:
        lag = (pos[:, None] - pos[None, :]).to(cd)  # (T, T)
        write = write - decay.to(cd)[None, :, :, None, None] * lag
    write = write.masked_fill(~mem, float("-inf"))
    omega = torch.softmax(write, dim=-1).masked_fill(~has_mem[:, None], 0.0)  # rows without memory are NaN
    # read: one softmax over [agents | window keys]
    read = s * torch.einsum("bhtd,hnd->bhtn", q, agents)  # (B, H, T, n)
    if agent_bias is not None:
        read = read + agent_bias.to(cd)[None, :, None, :]
    read = read.masked_fill(~has_mem[:, None], float("-inf"))
    window_q, window_k = window_q.to(cd), window_k.to(cd)
    scores = (s * window_q @ window_k.transpose(-2, -1)).masked_fill(~local, float("-inf"))  # (B, H, T, T)
    probs = torch.softmax(torch.cat([read, scores], dim=-1), dim=-1)
    n = agents.shape[1]
    weights = probs[..., n:] + torch.einsum("bhtn,bhntj->bhtj", probs[..., :n], omega)  # (B, H, T, T)
    return (weights @ v).to(out_dtype)


def causal_linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """Reference with the explicit causal (B, H, T, T) weight matrix. q, k: (B, H, T, d), v: (B, H, T, d_v)."""
    _check_causal_linear_args(q, k, v)
    out_dtype, cd = q.dtype, _causal_compute_dtype(q.dtype)
    phi_q, phi_k = elu_feature_map(q.to(cd)), elu_feature_map(k.to(cd))
    tokens = q.shape[2]
    mask = torch.ones(tokens, tokens, dtype=torch.bool, device=q.device).tril()
    weights = (phi_q @ phi_k.transpose(-2, -1)).masked_fill(~mask, 0.0)  # (B, H, T, T)
    return ((weights @ v.to(cd)) / (weights.sum(-1, keepdim=True) + eps)).to(out_dtype)


def causal_retention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Reference with the explicit (B, H, T, T) matrix. q, k: (B, H, T, d), v: (B, H, T, d_v) → (B, H, T, d_v)."""
    _check_causal_retention_args(q, k, v, gamma)
    out_dtype, cd = q.dtype, _causal_compute_dtype(q.dtype)
    weights = (q.to(cd) @ k.to(cd).transpose(-2, -1)) * _decay_mask(gamma, q.shape[2], cd)
    return (weights @ v.to(cd)).to(out_dtype)
