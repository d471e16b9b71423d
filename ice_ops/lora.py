"""A small LoRA on the UNet's attention projections, applied through forward hooks.

The user's UNet is never modified: the low-rank update ``scale * up @ down`` is added to the outputs of the
targeted ``nn.Linear`` layers only while :func:`apply_lora` is active. Weights are stored in the kohya key
layout that ComfyUI's LoraLoader reads (``lora_unet_<diffusers path with _>.lora_down.weight`` /
``.lora_up.weight`` / ``.alpha``).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

KOHYA_UNET_PREFIX = "lora_unet_"
DOWN_SUFFIX = ".lora_down.weight"
UP_SUFFIX = ".lora_up.weight"
ALPHA_SUFFIX = ".alpha"
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
DEFAULT_RANK = 4


def attention_projection_names(unet) -> list[str]:
    """Module paths of every attention projection (``...attn1.to_q`` etc.) of the UNet's transformer blocks."""
    names = []
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and ".transformer_blocks." in name:
            if any(name.endswith(".attn1." + p) or name.endswith(".attn2." + p) for p in ATTENTION_PROJECTIONS):
                names.append(name)
    return names


def kohya_key(module_name: str) -> str:
    return KOHYA_UNET_PREFIX + module_name.replace(".", "_")


def init_lora(unet, rank: int = DEFAULT_RANK, *, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Fresh LoRA tensors for every attention projection: ``down`` small random, ``up`` zero (a no-op start)."""
    if rank < 1:
        raise ValueError(f"The LoRA rank must be at least 1, got {rank}.")
    modules = dict(unet.named_modules())
    tensors: dict[str, torch.Tensor] = {}
    for name in attention_projection_names(unet):
        linear = modules[name]
        key = kohya_key(name)
        down = torch.randn(rank, linear.in_features, generator=generator) / rank
        tensors[key + DOWN_SUFFIX] = down
        tensors[key + UP_SUFFIX] = torch.zeros(linear.out_features, rank)
        tensors[key + ALPHA_SUFFIX] = torch.tensor(float(rank))
    return tensors


@contextlib.contextmanager
def apply_lora(unet, tensors: dict[str, torch.Tensor] | None, strength: float = 1.0) -> Iterator[None]:
    """Add the LoRA's update to the targeted layers' outputs inside the block (hooks removed on exit)."""
    if not tensors:
        yield
        return
    modules = dict(unet.named_modules())
    by_key = {kohya_key(name): name for name in attention_projection_names(unet)}
    handles = []
    try:
        for key in sorted({k[: -len(DOWN_SUFFIX)] for k in tensors if k.endswith(DOWN_SUFFIX)}):
            if key not in by_key:
                raise ValueError(
                    f"The LoRA has weights for {key}, which this UNet does not have; it was trained on another model."
                )
            down, up = tensors[key + DOWN_SUFFIX], tensors[key + UP_SUFFIX]
            alpha = float(tensors.get(key + ALPHA_SUFFIX, torch.tensor(float(down.shape[0]))))
            scale = strength * alpha / down.shape[0]
            handles.append(modules[by_key[key]].register_forward_hook(_lora_hook(down, up, scale)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _lora_hook(down: torch.Tensor, up: torch.Tensor, scale: float):
    def hook(module, inputs, output):
        x = inputs[0]
        d = down.to(x.device, x.dtype) if not down.requires_grad else down.to(x.device)
        u = up.to(x.device, x.dtype) if not up.requires_grad else up.to(x.device)
        update = torch.nn.functional.linear(torch.nn.functional.linear(x.to(d.dtype), d), u) * scale
        return output + update.to(output.dtype)

    return hook


def trainable_lora(tensors: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    """Copies of the up/down factors on ``device`` that require grad (alphas stay constants)."""
    out = {}
    for key, value in tensors.items():
        copy = value.detach().to(device, torch.float32).clone()
        if not key.endswith(ALPHA_SUFFIX):
            copy.requires_grad_(True)
        out[key] = copy
    return out
