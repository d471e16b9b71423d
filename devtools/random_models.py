"""Randomly initialised models built from configs, for tests, benchmarks and smoke runs.

No weights are downloaded anywhere in this project; these give the engine real modules of the right
architecture. ``tiny`` runs in seconds on a CPU; ``sd15`` and ``sd21`` have the full SD 1.5 and
SD 2.1-base architectures (about 1 B parameters) and are meant for GPU benchmarks.
"""
from __future__ import annotations

import os

import torch

from ice_ops.bundle import DiffusionBundle, read_config, save_text_encoder, scheduler_config, write_model_index
from ice_ops.text import END_OF_TEXT, build_clip_tokenizer

# A tiny open_clip architecture (the CLIP retriever's shape at a fraction of its size), for tests and benches.
TINY_OPEN_CLIP_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "tiny_open_clip.json")
TINY_TEXT_WIDTH = 32
TINY_UNET = {
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": TINY_TEXT_WIDTH,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}
TINY_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [16, 32],
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 64,
    "scaling_factor": 0.18215,
}
TINY_TEXT = {
    "hidden_size": TINY_TEXT_WIDTH,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    "hidden_act": "quick_gelu",
    "projection_dim": TINY_TEXT_WIDTH,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
KINDS = ("tiny", "sd15", "sd21", "sd21-v")


def model_configs(kind: str) -> tuple[dict, dict, dict, str]:
    """(unet, vae, text encoder) configs and prediction type for ``kind``."""
    if kind == "tiny":
        return dict(TINY_UNET), dict(TINY_VAE), dict(TINY_TEXT), "epsilon"
    family = {"sd15": "sd1", "sd21": "sd2", "sd21-v": "sd2"}.get(kind)
    if family is None:
        raise ValueError(f"Unknown random model kind {kind!r}; choose one of {', '.join(KINDS)}.")
    text = {k: v for k, v in read_config(family, "text_encoder").items() if k != "architectures"}
    unet = read_config(family, "unet")
    prediction = "v_prediction" if kind == "sd21-v" else "epsilon"
    return unet, read_config(family, "vae"), text, prediction


def build_random_bundle(
    kind: str = "tiny", *, seed: int = 0, device: str | torch.device = "cpu",
    dtype: torch.dtype | dict[str, torch.dtype] = torch.float32,
) -> DiffusionBundle:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_cfg, vae_cfg, text_cfg, prediction = model_configs(kind)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(unet_cfg)
    vae = AutoencoderKL.from_config(vae_cfg)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    pad = END_OF_TEXT if kind in ("tiny", "sd15") else "!"
    tokenizer = build_clip_tokenizer(pad_token=pad)
    scheduler = DDPMScheduler.from_config(scheduler_config(prediction))
    return DiffusionBundle.from_components(
        unet, vae, text_encoder, tokenizer, scheduler, device=device, dtype=dtype
    )


def save_diffusers_folder(bundle: DiffusionBundle, folder: str) -> str:
    """Write ``bundle`` as a diffusers Stable Diffusion folder (``model_index.json`` included)."""
    os.makedirs(folder, exist_ok=True)
    bundle.unet.save_pretrained(os.path.join(folder, "unet"))
    bundle.vae.save_pretrained(os.path.join(folder, "vae"))
    save_text_encoder(bundle.text_encoder, os.path.join(folder, "text_encoder"))
    bundle.tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
    bundle.scheduler.save_pretrained(os.path.join(folder, "scheduler"))
    write_model_index(folder)
    return folder
