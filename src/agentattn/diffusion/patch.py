"""``apply_patch`` / ``remove_patch``: AgentSD on any diffusers ``UNet2DConditionModel`` (SD 1.x, 2.x, SDXL).

Nothing is swapped at the class level. The patch installs, and ``remove_patch`` takes away:

- a forward pre-hook on the UNet that records the latent size H×W;
- on each selected ``BasicTransformerBlock`` (levels with downsampling ≤ ``max_downsample``): a forward pre-hook
  that plans the merge from the block input (cosine similarity on the un-normalised tokens, as the official
  code does) and a forward hook that drops the plan afterwards;
- an :class:`~agentattn.diffusion.processor.AgentSDAttnProcessor` around ``attn1``'s processor (and ``attn2``'s
  with ``merge_crossattn``), which merges, attends and unmerges; with ``merge_mlp``, hooks around ``ff``.

``remove_patch`` puts the original processor objects back and removes the hooks, so the UNet computes exactly
what it computed before (bit for bit).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

try:
    from diffusers.models.attention import BasicTransformerBlock
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("agentattn.diffusion needs diffusers: pip install 'agentattn[diffusion]'") from e

from .merge import bipartite_soft_matching_2d
from .processor import AgentSDAttnProcessor, BlockState

_STATE_ATTR = "_agentsd"


@dataclass(frozen=True)
class AgentSDConfig:
    """Settings of one patch (see :func:`apply_patch`); ``max_downsample`` is already resolved."""

    ratio: float = 0.4
    agent_ratio: float = 0.95
    sx: int = 4
    sy: int = 4
    max_downsample: int = 1
    k_scale2: float = 0.3
    k_shortcut: float = 0.075
    attn_precision: str | None = None
    use_rand: bool = True
    merge_attn: bool = True
    merge_crossattn: bool = False
    merge_mlp: bool = False


class _PatchState:
    def __init__(self, config: AgentSDConfig) -> None:
        self.config = config
        self.size: tuple[int, int] | None = None
        self.generator: torch.Generator | None = None
        self.handles: list[Any] = []
        self.blocks: list[BlockState] = []
        self.processors: list[AgentSDAttnProcessor] = []
        self.installed: list[tuple[nn.Module, AgentSDAttnProcessor]] = []  # (attention module, our processor)

    def intact(self) -> bool:
        """Whether every processor the patch installed is still in place (``set_attn_processor`` replaces them)."""
        return all(getattr(module, "processor", None) is proc for module, proc in self.installed)


def _unet_of(pipe_or_unet: Any) -> nn.Module:
    if isinstance(pipe_or_unet, nn.Module) and hasattr(pipe_or_unet, "down_blocks"):
        return pipe_or_unet
    unet = getattr(pipe_or_unet, "unet", None)
    if isinstance(unet, nn.Module) and hasattr(unet, "down_blocks"):
        return unet
    raise TypeError(
        "AgentSD supports diffusers UNet2DConditionModel UNets (SD 1.x, 2.x, SDXL) or a pipeline with one as "
        f".unet; got {type(pipe_or_unet).__name__}"
    )


def _level_blocks(unet: nn.Module) -> list[tuple[BasicTransformerBlock, int]]:
    """Every BasicTransformerBlock of the UNet with the downsampling factor of its level (1 = full latent)."""

    def blocks(module: nn.Module | None) -> list[BasicTransformerBlock]:
        if module is None:
            return []
        return [m for m in module.modules() if isinstance(m, BasicTransformerBlock)]

    out: list[tuple[BasicTransformerBlock, int]] = []
    ds = 1
    for down in unet.down_blocks:
        out += [(b, ds) for b in blocks(down)]
        if getattr(down, "downsamplers", None):
            ds *= 2
    out += [(b, ds) for b in blocks(getattr(unet, "mid_block", None))]
    for up in unet.up_blocks:
        out += [(b, ds) for b in blocks(up)]
        if getattr(up, "upsamplers", None):
            ds //= 2
    return out


def check_config(cfg: AgentSDConfig) -> None:
    """ValueError naming the first option of ``cfg`` out of its range (see :class:`AgentSDConfig`)."""
    for name in ("ratio", "agent_ratio"):
        value = getattr(cfg, name)
        if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    for name in ("sx", "sy", "max_downsample"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if cfg.attn_precision not in (None, "fp32"):
        raise ValueError(f"attn_precision must be None or 'fp32', got {cfg.attn_precision!r}")
    if not (cfg.merge_attn or cfg.merge_crossattn or cfg.merge_mlp):
        raise ValueError(
            "merge_attn, merge_crossattn and merge_mlp are all False: the patch would do nothing"
        )


def _generator(state: _PatchState, device: torch.device) -> torch.Generator:
    """A private generator seeded from the global RNG state (without advancing it), as the official code does."""
    gen = state.generator
    if gen is None or gen.device != device:
        if device.type == "cuda":
            gen = torch.Generator(device).set_state(torch.cuda.get_rng_state(device))
        else:
            gen = torch.Generator("cpu").set_state(torch.get_rng_state())
        state.generator = gen
    return gen


def _plan(state: _PatchState, block: BlockState, x: torch.Tensor) -> None:
    cfg = state.config
    if state.size is None or block.downsample > cfg.max_downsample:
        block.plan = None
        return
    batch, n, _ = x.shape
    h = math.ceil(state.size[0] / block.downsample)
    w = math.ceil(state.size[1] / block.downsample)
    if h * w != n:
        raise RuntimeError(
            f"AgentSD: a block at downsampling {block.downsample} of a {state.size[0]}x{state.size[1]} latent "
            f"got {n} tokens, expected {h}x{w}"
        )
    use_rand = cfg.use_rand and batch % 2 == 0  # odd batch: cond and uncond are not paired (official rule)
    gen = _generator(state, x.device) if use_rand else None
    block.plan = bipartite_soft_matching_2d(
        x, h, w, cfg.sx, cfg.sy, int(n * cfg.ratio), int(n * cfg.agent_ratio), use_rand, gen
    )


def apply_patch(
    pipe_or_unet: Any,
    ratio: float = 0.4,
    agent_ratio: float = 0.95,
    sx: int = 4,
    sy: int = 4,
    max_downsample: int | None = None,
    k_scale2: float = 0.3,
    k_shortcut: float = 0.075,
    attn_precision: str | None = None,
    use_rand: bool = True,
    merge_attn: bool = True,
    merge_crossattn: bool = False,
    merge_mlp: bool = False,
) -> Any:
    """Patch a diffusers UNet (or ``pipe.unet``) with AgentSD, in place. Re-applying replaces the patch.

    Args:
        pipe_or_unet: a ``UNet2DConditionModel`` or a pipeline with one as ``.unet``.
        ratio: fraction of the N tokens of a patched level merged away (r = int(N·ratio)), in [0, 1).
        agent_ratio: the same for building the agent tokens, in [0, 1).
        sx, sy: one dst token per sy×sx cell of the token grid.
        max_downsample: patch levels downsampled at most this much; None = the highest-resolution level with
            attention blocks (1 for SD 1.x/2.x, 2 for SDXL, whose top level has none).
        k_scale2, k_shortcut: O = softmax(Q·Aᵀ·s^k_scale2)·softmax(A·Kᵀ·s)·V + k_shortcut·V, s = d^-0.5.
        attn_precision: "fp32" computes agent attention in float32.
        use_rand: random dst token per cell (forced off for odd batch sizes).
        merge_attn, merge_crossattn, merge_mlp: where tokens are merged (agents are used in self-attention).

    Returns:
        ``pipe_or_unet``.

    Raises:
        TypeError: not a diffusers UNet2DConditionModel (or a pipeline holding one).
        ValueError: a ratio outside [0, 1), a bad option, no ``BasicTransformerBlock``, or no block selected.
    """
    unet = _unet_of(pipe_or_unet)
    levels = _patchable_levels(unet)
    top = min(ds for _, ds in levels)
    cfg = AgentSDConfig(
        ratio,
        agent_ratio,
        sx,
        sy,
        top if max_downsample is None else max_downsample,
        k_scale2,
        k_shortcut,
        attn_precision,
        use_rand,
        merge_attn,
        merge_crossattn,
        merge_mlp,
    )
    check_config(cfg)
    selected = _selected_blocks(levels, cfg)
    remove_patch(unet)
    state = _PatchState(cfg)
    _hook_unet(state, unet)
    for block, ds in selected:
        _patch_block(state, block, ds)
    setattr(unet, _STATE_ATTR, state)
    return pipe_or_unet


def _patchable_levels(unet: nn.Module) -> list[tuple[BasicTransformerBlock, int]]:
    """:func:`_level_blocks` of ``unet``; ValueError when it has no BasicTransformerBlock to patch."""
    levels = _level_blocks(unet)
    if not levels:
        raise ValueError(
            f"{type(unet).__name__} has no diffusers BasicTransformerBlock: AgentSD patches the self-attention "
            "of SD 1.x, 2.x and SDXL UNets"
        )
    return levels


def _selected_blocks(
    levels: list[tuple[BasicTransformerBlock, int]], cfg: AgentSDConfig
) -> list[tuple[BasicTransformerBlock, int]]:
    """The (block, downsampling) pairs of ``levels`` that ``cfg`` patches; ValueError when none or unpatchable."""
    selected = [(b, ds) for b, ds in levels if ds <= cfg.max_downsample]
    if not selected:
        raise ValueError(
            f"max_downsample={cfg.max_downsample} selects no transformer block: this UNet's attention levels "
            f"are downsampled {sorted({ds for _, ds in levels})} (use max_downsample=None for the top one)"
        )
    if cfg.merge_mlp and any(b._chunk_size is not None for b, _ in selected):
        raise ValueError("merge_mlp does not work with chunked feed-forward (disable_forward_chunking first)")
    return selected


def _hook_unet(state: _PatchState, unet: nn.Module) -> None:
    """Record the latent size H×W of each UNet call in ``state.size`` (None once the processors were replaced)."""

    def record_size(module: nn.Module, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs["sample"]
        state.size = (sample.shape[-2], sample.shape[-1])
        if not state.intact():  # processors replaced: no merging either, the UNet runs as without the patch
            state.size = None

    state.handles.append(unet.register_forward_pre_hook(record_size, with_kwargs=True))


def _patch_block(state: _PatchState, block: BasicTransformerBlock, ds: int) -> None:
    """Hook ``block`` (at downsampling ``ds``) and wrap its attention processors as ``state.config`` says."""
    cfg = state.config
    bs = BlockState(ds)
    state.blocks.append(bs)
    _hook_block(state, block, bs)
    targets = [(block.attn1, True)] if cfg.merge_attn else []
    if cfg.merge_crossattn and block.attn2 is not None:
        targets.append((block.attn2, False))
    for attn, use_agents in targets:
        proc = AgentSDAttnProcessor(
            attn.processor, bs, use_agents, cfg.k_scale2, cfg.k_shortcut, cfg.attn_precision
        )
        attn.set_processor(proc)
        state.processors.append(proc)
        state.installed.append((attn, proc))
    if cfg.merge_mlp:
        _hook_ff(state, block.ff, bs)


def _hook_block(state: _PatchState, block: nn.Module, bs: BlockState) -> None:
    def plan(module: nn.Module, args: tuple, kwargs: dict) -> None:
        _plan(state, bs, args[0] if args else kwargs["hidden_states"])

    def drop(module: nn.Module, args: tuple, output: Any) -> None:
        bs.plan = None

    state.handles.append(block.register_forward_pre_hook(plan, with_kwargs=True))
    state.handles.append(block.register_forward_hook(drop, always_call=True))


def _hook_ff(state: _PatchState, ff: nn.Module, bs: BlockState) -> None:
    def merge(module: nn.Module, args: tuple) -> tuple | None:
        return None if bs.plan is None else (bs.plan.merge(args[0]), *args[1:])

    def unmerge(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        return None if bs.plan is None else bs.plan.unmerge(output)

    state.handles.append(ff.register_forward_pre_hook(merge))
    state.handles.append(ff.register_forward_hook(unmerge))


def remove_patch(pipe_or_unet: Any) -> Any:
    """Undo :func:`apply_patch` (a no-op on an unpatched UNet): original processors back, hooks removed."""
    unet = _unet_of(pipe_or_unet)
    for module in unet.modules():
        proc = getattr(module, "processor", None)
        if isinstance(proc, AgentSDAttnProcessor):
            while isinstance(proc, AgentSDAttnProcessor):
                proc = proc.original
            module.set_processor(proc)
    state = unet.__dict__.pop(_STATE_ATTR, None)
    if state is not None:
        for handle in state.handles:
            handle.remove()
    return pipe_or_unet


def _live_state(unet: nn.Module) -> _PatchState | None:
    """The patch state, or None. A patch whose processors were replaced (``unet.set_attn_processor(...)``, or
    ``set_processor`` on one attention layer) is no longer in effect: it is removed here, with a warning, so that
    :func:`is_patched`, :func:`patch_options` and :func:`patch_stats` never describe a patch that does not run."""
    state = unet.__dict__.get(_STATE_ATTR)
    if state is None or state.intact():
        return state
    warnings.warn(
        "AgentSD's attention processors were replaced (set_attn_processor / set_processor), so AgentSD was not "
        "running: the rest of the patch is removed now. Call apply_patch again to use AgentSD with the new "
        "processors.",
        RuntimeWarning,
        stacklevel=3,
    )
    remove_patch(unet)
    return None


def is_patched(pipe_or_unet: Any) -> bool:
    """Whether :func:`apply_patch` is in effect (False once its processors were replaced, see ``_live_state``)."""
    return _live_state(_unet_of(pipe_or_unet)) is not None


def _state(pipe_or_unet: Any) -> _PatchState:
    state = _live_state(_unet_of(pipe_or_unet))
    if state is None:
        raise RuntimeError(
            "this UNet is not patched with AgentSD (call agentattn.diffusion.apply_patch first)"
        )
    return state


def patch_options(pipe_or_unet: Any) -> dict[str, Any]:
    """The settings of the patch in effect."""
    return asdict(_state(pipe_or_unet).config)


def set_patch_options(pipe_or_unet: Any, **changes: Any) -> None:
    """Change ratio / agent_ratio / sx / sy / k_scale2 / k_shortcut / use_rand of the patch in effect.

    Used by the step schedule; the set of patched blocks and layers stays as it is.
    """
    state = _state(pipe_or_unet)
    allowed = {"ratio", "agent_ratio", "sx", "sy", "k_scale2", "k_shortcut", "use_rand"}
    unknown = set(changes) - allowed
    if unknown:
        raise ValueError(f"set_patch_options: cannot change {sorted(unknown)}; allowed: {sorted(allowed)}")
    cfg = replace(state.config, **changes)
    check_config(cfg)
    state.config = cfg
    for proc in state.processors:
        proc.k_scale2, proc.k_shortcut = cfg.k_scale2, cfg.k_shortcut


def patch_stats(pipe_or_unet: Any) -> dict[str, int]:
    """Counters since patching: patched blocks, attention calls on the agent path and on merged softmax."""
    state = _state(pipe_or_unet)
    return {
        "blocks": len(state.blocks),
        "agent_calls": sum(b.calls["agent"] for b in state.blocks),
        "merged_calls": sum(b.calls["merged"] for b in state.blocks),
    }
