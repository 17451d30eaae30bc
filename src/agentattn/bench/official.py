"""A line-by-line transcription of the official Agent-DeiT/Agent-Swin attention forward (commit 207ce3eb357b).

It is the "official code" baseline of the benchmarks and a second, independent reference in the tests. It does
what the official module does on every call: explicit matmuls, biases interpolated from their 7×7 tables and
``repeat``-ed over the batch, the class token handled by slicing. It reads the state dict of
``agentattn.layers.AgentAttention`` (the official key names), for ``num_prefix_tokens`` 0 (Swin) or 1 (DeiT).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class OfficialAgentAttention(nn.Module):
    """Official-style agent attention for a square window; x: (B, P + window², C) → same shape."""

    def __init__(
        self, dim: int, num_heads: int, agent_num: int, window: int, num_prefix_tokens: int = 1
    ) -> None:
        super().__init__()
        if num_prefix_tokens not in (0, 1):
            raise ValueError(f"num_prefix_tokens must be 0 (Swin) or 1 (DeiT), got {num_prefix_tokens}")
        head_dim = dim // num_heads
        self.dim, self.num_heads, self.agent_num, self.window = dim, num_heads, agent_num, window
        self.num_prefix_tokens = num_prefix_tokens
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.dwc = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.an_bias = nn.Parameter(torch.zeros(num_heads, agent_num, 7, 7))
        self.na_bias = nn.Parameter(torch.zeros(num_heads, agent_num, 7, 7))
        self.ah_bias = nn.Parameter(torch.zeros(1, num_heads, agent_num, window, 1))
        self.aw_bias = nn.Parameter(torch.zeros(1, num_heads, agent_num, 1, window))
        self.ha_bias = nn.Parameter(torch.zeros(1, num_heads, window, 1, agent_num))
        self.wa_bias = nn.Parameter(torch.zeros(1, num_heads, 1, window, agent_num))
        if num_prefix_tokens:
            self.ac_bias = nn.Parameter(torch.zeros(1, num_heads, agent_num, 1))
            self.ca_bias = nn.Parameter(torch.zeros(1, num_heads, 1, agent_num))
        for p in (self.an_bias, self.na_bias, self.ah_bias, self.aw_bias, self.ha_bias, self.wa_bias):
            nn.init.trunc_normal_(p, std=0.02)
        pool_size = int(agent_num**0.5)
        self.pool = nn.AdaptiveAvgPool2d(output_size=(pool_size, pool_size))
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        cls = self.num_prefix_tokens
        h = w = self.window
        num_heads = self.num_heads
        head_dim = c // num_heads
        qkv = self.qkv(x).reshape(b, n, 3, c).permute(2, 0, 1, 3)
        q, k, v = qkv[0], qkv[1], qkv[2]

        agent_tokens = (
            self.pool(q[:, cls:, :].reshape(b, h, w, c).permute(0, 3, 1, 2))
            .reshape(b, c, -1)
            .permute(0, 2, 1)
        )
        q = q.reshape(b, n, num_heads, head_dim).permute(0, 2, 1, 3)
        k = k.reshape(b, n, num_heads, head_dim).permute(0, 2, 1, 3)
        v = v.reshape(b, n, num_heads, head_dim).permute(0, 2, 1, 3)
        agent_tokens = agent_tokens.reshape(b, self.agent_num, num_heads, head_dim).permute(0, 2, 1, 3)

        kv_size = (self.window, self.window)
        position_bias1 = F.interpolate(self.an_bias, size=kv_size, mode="bilinear")
        position_bias1 = position_bias1.reshape(1, num_heads, self.agent_num, -1).repeat(b, 1, 1, 1)
        position_bias2 = (
            (self.ah_bias + self.aw_bias).reshape(1, num_heads, self.agent_num, -1).repeat(b, 1, 1, 1)
        )
        position_bias = position_bias1 + position_bias2
        if cls:
            position_bias = torch.cat([self.ac_bias.repeat(b, 1, 1, 1), position_bias], dim=-1)
        agent_attn = self.softmax((agent_tokens * self.scale) @ k.transpose(-2, -1) + position_bias)
        agent_v = agent_attn @ v

        agent_bias1 = F.interpolate(self.na_bias, size=kv_size, mode="bilinear")
        agent_bias1 = (
            agent_bias1.reshape(1, num_heads, self.agent_num, -1).permute(0, 1, 3, 2).repeat(b, 1, 1, 1)
        )
        agent_bias2 = (
            (self.ha_bias + self.wa_bias).reshape(1, num_heads, -1, self.agent_num).repeat(b, 1, 1, 1)
        )
        agent_bias = agent_bias1 + agent_bias2
        if cls:
            agent_bias = torch.cat([self.ca_bias.repeat(b, 1, 1, 1), agent_bias], dim=-2)
        q_attn = self.softmax((q * self.scale) @ agent_tokens.transpose(-2, -1) + agent_bias)
        x = q_attn @ agent_v

        x = x.transpose(1, 2).reshape(b, n, c)
        v_ = v[:, :, cls:, :].transpose(1, 2).reshape(b, h, w, c).permute(0, 3, 1, 2)
        if cls:
            x[:, cls:, :] = x[:, cls:, :] + self.dwc(v_).permute(0, 2, 3, 1).reshape(b, n - cls, c)
        else:
            x = x + self.dwc(v_).permute(0, 2, 3, 1).reshape(b, n, c)
        return self.proj(x)
