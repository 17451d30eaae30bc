"""Agent-CSwin (Han et al., ECCV 2024) for timm, with the official parameter names.

Structure (official ``agent_transformer/models/agent_cswin.py``, itself built on microsoft/CSWin-Transformer):
``stage1_conv_embed`` (Conv 7×7 s4 p2, tokens, LayerNorm), ``stage{1..4}.{j}`` blocks with a block-level
``qkv``/``norm1``/``proj``/``norm2``/``mlp`` and the attention branches in ``attns``, ``merge{1..3}``
(Conv 3×3 s2 + LayerNorm), final ``norm``, token mean, ``head``.

Per stage ``attn_type`` letter:

- ``A``: one agent branch over the whole stage map (``agentattn.layers.CSwinAgentAttention`` as ``attns.0``).
  This is the official block with ``la_split_size`` equal to the stage resolution ("last_stage").
- ``B``: the original CSwin LePE cross-shaped window attention: two branches (``attns.0`` vertical stripes of
  width ``split_size``, ``attns.1`` horizontal stripes), each with half the channels and half the heads. It is
  one branch over the whole map in the last stage, or when the split size reaches the stage resolution.
- ``L``: a linear-attention twin: one elu+1 linear-attention branch over the whole map with the same ``get_v``
  LePE term as the agent branch (keys ``attns.0.get_v``), between the block's ``qkv`` and ``proj``.

Any resolution: the stage grids are computed from the input at run time. Agent branches pass ``grid_size=(H, W)``
(the layer resamples its biases). LePE stripes wider than the map are clamped to it; a map that is not a multiple
of the stripe width is zero-padded at the right/bottom and the padded keys are masked out of the softmax, so the
last stripe simply is narrower (and its LePE conv sees zeros, as at the map border).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models import (
    generate_default_cfgs,
    register_model,
    register_notrace_module,  # in every timm >= 1.0 (timm.layers from 1.0.17)
)
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint
from torch import nn

from ..layers import CSwinAgentAttention
from ..layers.agent_bias import to_2tuple_grid
from ..ops import linear_attention
from ..ops.tracing import is_tracing
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

__all__ = ["AgentCSwinBlock", "AgentCSwinTransformer", "CSwinLinearAttention", "LePEAttention"]


class LePEAttention(nn.Module):
    """One branch of CSwin's cross-shaped window attention with the LePE term (official key: ``get_v``).

    ``idx`` -1: one window over the whole map; 0: vertical stripes (full height × ``split_size`` columns);
    1: horizontal stripes (``split_size`` rows × full width). Stripes wider than the map are clamped to it; a map
    that is not a multiple of the stripe width is padded at the end and the padded keys are masked.

    Shape:
        ``forward(qkv, grid_size)``: qkv (3, B, H·W, C) → (B, H·W, C), before the block's ``proj``.
    """

    def __init__(self, dim: int, num_heads: int, idx: int, split_size: int, attn_drop: float = 0.0) -> None:
        super().__init__()
        if idx not in (-1, 0, 1):
            raise ValueError(f"idx must be -1, 0 or 1, got {idx!r}")
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.dim, self.num_heads, self.idx, self.split_size = dim, num_heads, idx, split_size
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.attn_drop = attn_drop
        self.get_v = nn.Conv2d(dim, dim, kernel_size=3, stride=1, padding=1, groups=dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, idx={self.idx}, split_size={self.split_size}"

    def window(self, grid_size: tuple[int, int]) -> tuple[int, int]:
        """(H_sp, W_sp) for a map of ``grid_size`` (the stripe width clamped to the map)."""
        height, width = grid_size
        if self.idx == -1:
            return height, width
        if self.idx == 0:
            return height, min(self.split_size, width)
        return min(self.split_size, height), width

    @staticmethod
    def _windows(t: torch.Tensor, win: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
        """(B, C, H', W') → (B·nw, C, H_sp, W_sp) in official window order (rows of windows, then columns).

        The reshapes in this module never name the batch size: the legacy ONNX exporter would pin it to the
        traced one (it loses the dynamic batch through module tuples and unbind)."""
        t = t.unflatten(3, (grid[1] // win[1], win[1])).unflatten(2, (grid[0] // win[0], win[0]))
        return t.permute(0, 2, 4, 1, 3, 5).flatten(0, 2)

    def forward(self, qkv: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
        """qkv: (3, B, H·W, C) → (B, H·W, C)."""
        tokens, channels = qkv.shape[2], qkv.shape[3]
        height, width = grid_size
        if tokens != height * width or channels != self.dim:
            raise ValueError(
                f"qkv must be (3, B, {height}·{width}, {self.dim}), got shape {tuple(qkv.shape)}"
            )
        win = self.window(grid_size)
        pad_h, pad_w = (-height) % win[0], (-width) % win[1]
        padded = (height + pad_h, width + pad_w)
        maps = qkv.transpose(-2, -1).flatten(0, 1).unflatten(-1, (height, width))  # (3·B, C, H, W)
        if pad_h or pad_w:
            maps = F.pad(maps, (0, pad_w, 0, pad_h))
        windows = self._windows(maps, win, padded)  # (3·B·nw, C, H_sp, W_sp)
        # unbind, not chunk(): chunk's size guards would pin torch.export's batch dimension.
        q, k, v = windows.unflatten(0, (3, -1)).unbind(0)
        lepe = self.get_v(v)  # per-window conv, as officially (zero padding at stripe borders)

        n_h, n_w = padded[0] // win[0], padded[1] // win[1]

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B·nw, C, H_sp, W_sp) → (B·nw, h, L, d)
            return t.unflatten(1, (self.num_heads, self.head_dim)).flatten(-2).transpose(-2, -1)

        q, k, v, mask = heads(q), heads(k), heads(v), None
        if pad_h or pad_w:
            valid = torch.zeros(padded, dtype=torch.bool, device=qkv.device)
            valid[:height, :width] = True
            valid = self._windows(valid[None, None], win, padded).flatten(1)  # (nw, L)
            mask = valid[:, None, None]  # (nw, 1, 1, L): broadcasts over the batch and heads of (B, nw, ...)
            q, k, v = (t.unflatten(0, (-1, n_h * n_w)) for t in (q, k, v))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.attn_drop if self.training else 0.0, scale=self.scale
        ).flatten(0, -4)  # (B·nw, h, L, d)
        out = out + heads(lepe)
        # windows → map: (B, nH, nW, h, H_sp, W_sp, d) → (B, H', W', h·d)
        out = out.unflatten(0, (-1, n_h, n_w)).unflatten(-2, win)
        out = out.permute(0, 1, 4, 2, 5, 3, 6).flatten(-2).flatten(3, 4).flatten(1, 2)
        if pad_h or pad_w:
            out = out[:, :height, :width]
        return out.flatten(1, 2)


class CSwinLinearAttention(nn.Module):
    """Linear-attention twin of the agent branch: elu+1 linear attention over the whole map plus ``get_v``.

    Shape:
        ``forward(qkv, grid_size)``: qkv (3, B, H·W, C) → (B, H·W, C), before the block's ``proj``.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.dim, self.num_heads = dim, num_heads
        self.get_v = nn.Conv2d(dim, dim, kernel_size=3, stride=1, padding=1, groups=dim)

    def forward(self, qkv: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
        """qkv: (3, B, H·W, C) → (B, H·W, C)."""
        _, batch, tokens, channels = qkv.shape
        if tokens != grid_size[0] * grid_size[1] or channels != self.dim:
            raise ValueError(
                f"qkv must be (3, B, {grid_size[0]}·{grid_size[1]}, {self.dim}), got {tuple(qkv.shape)}"
            )
        q, k, v = (t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for t in qkv.unbind(0))
        out = linear_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, channels)
        v_map = qkv[2].unflatten(1, grid_size).permute(0, 3, 1, 2)
        return out + self.get_v(v_map).permute(0, 2, 3, 1).reshape(batch, tokens, channels)


# An fx leaf (timm's notrace registry): its forward reads Python values from shapes.
@register_notrace_module
class AgentCSwinBlock(nn.Module):
    """CSwin block: ``norm1`` → ``qkv`` → branches (``attns``) → concat → ``proj``; then ``norm2`` → ``mlp``.

    Shape:
        ``forward(x, grid_size)``: x (B, H·W, C) → (B, H·W, C).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        resolution: tuple[int, int],
        split_size: int = 7,
        attn_type: str = "B",
        agent_num: int = 49,
        last_stage: bool = False,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        if attn_type not in ("A", "B", "L"):
            raise ValueError(f"attn_type of a block must be 'A', 'B' or 'L', got {attn_type!r}")
        self.dim, self.num_heads, self.attn_type = dim, num_heads, attn_type
        self.resolution = resolution
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm1 = norm_layer(dim)
        # Official rule: one branch in the last stage or when the stripe covers the map (split == resolution).
        single = last_stage or attn_type != "B" or split_size >= max(resolution)
        self.branch_num = 1 if single else 2
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(drop)
        if attn_type == "A":
            attns = [CSwinAgentAttention(dim, num_heads, agent_num, resolution, attn_drop=attn_drop)]
        elif attn_type == "L":
            attns = [CSwinLinearAttention(dim, num_heads)]
        elif single:
            attns = [LePEAttention(dim, num_heads, -1, split_size, attn_drop)]
        else:
            if num_heads % 2 or dim % 2:
                raise ValueError(
                    f"a two-branch CSwin block needs even dim and num_heads, got {dim}, {num_heads}"
                )
            attns = [LePEAttention(dim // 2, num_heads // 2, i, split_size, attn_drop) for i in range(2)]
        self.attns = nn.ModuleList(attns)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)
        self.norm2 = norm_layer(dim)

    def forward(self, x: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
        """x: (B, H·W, C) → (B, H·W, C)."""
        channels = x.shape[-1]
        # No x.shape[0]: the legacy ONNX exporter pins the batch of a tensor unpacked from MergeBlock's tuple.
        qkv = self.qkv(self.norm1(x)).unflatten(-1, (3, channels)).permute(2, 0, 1, 3)  # (3, B, L, C)
        if self.branch_num == 2:
            half = channels // 2
            out = torch.cat(
                [self.attns[0](qkv[..., :half], grid_size), self.attns[1](qkv[..., half:], grid_size)], dim=2
            )
        elif self.attn_type == "A":
            out = self.attns[0](qkv, grid_size=grid_size)
        else:
            out = self.attns[0](qkv, grid_size)
        x = x + self.drop_path(self.proj_drop(self.proj(out)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class _ToTokens(nn.Module):
    """(B, C, H, W) → (B, H·W, C): the parameter-free slot 1 of the official ``stage1_conv_embed``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)


class MergeBlock(nn.Module):
    """Official ``Merge_Block``: Conv 3×3 stride 2 pad 1, then LayerNorm.

    Shape:
        ``forward(x, grid_size)``: (B, H·W, C) → (B, ⌈H/2⌉·⌈W/2⌉, C_out); ``merged_grid(grid_size)`` is
        (⌈H/2⌉, ⌈W/2⌉). One tensor out, not an (x, grid) tuple: the legacy ONNX exporter pins the batch size of
        a tensor unpacked from a module's tuple output.
    """

    def __init__(self, dim: int, dim_out: int, norm_layer: type[nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim_out, 3, 2, 1)
        self.norm = norm_layer(dim_out)

    @staticmethod
    def merged_grid(grid_size: tuple[int, int]) -> tuple[int, int]:
        """The map size after the 3×3, stride-2, padding-1 conv."""
        return (grid_size[0] + 1) // 2, (grid_size[1] + 1) // 2

    def forward(self, x: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
        x = self.conv(x.transpose(1, 2).unflatten(2, grid_size))
        return self.norm(x.flatten(2).transpose(1, 2))


def _check_cswin_args(patch_size: int, qk_scale: float | None, global_pool: str) -> None:
    """The official options this model fixes: the stride-4 stem and the head_dim ** -0.5 scale; the pooling."""
    if patch_size != 4:
        raise ValueError(
            f"patch_size must be 4 (the CSwin stem is a fixed 7×7 stride-4 conv), got {patch_size!r}"
        )
    if qk_scale is not None:
        raise ValueError("qk_scale is not supported: the official model always uses head_dim ** -0.5")
    check_global_pool(global_pool)


def _stage_resolutions(img: tuple[int, int]) -> list[tuple[int, int]]:
    """Construction grids: stem 7×7 stride 4 pad 2, then 3×3 stride 2 pad 1 merges (56/28/14/7 at 224)."""
    resolutions = [((img[0] - 3) // 4 + 1, (img[1] - 3) // 4 + 1)]
    for _ in range(3):
        resolutions.append(((resolutions[-1][0] + 1) // 2, (resolutions[-1][1] + 1) // 2))
    return resolutions


def _check_la_split_size(
    la_split_size: Any, kinds: list[list[str]], resolutions: list[tuple[int, int]]
) -> None:
    """Official agent blocks with la_split_size == stage resolution attend over the whole map; smaller agent
    windows are not supported (the released models never use them)."""
    la = per_stage("la_split_size", la_split_size, 4)
    for i, (s, res) in enumerate(zip(la, resolutions, strict=True)):
        if "A" in kinds[i] and s < max(res):
            raise ValueError(
                f"la_split_size[{i}] = {s} is smaller than the stage-{i + 1} map {res}; only global agent "
                "branches (la_split_size equal to the stage resolution) are supported"
            )


class AgentCSwinTransformer(LinearHeadMixin, nn.Module):
    """Agent-CSwin classifier (official argument names: ``depth``, ``split_size``, ``la_split_size``, ...).

    Shape:
        ``forward(x)``: (B, in_chans, H, W) → (B, num_classes); ``forward_features``: → (B, H/32, W/32, C) (NHWC,
        after the final norm); ``forward_head``: mean over the tokens, then ``head``.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 64,
        depth: Sequence[int] = (2, 4, 18, 1),
        split_size: Sequence[int] | str = (1, 2, 7, 7),
        la_split_size: Sequence[int] | str | None = None,
        num_heads: Sequence[int] | int = (2, 4, 8, 16),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        agent_num: Sequence[int] | str = (9, 16, 49, 49),
        attn_type: str = "AABB",
        norm_layer: type[nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        img = to_2tuple_grid("img_size", img_size)
        _check_cswin_args(patch_size, qk_scale, global_pool)
        depth = per_stage("depth", depth, 4)
        if any(d < 0 for d in depth):
            raise ValueError(f"depth must be non-negative, got {depth!r}")
        split_size = per_stage("split_size", split_size, 4)
        heads = per_stage("num_heads", num_heads, 4)
        agent_nums = per_stage("agent_num", agent_num, 4)
        kinds = parse_attn_type(attn_type, depth)
        if any(s <= 0 for s in split_size):
            raise ValueError(f"split_size must be positive, got {split_size!r}")
        resolutions = _stage_resolutions(img)
        if la_split_size is not None:
            _check_la_split_size(la_split_size, kinds, resolutions)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.output_fmt = "NHWC"  # forward_features' layout, declared as timm's Swin does
        self.attn_type = attn_type
        self.img_size = img
        self.grad_checkpointing = False
        dims = [embed_dim * 2**i for i in range(4)]
        self.num_features = self.head_hidden_size = dims[-1]
        self.feature_info = [
            dict(num_chs=dims[i], reduction=4 * 2**i, module=f"stage{i + 1}") for i in range(4)
        ]

        self.stage1_conv_embed = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim, 7, 4, 2), _ToTokens(), nn.LayerNorm(embed_dim)
        )
        dpr = torch.linspace(0, drop_path_rate, sum(depth), device="cpu").tolist()
        start = 0
        for i in range(4):
            blocks = nn.ModuleList(
                [
                    AgentCSwinBlock(
                        dims[i], heads[i], resolutions[i], split_size[i], kinds[i][j], agent_nums[i],
                        last_stage=i == 3, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate,
                        attn_drop=attn_drop_rate, drop_path=dpr[start + j], norm_layer=norm_layer,
                    )
                    for j in range(depth[i])
                ]
            )  # fmt: skip
            start += depth[i]
            setattr(self, f"stage{i + 1}", blocks)
            if i < 3:
                setattr(self, f"merge{i + 1}", MergeBlock(dims[i], dims[i + 1]))
        self._num_stages = 4
        self.norm = norm_layer(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_official_weights)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)

    # -- timm contract ----------------------------------------------------------------------------------
    def load_pretrained(self, checkpoint_path: str, use_ema: bool | None = None) -> None:
        """Load an official checkpoint (.pth training dict, bare state dict or .safetensors); timm calls this."""
        load_pretrained(self, checkpoint_path, filter_fn=checkpoint_filter_fn, use_ema=use_ema)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        # Official training decays everything but 1-D params and '*.bias' (the agent '*_bias' tables included).
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(
            stem=r"^stage1_conv_embed",
            blocks=r"^(?:stage|merge)(\d+)"
            if coarse
            else [(r"^stage(\d+)\.(\d+)", None), (r"^merge(\d+)", (99999,)), (r"^norm", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def _stem(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.stage1_conv_embed[0](x)
        grid = (x.shape[-2], x.shape[-1])
        return self.stage1_conv_embed[2](self.stage1_conv_embed[1](x)), grid

    def _run_stage(
        self, i: int, x: torch.Tensor, grid: tuple[int, int]
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        if i > 0:
            merge = getattr(self, f"merge{i}")
            x, grid = merge(x, grid), merge.merged_grid(grid)
        for blk in getattr(self, f"stage{i + 1}"):
            if self.grad_checkpointing and not torch.jit.is_scripting() and torch.is_grad_enabled():
                x = checkpoint(blk, x, grid)
            else:
                x = blk(x, grid)
        return x, grid

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) → (B, H/32, W/32, C) after the final norm (NHWC)."""
        check_image_input(self, x)
        if (
            not is_tracing() and x.shape[0] == 0
        ):  # the window reshapes cannot infer sizes from 0 elements: run one blank image
            return self.forward_features(x.new_zeros(1, *x.shape[1:]))[:0]
        x, grid = self._stem(x)
        for i in range(self._num_stages):
            x, grid = self._run_stage(i, x, grid)
        return self.norm(x).unflatten(1, grid)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, H, W, C) or (B, N, C) → pooled (B, C) (pre_logits) or (B, num_classes)."""
        if self.global_pool == "avg":
            x = x.flatten(1, -2).mean(dim=1)  # (B, H, W, C) or (B, N, C); no branch on x.dim() for torch.fx
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
        """Stage outputs (B, C_i, H/2^(i+2), W/2^(i+2)) (NCHW, or NHWC) for the selected stages.

        Returns the intermediates, or (final features as in ``forward_features``, intermediates). ``norm``
        applies the final norm to the last stage's output, as timm's hierarchical models do.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(self._num_stages, indices)
        last = max_index if stop_early else self._num_stages - 1
        intermediates = []
        x, grid = self._stem(x)
        for i in range(last + 1):
            x, grid = self._run_stage(i, x, grid)
            if i in take_indices:
                feat = self.norm(x) if norm and i == self._num_stages - 1 else x
                feat = feat.unflatten(1, grid)
                intermediates.append(feat.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else feat)
        if intermediates_only:
            return intermediates
        return self.norm(x).unflatten(1, grid), intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last selected one (and the norm / head); returns the kept indices."""
        take_indices, max_index = feature_take_indices(self._num_stages, indices)
        for i in range(max_index + 1, self._num_stages):
            setattr(self, f"stage{i + 1}", nn.ModuleList())
            setattr(self, f"merge{i}", None)
        if max_index + 1 < self._num_stages:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
            prune_norm = prune_head = True
        self._num_stages = max_index + 1
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices


def checkpoint_filter_fn(
    state_dict: dict[str, torch.Tensor], model: AgentCSwinTransformer
) -> dict[str, torch.Tensor]:
    """Adapt an official Agent-CSwin state dict (already unwrapped) to ``model``.

    - Agent row/column bias tables of another resolution: 1-D linear interpolation (official fine-tuning rule).
    - A LePE block that is two-branch in the checkpoint but one branch here (or the reverse; this happens when the
      split size is clamped at a smaller img_size): the depthwise ``get_v`` weights are concatenated (split) along
      the channel axis, which keeps every channel's LePE conv.
    """
    out = dict(state_dict)
    model_keys = model.state_dict()
    for key in list(out):
        for part in ("weight", "bias"):
            suffix = f".attns.0.get_v.{part}"
            if not key.endswith(suffix):
                continue
            prefix = key[: -len(suffix)]
            other = f"{prefix}.attns.1.get_v.{part}"
            if other in out and other not in model_keys and key in model_keys:
                out[key] = torch.cat([out[key], out.pop(other)], dim=0)
            elif other not in out and other in model_keys and key in model_keys:
                if out[key].shape[0] == 2 * model_keys[key].shape[0]:
                    out[key], out[other] = out[key].chunk(2, dim=0)
    return resize_agent_bias_tables(out, model)


def _create_agent_cswin(variant: str, pretrained: bool = False, **kwargs: Any) -> AgentCSwinTransformer:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_agent_model(
        AgentCSwinTransformer,
        variant,
        pretrained,
        checkpoint_filter_fn,
        dict(feature_cls="getter", out_indices=out_indices),
        **kwargs,
    )


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return agent_cfg("stage1_conv_embed.0", **{"pool_size": (7, 7), **kwargs})


default_cfgs = generate_default_cfgs(
    with_official_tags(
        {
            "agent_cswin_tiny_224": _cfg(),
            "agent_cswin_small_224": _cfg(),
            "agent_cswin_base_224": _cfg(),
            "agent_cswin_base_384": _cfg(input_size=(3, 384, 384), pool_size=(12, 12)),
        }
    )
)


@register_model
def agent_cswin_tiny_224(pretrained: bool = False, **kwargs: Any) -> AgentCSwinTransformer:
    """Agent-CSwin-T (official ``Agent_CSWin_64_24181_tiny_224``), 20.46M params."""
    model_args = dict(
        embed_dim=64,
        depth=(2, 4, 18, 1),
        split_size=(1, 2, 7, 7),
        num_heads=(2, 4, 8, 16),
        mlp_ratio=4.0,
        agent_num=(9, 16, 49, 49),
        attn_type="AABB",
        drop_path_rate=0.2,
    )
    return _create_agent_cswin("agent_cswin_tiny_224", pretrained, **dict(model_args, **kwargs))


@register_model
def agent_cswin_small_224(pretrained: bool = False, **kwargs: Any) -> AgentCSwinTransformer:
    """Agent-CSwin-S (official ``Agent_CSWin_64_36292_small_224``), 32.81M params."""
    model_args = dict(
        embed_dim=64,
        depth=(3, 6, 29, 2),
        split_size=(1, 2, 7, 7),
        num_heads=(2, 4, 8, 16),
        mlp_ratio=4.0,
        agent_num=(9, 16, 49, 49),
        attn_type="AABB",
        drop_path_rate=0.4,
    )
    return _create_agent_cswin("agent_cswin_small_224", pretrained, **dict(model_args, **kwargs))


@register_model
def agent_cswin_base_224(pretrained: bool = False, **kwargs: Any) -> AgentCSwinTransformer:
    """Agent-CSwin-B (official ``Agent_CSWin_96_36292_base_224``), 73.25M params."""
    model_args = dict(
        embed_dim=96,
        depth=(3, 6, 29, 2),
        split_size=(1, 2, 7, 7),
        num_heads=(4, 8, 16, 32),
        mlp_ratio=4.0,
        agent_num=(9, 16, 49, 49),
        attn_type="AABB",
        drop_path_rate=0.5,
    )
    return _create_agent_cswin("agent_cswin_base_224", pretrained, **dict(model_args, **kwargs))


@register_model
def agent_cswin_base_384(pretrained: bool = False, **kwargs: Any) -> AgentCSwinTransformer:
    """Agent-CSwin-B at 384 (official ``Agent_CSWin_96_36292_base_384``), 73.33M params."""
    model_args = dict(
        img_size=384,
        embed_dim=96,
        depth=(3, 6, 29, 2),
        split_size=(1, 2, 12, 12),
        num_heads=(4, 8, 16, 32),
        mlp_ratio=4.0,
        agent_num=(9, 16, 49, 49),
        attn_type="AABB",
        drop_path_rate=0.7,
    )
    return _create_agent_cswin("agent_cswin_base_384", pretrained, **dict(model_args, **kwargs))
