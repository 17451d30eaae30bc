"""Agent-DeiT (spec §2.1, §3.1): a DeiT whose blocks use agent attention, as timm models.

The model is timm's ``VisionTransformer`` with its own blocks, so the official state-dict keys are kept
(``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.{i}.{norm1,attn,norm2,mlp}``, ``norm``, ``head``)
and every timm feature of the ViT (pooling, ``forward_intermediates``, ``features_only``, dynamic image size,
grad checkpointing) keeps working. The blocks get the patch grid at run time, so the agent biases follow any
input resolution (spec §2.5).

``attn_type`` chooses the attention of every block:

* ``'A'`` agent attention (``AgentAttention`` with the cls token as prefix), ``'B'`` plain softmax attention
  (the official non-agent DeiT block), ``'L'`` the linear-attention twin (``LinearAttention``);
* one letter per block (``'AABB'`` for depth 4), a single letter for all blocks (``'A'``), or a run-length form
  (``'A4B8'``: blocks 0–3 agent, 4–11 softmax — the official Agent-DeiT-B).

``agent_num`` is an int for all agent blocks, or a sequence with one entry per block (entries of non-agent
blocks are ignored).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from timm.layers import DropPath, LayerScale, Mlp, resample_abs_pos_embed, resample_patch_embed, trunc_normal_
from timm.models import VisionTransformer, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint
from torch import nn

from ..layers import AgentAttention, LinearAttention, SoftmaxAttention
from ..ops.tracing import is_tracing
from ._builder import agent_cfg, build_agent_model, check_image_input, per_stage, with_official_tags
from ._builder import parse_attn_type as parse_block_kinds
from .pretrained import load_pretrained, resize_agent_bias_tables

__all__ = ["AgentDeiT", "AgentDeiTBlock", "checkpoint_filter_fn", "parse_attn_type"]

_DEIT_POOLS = ("", "avg", "avgmax", "max", "token", "map")  # what timm's VisionTransformer takes


def parse_attn_type(attn_type: str, depth: int) -> str:
    """Expand ``attn_type`` to one letter per block ('A' agent, 'B' softmax, 'L' linear).

    The grammar of every family (:func:`agentattn.models._builder.parse_attn_type`) with one stage: a letter or
    word for all blocks, one letter per block, or runs such as ``'A4B8'``. Raises ValueError naming ``attn_type``.
    """
    return "".join(parse_block_kinds(attn_type, [depth])[0])


class AgentDeiTBlock(nn.Module):
    """Pre-norm transformer block whose attention is agent ('A'), softmax ('B') or linear ('L').

    Keys as officially: ``norm1``, ``attn``, ``norm2``, ``mlp.fc1``, ``mlp.fc2`` (``ls1``/``ls2`` only with
    ``init_values``).

    Shape:
        ``forward(x, grid_size)``: x (B, P + H·W, C) → (B, P + H·W, C), with the patch grid (H, W).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        init_values: float | None = None,
        drop_path: float = 0.0,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        mlp_layer: type[nn.Module] = Mlp,
        scale_mlp_norm: bool = False,
        attn_letter: str = "A",
        agent_num: int = 49,
        grid_size: tuple[int, int] = (14, 14),
        num_prefix_tokens: int = 1,
        learned_agents: bool = False,
    ) -> None:
        super().__init__()
        self.attn_letter = attn_letter
        self.norm1 = norm_layer(dim)
        if attn_letter == "A":
            self.attn = AgentAttention(
                dim,
                num_heads=num_heads,
                agent_num=agent_num,
                grid_size=grid_size,
                num_prefix_tokens=num_prefix_tokens,
                qkv_bias=qkv_bias,
                attn_drop=attn_drop,
                proj_drop=proj_drop,
                learned_agents=learned_agents,
            )
        elif attn_letter == "B":
            self.attn = SoftmaxAttention(
                dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop
            )
        elif attn_letter == "L":
            self.attn = LinearAttention(
                dim,
                num_heads,
                grid_size=grid_size,
                num_prefix_tokens=num_prefix_tokens,
                qkv_bias=qkv_bias,
                proj_drop=proj_drop,
            )
        else:
            raise ValueError(f"attn_type letter must be 'A', 'B' or 'L', got {attn_letter!r}")
        self.ls1 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = mlp_layer(
            in_features=dim,
            hidden_features=int(dim * mlp_ratio),
            act_layer=act_layer,
            norm_layer=norm_layer if scale_mlp_norm else None,
            drop=proj_drop,
        )
        self.ls2 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid_size: tuple[int, int] | None = None) -> torch.Tensor:
        """x: (B, P + H·W, C) → (B, P + H·W, C)."""
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), grid_size=grid_size)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def _block_factory(
    *,
    letters: str,
    agent_nums: list[int],
    grid_size: tuple[int, int],
    num_prefix_tokens: int,
    learned_agents: bool,
    depth: int,
    dim: int,
    num_heads: int,
    mlp_ratio: float,
    qkv_bias: bool,
    proj_drop: float,
    attn_drop: float,
    init_values: float | None,
    drop_path: float,
    act_layer: type[nn.Module],
    norm_layer: type[nn.Module],
    mlp_layer: type[nn.Module],
    scale_mlp_norm: bool = False,
    device: Any = None,
    dtype: Any = None,
    **_unused: Any,  # VisionTransformer's other block kwargs (qk_norm, attn_layer, ...), rejected earlier
) -> AgentDeiTBlock:
    """``block_fn`` for VisionTransformer: picks block ``depth``'s attention letter and agent number."""
    block = AgentDeiTBlock(
        dim,
        num_heads,
        mlp_ratio=mlp_ratio,
        qkv_bias=qkv_bias,
        proj_drop=proj_drop,
        attn_drop=attn_drop,
        init_values=init_values,
        drop_path=drop_path,
        act_layer=act_layer,
        norm_layer=norm_layer,
        mlp_layer=mlp_layer,
        scale_mlp_norm=scale_mlp_norm,
        attn_letter=letters[depth],
        agent_num=agent_nums[depth],
        grid_size=grid_size,
        num_prefix_tokens=num_prefix_tokens,
        learned_agents=learned_agents,
    )
    if device is not None or dtype is not None:
        block.to(device=device, dtype=dtype)
    return block


class AgentDeiT(VisionTransformer):
    """Agent-DeiT: timm's VisionTransformer with agent / softmax / linear blocks chosen by ``attn_type``.

    Args (beyond VisionTransformer's):
        attn_type: per-block attention, see the module docstring ('A', 'AABB', 'A4B8', ...).
        agent_num: agents per agent block: an int, or one int per block.
        learned_agents: learned agent tokens instead of pooled queries (official issue #30).

    The agent biases are built for ``img_size // patch_size``; other grids (``dynamic_img_size=True``) resample
    them per forward. Patch dropout and attention masks are not supported (agent pooling needs the full grid).

    Shape:
        ``forward(x)``: (B, 3, H, W) → (B, num_classes); ``forward_features(x)``: → (B, P + h·w, C) after the
        final norm; ``forward_head(f, pre_logits=True)``: → (B, C) (the cls token).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        depth: int = 12,
        attn_type: str = "A",
        agent_num: int | Sequence[int] = 49,
        learned_agents: bool = False,
        **kwargs: Any,
    ) -> None:
        for name in ("qk_norm", "scale_attn_norm"):
            if kwargs.get(name):
                raise ValueError(f"{name}=True is not supported by Agent-DeiT blocks")
        if kwargs.get("global_pool", "token") not in _DEIT_POOLS:
            raise ValueError(f"global_pool must be one of {_DEIT_POOLS}, got {kwargs['global_pool']!r}")
        if kwargs.get("patch_drop_rate", 0.0):
            raise ValueError("patch_drop_rate must be 0: agent pooling needs the full patch grid")
        for name in ("block_fn", "attn_layer"):
            if name in kwargs:
                raise ValueError(f"{name} cannot be set for Agent-DeiT; choose the attention with attn_type")
        letters = parse_attn_type(attn_type, depth)
        agent_nums = per_stage("agent_num", agent_num, depth, unit="block")
        img = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        patch = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
        rounding = math.ceil if kwargs.get("dynamic_img_pad") else (lambda v: int(v))
        grid = (rounding(img[0] / patch[0]), rounding(img[1] / patch[1]))
        prefix = (1 if kwargs.get("class_token", True) else 0) + kwargs.get("reg_tokens", 0)
        block_fn = partial(
            _block_factory,
            letters=letters,
            agent_nums=agent_nums,
            grid_size=grid,
            num_prefix_tokens=prefix,
            learned_agents=learned_agents,
        )
        super().__init__(img_size=img_size, patch_size=patch_size, depth=depth, block_fn=block_fn, **kwargs)
        self.attn_type = letters
        if self.cls_token is not None and kwargs.get("weight_init", "") != "skip":
            trunc_normal_(self.cls_token, std=0.02)  # official init (timm's ViT uses std 1e-6)

    def load_pretrained(self, checkpoint_path: str, use_ema: bool | None = None) -> None:  # type: ignore[override]
        """Load an official checkpoint (.pth training dict, bare state dict or .safetensors) safely."""
        load_pretrained(self, checkpoint_path, filter_fn=checkpoint_filter_fn, use_ema=use_ema)

    def _grid(self, x: torch.Tensor) -> tuple[int, int]:
        embed = self.patch_embed
        if embed.strict_img_size and not self.dynamic_img_size:
            return tuple(embed.grid_size)  # known without reading x: also while tracing
        grid = embed.dynamic_feat_size((x.shape[-2], x.shape[-1]))
        if is_tracing():
            return grid  # symbolic under torch.fx: the agent layers (fx leaves) read it at run time
        return int(grid[0]), int(grid[1])

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        return self.norm_pre(self.patch_drop(x))

    def _run_block(self, blk: nn.Module, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint(blk, x, grid)
        return blk(x, grid)

    @staticmethod
    def _no_mask(attn_mask: torch.Tensor | None, is_causal: bool) -> None:
        if is_tracing():
            return  # torch.fx passes every argument as a proxy; a traced graph has no mask input
        if attn_mask is not None or is_causal:
            raise ValueError("attn_mask / is_causal are not supported: agent attention pools the whole grid")

    def forward_features(  # type: ignore[override]
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        """(B, 3, H, W) → (B, P + h·w, C) tokens after the final norm."""
        self._no_mask(attn_mask, is_causal)
        check_image_input(self, x)
        embed = self.patch_embed
        if (
            not is_tracing()
            and embed.strict_img_size
            and not embed.dynamic_img_pad
            and tuple(x.shape[-2:]) != tuple(embed.img_size)
        ):
            raise ValueError(
                f"x is {tuple(x.shape[-2:])} pixels but the model was built for img_size = {tuple(embed.img_size)}; "
                "build it with that img_size (or dynamic_img_size=True)"
            )
        grid = self._grid(x)
        x = self._embed(x)
        for blk in self.blocks:
            x = self._run_block(blk, x, grid)
        return self.norm(x)

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        """(B, 3, H, W) → (B, num_classes) logits."""
        return self.forward_head(self.forward_features(x, attn_mask=attn_mask, is_causal=is_causal))

    def forward_intermediates(  # type: ignore[override]
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]] | dict[str, Any]:
        """Block outputs as in timm's ViT: (B, C, h, w) maps ('NCHW') or (B, h·w, C) tokens ('NLC').

        Returns the intermediates, (final normed tokens (B, P + h·w, C), intermediates), or with
        ``output_dict`` timm's dict (``image_intermediates``, ``image_intermediates_prefix``, ``image_features``).
        """
        self._no_mask(attn_mask, is_causal)
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        batch = x.shape[0]
        grid = self._grid(x)
        x = self._embed(x)
        blocks = self.blocks[: max_index + 1] if stop_early else self.blocks
        intermediates = []
        for i, blk in enumerate(blocks):
            x = self._run_block(blk, x, grid)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)
        prefix = self.num_prefix_tokens
        prefix_tokens = [y[:, :prefix] for y in intermediates] if prefix else None
        intermediates = [y[:, prefix:] for y in intermediates]
        if output_fmt == "NCHW":
            intermediates = [
                y.reshape(batch, grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous() for y in intermediates
            ]
        if output_dict:
            result: dict[str, Any] = {"image_intermediates": intermediates}
            if return_prefix_tokens and prefix_tokens is not None:
                result["image_intermediates_prefix"] = prefix_tokens
            if not intermediates_only:
                result["image_features"] = self.norm(x)
            return result
        if return_prefix_tokens and prefix_tokens is not None:
            intermediates = list(zip(intermediates, prefix_tokens, strict=True))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: AgentDeiT) -> dict[str, torch.Tensor]:
    """Adapt an official Agent-DeiT state dict to ``model``: resample ``pos_embed`` (and the patch-embed kernel)
    the way timm's ViT does, and resize the agent row/column biases to the model's grid (spec §4)."""
    out = {}
    for key, value in state_dict.items():
        if key == "pos_embed" and value.shape != model.pos_embed.shape:
            prefix = 0 if model.no_embed_class else model.num_prefix_tokens
            value = resample_abs_pos_embed(
                value, new_size=model.patch_embed.grid_size, num_prefix_tokens=prefix, verbose=True
            )
        elif (
            key == "patch_embed.proj.weight" and value.shape[-2:] != model.patch_embed.proj.weight.shape[-2:]
        ):
            value = resample_patch_embed(value, list(model.patch_embed.proj.weight.shape[-2:]), verbose=True)
        out[key] = value
    return resize_agent_bias_tables(out, model)


def _create_agent_deit(variant: str, pretrained: bool = False, **kwargs: Any) -> AgentDeiT:
    out_indices = kwargs.pop("out_indices", 3)
    return build_agent_model(
        AgentDeiT,
        variant,
        pretrained,
        checkpoint_filter_fn,
        dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


def _cfg(**kwargs: Any) -> dict[str, Any]:
    # As timm's ViT/DeiT: the model takes its img_size only, unless built with dynamic_img_size=True.
    return agent_cfg("patch_embed.proj", fixed_input_size=True, **kwargs)


default_cfgs = generate_default_cfgs(
    with_official_tags(
        {
            "agent_deit_tiny_patch16_224": _cfg(),
            "agent_deit_small_patch16_224": _cfg(),
            "agent_deit_small_patch16_448": _cfg(input_size=(3, 448, 448)),
            "agent_deit_base_patch16_224": _cfg(),
        }
    )
)


@register_model
def agent_deit_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> AgentDeiT:
    """Agent-DeiT-T: 192 wide, 3 heads, 12 agent blocks with 49 agents (6.0M params, 74.9% top-1)."""
    model_args = dict(
        patch_size=16, embed_dim=192, depth=12, num_heads=3, attn_type="A", agent_num=49, drop_path_rate=0.0
    )
    return _create_agent_deit("agent_deit_tiny_patch16_224", pretrained, **dict(model_args, **kwargs))


@register_model
def agent_deit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> AgentDeiT:
    """Agent-DeiT-S: 384 wide, 6 heads, 12 agent blocks with 49 agents (22.7M params, 80.5% top-1)."""
    model_args = dict(
        patch_size=16, embed_dim=384, depth=12, num_heads=6, attn_type="A", agent_num=49, drop_path_rate=0.1
    )
    return _create_agent_deit("agent_deit_small_patch16_224", pretrained, **dict(model_args, **kwargs))


@register_model
def agent_deit_small_patch16_448(pretrained: bool = False, **kwargs: Any) -> AgentDeiT:
    """Agent-DeiT-S at 448 (window 28): 23.1M params, 83.1% top-1."""
    model_args = dict(
        img_size=448,
        patch_size=16,
        embed_dim=384,
        depth=12,
        num_heads=6,
        attn_type="A",
        agent_num=49,
        drop_path_rate=0.1,
    )
    return _create_agent_deit("agent_deit_small_patch16_448", pretrained, **dict(model_args, **kwargs))


@register_model
def agent_deit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> AgentDeiT:
    """Agent-DeiT-B: 768 wide, 12 heads, agent blocks 0–3 with 81 agents, softmax 4–11 (87.2M, 82.0%)."""
    model_args = dict(
        patch_size=16,
        embed_dim=768,
        depth=12,
        num_heads=12,
        attn_type="A4B8",
        agent_num=81,
        drop_path_rate=0.3,
    )
    return _create_agent_deit("agent_deit_base_patch16_224", pretrained, **dict(model_args, **kwargs))
