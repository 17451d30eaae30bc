"""Agent-PVT (PVT v1 with agent attention), official parameter names, for timm.

Official code: ``agent_transformer/models/agent_pvt.py`` of LeapLabTHU/Agent-Attention (spec §2.2, §3.2).

    image ─ patch_embed1 (conv 4×4/4 + LN) + pos_embed1 ─ block1.* ─ patch_embed2 (conv 2×2/2 + LN) + pos_embed2
          ─ block2.* ─ … ─ block4.* ─ mean over tokens ─ head

No cls token and no final norm. Blocks are pre-norm: ``x + attn(norm1(x))``, ``x + mlp(norm2(x))``.
Per stage, ``attn_type`` picks the attention: 'A' agent attention (:class:`PVTAgentAttention`, spatial
reduction from ``agent_sr_ratios``), 'B' PVT's spatial-reduction softmax attention (``sr_ratios``), 'L' an
elu+1 linear-attention twin with the same keys as the agent layer minus the biases.

Unlike the official model, this one is not fixed-resolution: the position embeddings are sized for
``img_size`` at construction, resampled bilinearly when an input gives another grid (official
``_get_pos_embed``), and the agent layers resample their biases per forward (spec §2.5). Inputs of any H×W
work: each patch embedding pads its input on the right/bottom to a multiple of its stride.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import (
    DropPath,
    Mlp,
    resample_abs_pos_embed,
    trunc_normal_,
)
from timm.models import (
    generate_default_cfgs,
    register_model,
    register_notrace_function,
    register_notrace_module,
)
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint
from torch import nn

from ..layers import PVTAgentAttention
from ..layers.agent_bias import agent_grid_for, to_2tuple_grid
from ..layers.spatial_reduction import reduce_tokens
from ..ops import linear_attention
from ._builder import (
    LinearHeadMixin,
    agent_cfg,
    build_agent_model,
    check_global_pool,
    check_image_input,
    init_official_weights,
    parse_attn_type,
    per_stage,
    with_official_tags,
)
from .pretrained import load_pretrained, resize_agent_bias_tables

__all__ = ["AgentPVT", "PVTAttention", "PVTLinearAttention", "checkpoint_filter_fn"]

_ATTN_TYPES = "ABL"


# ---------------------------------------------------------------------------------------------------------------
# Attention modules of the non-agent stages
# ---------------------------------------------------------------------------------------------------------------
def _tokens_to_map(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, H·W, C) → (B, C, H, W)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], grid[0], grid[1])


def _check_tokens(x: torch.Tensor, dim: int, grid: tuple[int, int]) -> None:
    if x.dim() != 3 or x.shape[1] != grid[0] * grid[1] or x.shape[2] != dim:
        raise ValueError(f"x must be (B, H·W, {dim}) for grid_size {grid}, got shape {tuple(x.shape)}")


# An fx leaf (timm's notrace registry): its forward reads Python values from shapes.
@register_notrace_module
class _SpatialReduction(nn.Module):
    """Shared ``q``/``kv``/``proj`` projections and PVT's optional ``sr`` conv + ``norm`` on the key map."""

    def __init__(
        self, dim: int, num_heads: int, grid_size, sr_ratio: int, qkv_bias: bool, proj_drop: float
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if not isinstance(sr_ratio, int) or sr_ratio < 1:
            raise ValueError(f"sr_ratio must be a positive int, got {sr_ratio!r}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.grid_size = to_2tuple_grid("grid_size", grid_size)
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def _keys_values(
        self, x: torch.Tensor, grid: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """k, v (B, Hk·Wk, C) and the key grid (Hk, Wk)."""
        x, key_grid = reduce_tokens(
            x, grid, self.sr_ratio, getattr(self, "sr", None), getattr(self, "norm", None)
        )
        k, v = self.kv(x).unflatten(-1, (2, self.dim)).unbind(-2)
        return k, v, key_grid

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)  # (B, h, L, d)


class PVTAttention(_SpatialReduction):
    """PVT v1 spatial-reduction softmax attention (the official 'B' blocks; keys q, kv, proj, sr, norm).

    Shape:
        ``forward(x, grid_size=None)``: x (B, H·W, C) → (B, H·W, C).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        grid_size: int | tuple[int, int] = (14, 14),
        sr_ratio: int = 1,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__(dim, num_heads, grid_size, sr_ratio, qkv_bias, proj_drop)
        self.attn_drop = attn_drop

    def forward(self, x: torch.Tensor, grid_size: int | tuple[int, int] | None = None) -> torch.Tensor:
        """x: (B, H·W, C) → (B, H·W, C)."""
        grid = self.grid_size if grid_size is None else to_2tuple_grid("grid_size", grid_size)
        _check_tokens(x, self.dim, grid)
        q = self._split(self.q(x))
        k, v, _ = self._keys_values(x, grid)
        out = F.scaled_dot_product_attention(
            q, self._split(k), self._split(v), dropout_p=self.attn_drop if self.training else 0.0
        )
        return self.proj_drop(self.proj(out.transpose(1, 2).flatten(2)))


class PVTLinearAttention(_SpatialReduction):
    """elu+1 linear attention with PVT's projections and the agent layer's DWC term ('L' blocks).

    Keys q, kv, proj, dwc (and sr, norm with ``sr_ratio > 1``): the agent layer's, minus the agent biases, so
    that an 'A' versus 'L' comparison isolates the attention itself.

    Shape:
        ``forward(x, grid_size=None)``: x (B, H·W, C) → (B, H·W, C).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        grid_size: int | tuple[int, int] = (14, 14),
        sr_ratio: int = 1,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__(dim, num_heads, grid_size, sr_ratio, qkv_bias, proj_drop)
        self.dwc = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, grid_size: int | tuple[int, int] | None = None) -> torch.Tensor:
        """x: (B, H·W, C) → (B, H·W, C)."""
        grid = self.grid_size if grid_size is None else to_2tuple_grid("grid_size", grid_size)
        _check_tokens(x, self.dim, grid)
        q = self.q(x)
        k, v, key_grid = self._keys_values(x, grid)
        out = linear_attention(self._split(q), self._split(k), self._split(v)).transpose(1, 2).flatten(2)
        v_map = _tokens_to_map(v, key_grid)
        if key_grid != grid:
            v_map = F.interpolate(v_map, size=grid, mode="bilinear", align_corners=False)
        out = out + self.dwc(v_map).flatten(2).transpose(1, 2)
        return self.proj_drop(self.proj(out))


# ---------------------------------------------------------------------------------------------------------------
# Blocks and stages
# ---------------------------------------------------------------------------------------------------------------
class Block(nn.Module):
    """Pre-norm PVT block: ``x + drop_path(attn(norm1(x)))``, ``x + drop_path(mlp(norm2(x)))``.

    Shape:
        ``forward(x, grid_size)``: x (B, H·W, C) → (B, H·W, C).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        grid_size: tuple[int, int],
        attn_type: str = "A",
        agent_num: int = 49,
        sr_ratio: int = 1,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_layer=nn.LayerNorm,
        target_agent_grid: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        if attn_type == "A":
            common = dict(
                num_heads=num_heads, agent_num=agent_num, grid_size=grid_size, sr_ratio=sr_ratio,
                qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop,
            )  # fmt: skip
            if target_agent_grid == agent_grid_for(agent_num):
                target_agent_grid = None  # the trained grid: nothing to resample
            self.attn = PVTAgentAttention(dim, target_agent_grid=target_agent_grid, **common)
        elif attn_type == "B":
            self.attn = PVTAttention(dim, num_heads, grid_size, sr_ratio, qkv_bias, attn_drop, proj_drop)
        elif attn_type == "L":
            self.attn = PVTLinearAttention(dim, num_heads, grid_size, sr_ratio, qkv_bias, proj_drop)
        else:
            raise ValueError(f"attn_type of a block must be one of {_ATTN_TYPES!r}, got {attn_type!r}")
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), grid_size=grid_size))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


# An fx leaf (timm's notrace registry): its forward reads Python values from shapes.
@register_notrace_module
class PatchEmbed(nn.Module):
    """Conv patch embedding + LayerNorm (eps 1e-5 as officially), padding the input to a multiple of the stride.

    Shape:
        ``forward(x)``: (B, C_in, H, W) → ((B, ⌈H/p⌉·⌈W/p⌉, C), (⌈H/p⌉, ⌈W/p⌉)).
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        p = self.patch_size
        pad_h, pad_w = (p - x.shape[2] % p) % p, (p - x.shape[3] % p) % p
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        x = self.proj(x)
        grid = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), grid


@register_notrace_function  # an fx leaf: it compares the grid's Python values
def resample_stage_pos_embed(
    pos_embed: torch.Tensor, built: tuple[int, int], grid: tuple[int, int]
) -> torch.Tensor:
    """(1, H0·W0, C) position embedding built for ``built`` → (1, H·W, C) for ``grid``, resampled bilinearly as
    officially when the grids differ."""
    if tuple(grid) == tuple(built):
        return pos_embed
    pos_map = pos_embed.reshape(1, built[0], built[1], -1).permute(0, 3, 1, 2)
    pos_map = F.interpolate(pos_map, size=tuple(grid), mode="bilinear", align_corners=False)
    return pos_map.flatten(2).transpose(1, 2)


# ---------------------------------------------------------------------------------------------------------------
# Argument parsing
# ---------------------------------------------------------------------------------------------------------------
def _check_pvt_args(depths: Any, num_stages: int, patch_size: Any, global_pool: str) -> None:
    """The constructor's checks of the stage count, the patch size and the pooling."""
    if not isinstance(depths, Sequence) or len(depths) != num_stages or num_stages < 1:
        raise ValueError(f"depths must give one depth per stage (num_stages = {num_stages}), got {depths!r}")
    check_global_pool(global_pool)
    if not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")


def _target_agent_grids(shape: Any, num_stages: int) -> list[tuple[int, int] | None]:
    """Per-stage (rows, cols) agent grids of ``downstream_agent_shape`` (None: every stage keeps its own)."""
    if shape is None:
        return [None] * num_stages
    return [
        to_2tuple_grid("downstream_agent_shape", g)
        for g in _per_stage_seq("downstream_agent_shape", shape, num_stages)
    ]


def _per_stage_seq(name: str, value, num_stages: int) -> list:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != num_stages:
        raise ValueError(f"{name} must be a sequence of {num_stages} values (one per stage), got {value!r}")
    return list(value)


def _stage_grids(img_size: tuple[int, int], patch_size: int, num_stages: int) -> list[tuple[int, int]]:
    """Token grid of each stage; ceil division because every patch embedding pads its input."""
    grids, (h, w) = [], img_size
    for i in range(num_stages):
        stride = patch_size if i == 0 else 2
        h, w = math.ceil(h / stride), math.ceil(w / stride)
        grids.append((h, w))
    return grids


# ---------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------
class AgentPVT(LinearHeadMixin, nn.Module):
    """Agent-PVT classifier (official ``PyramidVisionTransformer`` of ``agent_pvt.py``, same parameter names).

    Args:
        img_size: construction resolution (int or (H, W)); sizes the position embeddings and agent biases.
            Other input sizes work at run time (they are resampled).
        patch_size: stride of the first patch embedding (later stages downsample by 2).
        in_chans, num_classes: input channels; classes (0: no head).
        global_pool: 'avg' (mean over tokens, as officially) or '' (no pooling in ``forward_head``).
        embed_dims, num_heads, mlp_ratios, depths: per stage.
        qkv_bias: bias in ``q`` and ``kv``.
        sr_ratios: spatial reduction of the 'B' (softmax) stages, PVT's [8, 4, 2, 1].
        agent_sr_ratios: spatial reduction of the 'A' and 'L' stages ('1111' in every released model); an int,
            a digit string or a sequence.
        agent_num: agents per stage: a list of ints or of strings (the official builder passes strings), a
            '-'-joined string ('9-16-49-49'), or one int for every stage.
        attn_type: one letter per stage: 'A' agent, 'B' softmax (spatial reduction), 'L' linear attention.
        downstream_agent_shape: optional per-stage agent pooling grid (the official detection/segmentation
            backbones use (12, 16, 28, 28)); the bias tables keep the ``agent_num`` shapes and are resampled.
        drop_rate: the official ``drop_rate`` (after the position embedding, in the MLP and after ``proj``).
        pos_drop_rate, proj_drop_rate: override those two parts of ``drop_rate`` separately.
        attn_drop_rate, drop_path_rate: attention dropout; stochastic depth, linear over all blocks.
        norm_layer: block norm (LayerNorm eps 1e-6 as officially); patch embeddings use eps 1e-5.
        num_stages: must equal ``len(depths)`` (kept for the official signature).

    Shape:
        ``forward(x)``: (B, in_chans, H, W) → (B, num_classes), any H and W.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dims: Sequence[int] = (64, 128, 320, 512),
        num_heads: Sequence[int] = (1, 2, 5, 8),
        mlp_ratios: Sequence[float] = (8, 8, 4, 4),
        qkv_bias: bool = True,
        depths: Sequence[int] = (2, 2, 2, 2),
        sr_ratios: str | int | Sequence[int] = (8, 4, 2, 1),
        agent_sr_ratios: str | int | Sequence[int] = "1111",
        agent_num: str | int | Sequence[int | str] = (9, 16, 49, 49),
        attn_type: str = "AAAA",
        downstream_agent_shape: Sequence[int | tuple[int, int]] | None = None,
        drop_rate: float = 0.0,
        pos_drop_rate: float | None = None,
        proj_drop_rate: float | None = None,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer=None,
        num_stages: int | None = None,
        qk_scale: float | None = None,
    ) -> None:
        super().__init__()
        num_stages = len(depths) if num_stages is None else num_stages
        _check_pvt_args(depths, num_stages, patch_size, global_pool)
        embed_dims = _per_stage_seq("embed_dims", embed_dims, num_stages)
        num_heads = _per_stage_seq("num_heads", num_heads, num_stages)
        mlp_ratios = _per_stage_seq("mlp_ratios", mlp_ratios, num_stages)
        sr_ratios = per_stage("sr_ratios", sr_ratios, num_stages)
        agent_sr_ratios = per_stage("agent_sr_ratios", agent_sr_ratios, num_stages)
        agent_num = per_stage("agent_num", agent_num, num_stages)
        attn_type = "A" * num_stages if attn_type is None else attn_type  # official default for None
        kinds = parse_attn_type(attn_type, depths)
        target_agent_grids = _target_agent_grids(downstream_agent_shape, num_stages)
        del qk_scale  # official signature; None in every official config, so the scale is head_dim ** -0.5
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)
        pos_drop_rate = drop_rate if pos_drop_rate is None else pos_drop_rate
        proj_drop_rate = drop_rate if proj_drop_rate is None else proj_drop_rate

        self.img_size = to_2tuple_grid("img_size", img_size)
        self.num_classes, self.global_pool, self.num_stages = num_classes, global_pool, num_stages
        self.depths, self.embed_dims = list(depths), list(embed_dims)
        self.attn_type, self.agent_num = attn_type, agent_num
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dims[-1]
        self.grad_checkpointing = False
        self.grid_sizes = _stage_grids(self.img_size, patch_size, num_stages)

        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        cur = 0
        self.feature_info = []
        for i in range(num_stages):
            grid = self.grid_sizes[i]
            stem = (patch_size, in_chans) if i == 0 else (2, embed_dims[i - 1])
            setattr(self, f"patch_embed{i + 1}", PatchEmbed(*stem, embed_dims[i]))
            setattr(self, f"pos_embed{i + 1}", nn.Parameter(torch.zeros(1, grid[0] * grid[1], embed_dims[i])))
            setattr(self, f"pos_drop{i + 1}", nn.Dropout(pos_drop_rate))
            blocks = nn.ModuleList(
                Block(
                    embed_dims[i], num_heads[i], grid, kind, agent_num[i],
                    sr_ratios[i] if kind == "B" else agent_sr_ratios[i], mlp_ratios[i], qkv_bias,
                    proj_drop_rate, attn_drop_rate, dpr[cur + j], norm_layer, target_agent_grids[i],
                )
                for j, kind in enumerate(kinds[i])
            )  # fmt: skip
            setattr(self, f"block{i + 1}", blocks)
            cur += depths[i]
            info = dict(num_chs=embed_dims[i], reduction=patch_size * 2**i, module=f"block{i + 1}")
            self.feature_info.append(info)

        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()

        for i in range(num_stages):
            trunc_normal_(getattr(self, f"pos_embed{i + 1}"), std=0.02)
        self.apply(init_official_weights)

    # -- timm contract --------------------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        # The official model returns {'cls_token'}, a name it does not have: pos embeds are weight-decayed.
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        if coarse:
            blocks = r"^(?:patch_embed|pos_embed|block)(\d+)"
        else:
            blocks = [(r"^block(\d+)\.(\d+)", None), (r"^(?:patch_embed|pos_embed)(\d+)", (0,))]
        return dict(stem=r"^(?:patch_embed1\.|pos_embed1$)", blocks=blocks)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def load_pretrained(self, checkpoint_path: str, use_ema: bool | None = None) -> None:
        """Load an official checkpoint (.pth training dict, bare state dict or .safetensors) safely."""
        load_pretrained(self, checkpoint_path, filter_fn=checkpoint_filter_fn, use_ema=use_ema)

    # -- forward ---------------------------------------------------------------------------------------------
    def _pos_embed(self, i: int, grid: tuple[int, int]) -> torch.Tensor:
        """Stage ``i`` position embedding (1, H·W, C) for ``grid``."""
        return resample_stage_pos_embed(getattr(self, f"pos_embed{i + 1}"), self.grid_sizes[i], grid)

    def _stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) map → (B, C_i, H_i, W_i) map after stage ``i``."""
        x, grid = getattr(self, f"patch_embed{i + 1}")(x)
        x = getattr(self, f"pos_drop{i + 1}")(x + self._pos_embed(i, grid))
        for blk in getattr(self, f"block{i + 1}"):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, grid)
            else:
                x = blk(x, grid)
        return _tokens_to_map(x, grid)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) → last-stage map (B, C_last, ⌈H/32⌉, ⌈W/32⌉) (for patch_size 4)."""
        check_image_input(self, x)
        for i in range(self.num_stages):
            x = self._stage(i, x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, C, h, w) map → (B, num_classes) logits, or (B, C) pooled features with ``pre_logits``."""
        if self.global_pool == "avg":
            x = x.flatten(2).mean(dim=-1)  # the official mean over tokens
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) → (B, num_classes)."""
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs (B, C_i, H_i, W_i) for the stages in ``indices`` (timm semantics).

        ``norm`` is accepted for the timm interface; Agent-PVT has no norms on its outputs (the official
        downstream backbones return the raw stage maps).
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(self.num_stages, indices)
        last = max_index if stop_early or intermediates_only else self.num_stages - 1
        intermediates = []
        for i in range(last + 1):
            x = self._stage(i, x)
            if i in take_indices:
                intermediates.append(x if output_fmt == "NCHW" else x.permute(0, 2, 3, 1))
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last one in ``indices`` (and the head); returns the absolute indices."""
        take_indices, max_index = feature_take_indices(self.num_stages, indices)
        for i in range(max_index + 1, self.num_stages):
            for name in ("patch_embed", "pos_embed", "pos_drop", "block"):
                delattr(self, f"{name}{i + 1}")
        if max_index + 1 < self.num_stages:
            self.num_stages = max_index + 1
            self.num_features = self.head_hidden_size = self.embed_dims[max_index]
            self.feature_info = self.feature_info[: max_index + 1]
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------
def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: AgentPVT) -> dict[str, torch.Tensor]:
    """Adapt an official Agent-PVT state dict to ``model``: resample position embeddings and agent biases.

    ``pos_embed{i}`` of another token count (a checkpoint trained at another resolution) is resampled with
    timm's ``resample_abs_pos_embed`` (bicubic, as the official fine-tuning loader) from its square grid to the
    model's stage grid; row/column agent biases get the official 1-D linear resize.
    """
    out = dict(state_dict)
    for i, grid in enumerate(getattr(model, "grid_sizes", [])):
        key = f"pos_embed{i + 1}"
        pos = out.get(key)
        if pos is None or pos.shape[1] == grid[0] * grid[1]:
            continue
        side = math.isqrt(pos.shape[1])
        if side * side != pos.shape[1]:
            raise ValueError(
                f"{key} of the checkpoint has {pos.shape[1]} tokens, not a square grid; cannot resample it to {grid}"
            )
        out[key] = resample_abs_pos_embed(
            pos, new_size=list(grid), old_size=[side, side], num_prefix_tokens=0
        )
    return resize_agent_bias_tables(out, model)


# ---------------------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------------------
def _create_agent_pvt(variant: str, pretrained: bool = False, **kwargs) -> AgentPVT:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_agent_model(
        AgentPVT,
        variant,
        pretrained,
        checkpoint_filter_fn,
        dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


def _cfg(**kwargs) -> dict:
    return agent_cfg("patch_embed1.proj", **{"pool_size": (7, 7), **kwargs})


default_cfgs = generate_default_cfgs(
    with_official_tags(
        {
            "agent_pvt_tiny_224": _cfg(),
            "agent_pvt_small_224": _cfg(),
            "agent_pvt_medium_224": _cfg(),
            "agent_pvt_medium_256": _cfg(input_size=(3, 256, 256), pool_size=(8, 8)),
            "agent_pvt_large_224": _cfg(),
        }
    )
)

_PVT_ARGS = dict(
    patch_size=4,
    embed_dims=(64, 128, 320, 512),
    num_heads=(1, 2, 5, 8),
    mlp_ratios=(8, 8, 4, 4),
    qkv_bias=True,
    sr_ratios=(8, 4, 2, 1),
    agent_num=(9, 16, 49, 49),
    attn_type="AAAA",
    agent_sr_ratios="1111",
)


@register_model
def agent_pvt_tiny_224(pretrained: bool = False, **kwargs) -> AgentPVT:
    """Agent-PVT-T (spec §3.2: depths 2-2-2-2, drop path 0.1), 11.57 M params."""
    args = dict(_PVT_ARGS, depths=(2, 2, 2, 2), drop_path_rate=0.1)
    return _create_agent_pvt("agent_pvt_tiny_224", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def agent_pvt_small_224(pretrained: bool = False, **kwargs) -> AgentPVT:
    """Agent-PVT-S (depths 3-4-6-3, drop path 0.1), 20.64 M params."""
    args = dict(_PVT_ARGS, depths=(3, 4, 6, 3), drop_path_rate=0.1)
    return _create_agent_pvt("agent_pvt_small_224", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def agent_pvt_medium_224(pretrained: bool = False, **kwargs) -> AgentPVT:
    """Agent-PVT-M (depths 3-4-18-3, drop path 0.3), 35.92 M params."""
    args = dict(_PVT_ARGS, depths=(3, 4, 18, 3), drop_path_rate=0.3)
    return _create_agent_pvt("agent_pvt_medium_224", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def agent_pvt_medium_256(pretrained: bool = False, **kwargs) -> AgentPVT:
    """Agent-PVT-M at 256 (depths 3-4-18-3, drop path 0.3), 36.08 M params."""
    args = dict(_PVT_ARGS, depths=(3, 4, 18, 3), drop_path_rate=0.3, img_size=256)
    return _create_agent_pvt("agent_pvt_medium_256", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def agent_pvt_large_224(pretrained: bool = False, **kwargs) -> AgentPVT:
    """Agent-PVT-L (depths 3-8-27-3, drop path 0.3; official cfg ``agent_pvt_b.yaml``), 48.74 M params."""
    args = dict(_PVT_ARGS, depths=(3, 8, 27, 3), drop_path_rate=0.3)
    return _create_agent_pvt("agent_pvt_large_224", pretrained=pretrained, **dict(args, **kwargs))
