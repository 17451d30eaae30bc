"""Agent-Swin (Han et al., ECCV 2024) in timm, with the official parameter names.

Layout of the official ``agent_transformer/models/agent_swin.py`` (Swin v1): ``patch_embed.{proj,norm}``,
``layers.{i}.blocks.{j}.{norm1,attn,norm2,mlp.fc1,mlp.fc2}``, ``layers.{i}.downsample.{norm,reduction}``
(PatchMerging at the *end* of stages 0–2), ``norm``, ``head``.

Per stage, ``attn_type`` picks the attention of every block (spec §2.3):

- ``A``: agent attention over the whole stage map (the official window is clamped to the map, shift 0);
- ``B``: Swin W-MSA / SW-MSA with a relative-position bias, window ``max(7, window_size // 8)``, shift 0 for
  even and window//2 for odd blocks (window clamped to the map when the map is not larger, then shift 0);
- ``M<k>``: the first k blocks ``A``, the rest ``B`` (official strings put the digits last: ``'AAMB2'``);
- ``L``: the linear-attention twin (elu+1 with the same DWC), over the whole map.

Any input size runs: agent and linear blocks take the current map as their grid (agent biases resample per
forward, spec §2.5), window blocks pad to a multiple of the window and build the shift mask for the padded map
(as the official downstream backbone does), and PatchMerging pads odd sizes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import (
    DropPath,
    Mlp,
    PatchEmbed,
    resample_patch_embed,
    resize_rel_pos_bias_table,
    to_2tuple,
)
from timm.models import generate_default_cfgs, register_model, register_notrace_module
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq
from timm.models.swin_transformer import PatchMerging, WindowAttention, window_partition, window_reverse
from torch import nn

from ..layers import AgentAttention, LinearAttention
from ..layers.agent_bias import to_2tuple_grid
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

__all__ = ["AgentSwinTransformer", "checkpoint_filter_fn", "parse_attn_type"]

MASK_VALUE = -100.0  # the official Swin SW-MSA mask value


# ---------------------------------------------------------------------------------------------------------------
# configuration helpers
# ---------------------------------------------------------------------------------------------------------------


def _per_stage_agent_shape(shape: Any, num_stages: int) -> list[tuple[int, int] | None]:
    if shape is None:
        return [None] * num_stages
    if not isinstance(shape, (list, tuple)) or len(shape) != num_stages:
        raise ValueError(
            f"downstream_agent_shape must have one entry per stage ({num_stages}), e.g. (9, 12, 14, 7), got {shape!r}"
        )
    return [None if s is None else to_2tuple_grid("downstream_agent_shape", s) for s in shape]


def swin_shift_mask(
    height: int, width: int, window: tuple[int, int], shift: tuple[int, int], device=None, dtype=None
) -> torch.Tensor:
    """The SW-MSA mask for a (padded) ``height × width`` map: (num_windows, wh·ww, wh·ww), 0 or -100."""
    img_mask = torch.zeros((1, height, width, 1), device=device, dtype=dtype)
    count = 0
    for hs in (slice(0, -window[0]), slice(-window[0], -shift[0]), slice(-shift[0], None)):
        for ws in (slice(0, -window[1]), slice(-window[1], -shift[1]), slice(-shift[1], None)):
            img_mask[:, hs, ws, :] = count
            count += 1
    windows = window_partition(img_mask, window).reshape(-1, window[0] * window[1])
    mask = windows.unsqueeze(1) - windows.unsqueeze(2)
    return mask.masked_fill(mask != 0, MASK_VALUE).masked_fill(mask == 0, 0.0)


# ---------------------------------------------------------------------------------------------------------------
# modules
# ---------------------------------------------------------------------------------------------------------------
# An fx leaf (timm's notrace registry): its forward reads Python values from shapes.
@register_notrace_module
class AgentSwinBlock(nn.Module):
    """One Agent-Swin block: pre-norm attention (agent, window or linear) and MLP, each with a residual.

    Args:
        dim: channels C.
        input_resolution: the (H, W) map the block is built for (biases, window clamp, stored shift mask).
        num_heads: attention heads.
        attn_kind: 'A' agent, 'B' (shifted) window attention, 'L' linear attention.
        window_size: window of a 'B' block before clamping.
        shift_size: shift of a 'B' block before clamping (0 or window // 2).
        agent_num: agents of an 'A' block.
        downstream_agent_shape: optional agent grid to pool onto instead (``target_agent_grid`` of
            :class:`~agentattn.layers.AgentAttention`).

    Shape:
        ``forward(x)``: x (B, H, W, C) → (B, H, W, C), any H and W.
    """

    def __init__(
        self,
        dim: int,
        input_resolution: tuple[int, int],
        num_heads: int,
        attn_kind: str = "A",
        window_size: int = 7,
        shift_size: int = 0,
        agent_num: int | tuple[int, int] = 49,
        downstream_agent_shape: tuple[int, int] | None = None,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.input_resolution = tuple(input_resolution)
        self.attn_kind = attn_kind
        if attn_kind in ("A", "L"):
            # Agent (and linear) blocks see the whole map as one window, never shifted.
            self.window_size, self.shift_size = self.input_resolution, (0, 0)
        elif attn_kind == "B":
            if min(self.input_resolution) <= window_size:  # official clamp
                window_size, shift_size = min(self.input_resolution), 0
            self.window_size, self.shift_size = to_2tuple(window_size), to_2tuple(shift_size)
        else:
            raise ValueError(f"attn_kind must be 'A', 'B' or 'L', got {attn_kind!r}")

        self.norm1 = norm_layer(dim)
        if attn_kind == "A":
            self.attn = AgentAttention(
                dim,
                num_heads=num_heads,
                agent_num=agent_num,
                grid_size=self.input_resolution,
                num_prefix_tokens=0,
                qkv_bias=qkv_bias,
                attn_drop=attn_drop,
                proj_drop=proj_drop,
                target_agent_grid=downstream_agent_shape,
            )
        elif attn_kind == "L":
            self.attn = LinearAttention(
                dim,
                num_heads=num_heads,
                grid_size=self.input_resolution,
                qkv_bias=qkv_bias,
                proj_drop=proj_drop,
            )
        else:
            self.attn = WindowAttention(
                dim,
                num_heads=num_heads,
                window_size=self.window_size,
                qkv_bias=qkv_bias,
                attn_drop=attn_drop,
                proj_drop=proj_drop,
            )
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(
            in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop
        )
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

        # Official: a buffer on shifted window blocks only; ours is re-created, hence not persistent.
        self.register_buffer("attn_mask", self._shift_mask(), persistent=False)

    def _shift_mask(self, device: torch.device | None = None) -> torch.Tensor | None:
        if self.attn_kind != "B" or not any(self.shift_size):
            return None
        return swin_shift_mask(
            *self._padded(self.input_resolution), self.window_size, self.shift_size, device=device
        )

    def init_non_persistent_buffers(self) -> None:
        """Rebuild the shift mask, e.g. after ``to_empty()`` from the meta device (timm's convention)."""
        if self.attn_mask is not None:
            self.attn_mask = self._shift_mask(device=self.attn_mask.device)

    def _padded(self, size: tuple[int, int]) -> tuple[int, int]:
        return tuple(math.ceil(s / w) * w for s, w in zip(size, self.window_size, strict=True))

    def _window_attn(self, x: torch.Tensor) -> torch.Tensor:
        """W-MSA / SW-MSA on (B, H, W, C): pad to whole windows, shift, attend, undo."""
        _, height, width, channels = x.shape
        win, shift = self.window_size, self.shift_size
        pad_h, pad_w = (-height) % win[0], (-width) % win[1]
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        padded = (x.shape[1], x.shape[2])
        mask = None
        if any(shift):
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
            mask = self.attn_mask
            if mask is None or padded != self._padded(self.input_resolution):
                mask = swin_shift_mask(*padded, win, shift, device=x.device, dtype=x.dtype)
            else:
                mask = mask.to(x.dtype)
        windows = window_partition(x, win).reshape(-1, win[0] * win[1], channels)
        windows = self.attn(windows, mask=mask)
        x = window_reverse(windows.reshape(-1, win[0], win[1], channels), win, *padded)
        if any(shift):
            x = torch.roll(x, shifts=shift, dims=(1, 2))
        return x[:, :height, :width].contiguous() if (pad_h or pad_w) else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) → (B, H, W, C)."""
        batch, height, width, channels = x.shape
        y = self.norm1(x)
        if self.attn_kind == "B":
            y = self._window_attn(y)
        else:
            y = self.attn(y.reshape(batch, height * width, channels), grid_size=(height, width))
            y = y.reshape(batch, height, width, channels)
        x = x + self.drop_path1(y)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x


class AgentSwinStage(nn.Module):
    """Blocks of one stage, then the official end-of-stage PatchMerging (``downsample``) if any.

    Shape:
        ``forward(x)``: (B, H, W, C) → (B, ⌈H/2⌉, ⌈W/2⌉, 2C) with a downsample, else (B, H, W, C).
    """

    def __init__(self, blocks: list[AgentSwinBlock], dim: int, downsample: bool, norm_layer: type[nn.Module]):
        super().__init__()
        self.grad_checkpointing = False
        self.blocks = nn.Sequential(*blocks)
        self.downsample = PatchMerging(dim, 2 * dim, norm_layer=norm_layer) if downsample else nn.Identity()

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """The stage's blocks only (what a feature map of this stage is)."""
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(self.forward_blocks(x))


def _check_swin_args(
    depths: tuple[int, ...], num_heads: tuple[int, ...], window_size: int, global_pool: str, ape: bool,
    qk_scale: float | None,
) -> None:  # fmt: skip
    """The constructor's argument checks: stage counts, window, pooling and the unsupported official options."""
    if not depths or not all(isinstance(d, int) and d >= 1 for d in depths):
        raise ValueError(f"depths must be a non-empty sequence of positive ints, got {depths!r}")
    if len(num_heads) != len(depths):
        raise ValueError(f"num_heads must have one entry per stage ({len(depths)}), got {num_heads!r}")
    if not isinstance(window_size, int) or window_size < 1:
        raise ValueError(f"window_size must be a positive int, got {window_size!r}")
    check_global_pool(global_pool)
    if ape:
        raise ValueError("ape=True (absolute position embedding) is not supported; no released model uses it")
    if qk_scale is not None:
        raise ValueError("qk_scale is not supported (the official agent models use head_dim ** -0.5)")


class AgentSwinTransformer(LinearHeadMixin, nn.Module):
    """Agent-Swin classifier (official layout; timm model contract).

    Args:
        img_size: construction size; agent biases, window clamps and stored masks are built for its stage maps.
            Other input sizes still run.
        patch_size, in_chans, num_classes, embed_dim, depths, num_heads, mlp_ratio, qkv_bias: as in Swin.
        window_size: the official ``WINDOW_SIZE`` (56 at 224, 72 at 288, 96 at 384); window blocks use
            ``max(7, window_size // 8)``. Agent blocks always cover the whole map.
        agent_num: agents per stage (int, per-stage list, or official ``'9-16-49-49'``).
        attn_type: per-stage attention, e.g. ``'AAAB'`` or ``'AAMB2'``, or per block (the grammar of
            :func:`agentattn.models._builder.parse_attn_type`).
        downstream_agent_shape: optional per-stage agent grids to pool onto (e.g. ``(9, 12, 14, 7)``), the
            official detection/segmentation setting; biases are resampled, parameters unchanged.
        drop_rate: dropout after the patch embedding and in the MLP / projection (official meaning).
        drop_path_rate: stochastic depth, linear 0 → rate over all blocks.
        global_pool: ``'avg'`` or ``''``.
        ape, patch_norm, qk_scale, use_checkpoint: official arguments; only the official values are supported
            (``ape=False``, ``qk_scale=None``), ``use_checkpoint`` turns on gradient checkpointing.

    Shape:
        ``forward(x)``: (B, in_chans, H, W) → (B, num_classes); ``forward_features``: → (B, H/32, W/32, C_last).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 56,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float | None = None,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        agent_num: Any = (9, 16, 49, 49),
        attn_type: str | Sequence[str] = "AAAB",
        downstream_agent_shape: Sequence[Any] | None = None,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        ape: bool = False,
        patch_norm: bool = True,
        qk_scale: float | None = None,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        depths, num_heads = tuple(depths), tuple(num_heads)
        _check_swin_args(depths, num_heads, window_size, global_pool, ape, qk_scale)
        num_stages = len(depths)
        kinds = parse_attn_type(attn_type, depths)
        agent_nums = per_stage("agent_num", agent_num, num_stages, pairs=True)
        agent_shapes = _per_stage_agent_shape(downstream_agent_shape, num_stages)
        proj_drop_rate = drop_rate if proj_drop_rate is None else proj_drop_rate

        self.num_classes, self.global_pool, self.num_layers = num_classes, global_pool, num_stages
        self.embed_dim, self.attn_type, self.window_size = embed_dim, attn_type, window_size
        self.output_fmt = "NHWC"  # forward_features' layout, declared as timm's Swin does
        self.num_features = self.head_hidden_size = int(embed_dim * 2 ** (num_stages - 1))

        self.patch_embed = PatchEmbed(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
            norm_layer=norm_layer if patch_norm else None, output_fmt="NHWC", strict_img_size=False,
            dynamic_img_pad=True,
        )  # fmt: skip
        self.pos_drop = nn.Dropout(drop_rate)
        grid = tuple(self.patch_embed.grid_size)

        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        b_window = max(7, window_size // 8)
        stages = []
        self.feature_info = []
        block_index = 0
        dim = embed_dim
        for i in range(num_stages):
            blocks = [
                AgentSwinBlock(
                    dim, grid, num_heads[i], attn_kind=kind, window_size=b_window,
                    shift_size=0 if j % 2 == 0 else b_window // 2, agent_num=agent_nums[i],
                    downstream_agent_shape=agent_shapes[i], mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                    proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[block_index + j],
                    norm_layer=norm_layer,
                )
                for j, kind in enumerate(kinds[i])
            ]  # fmt: skip
            block_index += depths[i]
            stages.append(AgentSwinStage(blocks, dim, downsample=i < num_stages - 1, norm_layer=norm_layer))
            self.feature_info.append(
                dict(num_chs=dim, reduction=patch_size * 2**i, module=f"layers.{i}.blocks")
            )
            if i < num_stages - 1:
                grid = ((grid[0] + 1) // 2, (grid[1] + 1) // 2)
                dim *= 2
        self.layers = nn.Sequential(*stages)
        self.norm = norm_layer(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

        self.apply(init_official_weights)
        if use_checkpoint:
            self.set_grad_checkpointing(True)

    # -- timm contract --------------------------------------------------------------------------------------
    def load_pretrained(self, checkpoint_path: str, use_ema: bool | None = None) -> None:
        """Load an official checkpoint (.pth training dict, bare state dict or .safetensors) safely."""
        load_pretrained(self, checkpoint_path, filter_fn=checkpoint_filter_fn, use_ema=use_ema)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Relative-position tables, as in Swin (the official recipe does decay the agent biases)."""
        return {n for n, _ in self.named_parameters() if "relative_position_bias_table" in n}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise lr decay: stem, then per stage (per block when fine)."""
        return dict(
            stem=r"^patch_embed",
            blocks=r"^layers\.(\d+)"
            if coarse
            else [
                (r"^layers\.(\d+)\.downsample", (99998,)),  # official PatchMerging ends its stage
                (r"^layers\.(\d+)\.\w+\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Gradient checkpointing of every stage's blocks."""
        for stage in self.layers:
            stage.grad_checkpointing = enable

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs (before each stage's PatchMerging) as (B, C_i, H/(4·2^i), W/(4·2^i)) maps.

        Args:
            x: (B, in_chans, H, W).
            indices: last n stages if int, all if None, else the stage indices to return.
            norm: apply the final norm to the last stage's map.
            stop_early: stop after the last requested stage.
            output_fmt: 'NCHW' (or 'NHWC').
            intermediates_only: return only the list.

        Returns:
            the list of maps, or (final features (B, h, w, C) NHWC, list).
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        x = self.pos_drop(self.patch_embed(x))
        num_stages = len(self.layers)
        stages = self.layers[: max_index + 1] if stop_early else self.layers
        intermediates = []
        last = -1
        for i, stage in enumerate(stages):
            x = stage.forward_blocks(x)
            last = i
            if i in take_indices:
                inter = self.norm(x) if norm and i == num_stages - 1 else x
                intermediates.append(
                    inter.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else inter
                )
            if i < len(stages) - 1:
                x = stage.downsample(x)
        if intermediates_only:
            return intermediates
        if last == num_stages - 1:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages (and norm / head) not needed for ``indices``; returns the kept indices."""
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        prune_end = max_index < len(self.layers) - 1
        self.layers = self.layers[: max_index + 1]
        if prune_end:
            self.layers[-1].downsample = nn.Identity()  # its output would only feed the pruned stages
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) → (B, h, w, C_last), normalised (NHWC, like timm's Swin)."""
        check_image_input(self, x)
        if (
            not is_tracing() and x.shape[0] == 0
        ):  # the window reshapes cannot infer sizes from 0 elements: run one blank image
            return self.forward_features(x.new_zeros(1, *x.shape[1:]))[:0]
        x = self.pos_drop(self.patch_embed(x))
        x = self.layers(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, h, w, C) → pooled (B, C) with ``pre_logits``, else logits (B, num_classes)."""
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) → (B, num_classes)."""
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------------------
def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapt an official Agent-Swin state dict to ``model``.

    Drops the buffers the model re-creates (``relative_position_index``, ``attn_mask``), resizes
    relative-position tables to the model's windows (timm's ``resize_rel_pos_bias_table``), resamples the patch
    embedding kernel if the patch size differs, and 1-D-interpolates agent row/column biases trained at another
    resolution (spec §4).
    """
    if "model" in state_dict and isinstance(state_dict["model"], dict):
        state_dict = state_dict["model"]
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
        state_dict = state_dict["state_dict"]
    model_params = dict(model.named_parameters())
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith("relative_position_index") or key.endswith("attn_mask"):
            continue
        if key == "patch_embed.proj.weight" and key in model_params:
            target = model_params[key].shape
            if value.shape[-2:] != target[-2:]:
                value = resample_patch_embed(
                    value, list(target[-2:]), interpolation="bicubic", antialias=True
                )
        if key.endswith("relative_position_bias_table") and key in model_params:
            target = model_params[key]
            if value.shape != target.shape:
                module = model.get_submodule(key[: -len(".relative_position_bias_table")])
                value = resize_rel_pos_bias_table(
                    value, new_window_size=module.window_size, new_bias_shape=tuple(target.shape)
                )
        out[key] = value
    return resize_agent_bias_tables(out, model)


def _create_agent_swin(variant: str, pretrained: bool = False, **kwargs: Any) -> AgentSwinTransformer:
    depths = kwargs.get("depths", (2, 2, 6, 2))
    out_indices = kwargs.pop("out_indices", tuple(range(len(depths))))
    return build_agent_model(
        AgentSwinTransformer,
        variant,
        pretrained,
        checkpoint_filter_fn,
        dict(feature_cls="getter", out_indices=out_indices),
        **kwargs,
    )


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return agent_cfg("patch_embed.proj", **{"pool_size": (7, 7), **kwargs})


default_cfgs = generate_default_cfgs(
    with_official_tags(
        {
            "agent_swin_tiny_224": _cfg(),
            "agent_swin_small_224": _cfg(),
            # TEST.CROP False in the official 288/384 configs: direct resize to S×S.
            "agent_swin_small_288": _cfg(input_size=(3, 288, 288), pool_size=(9, 9), crop_pct=1.0),
            "agent_swin_base_224": _cfg(),
            "agent_swin_base_384": _cfg(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0),
        }
    )
)


@register_model
def agent_swin_tiny_224(pretrained: bool = False, **kwargs: Any) -> AgentSwinTransformer:
    """Agent-Swin-T (official ``agent_swin_t.yaml``): C 96, depths 2-2-6-2, ``AAAB``, 224²."""
    args = dict(
        embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=56,
        agent_num=(9, 16, 49, 49), attn_type="AAAB", drop_path_rate=0.2,
    )  # fmt: skip
    return _create_agent_swin("agent_swin_tiny_224", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def agent_swin_small_224(pretrained: bool = False, **kwargs: Any) -> AgentSwinTransformer:
    """Agent-Swin-S (official ``agent_swin_s.yaml``): C 96, depths 2-2-18-2, ``AABB``, 224²."""
    args = dict(
        embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=56,
        agent_num=(9, 16, 49, 49), attn_type="AABB", drop_path_rate=0.3,
    )  # fmt: skip
    return _create_agent_swin("agent_swin_small_224", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def agent_swin_small_288(pretrained: bool = False, **kwargs: Any) -> AgentSwinTransformer:
    """Agent-Swin-S at 288² (official ``agent_swin_s_288.yaml``): WINDOW_SIZE 72, window blocks 9."""
    args = dict(
        img_size=288, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=72,
        agent_num=(9, 16, 49, 49), attn_type="AABB", drop_path_rate=0.3,
    )  # fmt: skip
    return _create_agent_swin("agent_swin_small_288", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def agent_swin_base_224(pretrained: bool = False, **kwargs: Any) -> AgentSwinTransformer:
    """Agent-Swin-B (official ``agent_swin_b.yaml``): C 128, depths 2-2-18-2, ``AAMB2``, 224²."""
    args = dict(
        embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=56,
        agent_num=(9, 16, 49, 49), attn_type="AAMB2", drop_path_rate=0.5,
    )  # fmt: skip
    return _create_agent_swin("agent_swin_base_224", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def agent_swin_base_384(pretrained: bool = False, **kwargs: Any) -> AgentSwinTransformer:
    """Agent-Swin-B at 384² (official ``agent_swin_b_384.yaml``): WINDOW_SIZE 96, window blocks 12."""
    args = dict(
        img_size=384, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=96,
        agent_num=(9, 16, 49, 49), attn_type="AAMB2", drop_path_rate=0.5,
    )  # fmt: skip
    return _create_agent_swin("agent_swin_base_384", pretrained=pretrained, **dict(args, **kwargs))
