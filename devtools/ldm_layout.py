"""Write a DiffusionBundle in the original (CompVis/LDM, "single-file") checkpoint layout.

diffusers only converts LDM -> diffusers; this module goes the other way so that models built or changed by
ICE can be saved as one ``.safetensors`` file that ComfyUI's CheckpointLoaderSimple and
``DiffusionBundle.from_single_file`` read. The mapping is derived from the model configs (number of levels,
layers per level, which levels carry cross-attention), so small test models convert exactly like full ones.

Layout of the single file:

- ``model.diffusion_model.*``: the UNet (``input_blocks`` / ``middle_block`` / ``output_blocks``);
- ``first_stage_model.*``: the VAE (``encoder.down.*`` / ``decoder.up.*`` with the decoder levels numbered
  from the lowest resolution, mid-block attention as 1x1 convolutions);
- ``cond_stage_model.transformer.text_model.*`` (SD 1.x, Hugging Face CLIP names) or
  ``cond_stage_model.model.*`` (SD 2.x, OpenCLIP names with fused q/k/v ``in_proj``).
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import torch

from ice_ops.bundle import LDM_UNET_PREFIX, LDM_VAE_PREFIX
from ice_ops.files import write_atomic

LDM_SD1_TEXT_PREFIX = "cond_stage_model.transformer.text_model."
LDM_SD2_TEXT_PREFIX = "cond_stage_model.model."
# Marker key ComfyUI and DiffusionBundle.detect_prediction_type read as "this checkpoint predicts v".
LDM_V_PREDICTION_KEY = "v_pred"
HF_TEXT_MODEL_LEVEL = "text_model."  # transformers 4 keeps this level in CLIPTextModel; transformers 5 does not
SINGLE_FILE_SUFFIX = ".safetensors"

SUPPORTED_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
SUPPORTED_UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
SUPPORTED_MID_BLOCKS = ("UNetMidBlock2DCrossAttn", None)
# UNet2DConditionModel always builds its cross-attention mid block with one attention between two resnets.
UNET_MID_ATTENTIONS = 1
SUPPORTED_VAE_DOWN_BLOCKS = ("DownEncoderBlock2D",)
SUPPORTED_VAE_UP_BLOCKS = ("UpDecoderBlock2D",)

# diffusers ResnetBlock2D child -> LDM ResBlock child (openaimodel.ResBlock: in_layers = [norm, act, conv],
# emb_layers = [act, linear], out_layers = [norm, act, dropout, conv]).
UNET_RESNET_CHILDREN = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# diffusers ResnetBlock2D child -> LDM autoencoder ResnetBlock child.
VAE_RESNET_CHILDREN = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
}
# diffusers Attention (VAE mid block) child -> LDM AttnBlock child; the LDM ones are 1x1 convolutions.
VAE_ATTENTION_CHILDREN = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}
VAE_CONV_ATTENTION_CHILDREN = ("q", "k", "v", "proj_out")
# Hugging Face CLIP encoder-layer child -> OpenCLIP residual-block child (q/k/v are handled separately).
OPEN_CLIP_LAYER_CHILDREN = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
OPEN_CLIP_QKV = ("q_proj", "k_proj", "v_proj")  # order of the rows in OpenCLIP's fused in_proj


# ---------------------------------------------------------------------------------------------- helpers
def _config_value(config: Any, name: str, default: Any = None) -> Any:
    """Read ``name`` from a diffusers FrozenDict, a plain dict or an object with attributes."""
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


def _per_level(value: Any, levels: int, name: str) -> list[int]:
    if isinstance(value, (list, tuple)):
        if len(value) != levels:
            raise ValueError(
                f"Config {name} has {len(value)} entries but the model has {levels} levels; fix the config."
            )
        return [int(v) for v in value]
    return [int(value)] * levels


def _check_block_types(types: Any, supported: tuple, what: str) -> list:
    types = list(types)
    unknown = [t for t in types if t not in supported]
    if unknown:
        raise ValueError(
            f"Cannot write {what} block type(s) {unknown} in the original layout; supported: {list(supported)}. "
            "Only Stable Diffusion 1.x/2.x architectures can be saved as a single file."
        )
    return types


def _rename_by_modules(
    state: Mapping[str, torch.Tensor], modules: Mapping[str, tuple[str, Mapping[str, str] | None]], what: str
) -> dict[str, torch.Tensor]:
    """Rename every key through ``modules``: diffusers module path -> (LDM module path, child renames).

    The longest module path that prefixes a key wins. With child renames, the part between the module and
    the parameter name must be one of the listed children; without, it is kept as is. Keys no module
    claims raise ValueError, so nothing is dropped silently.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            module = ".".join(parts[:cut])
            if module in modules:
                break
        else:
            raise ValueError(
                f"The {what} weight {key!r} has no place in the original layout; only SD 1.x/2.x models can be saved."
            )
        target, children = modules[module]
        rest = parts[cut:]
        if children is not None:
            child = ".".join(rest[:-1])
            if child not in children:
                raise ValueError(f"The {what} weight {key!r} is not part of a Stable Diffusion {what}.")
            rest = [children[child], rest[-1]]
        out[".".join([target, *rest])] = value
    return out


# ---------------------------------------------------------------------------------------------- UNet
def _unet_module_map(config: Any) -> dict[str, tuple[str, Mapping[str, str] | None]]:
    down_types = _check_block_types(_config_value(config, "down_block_types"), SUPPORTED_DOWN_BLOCKS, "UNet down")
    up_types = _check_block_types(_config_value(config, "up_block_types"), SUPPORTED_UP_BLOCKS, "UNet up")
    mid_type = _config_value(config, "mid_block_type", "UNetMidBlock2DCrossAttn")
    _check_block_types([mid_type], SUPPORTED_MID_BLOCKS, "UNet mid")
    levels = len(down_types)
    layers = _per_level(_config_value(config, "layers_per_block"), levels, "layers_per_block")

    modules: dict[str, tuple[str, Mapping[str, str] | None]] = {
        "time_embedding.linear_1": ("time_embed.0", None),
        "time_embedding.linear_2": ("time_embed.2", None),
        "conv_in": ("input_blocks.0.0", None),
        "conv_norm_out": ("out.0", None),
        "conv_out": ("out.2", None),
    }
    block = 1  # input_blocks.0 is conv_in
    for level in range(levels):
        for layer in range(layers[level]):
            modules[f"down_blocks.{level}.resnets.{layer}"] = (f"input_blocks.{block}.0", UNET_RESNET_CHILDREN)
            modules[f"down_blocks.{level}.attentions.{layer}"] = (f"input_blocks.{block}.1", None)
            block += 1
        if level < levels - 1:  # every level but the last halves the resolution
            modules[f"down_blocks.{level}.downsamplers.0.conv"] = (f"input_blocks.{block}.0.op", None)
            block += 1

    if mid_type is not None:  # middle_block = [resnet, attention, resnet], as in UNetMidBlock2DCrossAttn
        for index in range(UNET_MID_ATTENTIONS + 1):
            modules[f"mid_block.resnets.{index}"] = (f"middle_block.{2 * index}", UNET_RESNET_CHILDREN)
        for index in range(UNET_MID_ATTENTIONS):
            modules[f"mid_block.attentions.{index}"] = (f"middle_block.{2 * index + 1}", None)

    up_layers = list(reversed(layers))
    block = 0
    for level, up_type in enumerate(up_types):
        for layer in range(up_layers[level] + 1):  # one more resnet than on the way down (skip from the sampler)
            modules[f"up_blocks.{level}.resnets.{layer}"] = (f"output_blocks.{block}.0", UNET_RESNET_CHILDREN)
            modules[f"up_blocks.{level}.attentions.{layer}"] = (f"output_blocks.{block}.1", None)
            block += 1
        if level < len(up_types) - 1:  # the upsampler sits after the attention (if any) of the level's last block
            slot = 2 if up_type.startswith("CrossAttn") else 1
            modules[f"up_blocks.{level}.upsamplers.0.conv"] = (f"output_blocks.{block - 1}.{slot}.conv", None)
    return modules


def unet_to_ldm(unet_state: dict, unet_config) -> dict:
    """diffusers ``UNet2DConditionModel`` state dict -> LDM UNet keys (without ``model.diffusion_model.``).

    Tensors are shared, not copied; the transformer blocks keep their names and shapes (1x1-conv or linear
    ``proj_in``/``proj_out`` exactly as the config built them).
    """
    return _rename_by_modules(unet_state, _unet_module_map(unet_config), "UNet")


# ---------------------------------------------------------------------------------------------- VAE
def _vae_module_map(config: Any) -> dict[str, tuple[str, Mapping[str, str] | None]]:
    down_types = _check_block_types(_config_value(config, "down_block_types"), SUPPORTED_VAE_DOWN_BLOCKS, "VAE down")
    up_types = _check_block_types(_config_value(config, "up_block_types"), SUPPORTED_VAE_UP_BLOCKS, "VAE up")
    modules: dict[str, tuple[str, Mapping[str, str] | None]] = {
        "quant_conv": ("quant_conv", None),
        "post_quant_conv": ("post_quant_conv", None),
    }
    for coder in ("encoder", "decoder"):
        modules[f"{coder}.conv_in"] = (f"{coder}.conv_in", None)
        modules[f"{coder}.conv_out"] = (f"{coder}.conv_out", None)
        modules[f"{coder}.conv_norm_out"] = (f"{coder}.norm_out", None)
        modules[f"{coder}.mid_block.resnets.0"] = (f"{coder}.mid.block_1", VAE_RESNET_CHILDREN)
        modules[f"{coder}.mid_block.resnets.1"] = (f"{coder}.mid.block_2", VAE_RESNET_CHILDREN)
        modules[f"{coder}.mid_block.attentions.0"] = (f"{coder}.mid.attn_1", VAE_ATTENTION_CHILDREN)

    layers = int(_config_value(config, "layers_per_block"))
    for level in range(len(down_types)):
        for layer in range(layers):
            modules[f"encoder.down_blocks.{level}.resnets.{layer}"] = (
                f"encoder.down.{level}.block.{layer}",
                VAE_RESNET_CHILDREN,
            )
        modules[f"encoder.down_blocks.{level}.downsamplers.0.conv"] = (f"encoder.down.{level}.downsample.conv", None)
    # The LDM decoder numbers its levels by resolution (up.0 is the full-resolution one, run last).
    for level in range(len(up_types)):
        ldm_level = len(up_types) - 1 - level
        for layer in range(layers + 1):
            modules[f"decoder.up_blocks.{level}.resnets.{layer}"] = (
                f"decoder.up.{ldm_level}.block.{layer}",
                VAE_RESNET_CHILDREN,
            )
        modules[f"decoder.up_blocks.{level}.upsamplers.0.conv"] = (f"decoder.up.{ldm_level}.upsample.conv", None)
    return modules


def _as_conv_attention(key: str, value: torch.Tensor) -> torch.Tensor:
    """Linear ``[out, in]`` mid-block attention weights -> the LDM's 1x1 convolution ``[out, in, 1, 1]``."""
    parts = key.split(".")
    is_attention_weight = ".mid.attn_1." in key and parts[-1] == "weight" and parts[-2] in VAE_CONV_ATTENTION_CHILDREN
    if is_attention_weight and value.ndim == 2:
        return value[:, :, None, None]
    return value


def vae_to_ldm(vae_state: dict, vae_config) -> dict:
    """diffusers ``AutoencoderKL`` state dict -> LDM VAE keys (without ``first_stage_model.``)."""
    renamed = _rename_by_modules(vae_state, _vae_module_map(vae_config), "VAE")
    return {key: _as_conv_attention(key, value) for key, value in renamed.items()}


# ---------------------------------------------------------------------------------------------- text encoder
def _without_text_model_level(text_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept transformers 4 (``text_model.embeddings...``) and 5 (``embeddings...``) CLIPTextModel keys."""
    return {
        (key[len(HF_TEXT_MODEL_LEVEL):] if key.startswith(HF_TEXT_MODEL_LEVEL) else key): value
        for key, value in text_state.items()
    }


def _sd1_text_to_ldm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if "text_projection.weight" in state:
        raise ValueError(
            "SD 1.x checkpoints hold a CLIPTextModel without projection; save the text encoder as CLIPTextModel."
        )
    return {LDM_SD1_TEXT_PREFIX + key: value for key, value in state.items()}


def _sd2_text_to_ldm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        parts = key.split(".")
        if key == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key == "embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key == "embeddings.position_ids":
            continue  # a derived buffer (0..L-1); OpenCLIP has none
        elif parts[0] == "final_layer_norm":
            out["ln_final." + parts[-1]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.t()  # OpenCLIP applies x @ P; a Linear applies x @ W^T
        elif parts[:2] == ["encoder", "layers"] and len(parts) >= 5:
            block = f"transformer.resblocks.{parts[2]}."
            child = ".".join(parts[3:-1])
            if parts[3] == "self_attn" and parts[4] in OPEN_CLIP_QKV:
                fused.setdefault(f"{block}attn.in_proj_{parts[-1]}", {})[parts[4]] = value
            elif child in OPEN_CLIP_LAYER_CHILDREN:
                out[f"{block}{OPEN_CLIP_LAYER_CHILDREN[child]}.{parts[-1]}"] = value
            else:
                raise ValueError(f"The text-encoder weight {key!r} is not part of a CLIP text transformer.")
        else:
            raise ValueError(f"The text-encoder weight {key!r} is not part of a CLIP text transformer.")
    for key, pieces in fused.items():
        missing = [name for name in OPEN_CLIP_QKV if name not in pieces]
        if missing:
            raise ValueError(f"The text encoder lacks {missing} for {key!r}; the state dict is incomplete.")
        out[key] = torch.cat([pieces[name] for name in OPEN_CLIP_QKV], dim=0)
    if "token_embedding.weight" not in out:
        raise ValueError("The text-encoder state dict has no token embedding; pass the full CLIPTextModel state dict.")
    if "text_projection" not in out:
        # A CLIPTextModel has no projection; the identity keeps the pooled output what the model computes.
        width = out["token_embedding.weight"].shape[1]
        reference = out["token_embedding.weight"]
        out["text_projection"] = torch.eye(width, dtype=reference.dtype, device=reference.device)
    return {LDM_SD2_TEXT_PREFIX + key: value for key, value in out.items()}


def clip_text_to_ldm(text_state: dict, family: str) -> dict:
    """CLIP text-encoder state dict -> LDM keys with their ``cond_stage_model.`` prefix.

    ``family`` ``"sd1"``: ``cond_stage_model.transformer.text_model.<HF keys>``; ``"sd2"``: the OpenCLIP layout
    under ``cond_stage_model.model.`` (fused ``in_proj``, ``positional_embedding``, ``ln_final``,
    ``text_projection``; identity when the model has no projection).
    """
    state = _without_text_model_level(text_state)
    if family == "sd1":
        return _sd1_text_to_ldm(state)
    if family == "sd2":
        return _sd2_text_to_ldm(state)
    raise ValueError(
        f"Cannot write a {family!r} text encoder in the original layout; supported families: 'sd1' (768-d CLIP-L) "
        "and 'sd2' (1024-d OpenCLIP-H)."
    )


# ---------------------------------------------------------------------------------------------- whole model
def bundle_to_ldm_state_dict(bundle) -> dict:
    """The full single-file state dict of a DiffusionBundle (UNet, VAE, text encoder, all prefixes).

    A v-prediction bundle gets the ``v_pred`` marker key so that loaders need not guess.
    """
    if bundle.family not in ("sd1", "sd2"):
        raise ValueError(
            f"Only SD 1.x (768-d) and SD 2.x (1024-d) models can be saved as a single file; this one is "
            f"{bundle.family!r} ({bundle.text_width}-d text encoder). Save it as a diffusers folder instead."
        )
    state: dict[str, torch.Tensor] = {}
    for key, value in unet_to_ldm(bundle.unet.state_dict(), bundle.unet.config).items():
        state[LDM_UNET_PREFIX + key] = value
    for key, value in vae_to_ldm(bundle.vae.state_dict(), bundle.vae.config).items():
        state[LDM_VAE_PREFIX + key] = value
    state.update(clip_text_to_ldm(bundle.text_encoder.state_dict(), bundle.family))
    if bundle.prediction_type == "v_prediction":
        state[LDM_V_PREDICTION_KEY] = torch.zeros(0)
    return state


def save_single_file(bundle, path: str, *, overwrite: bool = False) -> str:
    """Write ``bundle`` as one original-layout ``.safetensors`` checkpoint; returns the path.

    The file is written to a temporary name in the same folder and renamed into place, so readers never
    see half a file. An existing file is replaced only with ``overwrite=True``.
    """
    from safetensors.torch import save_file

    if not path.endswith(SINGLE_FILE_SUFFIX):
        raise ValueError(
            f"{os.path.basename(path)!r} must end in {SINGLE_FILE_SUFFIX}; single files are saved as safetensors."
        )
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"The folder {folder!r} does not exist; create it first.")
    if os.path.exists(path) and not overwrite:
        raise ValueError(f"{path!r} already exists; pass overwrite=True to replace it or choose another name.")
    state = {key: value.detach().cpu().contiguous() for key, value in bundle_to_ldm_state_dict(bundle).items()}
    return write_atomic(path, lambda temporary: save_file(state, temporary, metadata={"format": "pt"}),
                        overwrite=overwrite)
