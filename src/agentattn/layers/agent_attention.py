"""Agent attention layers, one per official family, sharing one implementation.

    agents = pool(Q over its grid)  or learned tokens        # (B, n, C)
    out    = agent_attention(Q, K, V, agents, B1, B2)        # agentattn.ops
           + DWC(V)                                          # depthwise 3×3 conv on the value map
    out    = proj(out)                                       # (not in CSwin: the block owns proj)

The families differ only in where Q, K and V come from (``qkv``; ``q`` + ``kv`` with optional spatial
reduction; the CSwin block's stacked qkv), in prefix tokens (Agent-DeiT's cls), and in the name of the
depthwise conv (``dwc``; CSwin's LePE ``get_v``). Parameter names and shapes are the official ones, so an
official state dict loads with ``load_state_dict(sd, strict=True)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models import (
    register_notrace_module,  # timm.models has it in every timm >= 1.0 (timm.layers from 1.0.17)
)
from torch import nn

from ..ops import agent_attention
from ..ops.agent_packed import agent_attention_packed, packed_path_applies
from ..ops.tracing import is_tracing
from .agent_bias import agent_biases, agent_grid_for, init_agent_bias_parameters, to_2tuple_grid
from .spatial_reduction import reduce_tokens


def _check_positive_int(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_rate(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")


def _pool_matrix(size_in: int, size_out: int, like: torch.Tensor) -> torch.Tensor:
    """(size_out, size_in) averaging matrix of adaptive average pooling along one axis (PyTorch's windows)."""
    rows = []
    for i in range(size_out):
        start, end = (i * size_in) // size_out, -(-(i + 1) * size_in // size_out)
        rows.append([1.0 / (end - start) if start <= j < end else 0.0 for j in range(size_in)])
    return torch.tensor(rows, dtype=like.dtype, device=like.device)


def _rank5_tolerant(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn`` for ``_apply``, retried on a rank-4 view for 5-D tensors that refuse a 4-D memory format."""

    def apply(t: torch.Tensor) -> torch.Tensor:
        try:
            return fn(t)
        except RuntimeError as error:
            if t.dim() != 5 or "channels_last" not in str(error):
                raise
            return fn(t.flatten(0, 1)).reshape(t.shape)

    return apply


def adaptive_avg_pool2d(x: torch.Tensor, output_size: tuple[int, int]) -> torch.Tensor:
    """``F.adaptive_avg_pool2d`` of (B, C, H, W) → (B, C, rows, cols); export-friendly under torch.export.

    When exporting (torch.export, torch.jit.trace, hence both ONNX exporters), a grid that divides the map becomes
    one AveragePool and any other grid two matmuls with constant averaging matrices, instead of the index gathers
    the generic decomposition emits (which the legacy ONNX exporter refuses). Eager mode calls the PyTorch kernel.
    """
    if not (torch.compiler.is_exporting() or torch.jit.is_tracing()):
        return F.adaptive_avg_pool2d(x, output_size)
    height, width = (int(s) for s in x.shape[-2:])  # a trace is fixed to its grid
    rows, cols = output_size
    if height % rows == 0 and width % cols == 0:
        kernel = (height // rows, width // cols)
        return F.avg_pool2d(x, kernel, stride=kernel)
    return _pool_matrix(height, rows, x) @ x @ _pool_matrix(width, cols, x).T  # (B, C, rows, cols)


# An fx leaf (timm's notrace registry): its forward reads Python values from shapes.
@register_notrace_module
class AgentAttentionBase(nn.Module):
    """Shared machinery: bias parameters, agent pooling, the op call and the DWC term.

    Subclasses create the projections and call :meth:`attend` on un-split (B, L, C) q, k and v.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        agent_num: int | tuple[int, int],
        grid_size: int | tuple[int, int],
        key_grid_size: int | tuple[int, int] | None = None,
        num_prefix_tokens: int = 0,
        attn_drop: float = 0.0,
        learned_agents: bool = False,
        target_agent_grid: int | tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        _check_positive_int("dim", dim)
        _check_positive_int("num_heads", num_heads)
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens must be a non-negative int, got {num_prefix_tokens!r}")
        _check_rate("attn_drop", attn_drop)
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.agent_grid = agent_grid_for(agent_num)
        self.agent_num = self.agent_grid[0] * self.agent_grid[1]
        self.grid_size = to_2tuple_grid("grid_size", grid_size)
        self.key_grid_size = (
            self.grid_size if key_grid_size is None else to_2tuple_grid("key_grid_size", key_grid_size)
        )
        self.num_prefix_tokens = num_prefix_tokens
        self.attn_drop = attn_drop
        self.learned_agents = learned_agents
        self.target_agent_grid: tuple[int, int] | None = None
        self.set_target_agent_grid(target_agent_grid)
        init_agent_bias_parameters(
            self, num_heads, self.agent_num, self.key_grid_size, self.grid_size, num_prefix_tokens
        )
        self._bias_cache: tuple | None = None  # (key, bias parameters, (B1, B2)); see biases()
        # Set by agentattn.layers.record_agent_attention: called with the split q, k, agents and biases.
        self._attention_sink = None
        if learned_agents:
            # Official issue #30: input-independent agents, one C-dim token per agent (split into heads).
            self.agent_tokens = nn.Parameter(torch.zeros(self.agent_num, dim))
            trunc_normal_(self.agent_tokens, std=0.02)

    def _apply(self, fn, recurse: bool = True):  # nn.Module's signature
        """``nn.Module._apply`` that survives ``model.to(memory_format=torch.channels_last)``.

        ``Module.to`` asks every 4-D and 5-D tensor for the format, but only rank-4 tensors have a channels_last
        layout, so the official 5-D row/column biases (``ah_bias``, ``wa_bias``, ...) would raise. They are
        converted as (h·..., ...) 4-D views and given back their official shape; device and dtype still follow.
        """
        return super()._apply(_rank5_tolerant(fn), recurse)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, agent_num={self.agent_num}, grid_size={self.grid_size}, "
            f"num_prefix_tokens={self.num_prefix_tokens}, learned_agents={self.learned_agents}"
        )

    # -- boundary checks ------------------------------------------------------------------------------
    def _resolve_grid(
        self, x: torch.Tensor, name: str, grid_size: int | tuple[int, int] | None
    ) -> tuple[int, int]:
        """Check that ``x`` is (B, P + H·W, C) for the grid; return (H, W)."""
        if is_tracing():
            return self.grid_size if grid_size is None else to_2tuple_grid("grid_size", grid_size)
        if x.dim() != 3:
            raise ValueError(f"{name} must be 3-D (B, N, C) with C = {self.dim}, got shape {tuple(x.shape)}")
        if x.shape[-1] != self.dim:
            raise ValueError(f"{name} must have C = dim = {self.dim} channels, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
        weight = self.an_bias
        if x.device != weight.device:
            raise ValueError(f"{name} is on {x.device} but the layer's parameters are on {weight.device}")
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"{name} has dtype {x.dtype} but the layer's parameters are {weight.dtype}; cast one of them "
                "or run under torch.autocast"
            )
        grid = self.grid_size if grid_size is None else to_2tuple_grid("grid_size", grid_size)
        expected = self.num_prefix_tokens + grid[0] * grid[1]
        if x.shape[1] != expected:
            raise ValueError(
                f"{name} has N = {x.shape[1]} tokens, but grid_size = {grid} with num_prefix_tokens = "
                f"{self.num_prefix_tokens} expects N = {self.num_prefix_tokens} + {grid[0]}·{grid[1]} = {expected}; "
                "pass the token grid as grid_size=(H, W)"
            )
        return grid

    # -- the shared computation -----------------------------------------------------------------------
    def biases(
        self, key_grid: tuple[int, int], query_grid: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B1, B2) for these grids: (1, h, n, P + Hk·Wk) and (1, h, P + Hq·Wq, n).

        When no gradient is needed (and not while tracing), the result is cached per grid until a bias
        parameter changes: in place (its version counter moves), or by replacement (``.to()``, loading).
        """
        if is_tracing() or (torch.is_grad_enabled() and self.an_bias.requires_grad):
            return self._compute_biases(key_grid, query_grid)
        params = tuple(p for name, p in self.named_parameters(recurse=False) if name.endswith("_bias"))
        key = (key_grid, query_grid, torch.is_inference_mode_enabled(), tuple(p._version for p in params))
        cache = self._bias_cache
        # Parameters compare by identity: a replaced parameter never hits, even at a reused address.
        if cache is None or cache[0] != key or any(a is not b for a, b in zip(cache[1], params, strict=True)):
            self._bias_cache = cache = (key, params, self._compute_biases(key_grid, query_grid))
        return cache[2]

    def _compute_biases(
        self, key_grid: tuple[int, int], query_grid: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.target_agent_grid is None or self.learned_agents:
            return agent_biases(self, key_grid, query_grid)
        # the bias tables keep their trained agent grid; their agent axis is resampled onto the target
        return agent_biases(
            self, key_grid, query_grid, agent_grid=self.agent_grid, target_agent_grid=self.target_agent_grid
        )

    def set_target_agent_grid(self, grid: int | tuple[int, int] | None) -> None:
        """Pool the agents onto ``grid`` from now on, as the official detection and segmentation backbones do
        (spec §2.5; None: back to ``agent_grid``). The bias parameters keep their shapes, so checkpoints load
        unchanged: their agent axis is resampled bilinearly onto ``grid`` when the biases are built."""
        self.target_agent_grid = None if grid is None else to_2tuple_grid("target_agent_grid", grid)
        self._bias_cache = None

    def pooled_agent_grid(self) -> tuple[int, int]:
        """The (rows, cols) grid :meth:`make_agents` pools the queries onto: ``target_agent_grid`` when set (a
        dense backbone's grid), else ``agent_grid``."""
        return self.agent_grid if self.target_agent_grid is None else self.target_agent_grid

    def make_agents(self, q: torch.Tensor, query_grid: tuple[int, int]) -> torch.Tensor:
        """(B, P + Hq·Wq, C) queries → (B, n, C) agents: average-pooled spatial queries, or learned tokens."""
        batch = q.shape[0]
        if self.learned_agents:
            return self.agent_tokens.to(q.dtype).expand(batch, -1, -1)
        spatial = (
            q[:, self.num_prefix_tokens :].unflatten(1, query_grid).permute(0, 3, 1, 2)
        )  # channels-last view
        pooled = adaptive_avg_pool2d(spatial, self.pooled_agent_grid())  # (B, C, rows, cols)
        # contiguous: fused SDPA kernels need stride 1 on the last dim, and the pooled map may come out either way.
        return pooled.flatten(2).transpose(1, 2).contiguous()

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, C) → (B, h, L, d), channel = head·d + j as officially."""
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def local_term(
        self, v: torch.Tensor, key_grid: tuple[int, int], query_grid: tuple[int, int]
    ) -> torch.Tensor:
        """Depthwise conv of the value map: (B, P + Hk·Wk, C) → (B, Hq·Wq, C). Subclasses pick the conv."""
        raise NotImplementedError

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        query_grid: tuple[int, int],
        key_grid: tuple[int, int],
    ) -> torch.Tensor:
        """Agent attention plus the DWC term on un-split tokens.

        Args:
            q: (B, P + Hq·Wq, C); k, v: (B, P + Hk·Wk, C).
        Returns:
            (B, P + Hq·Wq, C), before any output projection.
        """
        agents = self.make_agents(q, query_grid)  # (B, n, C)
        bias1, bias2 = self.biases(key_grid, query_grid)
        if self._attention_sink is not None:
            self._attention_sink(
                self, self.split_heads(q), self.split_heads(k), self.split_heads(agents), bias1, bias2,
                query_grid, key_grid,
            )  # fmt: skip
        out = agent_attention(
            self.split_heads(q),
            self.split_heads(k),
            self.split_heads(v),
            self.split_heads(agents),
            scale=self.scale,
            agent_bias=bias1,
            query_bias=bias2,
            dropout_p=self.attn_drop,
            training=self.training,
        )  # (B, h, P + Hq·Wq, d)
        out = out.transpose(1, 2).flatten(2)  # (B, P + Hq·Wq, C)
        local = self.local_term(v, key_grid, query_grid)  # (B, Hq·Wq, C)
        prefix = self.num_prefix_tokens
        if prefix == 0:
            return out + local
        # Prefix tokens (cls) get no DWC term. Without autograd, add in place: one pass instead of add + cat
        # (not while tracing: an in-place slice update becomes ScatterND in ONNX, and a trace must not depend on
        # the grad mode).
        if not out.requires_grad and not local.requires_grad and not is_tracing():
            out[:, prefix:] += local
            return out
        # With autograd: zero rows in front of the DWC term, whose backward is a view of the gradient (slicing
        # `out` and concatenating would fill two zero tensors in the backward).
        return out + F.pad(local, (0, 0, prefix, 0))

    @staticmethod
    def _conv_tokens(conv: nn.Conv2d, v: torch.Tensor, grid: tuple[int, int], out_grid: tuple[int, int]):
        """Apply a depthwise conv to (B, H·W, C) spatial tokens on ``grid``, upsampled to ``out_grid`` first."""
        # (B, H·W, C) viewed as a channels-last (B, C, H, W) map: no transposing copies on the way in or out.
        v_map = v.unflatten(1, grid).permute(0, 3, 1, 2)
        if grid != out_grid:
            v_map = F.interpolate(v_map, size=out_grid, mode="bilinear", align_corners=False)
        return conv(v_map).permute(0, 2, 3, 1).flatten(1, 2)


class AgentAttention(AgentAttentionBase):
    """Agent attention for Agent-DeiT (``num_prefix_tokens=1``) and Agent-Swin agent blocks (0).

    Args:
        dim: channels C.
        num_heads: heads h; head_dim = C / h.
        agent_num: n agents, pooled from the queries on a grid from :func:`agent_grid_for`.
        grid_size: the (H, W) patch grid the biases are built for; other grids interpolate them.
        num_prefix_tokens: tokens before the grid (cls, distillation) that attend but are not pooled.
        qkv_bias: bias in the ``qkv`` projection.
        attn_drop, proj_drop: dropout on the attention weights and on the output.
        learned_agents: use n learned agent tokens instead of pooled queries.
        target_agent_grid: pool the agents onto this (rows, cols) grid instead, with the biases' agent axis
            resampled onto it (the downstream backbones' larger grids, spec §2.5); see
            :meth:`~AgentAttentionBase.set_target_agent_grid`.

    Shape:
        ``forward(x, grid_size=None)``: x (B, P + H·W, C) → (B, P + H·W, C).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        agent_num: int | tuple[int, int] = 49,
        grid_size: int | tuple[int, int] = (14, 14),
        num_prefix_tokens: int = 0,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        learned_agents: bool = False,
        target_agent_grid: int | tuple[int, int] | None = None,
    ) -> None:
        super().__init__(
            dim, num_heads, agent_num, grid_size, None, num_prefix_tokens, attn_drop, learned_agents,
            target_agent_grid,
        )  # fmt: skip
        _check_rate("proj_drop", proj_drop)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.dwc = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)

    def local_term(self, v, key_grid, query_grid):
        return self._conv_tokens(self.dwc, v[:, self.num_prefix_tokens :], key_grid, query_grid)

    def forward(self, x: torch.Tensor, grid_size: int | tuple[int, int] | None = None) -> torch.Tensor:
        """x: (B, P + H·W, C) → (B, P + H·W, C)."""
        grid = self._resolve_grid(x, "x", grid_size)
        qkv = self.qkv(x)  # (B, N, 3C)
        if self._packed_training(qkv):
            return self.proj_drop(self.proj(self._attend_packed(qkv, grid)))
        # split, not unflatten + unbind: its backward is one cat along channels, where unbind's stack interleaves.
        q, k, v = qkv.split(self.dim, dim=-1)  # each (B, N, C)
        return self.proj_drop(self.proj(self.attend(q, k, v, grid, grid)))

    def _packed_training(self, qkv: torch.Tensor) -> bool:
        """CPU training goes through :func:`agentattn.ops.agent_packed.agent_attention_packed` (same result, a
        hand-written backward on the packed projection) unless a feature it does not cover is on."""
        return (
            packed_path_applies(qkv)
            and not (self.training and self.attn_drop > 0)
            and not self.learned_agents
            and self._attention_sink is None
            and type(self).make_agents is AgentAttentionBase.make_agents  # it pools onto pooled_agent_grid()
        )

    def _attend_packed(self, qkv: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """:meth:`attend` on the packed projection (B, N, 3C) → (B, N, C), before proj."""
        bias1, bias2 = self.biases(grid, grid)
        return agent_attention_packed(
            qkv, bias1, bias2, self.dwc.weight, self.dwc.bias, num_heads=self.num_heads, grid_size=grid,
            agent_grid=self.pooled_agent_grid(), num_prefix_tokens=self.num_prefix_tokens, scale=self.scale,
        )  # fmt: skip


class PVTAgentAttention(AgentAttentionBase):
    """Agent attention for Agent-PVT: ``q`` and ``kv`` projections, optional spatial reduction of K/V.

    With ``sr_ratio > 1`` the keys and values come from a stride-``sr_ratio`` conv (``sr``) and a LayerNorm
    (``norm``) of the token map (:func:`~agentattn.layers.spatial_reduction.reduce_tokens`: padded to a multiple
    of ``sr_ratio``, so any grid works), and V is upsampled bilinearly back to the query grid before the DWC.

    Shape:
        ``forward(x, grid_size=None)``: x (B, H·W, C) → (B, H·W, C).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        agent_num: int | tuple[int, int] = 49,
        grid_size: int | tuple[int, int] = (14, 14),
        sr_ratio: int = 1,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        learned_agents: bool = False,
        target_agent_grid: int | tuple[int, int] | None = None,
    ) -> None:
        _check_positive_int("sr_ratio", sr_ratio)
        grid = to_2tuple_grid("grid_size", grid_size)
        # the bias tables' key grid, as the official code sizes it (floor); forward resamples them to the key grid
        key_grid = (max(1, grid[0] // sr_ratio), max(1, grid[1] // sr_ratio))
        super().__init__(
            dim, num_heads, agent_num, grid, key_grid, 0, attn_drop, learned_agents, target_agent_grid
        )
        _check_rate("proj_drop", proj_drop)
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)
        self.dwc = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)

    def local_term(self, v, key_grid, query_grid):
        return self._conv_tokens(self.dwc, v, key_grid, query_grid)

    def forward(self, x: torch.Tensor, grid_size: int | tuple[int, int] | None = None) -> torch.Tensor:
        """x: (B, H·W, C) → (B, H·W, C)."""
        grid = self._resolve_grid(x, "x", grid_size)
        q = self.q(x)
        x, key_grid = reduce_tokens(
            x, grid, self.sr_ratio, getattr(self, "sr", None), getattr(self, "norm", None)
        )
        k, v = self.kv(x).unflatten(-1, (2, self.dim)).unbind(-2)  # each (B, Hk·Wk, C)
        return self.proj_drop(self.proj(self.attend(q, k, v, grid, key_grid)))


class CSwinAgentAttention(AgentAttentionBase):
    """The agent branch of an Agent-CSwin block (one window over the whole map).

    It has no projections of its own: the block computes the stacked qkv before it and applies ``proj`` after.
    ``get_v`` is CSwin's LePE depthwise conv, playing the role of the DWC.

    Shape:
        ``forward(qkv, grid_size=None)``: qkv (3, B, H·W, C) → (B, H·W, C).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        agent_num: int | tuple[int, int] = 49,
        grid_size: int | tuple[int, int] = (56, 56),
        attn_drop: float = 0.0,
        learned_agents: bool = False,
        target_agent_grid: int | tuple[int, int] | None = None,
    ) -> None:
        super().__init__(
            dim, num_heads, agent_num, grid_size, None, 0, attn_drop, learned_agents, target_agent_grid
        )
        self.get_v = nn.Conv2d(dim, dim, kernel_size=3, stride=1, padding=1, groups=dim)

    def local_term(self, v, key_grid, query_grid):
        return self._conv_tokens(self.get_v, v, key_grid, query_grid)

    def forward(self, qkv: torch.Tensor, grid_size: int | tuple[int, int] | None = None) -> torch.Tensor:
        """qkv: (3, B, H·W, C) stacked projections → (B, H·W, C)."""
        if qkv.dim() != 4 or qkv.shape[0] != 3:
            raise ValueError(
                f"qkv must be the stacked projection of shape (3, B, H·W, C) with C = {self.dim}, "
                f"got shape {tuple(qkv.shape)}"
            )
        q, k, v = qkv.unbind(0)
        grid = self._resolve_grid(q, "qkv", grid_size)
        return self.attend(q, k, v, grid, grid)
