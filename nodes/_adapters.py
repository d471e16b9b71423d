"""Conversions between ComfyUI's types and the ICE engine's.

Tensor conversions (IMAGE, MASK, CONDITIONING) are pure torch and tested without ComfyUI. Everything that
touches ComfyUI (model checks, LoRA patches, progress bar) imports it inside the function, so this module
itself never imports ComfyUI. ICE's models and their memory are in :mod:`._memory`.

ComfyUI runs every node under ``torch.inference_mode()`` (execution.py); tensors created there cannot
take part in autograd later. Engine calls therefore run inside ``_memory.engine_session``, and tensors coming
from ComfyUI are copied with :func:`normal_tensor` before the engine sees them.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ._engine import engine

# ComfyUI model classes (comfy/supported_models.py) ICE can run on, and the engine family of each.
SUPPORTED_MODEL_CLASSES = {"SD15": "sd1", "SD20": "sd2"}
SUPPORTED_TEXT = "Stable Diffusion 1.x (ComfyUI model type SD15) and 2.x (SD20: 2.0/2.1, 512-base or 768-v)"
# ComfyUI text-encoder wrapper classes (comfy/sd1_clip.py, comfy/text_encoders/sd2_clip.py) per family.
CLIP_CLASSES = {"sd1": "SD1ClipModel", "sd2": "SD2ClipModel"}
LATENT_CHANNELS = 4  # SD 1.x/2.x latents; 9-channel inpainting and 8-channel pix2pix UNets are not supported
PREVIEW_FORMAT = "JPEG"  # what ComfyUI's latent previews send (latent_preview.py)
RGB_CHANNELS = 3


# ---------------------------------------------------------------------- tensors
def normal_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A detached contiguous copy that is not an inference tensor (usable in autograd)."""
    with torch.inference_mode(False):
        return tensor.detach().clone(memory_format=torch.contiguous_format)


def image_to_engine(image: torch.Tensor, what: str = "image") -> torch.Tensor:
    """ComfyUI IMAGE ``[1, H, W, C]`` in 0..1 -> engine image ``[3, H, W]`` (float32, CPU)."""
    if image.ndim != 4:
        raise ValueError(f"The {what} must be a ComfyUI IMAGE [batch, height, width, channels], got shape {tuple(image.shape)}.")
    if image.shape[0] != 1:
        raise ValueError(
            f"The {what} is a batch of {image.shape[0]} images but ICE works on one; pick one with "
            "'ImageFromBatch' (batch_index) or load a single image."
        )
    channels = image.shape[-1]
    if channels == 1:
        image = image.expand(-1, -1, -1, RGB_CHANNELS)
    elif channels == RGB_CHANNELS + 1:
        image = image[..., :RGB_CHANNELS]
    elif channels != RGB_CHANNELS:
        raise ValueError(f"The {what} has {channels} channels; connect an RGB IMAGE (3 channels).")
    return normal_tensor(image[0].permute(2, 0, 1).float().cpu())


def image_from_engine(image: torch.Tensor) -> torch.Tensor:
    """Engine image ``[3, H, W]`` (or a batch ``[B, 3, H, W]``) -> ComfyUI IMAGE ``[B, H, W, 3]`` on CPU."""
    batch = image[None] if image.ndim == 3 else image
    if batch.ndim != 4 or batch.shape[1] != RGB_CHANNELS:
        raise ValueError(f"Expected engine images [3, H, W] or [B, 3, H, W], got shape {tuple(image.shape)}.")
    return batch.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().contiguous()


def mask_to_engine(mask: torch.Tensor | None, size: tuple[int, int], what: str = "mask") -> torch.Tensor | None:
    """ComfyUI MASK ``[1, H, W]`` or ``[H, W]`` -> engine mask ``[H, W]`` at the image's ``size``; None stays None."""
    if mask is None:
        return None
    if mask.ndim == 3:
        if mask.shape[0] != 1:
            raise ValueError(f"The {what} is a batch of {mask.shape[0]} masks; connect a single mask.")
        mask = mask[0]
    if mask.ndim != 2:
        raise ValueError(f"The {what} must be a ComfyUI MASK [batch, height, width], got shape {tuple(mask.shape)}.")
    if tuple(mask.shape) != tuple(size):
        raise ValueError(
            f"The {what} is {mask.shape[1]}x{mask.shape[0]} but the image is {size[1]}x{size[0]}; "
            "connect a mask made for this image (e.g. the MASK of the same Load Image node, after the same resize)."
        )
    return normal_tensor(mask.float().clamp(0, 1).cpu())


def masks_from_engine(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Engine masks ``[K, H, W]`` -> ComfyUI MASK batch; an empty set gives one empty mask (ComfyUI needs a batch of at least one)."""
    if masks.ndim != 3:
        raise ValueError(f"Expected engine masks [K, H, W], got shape {tuple(masks.shape)}.")
    if masks.shape[0] == 0:
        return torch.zeros(1, *size)
    return masks.detach().float().clamp(0, 1).cpu().contiguous()


def replace_masks(concepts, masks: torch.Tensor | None):
    """The concept set with its masks replaced by a ComfyUI MASK batch ``[K, H, W]`` (one per concept, in order)."""
    if masks is None:
        return concepts
    Concept = engine("concepts").Concept
    count = len(concepts.concepts)
    if masks.ndim == 2:
        masks = masks[None]
    if masks.ndim != 3 or masks.shape[0] != count:
        raise ValueError(
            f"The mask batch has {masks.shape[0] if masks.ndim == 3 else 'no'} masks but the concept set has {count} "
            f"concepts ({', '.join(concepts.names)}); connect one mask per concept, in the same order "
            "(e.g. the masks output of Localize Concepts after editing)."
        )
    size = tuple(concepts.image_size)
    if tuple(masks.shape[-2:]) != size:
        raise ValueError(
            f"The masks are {masks.shape[-1]}x{masks.shape[-2]} but the concepts' image is {size[1]}x{size[0]}; "
            "connect masks made for the same image."
        )
    fresh = normal_tensor(masks.float().clamp(0, 1).cpu())
    replaced = [Concept(c.name, c.word, c.score, fresh[i], dict(c.vectors)) for i, c in enumerate(concepts.concepts)]
    return concepts.replace(concepts=replaced)


def conditioning_from_composed(composed) -> list:
    """Engine ComposedPrompt -> ComfyUI CONDITIONING ``[[cond [1, 77, D], {"pooled_output": [1, D]}]]``,
    float32 on CPU like CLIPTextEncode's (comfy/sd.py encode_from_tokens_scheduled)."""
    hidden, pooled = composed.hidden_states, composed.pooled
    if hidden.ndim != 3 or hidden.shape[0] != 1:
        raise ValueError(f"Expected composed hidden states [1, tokens, width], got {tuple(hidden.shape)}.")
    pooled = pooled.reshape(1, -1)
    if pooled.shape[-1] != hidden.shape[-1]:
        raise ValueError(f"Pooled width {pooled.shape[-1]} differs from hidden width {hidden.shape[-1]}.")
    cond = hidden.detach().float().cpu().contiguous()
    return [[cond, {"pooled_output": pooled.detach().float().cpu().contiguous()}]]


def composed_from_conditioning(positive: list, negative: list | None, empty_prompt, width: int):
    """ComfyUI CONDITIONING (positive and optional negative) -> engine ComposedPrompt for ``generate``.

    ``empty_prompt`` (a ComposedPrompt of the empty text) supplies the negative when none is connected.
    ``width`` is the model's text width; conditioning of another width comes from another text encoder."""
    hidden, pooled = _single_conditioning(positive, "positive", width)
    if negative is None:
        negative_hidden, negative_pooled = empty_prompt.hidden_states, empty_prompt.pooled
    else:
        negative_hidden, negative_pooled = _single_conditioning(negative, "negative", width)
    return engine("composition").ComposedPrompt(hidden, pooled, negative_hidden, negative_pooled, text="", negative_text="")


def _single_conditioning(conditioning: list, what: str, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(conditioning, list) or len(conditioning) != 1 or len(conditioning[0]) != 2:
        count = len(conditioning) if isinstance(conditioning, list) else "no"
        raise ValueError(
            f"The {what} input must be one conditioning from Compose Concepts; got {count} entries. Connect Compose "
            "Concepts directly, without Conditioning (Combine) or area nodes."
        )
    cond, extras = conditioning[0]
    if cond.ndim != 3 or cond.shape[0] != 1 or cond.shape[-1] != width:
        raise ValueError(
            f"The {what} conditioning has shape {tuple(cond.shape)} but this model's text encoder gives "
            f"[1, tokens, {width}]; encode the prompt with Compose Concepts using the same ICE model."
        )
    pooled = extras.get("pooled_output") if isinstance(extras, dict) else None
    if pooled is None:  # the SD 1.x/2.x UNet does not read the pooled vector; keep the shape only
        pooled = torch.zeros(1, width)
    return normal_tensor(cond.float()), normal_tensor(pooled.float().reshape(1, -1))


def split_words(text: str) -> list[str]:
    """'vase, table' -> ['vase', 'table'] (commas or new lines separate; blanks dropped)."""
    return [word.strip() for word in text.replace("\n", ",").split(",") if word.strip()]


def labelled_overlay(image: torch.Tensor, masks: torch.Tensor, labels: Sequence[str]) -> torch.Tensor:
    """Masks ``[K, H, W]`` coloured over ``[3, H, W]``, each labelled at its centre; returns ``[3, H, W]``
    (the engine's :func:`ice_ops.imaging.labelled_overlay`)."""
    return engine("imaging").labelled_overlay(image, masks, labels)


# ---------------------------------------------------------------------- progress and cancel
class ProgressReporter:
    """The engine's ``callback(step, total, preview)`` driving ComfyUI's progress bar.

    Every call first checks ComfyUI's Cancel flag (raising stops the engine within one step; the engine also
    asks through ``check_cancel`` inside each step, before the backward pass and before Stage One's UNet pass), then
    updates the bar and, when the engine gives one, sends a preview image. ``bar_factory`` and
    ``interrupt_check`` default to ComfyUI's own and exist for tests.
    """

    def __init__(
        self,
        *,
        bar_factory: Callable[[int], Any] | None = None,
        interrupt_check: Callable[[], None] | None = None,
        preview_size: int | None = None,
    ) -> None:
        if bar_factory is None or interrupt_check is None or preview_size is None:
            import comfy.model_management
            import comfy.utils
            from comfy.cli_args import args

            bar_factory = bar_factory or comfy.utils.ProgressBar
            interrupt_check = interrupt_check or comfy.model_management.throw_exception_if_processing_interrupted
            preview_size = preview_size if preview_size is not None else int(args.preview_size)
        self.bar_factory = bar_factory
        self.interrupt_check = interrupt_check
        self.preview_size = preview_size
        self.bar = None
        self.total = None

    def check_cancel(self) -> None:
        """Called by the engine inside a step (``ice_ops.progress.cancel_point``): raises when Cancel was pressed."""
        self.interrupt_check()

    def __call__(self, step: int, total: int, preview: torch.Tensor | None = None) -> None:
        self.interrupt_check()
        if self.bar is None or total != self.total:
            self.bar, self.total = self.bar_factory(total), total
        payload = None
        if preview is not None:
            payload = (PREVIEW_FORMAT, engine("imaging").tensor_to_pil(preview), self.preview_size)
        self.bar.update_absolute(step, total, payload)


# ---------------------------------------------------------------------- models
def model_family(model) -> tuple[str, str]:
    """(engine family, ComfyUI model class name) of a ComfyUI MODEL; ``ValueError`` if ICE cannot use it."""
    inner = getattr(model, "model", None)
    config = getattr(inner, "model_config", None)
    if config is None:
        raise ValueError(
            "This input is not a ComfyUI MODEL; connect the MODEL output of Load Checkpoint (CheckpointLoaderSimple)."
        )
    name = type(config).__name__
    family = SUPPORTED_MODEL_CLASSES.get(name)
    if family is None:
        raise ValueError(
            f"ICE cannot use this model: ComfyUI detected it as {name}. ICE supports {SUPPORTED_TEXT}; "
            "load an SD 1.5 or SD 2.1 checkpoint with Load Checkpoint."
        )
    in_channels = config.unet_config.get("in_channels", LATENT_CHANNELS)
    if in_channels != LATENT_CHANNELS:
        raise ValueError(
            f"This {name} UNet takes {in_channels} input channels (an inpainting or instruct model); ICE needs a "
            "regular text-to-image SD 1.x/2.x checkpoint."
        )
    return family, name


def prediction_type(model) -> str:
    """'epsilon' or 'v_prediction' from ComfyUI's detected model type."""
    kind = getattr(getattr(model.model, "model_type", None), "name", None)
    types = {"EPS": "epsilon", "V_PREDICTION": "v_prediction"}
    if kind not in types:
        raise ValueError(f"ICE supports epsilon and v-prediction models; this one is {kind}.")
    return types[kind]


def check_clip(clip, family: str) -> None:
    expected = CLIP_CLASSES[family]
    actual = type(getattr(clip, "cond_stage_model", None)).__name__
    if actual != expected:
        raise ValueError(
            f"The CLIP input is a {actual} but this {family.upper()} model needs its own text encoder ({expected}); "
            "connect the CLIP output of the same Load Checkpoint node as MODEL."
        )


def diffusers_unet_config(comfy_config: dict, family_config: dict, native_sample_size: int) -> dict:
    """The diffusers ``UNet2DConditionModel`` config of a ComfyUI SD1/SD2 ``unet_config``.

    ``family_config`` (the shipped SD1/SD2 config) gives everything ComfyUI does not record; sizes,
    attention layout and heads come from ComfyUI, so trimmed or custom SD-architecture UNets load too.
    """
    channels = comfy_config["model_channels"]
    widths = [channels * m for m in comfy_config["channel_mult"]]
    per_level = list(comfy_config["num_res_blocks"])
    if len(set(per_level)) != 1:
        raise ValueError(f"UNets with different res-block counts per level ({per_level}) are not supported.")
    blocks = per_level[0]
    down_depth = list(comfy_config["transformer_depth"])
    up_depth = list(comfy_config["transformer_depth_output"])
    down_levels = [max(down_depth[i * blocks:(i + 1) * blocks]) for i in range(len(widths))]
    up_levels = [max(up_depth[i * (blocks + 1):(i + 1) * (blocks + 1)]) for i in range(len(widths))]
    if comfy_config.get("num_heads", -1) > 0:
        heads: int | list[int] = int(comfy_config["num_heads"])
    else:
        heads = [w // int(comfy_config["num_head_channels"]) for w in widths]
    config = dict(family_config)
    config.update(
        block_out_channels=widths,
        layers_per_block=blocks,
        down_block_types=["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in down_levels],
        up_block_types=["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(up_levels)],
        transformer_layers_per_block=[max(d, 1) for d in down_levels],
        attention_head_dim=heads,
        cross_attention_dim=int(comfy_config["context_dim"]),
        use_linear_projection=bool(comfy_config.get("use_linear_in_transformer", False)),
        in_channels=int(comfy_config["in_channels"]),
        out_channels=int(comfy_config.get("out_channels", comfy_config["in_channels"])),
        sample_size=native_sample_size,
    )
    return config


def sample_size_for(resolution: int, unet_config: dict, vae_config: dict) -> int:
    """UNet sample size (latent pixels) for a working ``resolution`` in image pixels; ``ValueError`` unless
    the resolution is a multiple of what the VAE and UNet downsample by together."""
    bundle_module = engine("bundle")
    multiple = bundle_module.size_multiple(unet_config, vae_config)
    if resolution < multiple or resolution % multiple:
        raise ValueError(
            f"working_resolution {resolution} must be a multiple of {multiple} pixels for this model "
            f"(e.g. {max(multiple, resolution // multiple * multiple)}), or 0 for the model's native resolution."
        )
    return resolution // bundle_module.downsampling(vae_config)


def lora_patched_model(model, lora: dict[str, torch.Tensor]):
    """A clone of ComfyUI ``model`` with a kohya-layout LoRA state dict applied (as LoraLoaderModelOnly does)."""
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    patches = comfy.lora.load_lora(lora, key_map, log_missing=True)
    if not patches:
        raise ValueError("The refinement LoRA matches no weight of this model; learn it with the same checkpoint.")
    patched = model.clone()
    patched.add_patches(patches, 1.0)
    return patched
