"""Turn a (pretrained) timm ViT/DeiT or Swin into an agent-attention model for fine-tuning (official issue #49).

``convert_to_agent`` swaps, in place, the attention module of the chosen blocks for an agentattn
``AgentAttention`` initialised from the old ``qkv`` and ``proj`` weights:

* timm ``VisionTransformer`` (ViT, DeiT, distilled DeiT, ...): ``blocks[i].attn`` becomes agent attention over
  the prefix tokens (cls, distillation, registers; ``model.num_prefix_tokens``) plus the patch grid.
* timm ``SwinTransformer``: as in the official Agent-Swin, a converted block attends globally over its whole
  stage map — its window is set to the stage resolution with shift 0 (no partition, no mask) — and its
  ``attn`` is agent attention over those tokens.
* an agentattn ``AgentDeiT``: its softmax ('B') or linear ('L') blocks become agent blocks.

New parameters: the agent biases get the official init (trunc_normal, std 0.02, i.e. nearly zero), and the
depthwise conv ``dwc`` is **zero-initialised**. Why zero: the pretrained block computed softmax attention; the
agent path (softmax over pooled agents, then back) is the closest available approximation of it, while a
randomly initialised DWC would add an untrained local term of the size of V to every token and push the
features away from the pretrained ones. A zero conv starts the fine-tuning from the pretrained behaviour as
closely as the agent path allows; its weight still receives gradients (dL/dW is the input times the upstream
gradient), so it learns the local term during fine-tuning.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from timm.layers import Attention
from timm.models import SwinTransformer, VisionTransformer
from timm.models.swin_transformer import SwinTransformerBlock, WindowAttention
from torch import nn

from ..layers import AgentAttention, LinearAttention, SoftmaxAttention
from ._builder import per_stage

__all__ = ["GlobalAgentSwinBlock", "ViTAgentAttention", "convert_to_agent"]


class ViTAgentAttention(AgentAttention):
    """``AgentAttention`` with timm ``Attention``'s call signature, for converted ViT blocks.

    The patch grid comes from the model's ``patch_embed`` (a forward pre-hook records the grid of the current
    input), so ``dynamic_img_size`` models work at any H×W; without a record the construction grid, or a square
    grid, is inferred from the token count.

    Shape:
        ``forward(x)``: x (B, P + H·W, C) → (B, P + H·W, C).
    """

    # (patch_embed,): kept in a tuple so that it is not registered as a submodule (no duplicate state-dict keys).
    _grid_source: tuple[nn.Module, ...] = ()

    def _runtime_grid(self, x: torch.Tensor) -> tuple[int, int]:
        spatial = x.shape[1] - self.num_prefix_tokens
        recorded = getattr(self._grid_source[0], "_agentattn_grid", None) if self._grid_source else None
        if recorded is not None and recorded[0] * recorded[1] == spatial:
            return recorded
        if self.grid_size[0] * self.grid_size[1] == spatial:
            return self.grid_size
        side = math.isqrt(max(spatial, 0))
        if side * side == spatial and side > 0:
            return side, side
        raise ValueError(
            f"cannot tell the patch grid of {spatial} spatial tokens; call the model (so that its patch_embed "
            "records the grid) or use square inputs"
        )

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        grid_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """x: (B, P + H·W, C) → (B, P + H·W, C). Masks are not supported by agent attention."""
        if attn_mask is not None or is_causal:
            raise ValueError("agent attention does not support attn_mask or is_causal")
        return super().forward(x, grid_size=self._runtime_grid(x) if grid_size is None else grid_size)


def _record_grid(module: nn.Module, args: tuple) -> None:
    """patch_embed pre-hook: remember the (h, w) token grid of this input for the converted attentions."""
    x = args[0]
    if hasattr(module, "dynamic_feat_size"):
        grid = module.dynamic_feat_size((x.shape[-2], x.shape[-1]))
        module._agentattn_grid = (int(grid[0]), int(grid[1]))


class GlobalAgentSwinBlock(SwinTransformerBlock):
    """A timm ``SwinTransformerBlock`` whose window is its whole input map (shift 0) and whose ``attn`` is
    ``AgentAttention``: global agent attention as in the official Agent-Swin 'A' blocks, at any H×W.

    Shape:
        ``forward(x)``: (B, H, W, C) → (B, H, W, C).
    """

    @classmethod
    def from_block(cls, block: SwinTransformerBlock, attn: AgentAttention) -> GlobalAgentSwinBlock:
        """A new block holding ``block``'s norms, MLP and drop paths (the same modules) and ``attn``.

        It is built on the meta device (no memory, no random draws), then given the real parts, so the converted
        model keeps every parameter and its state-dict keys.
        """
        resolution = tuple(int(r) for r in block.input_resolution)
        with torch.device("meta"):
            new = cls(block.dim, resolution, num_heads=attn.num_heads, window_size=resolution, shift_size=0)
        for name in ("norm1", "drop_path1", "norm2", "mlp", "drop_path2"):
            setattr(new, name, getattr(block, name))
        new.attn = attn
        return new.train(block.training)

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = x.shape
        out = self.attn(x.reshape(batch, height * width, channels), grid_size=(height, width))
        return out.reshape(batch, height, width, channels)

    def _init_buffers(self) -> None:
        self.attn_mask = None  # one window, no shift: never a mask

    def set_input_size(
        self, feat_size: tuple[int, int], window_size: tuple[int, int], always_partition: bool | None = None
    ) -> None:
        """Follow a new stage resolution; the window stays the whole map (the agent biases resample)."""
        self.input_resolution = tuple(feat_size)
        self.window_size = tuple(feat_size)
        self.shift_size = self.target_shift_size = (0, 0)
        self.window_area = feat_size[0] * feat_size[1]
        self._init_buffers()


def _select(blocks: Iterable[int] | None, total: int, default: list[int]) -> list[int]:
    if blocks is None:
        return default
    if isinstance(blocks, int) or not isinstance(blocks, Iterable):
        raise ValueError(f"blocks must be None or an iterable of block indices, got {blocks!r}")
    chosen = []
    for b in blocks:
        if not isinstance(b, int) or isinstance(b, bool) or not -total <= b < total:
            raise ValueError(f"blocks entries must be ints in [-{total}, {total}), got {b!r}")
        chosen.append(b % total)
    return sorted(set(chosen))


@torch.no_grad()
def _agent_from(
    old: nn.Module,
    new: AgentAttention,
) -> AgentAttention:
    """Copy qkv/proj into ``new`` (on ``old``'s device and dtype) and zero its DWC."""
    ref = old.qkv.weight
    new.to(device=ref.device, dtype=ref.dtype)
    new.qkv.weight.copy_(old.qkv.weight)
    if new.qkv.bias is not None:
        new.qkv.bias.copy_(old.qkv.bias)
    new.proj.weight.copy_(old.proj.weight)
    if old.proj.bias is not None:
        new.proj.bias.copy_(old.proj.bias)
    else:
        new.proj.bias.zero_()
    nn.init.zeros_(new.dwc.weight)
    nn.init.zeros_(new.dwc.bias)
    new.train(old.training)
    return new


def _check_linear_pair(attn: nn.Module, dim: int, where: str) -> None:
    qkv, proj = getattr(attn, "qkv", None), getattr(attn, "proj", None)
    if not isinstance(qkv, nn.Linear) or not isinstance(proj, nn.Linear):
        raise ValueError(f"{where}: attention has no fused qkv / proj Linear layers")
    if (
        qkv.in_features != dim
        or qkv.out_features != 3 * dim
        or proj.in_features != dim
        or proj.out_features != dim
    ):
        raise ValueError(f"{where}: only attention with head_dim · num_heads = dim = {dim} can be converted")


def _dropout_p(module: nn.Module | float | None) -> float:
    if isinstance(module, nn.Dropout):
        return float(module.p)
    return float(module) if isinstance(module, (int, float)) else 0.0


def _convert_vit(
    model: VisionTransformer,
    agent_num: int | Sequence[int],
    blocks: Iterable[int] | None,
    learned_agents: bool,
) -> None:
    depth = len(model.blocks)
    nums = per_stage("agent_num", agent_num, depth, unit="block")
    grid = tuple(int(g) for g in model.patch_embed.grid_size)
    prefix = model.num_prefix_tokens
    patch_embed = model.patch_embed
    for i in _select(blocks, depth, list(range(depth))):
        attn = getattr(model.blocks[i], "attn", None)
        where = f"blocks.{i}"
        if not isinstance(attn, Attention) or type(attn) is not Attention:
            raise ValueError(f"{where}: only timm's Attention can be converted, got {type(attn).__name__}")
        if not (
            isinstance(attn.q_norm, nn.Identity)
            and isinstance(attn.k_norm, nn.Identity)
            and isinstance(attn.norm, nn.Identity)
            and getattr(attn, "gate", None) is None
        ):
            raise ValueError(f"{where}: attention with qk_norm, scale_norm or a gate cannot be converted")
        dim = attn.qkv.in_features
        _check_linear_pair(attn, dim, where)
        new = ViTAgentAttention(
            dim,
            num_heads=attn.num_heads,
            agent_num=nums[i],
            grid_size=grid,
            num_prefix_tokens=prefix,
            qkv_bias=attn.qkv.bias is not None,
            attn_drop=_dropout_p(attn.attn_drop),
            proj_drop=_dropout_p(attn.proj_drop),
            learned_agents=learned_agents,
        )
        new._grid_source = (patch_embed,)
        model.blocks[i].attn = _agent_from(attn, new)
    if not getattr(patch_embed, "_agentattn_hooked", False):
        patch_embed.register_forward_pre_hook(_record_grid)
        patch_embed._agentattn_hooked = True


def _convert_agent_deit(model: nn.Module, agent_num, blocks, learned_agents) -> None:
    depth = len(model.blocks)
    nums = per_stage("agent_num", agent_num, depth, unit="block")
    default = [i for i, blk in enumerate(model.blocks) if blk.attn_letter != "A"]
    grid = tuple(int(g) for g in model.patch_embed.grid_size)
    letters = list(model.attn_type)
    for i in _select(blocks, depth, default):
        blk = model.blocks[i]
        if blk.attn_letter == "A":
            continue
        attn = blk.attn
        assert isinstance(attn, (SoftmaxAttention, LinearAttention))
        dim = attn.qkv.in_features
        new = AgentAttention(
            dim,
            num_heads=attn.num_heads,
            agent_num=nums[i],
            grid_size=grid,
            num_prefix_tokens=model.num_prefix_tokens,
            qkv_bias=attn.qkv.bias is not None,
            attn_drop=_dropout_p(getattr(attn, "attn_drop", 0.0)),
            proj_drop=_dropout_p(attn.proj_drop),
            learned_agents=learned_agents,
        )
        blk.attn = _agent_from(attn, new)
        blk.attn_letter = letters[i] = "A"
    model.attn_type = "".join(letters)


def _convert_swin(
    model: SwinTransformer, agent_num: int | Sequence[int], blocks: Iterable[int] | None, learned_agents: bool
) -> None:
    stages = list(model.layers)
    nums = per_stage("agent_num", agent_num, len(stages), unit="stage")
    flat = [(s, j, blk) for s, stage in enumerate(stages) for j, blk in enumerate(stage.blocks)]
    for k in _select(blocks, len(flat), list(range(len(flat)))):
        stage_idx, block_idx, block = flat[k]
        where = f"block {k} (stage {stage_idx})"
        if isinstance(block, GlobalAgentSwinBlock):
            continue
        if type(block) is not SwinTransformerBlock or type(block.attn) is not WindowAttention:
            raise ValueError(f"{where}: only timm's SwinTransformerBlock / WindowAttention can be converted")
        dim = block.dim
        _check_linear_pair(block.attn, dim, where)
        resolution = tuple(int(r) for r in block.input_resolution)
        new = AgentAttention(
            dim,
            num_heads=block.attn.num_heads,
            agent_num=nums[stage_idx],
            grid_size=resolution,
            num_prefix_tokens=0,
            qkv_bias=block.attn.qkv.bias is not None,
            attn_drop=_dropout_p(block.attn.attn_drop),
            proj_drop=_dropout_p(block.attn.proj_drop),
            learned_agents=learned_agents,
        )
        converted = GlobalAgentSwinBlock.from_block(block, _agent_from(block.attn, new))
        converted.set_input_size(resolution, resolution)
        stages[stage_idx].blocks[block_idx] = converted


def convert_to_agent(
    model: nn.Module,
    agent_num: int | Sequence[int] = 49,
    blocks: Iterable[int] | None = None,
    learned_agents: bool = False,
) -> nn.Module:
    """Replace, in place, the attention of a timm ViT/DeiT or Swin with agent attention; return the model.

    Args:
        model: a timm ``VisionTransformer`` (ViT, DeiT, ...), a timm ``SwinTransformer``, or an agentattn
            ``AgentDeiT`` (whose 'B'/'L' blocks are converted).
        agent_num: agents per converted block: an int, or one int per block (ViT/DeiT) or per stage (Swin).
        blocks: indices of the blocks to convert (ViT: into ``model.blocks``; Swin: flat over all stages in
            order); None converts every block (every non-agent block of an ``AgentDeiT``).
        learned_agents: learned agent tokens instead of pooled queries.

    The new modules copy ``qkv``/``proj``; agent biases are freshly initialised and ``dwc`` starts at zero (see the
    module docstring for why). A converted Swin block is a new :class:`GlobalAgentSwinBlock` in its stage, holding
    the old block's norms and MLP, so parameter names stay the same (hooks on the old block do not carry over). Raises ValueError for other models or attention layers that cannot be converted
    (qk-norm, gated, head_dim · heads ≠ dim, Swin V2, ...).

    Shape: unchanged — the converted model maps the same inputs to the same output shapes.
    """
    from .agent_deit import AgentDeiT  # local: agent_deit imports the checkpoint loader

    if isinstance(model, AgentDeiT):
        _convert_agent_deit(model, agent_num, blocks, learned_agents)
    elif isinstance(model, VisionTransformer):
        _convert_vit(model, agent_num, blocks, learned_agents)
    elif isinstance(model, SwinTransformer):
        _convert_swin(model, agent_num, blocks, learned_agents)
    else:
        raise ValueError(
            f"convert_to_agent supports timm VisionTransformer/DeiT and SwinTransformer models (and AgentDeiT), "
            f"got {type(model).__name__}"
        )
    return model
