"""Fast agent attention: two ``scaled_dot_product_attention`` calls.

Agent attention is two small softmax attentions chained through the agents:

    Va = softmax(s·A·Kᵀ + B1) · V      # (n, M) weights: agents gather from all keys
    O  = softmax(s·Q·Aᵀ + B2) · Va     # (N, n) weights: queries read from the agents

Each step is exactly what SDPA computes, with the bias as an additive mask. Without autograd we hand both
to PyTorch's fused kernels (flash/efficient on GPU, the fused CPU kernel): about 2× faster than explicit
matmuls at N = 197 on CPU. When gradients are needed, SDPA on CPU falls back to its unfused math kernel as
soon as a bias requires grad, which measured slower than plain matmuls, so training takes the explicit path
with the scale applied to the smaller operand (`benchmarks/attention.py` measures both).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ._validation import check_agent_attention_args

# Devices on which the training path (autograd) also goes through SDPA. CPU is not one: there SDPA falls back to
# its unfused math kernel as soon as a mask requires grad, slower than the explicit matmuls.
SDPA_TRAINING_DEVICES: tuple[str, ...] = ("cuda",)


def _as_4d(bias: torch.Tensor) -> torch.Tensor:
    """Leading unit dims up to 4-D: SDPA rejects a 1-D mask that broadcasting alone would accept."""
    return bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))


def _agent_mask(
    agent_bias: torch.Tensor | None, key_padding_mask: torch.Tensor | None, dtype: torch.dtype
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Fold the key padding mask into B1. Returns (mask for SDPA, (B,) rows whose keys are all padded)."""
    bias = None if agent_bias is None else _as_4d(agent_bias.to(dtype))
    if key_padding_mask is None:
        return bias, None
    # A sequence with every key padded would make a softmax over nothing (NaN): unmask it for the kernel
    # and zero its agent values afterwards, so that neither the output nor the gradients see a NaN.
    all_padded = key_padding_mask.all(dim=-1)  # (B,)
    padded = (key_padding_mask & ~all_padded[:, None])[:, None, None, :]  # (B, 1, 1, M)
    if bias is None:
        bias = torch.zeros(padded.shape, dtype=dtype, device=padded.device)
    return bias.masked_fill(padded, float("-inf")), all_padded


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
    """Agent attention: softmax(s·Q·Aᵀ + B2) · softmax(s·A·Kᵀ + B1) · V, in O(N·n·d).

    Args:
        q: (B, H, N, d) queries.
        k: (B, H, M, d) keys.
        v: (B, H, M, d_v) values.
        agents: (B, H, n, d) agent tokens (pooled queries, learned tokens, merged tokens, ...).
        scale: logit scale s for both softmaxes; ``d ** -0.5`` when None.
        agent_bias: B1, added to the agent→key logits; broadcastable to (B, H, n, M).
        query_bias: B2, added to the query→agent logits; broadcastable to (B, H, N, n).
        key_padding_mask: (B, M) bool; True marks a padded key, which is left out of the agent
            aggregation (the ``nn.MultiheadAttention`` convention). A sequence whose keys are all padded
            gets zero agent values, hence a zero output.
        dropout_p: dropout probability on both attention matrices, applied only when ``training``.
        training: whether dropout is active.

    Returns:
        (B, H, N, d_v). Biases are cast to the dtype of q. B = 0 gives an empty result.

    NaN is not checked for (that would cost a device sync): it propagates. A NaN in a query gives a NaN output
    row; a NaN in a key, value or agent of a (batch, head) reaches every output row of that (batch, head).
    fp16/bf16 inputs get fp32 logits and softmax on every path.
    """
    check_agent_attention_args(q, k, v, agents, agent_bias, query_bias, key_padding_mask, dropout_p, scale)
    s = q.shape[-1] ** -0.5 if scale is None else scale
    p = dropout_p if training else 0.0
    mask1, all_padded = _agent_mask(agent_bias, key_padding_mask, q.dtype)
    mask2 = None if query_bias is None else _as_4d(query_bias.to(q.dtype))
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, agents, agent_bias, query_bias)
    )
    # Under torch.export (and so ONNX export) record the explicit matmuls: plain MatMul/Softmax nodes for any
    # runtime, and no SDPA decomposition whose output strides differ from the eager kernel's.
    # On GPU, SDPA also trains: its memory-efficient kernel takes an additive mask and returns its gradient,
    # so training never materialises the (B, H, N, n) and (B, H, n, M) probabilities for autograd.
    sdpa_trains = q.device.type in SDPA_TRAINING_DEVICES
    explicit = (needs_grad and not sdpa_trains) or torch.compiler.is_exporting()
    attend = _attend_matmul if explicit else _attend_sdpa
    agent_values = attend(agents, k, v, mask1, p, s)  # (B, H, n, d_v)
    if all_padded is not None:
        agent_values = agent_values.masked_fill(all_padded[:, None, None, None], 0.0)
    out = attend(q, agents, agent_values, mask2, p, s)  # (B, H, N, d_v)
    if attend is _attend_sdpa:
        # PyTorch's fused CPU kernel returns zeros for a query row holding NaN; keep NaN in -> NaN out, as the
        # other paths do (adding ±0 changes nothing else, bit for bit).
        out = out + q.sum(dim=-1, keepdim=True).mul(0.0)
    return out


def _attend_sdpa(q, k, v, bias, dropout_p: float, scale: float) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)


def _attend_matmul(q, k, v, bias, dropout_p: float, scale: float) -> torch.Tensor:
    """softmax(s·q·kᵀ + bias)·v with explicit matmuls; s multiplies whichever of q or the logits is smaller.

    Logits and softmax are computed in fp32 when the inputs are fp16/bf16 or autocast is on, as the fused SDPA
    kernels do: rounded half-precision logits at |logit| ~ 1e4 are off by tens, which flips the softmax.
    """
    device_type = q.device.type
    upcast = q.dtype in (torch.float16, torch.bfloat16) or torch.is_autocast_enabled(device_type)
    with torch.autocast(device_type, enabled=False) if upcast else contextlib.nullcontext():
        if upcast:
            q, k = q.float(), k.float()
            bias = None if bias is None else bias.float()
        if q.shape[-1] <= k.shape[-2]:
            logits = (q * scale) @ k.transpose(-2, -1)
        else:
            logits = (q @ k.transpose(-2, -1)) * scale
        if bias is not None:
            logits = logits + bias
        probs = logits.softmax(dim=-1)  # max-subtracted by torch
    probs = F.dropout(probs.to(v.dtype), dropout_p, training=dropout_p > 0)
    return probs @ v
