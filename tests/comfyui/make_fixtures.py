"""Build the ComfyUI-tier test models: a random-weight SD1.5-architecture checkpoint in the original (LDM)
single-file layout and, when its config is given, a tiny random open_clip retriever.

Run as a script with ComfyUI importable (``sys.path`` gets ``--comfyui``): ComfyUI's own diffusers->LDM
key mappings write the checkpoint, so CheckpointLoaderSimple reads it exactly as it reads a real one.

    python tests/comfyui/make_fixtures.py --comfyui /path/to/ComfyUI --out DIR [--open-clip-config tiny.json]

Writes ``DIR/checkpoints/ice_tiny_sd15.safetensors`` (``--family sd2``: ``ice_tiny_sd21.safetensors``) and
``DIR/ice/<config stem>.{json,safetensors}``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHECKPOINT_NAMES = {"sd1": "ice_tiny_sd15.safetensors", "sd2": "ice_tiny_sd21.safetensors"}
# The "tiny variant" of the SD1.5 UNet (docs/COMFYUI.md, Tiny test checkpoints): two levels instead of four,
# one res block per level; model_channels (320) and the 768-d context keep ComfyUI's SD15 detection. CLIP-L and the VAE
# are full size because ComfyUI's SD15 model class fixes their architectures.
TINY_UNET_OVERRIDES = {
    "block_out_channels": [320, 640],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
CROSS_ATTENTION_BLOCKS = ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D")
SD2_HEAD_CHANNELS = 64  # SD 2.x attention uses 64 channels per head (ComfyUI SD20 num_head_channels)
OPEN_CLIP_H_LAYERS = 24  # ComfyUI's SD2 text encoder (comfy/text_encoders/sd2_clip_config.json) has all 24
LDM_TEXT_PREFIX = "cond_stage_model.transformer.text_model."
LDM_OPEN_CLIP_PREFIX = "cond_stage_model.model."
LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."


def comfy_unet_config(config: dict) -> dict:
    """The ComfyUI ``unet_config`` (the keys ``comfy.utils.unet_to_diffusers`` reads) of a diffusers UNet config."""
    levels = len(config["block_out_channels"])
    per_level = config["layers_per_block"]
    down_attention = [t in CROSS_ATTENTION_BLOCKS for t in config["down_block_types"]]
    up_attention = [t in CROSS_ATTENTION_BLOCKS for t in reversed(config["up_block_types"])]
    return {
        "num_res_blocks": [per_level] * levels,
        "channel_mult": [c // config["block_out_channels"][0] for c in config["block_out_channels"]],
        "transformer_depth": [int(a) for a in down_attention for _ in range(per_level)],
        "transformer_depth_output": [int(a) for a in up_attention for _ in range(per_level + 1)],
        "transformer_depth_middle": 1,
    }


def ldm_checkpoint_state(unet, vae, text_encoder, family: str = "sd1") -> dict:
    """LDM single-file state dict of diffusers/transformers modules, through ComfyUI's mappings."""
    import comfy.diffusers_convert
    import comfy.utils

    unet_state = unet.state_dict()
    mapping = comfy.utils.unet_to_diffusers(comfy_unet_config(dict(unet.config)))
    missing = sorted(set(unet_state) - set(mapping))
    if missing:
        raise RuntimeError(f"No LDM name for {len(missing)} UNet weights, e.g. {missing[:3]}")
    state = {LDM_UNET_PREFIX + mapping[key]: value for key, value in unet_state.items()}
    vae_state = comfy.diffusers_convert.convert_vae_state_dict(vae.state_dict())
    state.update({LDM_VAE_PREFIX + key: value for key, value in vae_state.items()})
    text_state = {}
    for key, value in text_encoder.state_dict().items():
        bare = key[len("text_model."):] if key.startswith("text_model.") else key
        text_state[bare] = value
    if family == "sd1":
        state.update({LDM_TEXT_PREFIX + key: value for key, value in text_state.items()})
    else:
        hf = {LDM_OPEN_CLIP_PREFIX + "transformer.text_model." + k: v for k, v in text_state.items()}
        state.update(comfy.diffusers_convert.convert_text_enc_state_dict_v20(hf))
    return state


def build_checkpoint(path: str, family: str = "sd1", seed: int = 0) -> str:
    """Random-weight tiny SD1.5 (``sd1``) or SD2.1 (``sd2``) checkpoint (fp16 on disk) at ``path``."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = os.path.join(ROOT, "ice_ops", "configs", family)

    def read(part: str) -> dict:
        with open(os.path.join(configs, f"{part}.json"), encoding="utf-8") as handle:
            return json.load(handle)

    torch.manual_seed(seed)
    unet_config = {**read("unet"), **TINY_UNET_OVERRIDES}
    text = {k: v for k, v in read("text_encoder").items() if k != "architectures"}
    if family == "sd2":
        unet_config["attention_head_dim"] = [w // SD2_HEAD_CHANNELS for w in unet_config["block_out_channels"]]
        text["num_hidden_layers"] = OPEN_CLIP_H_LAYERS
    unet = UNet2DConditionModel.from_config(unet_config)
    vae = AutoencoderKL.from_config(read("vae"))
    text_encoder = CLIPTextModel(CLIPTextConfig(**text))
    state = ldm_checkpoint_state(unet, vae, text_encoder, family)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in state.items()}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file(state, path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


def build_open_clip(config_path: str, folder: str, seed: int = 0) -> str:
    """Random-weight open_clip model of ``config_path``; writes the config and the weights into ``folder``."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    arch = os.path.splitext(os.path.basename(config_path))[0]
    os.makedirs(folder, exist_ok=True)
    shutil.copyfile(config_path, os.path.join(folder, arch + ".json"))
    open_clip.add_model_config(config_path)
    torch.manual_seed(seed)
    model = open_clip.create_model(arch, pretrained=None)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    target = os.path.join(folder, arch + ".safetensors")
    save_file(state, target + ".tmp")
    os.replace(target + ".tmp", target)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", required=True, help="ComfyUI checkout (its folder goes on sys.path)")
    parser.add_argument("--out", required=True, help="models folder to write into")
    parser.add_argument("--open-clip-config", default=None, help="open_clip model config JSON for the retriever")
    parser.add_argument("--family", action="append", choices=sorted(CHECKPOINT_NAMES), help="checkpoints to build (default sd1)")
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.abspath(args.comfyui))
    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = True  # must precede any comfy.model_management import (docs/COMFYUI.md, CPU mode)
    written = [
        build_checkpoint(os.path.join(args.out, "checkpoints", CHECKPOINT_NAMES[family]), family)
        for family in (args.family or ["sd1"])
    ]
    if args.open_clip_config:
        written.append(build_open_clip(args.open_clip_config, os.path.join(args.out, "ice")))
    sys.stdout.write(json.dumps({"written": written}) + "\n")


if __name__ == "__main__":
    main()
