"""Plain reference for the agent attention op, written straight from the math.

Slow and memory-hungry on purpose: every intermediate is materialised, so the fast path in
``agentattn.ops.agent`` can be checked against it (outputs and gradients), in float64 if need be.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._masked_rows import softmax_or_zero
from ._validation import check_agent_attention_args


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
