"""apply_patch / remove_patch on tiny SD-style and SDXL-style UNets built from configs."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
from agentattn.diffusion import (
    AgentSDAttnProcessor,
    apply_patch,
    is_patched,
    patch_options,
    patch_stats,
    remove_patch,
    set_patch_options,
)
from agentattn.diffusion.patch import _level_blocks

from ._tiny import TINY_SD_UNET, TINY_SDXL_UNET, run_unet, tiny_unet, unet_inputs


@pytest.fixture(scope="module")
def sd_unet():
    return tiny_unet(TINY_SD_UNET)


@pytest.fixture(scope="module")
def sdxl_unet():
    return tiny_unet(TINY_SDXL_UNET)


def _processors(unet):
    return {name: type(p).__name__ for name, p in unet.attn_processors.items()}


@pytest.mark.parametrize("which", ["sd", "sdxl"])
def test_patch_runs_and_unpatch_is_bit_identical(which, sd_unet, sdxl_unet):
    unet, config = (sd_unet, TINY_SD_UNET) if which == "sd" else (sdxl_unet, TINY_SDXL_UNET)
    inputs = unet_inputs(config)
    before = run_unet(unet, inputs)
    processors = dict(unet.attn_processors)

    apply_patch(unet)  # SD: top level (downsampling 1); SDXL: max_downsample=None means 2
    assert is_patched(unet)
    assert patch_options(unet)["max_downsample"] == (1 if which == "sd" else 2)
    patched = run_unet(unet, inputs)
    stats = patch_stats(unet)
    # SD: 1 block in the top down block + 2 in the top up block; SDXL: 2 down + 4 up + 2 mid at downsampling 2
    assert stats["blocks"] == (3 if which == "sd" else 8)
    assert stats["agent_calls"] == stats["blocks"]  # 16x16 latent, sx=sy=4: agents on every patched block
    assert not torch.equal(patched, before)
    assert (patched - before).abs().max() > 1e-3

    remove_patch(unet)
    assert not is_patched(unet)
    assert all(unet.attn_processors[k] is v for k, v in processors.items())
    assert torch.equal(run_unet(unet, inputs), before)
    assert not unet._forward_pre_hooks and not any(m._forward_pre_hooks for m in unet.modules())


def test_reapplying_is_the_same_as_once(sd_unet):
    inputs = unet_inputs(TINY_SD_UNET)
    apply_patch(sd_unet, ratio=0.5)
    once = run_unet(sd_unet, inputs)
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in sd_unet.modules())
    apply_patch(sd_unet, ratio=0.5)
    apply_patch(sd_unet, ratio=0.5)
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in sd_unet.modules()) == hooks
    assert all(
        not isinstance(p.original, AgentSDAttnProcessor)
        for p in sd_unet.attn_processors.values()
        if isinstance(p, AgentSDAttnProcessor)
    )
    assert torch.equal(run_unet(sd_unet, inputs), once)
    remove_patch(sd_unet)
    remove_patch(sd_unet)  # no-op when unpatched


def test_patch_through_a_pipeline_like_object(sd_unet):
    class Pipe:
        unet = sd_unet

    pipe = Pipe()
    assert apply_patch(pipe) is pipe and is_patched(sd_unet)
    remove_patch(pipe)
    assert not is_patched(sd_unet)


def test_fallback_and_merge_options(sd_unet):
    inputs = unet_inputs(TINY_SD_UNET)
    before = run_unet(sd_unet, inputs)
    # sx=sy=2, agent_ratio 0.5: the agent condition fails, the blocks run ToMe (merged softmax attention)
    apply_patch(sd_unet, ratio=0.4, agent_ratio=0.5, sx=2, sy=2)
    tome = run_unet(sd_unet, inputs)
    assert patch_stats(sd_unet) == {"blocks": 3, "agent_calls": 0, "merged_calls": 3}
    assert not torch.equal(tome, before)
    # cross-attention and MLP merging: attn2 merges its queries, ff runs on merged tokens
    apply_patch(sd_unet, merge_crossattn=True, merge_mlp=True, attn_precision="fp32")
    both = run_unet(sd_unet, inputs)
    assert patch_stats(sd_unet) == {"blocks": 3, "agent_calls": 3, "merged_calls": 3}
    apply_patch(sd_unet)
    assert not torch.equal(both, run_unet(sd_unet, inputs))
    remove_patch(sd_unet)
    assert torch.equal(run_unet(sd_unet, inputs), before)


def test_set_patch_options_and_random_dst(sd_unet):
    inputs = unet_inputs(TINY_SD_UNET, batch=2)
    apply_patch(sd_unet, use_rand=True)
    torch.manual_seed(5)
    a = run_unet(sd_unet, inputs)
    torch.manual_seed(5)
    apply_patch(sd_unet, use_rand=True)  # a fresh patch re-seeds its generator from the global RNG state
    assert torch.equal(run_unet(sd_unet, inputs), a)
    set_patch_options(sd_unet, sx=2, sy=2, agent_ratio=0.5)
    assert patch_options(sd_unet)["sx"] == 2
    with pytest.raises(ValueError, match="cannot change"):
        set_patch_options(sd_unet, max_downsample=2)
    with pytest.raises(ValueError, match="agent_ratio must be in \\[0, 1\\)"):
        set_patch_options(sd_unet, agent_ratio=1.0)
    remove_patch(sd_unet)
    with pytest.raises(RuntimeError, match="not patched"):
        set_patch_options(sd_unet, sx=2)


def test_odd_latent_size(sd_unet):
    inputs = unet_inputs(TINY_SD_UNET, batch=1, side=14)  # 14 = 3 full 4x4 cells + a partial one per side
    before = run_unet(sd_unet, inputs)
    apply_patch(sd_unet)
    out = run_unet(sd_unet, inputs)
    assert patch_stats(sd_unet)["agent_calls"] == 3 and not torch.equal(out, before)
    remove_patch(sd_unet)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ratio": 1.0}, "ratio must be in \\[0, 1\\)"),
        ({"ratio": -0.1}, "ratio must be in \\[0, 1\\)"),
        ({"agent_ratio": 1.5}, "agent_ratio must be in \\[0, 1\\)"),
        ({"sx": 0}, "sx must be a positive int"),
        ({"attn_precision": "fp16"}, "attn_precision"),
        ({"merge_attn": False}, "would do nothing"),
    ],
)
def test_bad_options(sd_unet, kwargs, match):
    with pytest.raises(ValueError, match=match):
        apply_patch(sd_unet, **kwargs)
    assert not is_patched(sd_unet)


def test_nothing_selected_is_an_error(sdxl_unet):
    with pytest.raises(ValueError, match="max_downsample=1 selects no transformer block"):
        apply_patch(sdxl_unet, max_downsample=1)
    assert not is_patched(sdxl_unet)


def test_unsupported_models():
    from diffusers import UNet2DConditionModel, UNet2DModel

    with pytest.raises(TypeError, match="UNet2DConditionModel"):
        apply_patch(torch.nn.Linear(2, 2))
    no_attention = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8, cross_attention_dim=8,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        mid_block_type=None,
    )  # fmt: skip
    with pytest.raises(ValueError, match="no diffusers BasicTransformerBlock"):
        apply_patch(no_attention)
    unet2d = UNet2DModel(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
                         down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                         up_block_types=("AttnUpBlock2D", "UpBlock2D"))  # fmt: skip
    with pytest.raises(ValueError, match="no diffusers BasicTransformerBlock"):
        apply_patch(unet2d)


@pytest.mark.parametrize(("config", "top", "blocks"), [("sd15", 1, 5), ("sdxl", 2, 10)])
def test_full_size_configs_pick_the_top_attention_level(config, top, blocks, monkeypatch):
    """The real SD v1.5 and SDXL UNet configs, built on the meta device (no memory, no weights)."""
    from diffusers import UNet2DConditionModel

    from agentattn.bench.sd import MODELS

    # the NaN-filling torch.empty of conftest is not a factory that `with torch.device` knows: use torch's own
    monkeypatch.setattr(torch, "empty", torch._C._VariableFunctions.empty)
    torch.utils._device._device_constructors.cache_clear()
    with torch.device("meta"):
        unet = UNet2DConditionModel(**MODELS[config])
    levels = _level_blocks(unet)
    assert min(ds for _, ds in levels) == top
    apply_patch(unet)
    assert patch_stats(unet)["blocks"] == blocks
    assert patch_options(unet)["max_downsample"] == top
    remove_patch(unet)


@pytest.mark.parametrize("how", ["set_attn_processor", "one_layer"])
def test_replacing_the_processors_turns_the_patch_off_truthfully(sd_unet, how):
    """diffusers' own processor API after apply_patch: the UNet runs unpatched, and the state says so."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    inputs = unet_inputs(TINY_SD_UNET)
    before = run_unet(sd_unet, inputs)
    apply_patch(sd_unet, merge_mlp=True)  # the feed-forward hooks must stop merging too
    assert not torch.equal(run_unet(sd_unet, inputs), before)
    if how == "set_attn_processor":
        sd_unet.set_attn_processor(AttnProcessor2_0())
    else:
        name = next(
            n for n, p in sd_unet.attn_processors.items() if type(p).__name__ == "AgentSDAttnProcessor"
        )
        sd_unet.get_submodule(name.removesuffix(".processor")).set_processor(AttnProcessor2_0())

    assert torch.equal(run_unet(sd_unet, inputs), before)  # nothing merged, no agent path
    with pytest.warns(RuntimeWarning, match="processors were replaced"):
        assert not is_patched(sd_unet)
    assert not sd_unet._forward_pre_hooks and not any(m._forward_pre_hooks for m in sd_unet.modules())
    assert "AgentSDAttnProcessor" not in _processors(sd_unet).values()
    with pytest.raises(RuntimeError, match="not patched"):
        patch_stats(sd_unet)
    apply_patch(sd_unet)  # and it can be applied again, around the new processors
    assert is_patched(sd_unet) and not torch.equal(run_unet(sd_unet, inputs), before)
    remove_patch(sd_unet)
