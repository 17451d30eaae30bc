"""Multi-scale backbones for dense prediction, built on the hierarchical zoo classifiers (spec §2.5).

    image (B, 3, H, W), any H and W ─ classifier.forward_intermediates ─ stage maps (B, C_i, ⌈H/s_i⌉, ⌈W/s_i⌉)
                                                                      ─ optional per-stage LayerNorm (norm{i})
                                                                      → OrderedDict {"0": P2, "1": P3, ...}

The classifier does the work: every patch embedding / merge pads its input on the right and bottom, agent
layers take the current grid and resample their biases each forward, and window blocks pad to whole windows.
What a downstream backbone adds (official ``downstream/*/backbones/agent_{pvt,swin}.py``):

- **Downstream agent grids.** Agents are pooled onto a larger grid than in pre-training (official PVT
  12²/16²/28²/28², Swin 9²/12²/14²/7²). The bias parameters keep their classification shapes, so a
  classification checkpoint (official ``.pth`` or ours) loads unchanged; each bias is resampled in two bilinear
  steps every forward: spatially to the current map, then along the agent axis (viewed as its p×p grid) to the
  downstream grid (:func:`agentattn.layers.agent_bias.agent_biases`).
- **Per-stage output norms** ``norm{i}`` (fresh LayerNorms, as in the official Swin backbone; the official PVT
  backbone returns the raw maps, hence ``out_norms`` defaults to False for PVT).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import timm
import torch
from torch import nn

from ..layers.agent_attention import CSwinAgentAttention
from ..layers.agent_bias import to_2tuple_grid

__all__ = [
    "OFFICIAL_AGENT_GRIDS",
    "AgentBackbone",
    "backbone_family",
    "build_backbone",
    "list_backbones",
]

# Official downstream agent grids per family (spec §2.5). CSwin has no official downstream backbone; its agent
# stages are 1-2, given the Swin grids.
OFFICIAL_AGENT_GRIDS: dict[str, tuple[tuple[int, int], ...]] = {
    "pvt": ((12, 12), (16, 16), (28, 28), (28, 28)),
    "swin": ((9, 9), (12, 12), (14, 14), (7, 7)),
    "cswin": ((9, 9), (12, 12), (14, 14), (7, 7)),
}
_FAMILY_PREFIX = {"agent_pvt_": "pvt", "agent_swin_": "swin", "agent_cswin_": "cswin"}
_DEFAULT_OUT_NORMS = {"pvt": False, "swin": True, "cswin": True}


def backbone_family(name: str) -> str:
    """'pvt', 'swin' or 'cswin' for a hierarchical zoo model name; ValueError for anything else."""
    import agentattn.models  # noqa: F401  (registers the zoo with timm)

    for prefix, family in _FAMILY_PREFIX.items():
        if name.startswith(prefix) and name in timm.list_models(f"{prefix}*"):
            return family
    raise ValueError(
        f"backbone must be a hierarchical zoo model ({', '.join(list_backbones())}), got {name!r}"
    )


def list_backbones() -> list[str]:
    """Names usable as dense backbones (the Agent-PVT, Swin and CSwin zoo models)."""
    import agentattn.models  # noqa: F401

    return sorted(n for prefix in _FAMILY_PREFIX for n in timm.list_models(f"{prefix}*"))


def _retarget_cswin(model: nn.Module, grids: Sequence[tuple[int, int] | None]) -> None:
    """Give the CSwin agent branches of stage i the agent grid ``grids[i]`` (the model has no such argument)."""
    for i, grid in enumerate(grids):
        if grid is None:
            continue
        for module in getattr(model, f"stage{i + 1}").modules():
            if isinstance(module, CSwinAgentAttention):
                module.set_target_agent_grid(grid)


def _parse_agent_grids(agent_grids: Any, family: str, num_stages: int) -> list[tuple[int, int] | None] | None:
    if agent_grids is None:
        return None
    if agent_grids == "official":
        return list(OFFICIAL_AGENT_GRIDS[family][:num_stages])
    if (
        isinstance(agent_grids, str)
        or not isinstance(agent_grids, Sequence)
        or len(agent_grids) != num_stages
    ):
        raise ValueError(
            f"agent_grids must be None, 'official' or one grid per stage ({num_stages}), e.g. (12, 16, 28, 28), "
            f"got {agent_grids!r}"
        )
    return [None if g is None else to_2tuple_grid("agent_grids", g) for g in agent_grids]


class AgentBackbone(nn.Module):
    """A zoo classifier as a multi-scale feature extractor for torchvision detectors and segmentation heads.

    Args:
        name: a hierarchical zoo model (``agent_pvt_*``, ``agent_swin_*``, ``agent_cswin_*``).
        pretrained: optional classification checkpoint (official ``.pth``, ours, or ``.safetensors``), loaded
            into the classifier unchanged (its head is dropped).
        agent_grids: None (the classification grids), ``'official'`` (spec §2.5), or one (rows, cols) or int per
            stage, e.g. ``(12, 16, 28, 28)``.
        out_indices: stages to return.
        out_norms: a fresh LayerNorm on each returned map (official Swin backbone); default True for Swin and
            CSwin, False for PVT.
        in_chans: input channels.
        **model_kwargs: passed to ``timm.create_model`` (``depths``, ``attn_type``, ``drop_path_rate`` ...).

    Attributes:
        out_channels_list: channels of each returned map; ``strides``: their reductions.

    Shape:
        ``forward(x)``: (B, in_chans, H, W) → OrderedDict ``{str(k): (B, C_k, ⌈H/s_k⌉, ⌈W/s_k⌉)}`` in
        ``out_indices`` order (keys "0", "1", ... as torchvision's FPN and RoI pooling expect).
    """

    def __init__(
        self,
        name: str,
        pretrained: str | None = None,
        agent_grids: Any = None,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        out_norms: bool | None = None,
        in_chans: int = 3,
        **model_kwargs: Any,
    ) -> None:
        super().__init__()
        self.family = backbone_family(name)
        self.name = name
        num_stages = 4
        grids = _parse_agent_grids(agent_grids, self.family, num_stages)
        out_indices = tuple(out_indices)
        if not out_indices or any(not isinstance(i, int) or not 0 <= i < num_stages for i in out_indices):
            raise ValueError(f"out_indices must be stage indices in [0, {num_stages}), got {out_indices!r}")
        kwargs = dict(model_kwargs, in_chans=in_chans, num_classes=0)
        if grids is not None and self.family in ("pvt", "swin"):
            kwargs["downstream_agent_shape"] = grids
        self.body = timm.create_model(name, pretrained=False, **kwargs)
        if grids is not None and self.family == "cswin":
            _retarget_cswin(self.body, grids)
        if pretrained is not None:
            self.body.load_pretrained(str(pretrained))
        self.in_chans = in_chans
        self.agent_grids = grids
        self.out_indices = out_indices
        info = self.body.feature_info
        self.out_channels_list = [int(info[i]["num_chs"]) for i in out_indices]
        self.strides = [int(info[i]["reduction"]) for i in out_indices]
        self.out_norms = _DEFAULT_OUT_NORMS[self.family] if out_norms is None else bool(out_norms)
        if self.out_norms:
            for i in out_indices:
                self.add_module(f"norm{i}", nn.LayerNorm(int(info[i]["num_chs"])))

    @property
    def out_channels(self) -> int:
        """Channels of the last returned map (torchvision's single-int convention)."""
        return self.out_channels_list[-1]

    def forward_raw(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The classifier's stage maps (before the output norms): list of (B, C_k, H_k, W_k)."""
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"images must be (B, {self.in_chans}, H, W) for backbone {self.name} (in_chans={self.in_chans}), "
                f"got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"images must be a floating-point tensor, got dtype {x.dtype}")
        return self.body.forward_intermediates(
            x, indices=list(self.out_indices), output_fmt="NCHW", intermediates_only=True, stop_early=True
        )

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """(B, in_chans, H, W) → {"0": (B, C_0, H_0, W_0), ...}."""
        feats = self.forward_raw(x)
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for k, (i, f) in enumerate(zip(self.out_indices, feats, strict=True)):
            if self.out_norms:
                f = getattr(self, f"norm{i}")(f.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            out[str(k)] = f
        return out


def build_backbone(
    name: str, pretrained: str | None = None, agent_grids: Any = None, **kwargs: Any
) -> AgentBackbone:
    """:class:`AgentBackbone` (see its arguments)."""
    return AgentBackbone(name, pretrained=pretrained, agent_grids=agent_grids, **kwargs)
