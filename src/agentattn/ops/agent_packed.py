"""Agent attention plus its DWC term on a packed ``[q | k | v]`` projection, with a hand-written backward (the
CPU training path of :class:`agentattn.layers.AgentAttention`).

Autograd through the layer (split of the qkv projection, head split, pooling, two softmax attentions) spends a
large part of a training step moving memory rather than multiplying: every head-split operand is copied before
its batched matmul, each of dq, dk, dv is assembled in its own buffer, then concatenated back into the gradient
of the projection, and slicing off the prefix tokens fills zero tensors. This op works on the packed projection
itself:

- per head, batched matmuls read q, k, v, the agents and the output gradient as strided slices of their packed
  (B, N, ·) tensors (no head-split copies), and out, dq, dk and dv are copied into their slices (a batched matmul
  writing into a strided slice itself falls back to a loop over the batch, 2.5× slower);
- the backward writes one (B, N, 3C) gradient, the one ``qkv`` needs;
- the depthwise conv on the spatial values runs on one channels-last copy of them and is added into the output
  buffer in place (no padded copy, no extra sum); its input gradient is added into dv.

Per head h (s the scale, B1/B2 the biases, A = pool(Q) the agents):

    P1 = softmax(s·A·Kᵀ + B1)   Va = P1·V        P2 = softmax(s·Q·Aᵀ + B2)   O = P2·Va
    dP2 = dO·Vaᵀ   dVa = P2ᵀ·dO   dL2 = P2 ⊙ (dP2 - rowsum(dP2 ⊙ P2))   dQ = s·dL2·A   dA = s·dL2ᵀ·Q
    dP1 = dVa·Vᵀ   dV = P1ᵀ·dVa   dL1 = P1 ⊙ (dP1 - rowsum(dP1 ⊙ P1))   dK = s·dL1ᵀ·A  dA += s·dL1·K
    dB1 = Σ_batch dL1   dB2 = Σ_batch dL2   dQ_spatial += pool_backward(dA)

and out[spatial] += DWC(V_spatial), whose backward is ``aten.convolution_backward``.

A row of B1 or B2 that is -inf everywhere is taken, as on every path of ``agent_attention``, as a row whose keys
are all padded: the softmax sees it as 0 and its output row is multiplied by 0 in place. That agent gathers zero
values, or that query gets a zero attention output (the DWC term is still added); the row passes no gradient
(dL = 0 there, a zero bias gradient) and nothing is NaN. Looking for such rows costs a look at each bias's first
and last columns (a few µs); the rest is paid only when one exists.

It is tested against autograd through :func:`agentattn.ops.agent_attention` (outputs and every gradient) and with
``torch.autograd.gradcheck`` in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._masked_rows import check_rows_first, fully_masked_rows
from .agent import forced_backend
from .tracing import is_tracing

__all__ = ["agent_attention_packed", "packed_path_applies"]


def packed_path_applies(qkv: torch.Tensor) -> bool:
    """Whether :func:`agent_attention_packed` is the faster training path for this projection output.

    CPU fp32/fp64 with autograd recording; not while tracing, under autocast, nor inside an
    :func:`~agentattn.ops.attention_backend` block. CUDA keeps its SDPA / matmul paths.
    """
    return (
        forced_backend() is None
        and qkv.device.type == "cpu"
        and qkv.dtype in (torch.float32, torch.float64)
        and torch.is_grad_enabled()
        and qkv.requires_grad
        and not torch.is_autocast_enabled("cpu")
        and not is_tracing()  # compile and export trace the plain ops; a jit trace must not depend on grad mode
    )


def agent_attention_packed(
    qkv: torch.Tensor,
    agent_bias: torch.Tensor,
    query_bias: torch.Tensor,
    dwc_weight: torch.Tensor,
    dwc_bias: torch.Tensor | None,
    *,
    num_heads: int,
    grid_size: tuple[int, int],
    agent_grid: tuple[int, int],
    num_prefix_tokens: int = 0,
    scale: float | None = None,
) -> torch.Tensor:
    """Agent attention with pooled agents plus the DWC term, on a packed projection, for training.

    Args:
        qkv: (B, P + H·W, 3C), the projection ``[q | k | v]`` along channels (channel = head·d + j in each part).
        agent_bias: B1, (1, h, n, P + H·W). query_bias: B2, (1, h, P + H·W, n).
        dwc_weight: (C, 1, k, k) depthwise conv on the spatial values (odd k, zero padding k // 2), ``dwc_bias``
            (C,) or None; the prefix tokens get no DWC term, as officially.
        num_heads: h; d = C / h.
        grid_size: (H, W) of the spatial tokens; the first P tokens (``num_prefix_tokens``) are not pooled.
        agent_grid: (rows, cols) of the adaptive average pooling of the spatial queries; n = rows·cols.
        scale: logit scale s (None: d ** -0.5).

    Returns:
        (B, P + H·W, C): what ``AgentAttention`` projects with ``proj``. A row of a bias that is -inf everywhere
        attends to nothing (zero agent values, or a zero attention output for that query; zero bias gradient),
        as in :func:`agentattn.ops.agent_attention`.
    """
    if qkv.dim() != 3 or qkv.shape[-1] % 3:
        raise ValueError(f"qkv must be (B, N, 3C), got shape {tuple(qkv.shape)}")
    tokens, channels = qkv.shape[1], qkv.shape[-1] // 3
    if channels % num_heads:
        raise ValueError(f"C = {channels} must be divisible by num_heads = {num_heads}")
    height, width = grid_size
    if tokens != num_prefix_tokens + height * width:
        raise ValueError(
            f"qkv has N = {tokens} tokens, but grid_size = {tuple(grid_size)} with num_prefix_tokens = "
            f"{num_prefix_tokens} expects {num_prefix_tokens + height * width}"
        )
    n = agent_grid[0] * agent_grid[1]
    for name, bias, shape in (
        ("agent_bias", agent_bias, (1, num_heads, n, tokens)),
        ("query_bias", query_bias, (1, num_heads, tokens, n)),
    ):
        if tuple(bias.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(bias.shape)}")
        if bias.dtype != qkv.dtype or bias.device != qkv.device:
            raise TypeError(f"{name} must match qkv's dtype and device ({qkv.dtype}, {qkv.device})")
    k = dwc_weight.shape[-1]
    if tuple(dwc_weight.shape) != (channels, 1, k, k) or k % 2 == 0:
        raise ValueError(f"dwc_weight must be a depthwise (C, 1, k, k) kernel with odd k, C = {channels}, "
                         f"got {tuple(dwc_weight.shape)}")  # fmt: skip
    if dwc_bias is not None and tuple(dwc_bias.shape) != (channels,):
        raise ValueError(f"dwc_bias must have shape ({channels},), got {tuple(dwc_bias.shape)}")
    s = (channels // num_heads) ** -0.5 if scale is None else scale
    return _PackedAgentAttention.apply(
        qkv, agent_bias, query_bias, dwc_weight, dwc_bias, num_heads, tuple(grid_size), tuple(agent_grid),
        num_prefix_tokens, s,
    )  # fmt: skip


def _spatial_map(x: torch.Tensor, prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    """(B, P + H·W, C) tokens → (B, C, H, W) channels-last view of the spatial ones."""
    return x[:, prefix:].unflatten(1, grid).permute(0, 3, 1, 2)


def _pool_backward_into(
    grad_map: torch.Tensor, grad_agents: torch.Tensor, q_map: torch.Tensor, agent_grid: tuple[int, int]
) -> None:
    """grad_map (B, C, H, W) view += adaptive_avg_pool2d backward of grad_agents (B, n, C)."""
    rows, cols = agent_grid
    height, width = grad_map.shape[-2:]
    if height % rows == 0 and width % cols == 0:
        # Whole windows: every query of a window gets 1/window of its agent's gradient, added through a view.
        kh, kw = height // rows, width // cols
        blocks = grad_map.unflatten(3, (cols, kw)).unflatten(2, (rows, kh))  # (B, C, rows, kh, cols, kw)
        agent = grad_agents.transpose(1, 2).unflatten(2, agent_grid)  # (B, C, rows, cols)
        blocks.add_(agent[:, :, :, None, :, None], alpha=1.0 / (kh * kw))
        return
    agent = grad_agents.transpose(1, 2).unflatten(2, agent_grid)
    grad_map.add_(torch.ops.aten._adaptive_avg_pool2d_backward(agent.contiguous(), q_map))


class _PackedAgentAttention(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx, qkv, bias1, bias2, dwc_weight, dwc_bias, heads, grid, agent_grid, prefix, scale
    ):
        channels = qkv.shape[-1] // 3
        d = channels // heads
        q, k, v = qkv.split(channels, dim=-1)  # (B, N, C) strided views
        q_map = _spatial_map(q, prefix, grid)
        agents = F.adaptive_avg_pool2d(q_map, agent_grid).flatten(2).transpose(1, 2).contiguous()  # (B, n, C)
        out = qkv.new_empty(q.shape)
        # Fully masked bias rows: 0 for the softmax, whose row is then multiplied by 0 (NaN in -> NaN out).
        check_first = check_rows_first(qkv)
        dead1, dead2 = fully_masked_rows(bias1, check_first), fully_masked_rows(bias2, check_first)
        keep1 = None if dead1 is None else dead1.logical_not().to(qkv.dtype)  # (1, h, n, 1)
        keep2 = None if dead2 is None else dead2.logical_not().to(qkv.dtype)  # (1, h, N, 1)
        if dead1 is not None:
            bias1 = bias1.masked_fill(dead1, 0.0)
        if dead2 is not None:
            bias2 = bias2.masked_fill(dead2, 0.0)
        saved = []
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            a_h = agents[..., cols]
            logits1 = torch.baddbmm(bias1[0, h], a_h, k[..., cols].transpose(1, 2), alpha=scale)  # (B, n, M)
            p1 = logits1.softmax(-1)
            if keep1 is not None:
                p1.mul_(keep1[0, h])
            va = torch.bmm(p1, v[..., cols])  # (B, n, d)
            logits2 = torch.baddbmm(bias2[0, h], q[..., cols], a_h.transpose(1, 2), alpha=scale)  # (B, N, n)
            p2 = logits2.softmax(-1)
            if keep2 is not None:
                p2.mul_(keep2[0, h])
            out[..., cols] = torch.bmm(p2, va)  # bmm(out=) into a strided slice takes a per-matrix loop
            saved += [p1, va, p2]
        v_map = _spatial_map(v, prefix, grid).contiguous(memory_format=torch.channels_last)  # (B, C, H, W)
        pad = dwc_weight.shape[-1] // 2
        local = F.conv2d(v_map, dwc_weight, dwc_bias, padding=pad, groups=channels)  # channels-last
        _spatial_map(out, prefix, grid).add_(local)
        ctx.save_for_backward(qkv, agents, v_map, dwc_weight, *saved)
        ctx.config = (heads, grid, agent_grid, prefix, scale, pad, dwc_bias is not None)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        qkv, agents, v_map, dwc_weight, *saved = ctx.saved_tensors
        heads, grid, agent_grid, prefix, scale, pad, has_dwc_bias = ctx.config
        channels = qkv.shape[-1] // 3
        d = channels // heads
        q, k, v = qkv.split(channels, dim=-1)
        grad = torch.empty_like(qkv)
        grad_q, grad_k, grad_v = grad.split(channels, dim=-1)
        grad_agents = torch.empty_like(agents)
        n, tokens = agents.shape[1], qkv.shape[1]
        need_b1, need_b2 = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_b1 = qkv.new_empty(1, heads, n, tokens) if need_b1 else None
        grad_b2 = qkv.new_empty(1, heads, tokens, n) if need_b2 else None
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            p1, va, p2 = saved[3 * h : 3 * h + 3]
            a_h, d_out = agents[..., cols], grad_out[..., cols]
            # query step
            d_va = torch.bmm(p2.transpose(1, 2), d_out)  # (B, n, d)
            d_p2 = torch.bmm(d_out, va.transpose(1, 2))  # (B, N, n)
            d_l2 = torch._softmax_backward_data(d_p2, p2, -1, p2.dtype)
            if need_b2:
                torch.sum(d_l2, dim=0, out=grad_b2[0, h])
            d_l2.mul_(scale)
            grad_q[..., cols] = torch.bmm(d_l2, a_h)
            grad_a = torch.bmm(d_l2.transpose(1, 2), q[..., cols])  # (B, n, d)
            # agent step
            grad_v[..., cols] = torch.bmm(p1.transpose(1, 2), d_va)
            d_p1 = torch.bmm(d_va, v[..., cols].transpose(1, 2))  # (B, n, M)
            d_l1 = torch._softmax_backward_data(d_p1, p1, -1, p1.dtype)
            if need_b1:
                torch.sum(d_l1, dim=0, out=grad_b1[0, h])
            d_l1.mul_(scale)
            grad_k[..., cols] = torch.bmm(d_l1.transpose(1, 2), a_h)
            grad_agents[..., cols] = grad_a.baddbmm_(d_l1, k[..., cols])
        _pool_backward_into(
            _spatial_map(grad_q, prefix, grid), grad_agents, _spatial_map(q, prefix, grid), agent_grid
        )
        need_w, need_b = ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        grad_v_map, grad_w, grad_b = torch.ops.aten.convolution_backward(
            _spatial_map(grad_out, prefix, grid), v_map, dwc_weight, [channels] if has_dwc_bias else None,
            [1, 1], [pad, pad], [1, 1], False, [0, 0], channels, [True, need_w, need_b],
        )  # fmt: skip
        _spatial_map(grad_v, prefix, grid).add_(grad_v_map)
        return grad, grad_b1, grad_b2, grad_w, grad_b, None, None, None, None, None
