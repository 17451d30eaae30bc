"""What the four model families share: their pretrained cfg, the builder, the official weight init, and the reading
of per-stage arguments."""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Sequence
from typing import Any

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import trunc_normal_
from timm.models import build_model_with_cfg
from torch import nn

from ..layers.agent_bias import to_2tuple_grid
from ..ops.tracing import is_tracing

GLOBAL_POOLS = ("avg", "")

OFFICIAL_WEIGHTS = "links in https://github.com/LeapLabTHU/Agent-Attention"
PRETRAINED_SOURCE_KEYS = ("file", "url", "hf_hub_id", "hf_hub_filename")  # timm's _PRETRAINED_SOURCE_KEYS


def agent_cfg(first_conv: str, **kwargs: Any) -> dict[str, Any]:
    """A timm pretrained cfg for an official Agent-Attention classifier (ImageNet-1k, 224² unless overridden).

    The official evaluation resizes the image to a square of int(256/224·S) and centre-crops S (``squash``),
    bicubic, with ImageNet mean/std. ``custom_load`` routes weight files through the project's safe loader.
    """
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,
        "crop_mode": "squash",
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": first_conv,
        "classifier": "head",
        "license": "apache-2.0",
        "origin_url": "https://github.com/LeapLabTHU/Agent-Attention",
        "paper_ids": "arXiv:2312.08874",
        "paper_name": "Agent Attention: On the Integration of Softmax and Linear Attention",
        "custom_load": True,
        **kwargs,
    }


def with_official_tags(cfgs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Give every model two pretrained tags for the two weight sets an official checkpoint may hold.

    ``NAME.in1k`` (the default) loads the file's ``model`` entry; ``NAME.in1k_ema`` loads ``state_dict_ema``
    (the CSwin EMA runs save both), e.g. ``timm.create_model("agent_cswin_tiny_224.in1k_ema", pretrained=True,
    pretrained_cfg_overlay=dict(file=PATH))``.
    """
    tagged: dict[str, dict[str, Any]] = {}
    for name, cfg in cfgs.items():
        tagged[f"{name}.in1k"] = cfg
        tagged[f"{name}.in1k_ema"] = cfg
    return tagged


def build_agent_model(
    model_cls: type[nn.Module],
    variant: str,
    pretrained: bool,
    filter_fn: Callable,
    feature_cfg: dict[str, Any],
    **kwargs: Any,
) -> nn.Module:
    """``build_model_with_cfg`` that keeps the safe loader when the caller overlays a weight source.

    timm resets ``custom_load`` to False when ``pretrained_cfg_overlay`` names a file or URL, and would then read
    the file with ``torch.load(weights_only=True)``, which refuses official checkpoints (their pickled yacs
    config). Every source of these models is in the official format, so the overlay keeps ``custom_load=True``
    unless the caller sets it.
    """
    check_model_kwargs(kwargs)
    overlay = kwargs.get("pretrained_cfg_overlay")
    if overlay and any(overlay.get(k) for k in PRETRAINED_SOURCE_KEYS) and "custom_load" not in overlay:
        kwargs["pretrained_cfg_overlay"] = {**overlay, "custom_load": True}
    try:
        return build_model_with_cfg(
            model_cls, variant, pretrained, pretrained_filter_fn=filter_fn, feature_cfg=feature_cfg, **kwargs
        )
    except RuntimeError as error:
        if not str(error).startswith("No pretrained weights exist"):
            raise
        raise RuntimeError(
            f"{variant}: agentattn ships no weights and downloads nothing; download the official checkpoint "
            f"({OFFICIAL_WEIGHTS}) and pass pretrained_cfg_overlay=dict(file=PATH), or load a saved Hub "
            "directory with timm.create_model('local-dir:DIR', pretrained=True)"
        ) from None


_RATE_KWARGS = ("drop_rate", "drop_path_rate", "attn_drop_rate", "proj_drop_rate", "pos_drop_rate")


def check_model_kwargs(kwargs: dict[str, Any]) -> None:
    """ValueError for out-of-range options every family shares (before anything is built)."""
    for name in _RATE_KWARGS:
        value = kwargs.get(name)
        if value is not None and not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
            raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    for name, low in (("num_classes", 0), ("in_chans", 1)):
        value = kwargs.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    img = kwargs.get("img_size")
    if img is not None:
        pair = (img, img) if isinstance(img, int) and not isinstance(img, bool) else img
        if (
            not isinstance(pair, (tuple, list))
            or len(pair) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair)
        ):
            raise ValueError(
                f"img_size must be a positive int or a pair (H, W) of positive ints, got {img!r}"
            )


def _stem_in_channels(model: nn.Module) -> int:
    cached = model.__dict__.get("_agentattn_in_chans")
    if cached is None:
        stem = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        cached = model.__dict__["_agentattn_in_chans"] = stem.in_channels
    return cached


def check_image_input(model: nn.Module, x: torch.Tensor) -> None:
    """ValueError/TypeError naming the problem for an image batch the model cannot take.

    x must be a floating-point (B, C, H, W) tensor with C = the stem's input channels, on the model's device and
    in its dtype (any dtype under autocast). Skipped while tracing (see ``is_tracing``).
    """
    if is_tracing():
        return
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor image batch (B, C, H, W), got {type(x).__name__}")
    in_chans = _stem_in_channels(model)
    if x.dim() != 4:
        raise ValueError(
            f"x must be a 4-D image batch (B, C, H, W) with C = {in_chans}, got shape {tuple(x.shape)}"
        )
    if x.shape[1] != in_chans:
        raise ValueError(
            f"x has {x.shape[1]} channels but the model takes in_chans = {in_chans}: shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point image batch, got dtype {x.dtype}")
    weight = next(model.parameters())
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but the model's parameters are on {weight.device}")
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(
            f"x has dtype {x.dtype} but the model's parameters are {weight.dtype}; cast one of them or run "
            "under torch.autocast"
        )


def init_official_weights(module: nn.Module) -> None:
    """The official ``_init_weights``: Linear trunc_normal(0.02) with zero bias, LayerNorm 1/0.

    Convs and the agent biases keep their own init (PyTorch default; trunc_normal 0.02 in the layers).
    """
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def check_global_pool(global_pool: str) -> str:
    """``'avg'`` (the official mean over tokens) or ``''`` (no pooling in ``forward_head``); ValueError otherwise."""
    if global_pool not in GLOBAL_POOLS:
        raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
    return global_pool


class LinearHeadMixin:
    """timm's classifier contract for models with a Linear ``head`` on ``num_features`` pooled channels."""

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The classifier (``head``)."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head with a fresh one for ``num_classes`` (0: identity), with the official init,
        on the model's device and dtype; optionally change the pooling."""
        if global_pool is not None:
            self.global_pool = check_global_pool(global_pool)
        self.num_classes = num_classes
        if num_classes > 0:
            reference = next(self.parameters())
            self.head = nn.Linear(
                self.num_features, num_classes, device=reference.device, dtype=reference.dtype
            )
            init_official_weights(self.head)
        else:
            self.head = nn.Identity()


def check_model_name(name: str) -> None:
    """ValueError unless ``name`` is a model registered with timm (the agent_* models register on import)."""
    if not timm.is_model(name):
        raise ValueError(
            f"unknown model {name!r}: use a registered timm name (`timm.list_models('agent_*')`)"
        )


def per_stage(name: str, value: Any, count: int, *, unit: str = "stage", pairs: bool = False) -> list[Any]:
    """One positive int per stage (or per block) from the forms the official configs and timm users write.

    Args:
        name: the argument's name, for errors.
        value: an int (every stage), a sequence of ``count`` ints or numeric strings, a '-'-joined string
            (``'9-16-49-49'``, the official agent_num) or a string of ``count`` digits (``'1211'``, the official
            agent_sr_ratios).
        count: how many stages (or blocks).
        unit: what one entry is for, in errors ("stage", "block").
        pairs: an entry may also be a (rows, cols) pair of positive ints (an agent grid).

    Raises:
        ValueError: naming ``name``, the count and the value.
    """
    if isinstance(value, str):
        items: list[Any] = (
            value.split("-") if "-" in value else list(value) if len(value) == count else [value]
        )
    elif isinstance(value, int) and not isinstance(value, bool):
        items = [value] * count
    elif isinstance(value, Sequence):
        items = list(value)
    else:
        raise ValueError(f"{name} must be an int or one entry per {unit} ({count}), got {value!r}")
    if len(items) != count:
        raise ValueError(f"{name} must be an int or have one entry per {unit} ({count}), got {value!r}")
    out: list[Any] = []
    for item in items:
        if pairs and isinstance(item, (list, tuple)):
            out.append(to_2tuple_grid(f"{name} entry", tuple(item)))
            continue
        if isinstance(item, str) and item.strip().isdigit():
            item = int(item)
        try:
            number = (
                None if isinstance(item, bool) else operator.index(item)
            )  # ints and numpy ints, not floats
        except TypeError:
            number = None
        if number is None or number < 1:
            kinds = "positive ints or (rows, cols) pairs" if pairs else "positive ints"
            raise ValueError(f"{name} entries must be {kinds}, got {value!r}")
        out.append(number)
    return out


ATTN_WORDS = {
    "agent": "A",
    "softmax": "B",
    "linear": "L",
}  # the LM's names; 'B' is softmax in the official code


def _attn_letters(spec: str, depth: int, where: str) -> list[str] | None:
    """One stage's (or the whole model's) blocks from a word, one letter, 'M<k>', letters per block or runs like
    'A4B8'; None when ``spec`` is none of these forms."""
    if spec.lower() in ATTN_WORDS:
        return [ATTN_WORDS[spec.lower()]] * depth
    if spec in ("A", "B", "L"):
        return [spec] * depth
    if re.fullmatch(r"M\d+", spec):
        num_agent = int(spec[1:])
        if num_agent > depth:
            raise ValueError(f"attn_type {where} is {spec!r} but has only {depth} blocks")
        return ["A"] * num_agent + ["B"] * (depth - num_agent)
    if re.fullmatch(r"([ABL]\d+)+", spec):
        letters = [c for c, n in re.findall(r"([ABL])(\d+)", spec) for _ in range(int(n))]
    elif re.fullmatch(r"[ABL]+", spec):
        letters = list(spec)
    else:
        return None
    if len(letters) != depth:
        raise ValueError(f"attn_type {where} is {spec!r}: {len(letters)} blocks, but it has {depth}")
    return letters


def parse_attn_type(attn_type: str | Sequence[str], depths: Sequence[int]) -> list[list[str]]:
    """Per-block attention letters from ``attn_type``: one grammar for every family.

    Letters: 'A' agent, 'B' softmax (the official name), 'L' linear; the words 'agent', 'softmax' and 'linear'
    stand for them. A string is one of:

    - a letter or word: every block (``'A'``, ``'softmax'``);
    - one letter per stage, with 'M' stages and their agent-block count as trailing digits (the official
      ``'AAAB'``, ``'AAMB2'``: M<k> = the first k blocks agent, the rest softmax);
    - one letter per block (``'ABL'``), or runs over all blocks (the official DeiT form ``'A4B8'``).

    A sequence gives one entry per stage, each in any of these forms for that stage's blocks (``['A', 'M1',
    'AB', 'B']``).

    Args:
        attn_type: the spec. depths: blocks per stage (``[depth]`` for a one-stage model).
    Returns:
        ``kinds[stage][block]``, letters 'A', 'B' or 'L'.
    Raises:
        ValueError naming ``attn_type``, the forms and the stage or block counts.
    """
    depths = list(depths)
    total = sum(depths)
    forms = (
        "a letter 'A' (agent), 'B' (softmax), 'L' (linear) or a word agent/softmax/linear; one letter per stage "
        "('AAMB2' with M<k>); one per block; runs like 'A4B8'; or a sequence of per-stage entries"
    )
    if isinstance(attn_type, (list, tuple)):
        if len(attn_type) != len(depths):
            raise ValueError(
                f"attn_type {attn_type!r} has {len(attn_type)} entries, but there are {len(depths)} stages"
            )
        kinds = []
        for stage, (spec, depth) in enumerate(zip(attn_type, depths, strict=True)):
            letters = _attn_letters(spec, depth, f"stage {stage}") if isinstance(spec, str) else None
            if letters is None:
                raise ValueError(f"attn_type stage {stage} is {spec!r}; expected {forms}")
            kinds.append(letters)
        return kinds
    if not isinstance(attn_type, str) or not attn_type:
        raise ValueError(f"attn_type must be {forms}; got {attn_type!r}")
    if attn_type.lower() not in ATTN_WORDS:
        attn_type = attn_type.upper()  # 'aaab' as the official configs' letters
    if re.fullmatch(r"[ABL]+", attn_type) and len(attn_type) not in (1, len(depths), total):
        raise ValueError(
            f"attn_type {attn_type!r} has {len(attn_type)} letters: give one, one per stage ({len(depths)}) or one "
            f"per block ({total})"
        )
    runs = re.fullmatch(r"([ABL]\d+)+", attn_type)  # 'A12', 'A4B8': counted over all blocks
    stagewise = None if runs else re.fullmatch(r"([ABLM]+)(\d*)", attn_type)
    if stagewise and ("M" in attn_type or len(stagewise.group(1)) == len(depths) != total):
        letters, count = stagewise.groups()
        if ("M" in letters) != bool(count):
            raise ValueError(
                f"attn_type {attn_type!r}: an 'M' stage needs a trailing count and a count needs an 'M'"
            )
        if len(letters) != len(depths):
            raise ValueError(
                f"attn_type {attn_type!r} names {len(letters)} stages, but there are {len(depths)}"
            )
        return parse_attn_type([f"M{count}" if c == "M" else c for c in letters], depths)
    letters = _attn_letters(attn_type, total, "over all blocks")
    if letters is None:
        raise ValueError(f"attn_type must be {forms}; got {attn_type!r}")
    starts = [sum(depths[:i]) for i in range(len(depths))]
    return [letters[start : start + depth] for start, depth in zip(starts, depths, strict=True)]
