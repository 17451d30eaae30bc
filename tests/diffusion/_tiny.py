"""Tiny diffusers models built from configs (no download): SD-style and SDXL-style UNets, a full SD pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import torch

# SD 1.x layout: attention at the top level (downsampling 1) and below.
TINY_SD_UNET = {
    "sample_size": 16,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
}
# SDXL layout: no attention at the top level, linear projections, several transformer layers, text_time embeds.
TINY_SDXL_UNET = {
    "sample_size": 16,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": (2, 4),
    "norm_num_groups": 8,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 32 + 6 * 8,
}


def tiny_unet(config: dict, seed: int = 0) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**config).eval()


def unet_inputs(config: dict, batch: int = 2, side: int = 16, seed: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    inputs = {
        "sample": torch.randn(batch, 4, side, side, generator=gen),
        "timestep": torch.tensor(10),
        "encoder_hidden_states": torch.randn(batch, 7, config["cross_attention_dim"], generator=gen),
    }
    if config.get("addition_embed_type") == "text_time":
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(
                batch, config["projection_class_embeddings_input_dim"] - 48, generator=gen
            ),
            "time_ids": torch.randn(batch, 6, generator=gen),
        }
    return inputs


def run_unet(unet: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return unet(**inputs).sample


def _tiny_tokenizer(directory: Path):
    """A CLIP tokenizer with a handful of words; every other word maps to the unknown token."""
    from transformers import CLIPTokenizer

    words = ["a", "photo", "of", "cat", "dog", "red", "blue"]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for w in words:
        vocab[f"{w}</w>"] = len(vocab)
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(f"{ch}</w>", len(vocab))
    merges = ["#version: 0.2"]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("\n".join(merges) + "\n")
    return CLIPTokenizer(
        str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=16, pad_token="!"
    )


def save_tiny_sd_pipeline(directory: Path) -> Path:
    """Build a StableDiffusionPipeline from tiny components (32² images, 16² latents) and save it."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = tiny_unet(TINY_SD_UNET)
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0, eos_token_id=1, pad_token_id=2, hidden_size=32, intermediate_size=37,
            num_attention_heads=4, num_hidden_layers=2, vocab_size=128, max_position_embeddings=16,
        )
    )  # fmt: skip
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text.eval(),
        tokenizer=_tiny_tokenizer(directory / "_tok"),
        scheduler=DDIMScheduler(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            clip_sample=False,
            steps_offset=1,
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out = directory / "tiny-sd"
    pipe.save_pretrained(out)
    return out
