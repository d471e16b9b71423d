"""DiffusionBundle: the Stable Diffusion parts ICE needs, loaded from local files only.

Supported: SD 1.x (CLIP-L text encoder, 768-d, epsilon) and SD 2.x (OpenCLIP-H text encoder, 1024-d,
epsilon or v-prediction). Single-file checkpoints are read with the configs shipped in
``ice_ops/configs``; diffusers folders with ``local_files_only=True``. Nothing is ever downloaded.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch

from .files import read_safetensors
from .imaging import resize_image

if TYPE_CHECKING:
    from .shared_weights import WeightPlan

CONFIG_ROOT = os.path.join(os.path.dirname(__file__), "configs")
FAMILY_BY_TEXT_WIDTH = {768: "sd1", 1024: "sd2"}
PREDICTION_TYPES = ("epsilon", "v_prediction")
SUPPORTED_TEXT = "Stable Diffusion 1.x (768-d text encoder) and 2.x (1024-d text encoder, epsilon or v-prediction)"
# Keys of an original (LDM) single-file checkpoint.
LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."
LDM_CROSS_ATTENTION_KEY = LDM_UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
LDM_LAST_NORM_BIAS_KEY = LDM_UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
# ComfyUI's rule for telling SD 2.x 768-v checkpoints from 512-base ones by their weights.
V_PREDICTION_NORM_STD = 0.09
SD2_V_NATIVE_SAMPLE_SIZE = 96
# Weight files of a diffusers folder: only safetensors are read; these pickle formats are refused by name.
SAFE_WEIGHTS_SUFFIX = ".safetensors"
PICKLE_WEIGHTS_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
WEIGHT_PARTS = ("unet", "vae", "text_encoder")
TEXT_MODEL_PREFIX = "text_model."  # the level transformers 4.x keeps in CLIPTextModel's keys and 5.x drops
TEXT_ENCODER_WEIGHTS = "model.safetensors"


# model_index.json of a diffusers Stable Diffusion folder (what DiffusersLoader and diffusers look for).
STABLE_DIFFUSION_MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "DDPMScheduler"],
}


def write_model_index(folder: str) -> str:
    """Write ``model_index.json`` into a diffusers folder being saved (replacing the folder's own)."""
    from .files import write_bytes_atomic

    payload = json.dumps(STABLE_DIFFUSION_MODEL_INDEX, indent=1).encode("utf-8")
    return write_bytes_atomic(os.path.join(folder, "model_index.json"), payload, overwrite=True)


def unsupported_model_error(what: str) -> ValueError:
    return ValueError(f"Unsupported model: {what}. ICE supports {SUPPORTED_TEXT}; load an SD 1.5 or SD 2.1 checkpoint.")


def read_config(family: str, part: str, config_dir: str | None = None) -> dict:
    """A shipped (or ``config_dir``) JSON config of one part: ``unet``, ``vae``, ``text_encoder``, ``scheduler``."""
    folder = config_dir or os.path.join(CONFIG_ROOT, family)
    path = os.path.join(folder, f"{part}.json")
    if not os.path.isfile(path):
        raise ValueError(f"Missing config {path}; a config folder needs unet.json, vae.json and text_encoder.json.")
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def scheduler_config(prediction_type: str) -> dict:
    config = read_config("sd1", "scheduler")
    config["prediction_type"] = prediction_type
    return config


@dataclass
class DiffusionBundle:
    """UNet, VAE, text encoder, tokenizer and training noise scheduler of one SD model.

    The frozen modules compute in their own dtypes (:func:`frozen_dtypes` by default: fp32 on the CPU, half
    precision on a GPU; :attr:`unet_dtype`, :attr:`vae_dtype`). What ICE learns (token vectors, LoRA) stays fp32.
    """

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    device: torch.device
    family: str
    prediction_type: str

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_components(
        cls,
        unet,
        vae,
        text_encoder,
        tokenizer,
        scheduler=None,
        *,
        prediction_type: str | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | dict[str, torch.dtype] | None = None,
    ) -> "DiffusionBundle":
        """Wrap already-built diffusers/transformers modules (models are put in eval mode and frozen) and move
        them to ``device`` in ``dtype`` (one dtype, or one per part; None keeps the modules' own)."""
        from diffusers import DDPMScheduler

        width = int(text_encoder.config.hidden_size)
        cross = unet.config.cross_attention_dim
        if isinstance(cross, (list, tuple)):
            cross = cross[0]
        if int(cross) != width:
            raise ValueError(
                f"The UNet expects {cross}-d text features but the text encoder gives {width}-d; "
                "load the text encoder that belongs to this checkpoint."
            )
        family = FAMILY_BY_TEXT_WIDTH.get(width, "custom")
        if scheduler is None:
            scheduler = DDPMScheduler.from_config(scheduler_config(prediction_type or "epsilon"))
        prediction = prediction_type or scheduler.config.prediction_type
        if prediction not in PREDICTION_TYPES:
            raise unsupported_model_error(f"prediction type {prediction!r}")
        if prediction != scheduler.config.prediction_type:
            scheduler = DDPMScheduler.from_config({**scheduler.config, "prediction_type": prediction})
        device = torch.device(device) if device is not None else next(unet.parameters()).device
        for module in (unet, vae, text_encoder):
            module.requires_grad_(False)
            module.eval()
        bundle = cls(unet, vae, text_encoder, tokenizer, scheduler, device, family, prediction)
        return bundle.to(device, dtype)

    @classmethod
    def from_pretrained(
        cls, folder: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> "DiffusionBundle":
        """Load a diffusers folder (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``)."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        if not os.path.isdir(folder):
            raise ValueError(f"{folder!r} is not a folder; give a diffusers model folder or use from_single_file.")
        missing = [p for p in ("unet", "vae", "text_encoder", "tokenizer") if not os.path.isdir(os.path.join(folder, p))]
        if missing:
            raise ValueError(
                f"{folder!r} is not a complete diffusers Stable Diffusion folder (missing {', '.join(missing)})."
            )
        for part in WEIGHT_PARTS:
            check_safetensors_weights(os.path.join(folder, part))
        # Without `accelerate`, diffusers' low-memory loading is unavailable and it warns on every load; ask
        # for it only where it works.
        local = dict(local_files_only=True, use_safetensors=True)
        weights = dict(local, low_cpu_mem_usage=_accelerate_available())
        with _reading(folder, "unet"):
            unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **weights)
        with _reading(folder, "vae"):
            vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", **weights)
        with _reading(folder, "text_encoder"), _without_loading_bars():
            text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **local)
        with _reading(folder, "tokenizer"):
            tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True)
        scheduler = None
        if os.path.isdir(os.path.join(folder, "scheduler")):
            with _reading(folder, "scheduler"):
                raw = DDPMScheduler.load_config(folder, subfolder="scheduler", local_files_only=True)
            scheduler = DDPMScheduler.from_config(raw)
        _check_supported(text_encoder)
        return cls.from_components(unet, vae, text_encoder, tokenizer, scheduler, device=device,
                                   dtype=dtype or frozen_dtypes(torch.device(device)))

    @classmethod
    def from_single_file(
        cls,
        path: str,
        *,
        prediction_type: str | None = None,
        config_dir: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> "DiffusionBundle":
        """Load an original-layout SD 1.x / 2.x ``.safetensors`` checkpoint with the shipped configs.

        ``prediction_type`` overrides detection (SD 2.x 768-v checkpoints are recognised the way ComfyUI
        does). ``config_dir`` (a folder with unet/vae/text_encoder JSON configs) loads custom architectures.
        """
        if not path.endswith(SAFE_WEIGHTS_SUFFIX):
            raise ValueError(
                f"{os.path.basename(path)!r} is not a .safetensors file; only safetensors checkpoints are loaded "
                "(pickle files can run code). Convert it to .safetensors first."
            )
        if not os.path.isfile(path):
            raise ValueError(f"Checkpoint {path!r} does not exist.")
        state = read_safetensors(path, "checkpoint")
        return cls.from_ldm_state_dict(
            state, prediction_type=prediction_type, config_dir=config_dir, device=device, dtype=dtype,
            share_tensors=True,  # the state dict was read from the file for this bundle alone
        )

    @classmethod
    def from_ldm_state_dict(
        cls,
        state: dict[str, torch.Tensor],
        *,
        prediction_type: str | None = None,
        config_dir: str | None = None,
        configs: dict[str, dict] | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        share_tensors: bool = False,
    ) -> "DiffusionBundle":
        """Build a bundle from an original (LDM) state dict, as single files and ComfyUI hold them.

        The bundle's weights are copies unless ``share_tensors`` (only for a state dict nobody else uses:
        ComfyUI patches its own weights in place).

        ``configs`` may give the ``unet``, ``vae`` and ``text_encoder`` configs as dicts (e.g. derived from a
        ComfyUI model); parts it leaves out come from ``config_dir`` or the shipped configs."""
        family = detect_family(state)
        prediction = prediction_type or detect_prediction_type(state, family)
        unet, vae, text_encoder = ldm_modules(state, family, prediction, configs or {}, config_dir, share_tensors)
        return cls.from_components(
            unet, vae, text_encoder, ldm_tokenizer(family), ldm_scheduler(prediction), device=device,
            dtype=dtype or frozen_dtypes(torch.device(device)),
        )

    @classmethod
    def borrowing(
        cls,
        state: dict[str, torch.Tensor],
        sources: dict[str, torch.Tensor],
        *,
        prediction_type: str | None = None,
        configs: dict[str, dict] | None = None,
    ) -> tuple["DiffusionBundle", dict[str, "WeightPlan"]]:
        """A bundle whose modules hold no weights: (the bundle on the meta device, a plan per part).

        ``state`` is an original (LDM) state dict whose tensors are those of ``sources`` (another framework's
        loaded modules, by any names) or views of them. Each part's plan says where in ``sources`` its weights
        lie; :meth:`bind` gives the part the current memory of those sources for a while, :meth:`release`
        takes it back. Nothing is copied except weights that lie in no source (the plans' ``owned``)."""
        from .shared_weights import normal_alias, plan_views, release_weights

        state = {key: normal_alias(value) for key, value in state.items()}  # ComfyUI's may be inference tensors
        family = detect_family(state)
        prediction = prediction_type or detect_prediction_type(state, family)
        modules = ldm_modules(state, family, prediction, configs or {}, None, share_tensors=True)
        plans = {}
        for part, module in zip(WEIGHT_PARTS, modules):
            plans[part] = plan_views(module, sources)
            release_weights(module)
        bundle = cls.from_components(*modules, ldm_tokenizer(family), ldm_scheduler(prediction))
        return bundle, plans

    def bind(self, plans: dict[str, "WeightPlan"], sources: dict[str, torch.Tensor], parts: Sequence[str], *,
             device: torch.device, dtypes: dict[str, torch.dtype]) -> int:
        """Give ``parts`` of a :meth:`borrowing` bundle the current memory of ``sources`` on ``device`` (each part
        in ``dtypes[part]``); returns the bytes that had to be copied instead (sources elsewhere or in another
        dtype, and owned tensors)."""
        from .shared_weights import bind_weights

        copied = 0
        for part in parts:
            copied += bind_weights(self.part(part), plans[part], sources, device=device, dtype=dtypes[part])
        self.device = torch.device(device)
        return copied

    def release(self) -> None:
        """Leave every part of a :meth:`borrowing` bundle without weights again (meta device)."""
        from .shared_weights import release_weights

        for part in WEIGHT_PARTS:
            release_weights(self.part(part))

    def part(self, name: str):
        """The ``unet``, ``vae`` or ``text_encoder`` module."""
        if name not in WEIGHT_PARTS:
            raise ValueError(f"Unknown model part {name!r}; choose one of {', '.join(WEIGHT_PARTS)}.")
        return getattr(self, name)

    def to(self, device: str | torch.device | None = None,
           dtype: torch.dtype | dict[str, torch.dtype] | None = None) -> "DiffusionBundle":
        """Move every model (in place) and return self. ``dtype``: one for every part, or one per part name."""
        self.device = torch.device(device) if device is not None else self.device
        dtypes = dtype if isinstance(dtype, dict) else dict.fromkeys(WEIGHT_PARTS, dtype)
        for part in WEIGHT_PARTS:
            module = self.part(part)
            current = next(module.parameters())
            if current.device != self.device:
                module.to(self.device)
            if dtypes.get(part) is not None and current.dtype != dtypes[part]:
                module.to(dtype=dtypes[part])
        return self

    # ------------------------------------------------------------------ sizes derived from configs
    @property
    def vae_scale_factor(self) -> int:
        return downsampling(self.vae.config)

    @property
    def latent_scaling(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def unet_downsampling(self) -> int:
        return downsampling(self.unet.config)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this (64 for Stable Diffusion)."""
        return size_multiple(self.unet.config, self.vae.config)

    @property
    def native_resolution(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def unet_dtype(self) -> torch.dtype:
        """What the UNet computes in (its inputs are cast to it)."""
        return next(self.unet.parameters()).dtype

    @property
    def vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @property
    def text_width(self) -> int:
        return int(self.text_encoder.config.hidden_size)

    @property
    def max_length(self) -> int:
        return int(min(self.tokenizer.model_max_length, self.text_encoder.config.max_position_embeddings))

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    # ------------------------------------------------------------------ encoders
    def prepare_image(self, image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """``[3, H, W]`` in 0..1 -> ``[1, 3, h, w]`` in -1..1 at ``size`` on the bundle's device."""
        resized = resize_image(image.float(), size)
        return (resized * 2 - 1)[None].to(self.device, self.vae_dtype)

    @torch.no_grad()
    def encode_image(self, image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Scaled posterior mean latent ``[1, C, h, w]`` of an image (no sampling)."""
        posterior = self.vae.encode(self.prepare_image(image, size)).latent_dist
        return posterior.mean * self.latent_scaling

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """``[B, C, h, w]`` latents -> ``[B, 3, H, W]`` images in 0..1."""
        decoded = self.vae.decode(latents.to(self.device, self.vae_dtype) / self.latent_scaling).sample
        return ((decoded.float() + 1) / 2).clamp(0, 1)

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token ids ``[B, max_length]`` padded the way the model was trained."""
        ids = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        ).input_ids
        return ids.to(self.device)

    def encode_prompt(self, prompts: Sequence[str]) -> torch.Tensor:
        """Last hidden states ``[B, L, D]`` of the text encoder (the UNet's cross-attention context)."""
        with torch.no_grad():
            return self.text_encoder(self.tokenize(prompts))[0]


def frozen_dtype(device: torch.device) -> torch.dtype:
    """The dtype the frozen UNet is kept and run in: bf16 on CUDA GPUs that support it, fp16 on other CUDA
    GPUs (half the memory of fp32, and what their tensor cores compute in), fp32 elsewhere (CPU kernels are
    fastest and exact in fp32)."""
    if torch.device(device).type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def frozen_dtypes(device: torch.device) -> dict[str, torch.dtype]:
    """The dtype of each frozen part on ``device``: the UNet's :func:`frozen_dtype`; on a GPU the text encoder
    in fp16 (as ComfyUI keeps it; the fingerprint of concept sets, taken at fp16, then matches exactly) and
    the VAE in bf16, or fp32 where bf16 is missing (SD VAEs overflow in fp16)."""
    unet = frozen_dtype(device)
    if unet == torch.float32:
        return dict.fromkeys(WEIGHT_PARTS, unet)
    return {"unet": unet, "text_encoder": torch.float16, "vae": unet if unet == torch.bfloat16 else torch.float32}


def ldm_modules(state: dict[str, torch.Tensor], family: str, prediction: str, configs: dict[str, dict],
                config_dir: str | None, share_tensors: bool):
    """(UNet, VAE, text encoder) built from an original (LDM) state dict. With ``share_tensors`` the modules
    hold the state's tensors (or views of them) instead of copies."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    if prediction not in PREDICTION_TYPES:
        raise unsupported_model_error(f"prediction type {prediction!r}")
    unet_config = dict(configs.get("unet") or read_config(family, "unet", config_dir))
    if family == "sd2" and prediction == "v_prediction" and config_dir is None and "unet" not in configs:
        unet_config["sample_size"] = SD2_V_NATIVE_SAMPLE_SIZE
    vae_config = dict(configs.get("vae") or read_config(family, "vae", config_dir))
    text_config = dict(configs.get("text_encoder") or read_config(family, "text_encoder", config_dir))

    def convert_unet(checkpoint: dict, model) -> dict:
        return convert_ldm_unet_checkpoint(checkpoint, model.config)

    def convert_vae(checkpoint: dict, model) -> dict:
        return convert_ldm_vae_checkpoint(checkpoint, model.config)

    unet = _build_and_load(UNet2DConditionModel.from_config, unet_config, convert_unet, state, "UNet", share_tensors)
    vae = _build_and_load(AutoencoderKL.from_config, vae_config, convert_vae, state, "VAE", share_tensors)

    def build_text_encoder(config: dict):
        return CLIPTextModel(CLIPTextConfig(**{k: v for k, v in config.items() if k != "architectures"}))

    def convert_text(checkpoint: dict, model) -> dict:
        if family == "sd1":
            converted = convert_ldm_clip_checkpoint(checkpoint)
        else:
            converted = convert_open_clip_checkpoint(model, checkpoint)
        return _match_text_prefix(model, converted)

    text_encoder = _build_and_load(build_text_encoder, text_config, convert_text, state, "text encoder",
                                   share_tensors, ignore=("position_ids",))
    return unet, vae, text_encoder


def ldm_tokenizer(family: str):
    """The CLIP tokenizer of an SD family, built from the shipped vocabulary (SD 2.x pads with "!")."""
    from .text import END_OF_TEXT, build_clip_tokenizer

    return build_clip_tokenizer(pad_token=END_OF_TEXT if family == "sd1" else "!")


def ldm_scheduler(prediction: str):
    """The training noise scheduler of an SD model with this prediction type."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(scheduler_config(prediction))


def downsampling(config) -> int:
    """How much a UNet or VAE encoder (its config, a dict or a diffusers config) shrinks an image: one halving
    between each pair of its levels."""
    channels = config["block_out_channels"] if isinstance(config, dict) else config.block_out_channels
    return 2 ** (len(channels) - 1)


def size_multiple(unet_config, vae_config) -> int:
    """Image sides must be multiples of this for the model: the VAE's and the UNet's downsampling together
    (64 for Stable Diffusion)."""
    return downsampling(vae_config) * downsampling(unet_config)


def _check_supported(text_encoder) -> None:
    width = int(text_encoder.config.hidden_size)
    if width not in FAMILY_BY_TEXT_WIDTH and width > 1024:
        raise unsupported_model_error(f"a {width}-d text encoder")


def detect_family(state: dict[str, torch.Tensor]) -> str:
    """'sd1' or 'sd2' from an LDM state dict; ``ValueError`` for anything else."""
    if LDM_CROSS_ATTENTION_KEY not in state:
        if any(k.startswith("model.diffusion_model.joint_blocks") for k in state) or any(
            k.startswith("model.diffusion_model.double_blocks") for k in state
        ):
            raise unsupported_model_error("an SD3/Flux-type transformer checkpoint")
        if any(k.startswith("conditioner.embedders.1") for k in state):
            raise unsupported_model_error("an SDXL checkpoint")
        raise unsupported_model_error("this file has no Stable Diffusion UNet in the original layout")
    width = int(state[LDM_CROSS_ATTENTION_KEY].shape[1])
    family = FAMILY_BY_TEXT_WIDTH.get(width)
    if family is None:
        raise unsupported_model_error(f"a UNet with {width}-d cross-attention (SDXL uses 2048)")
    return family


def detect_prediction_type(state: dict[str, torch.Tensor], family: str) -> str:
    """SD 1.x: epsilon. SD 2.x: v-prediction when the checkpoint says so or its last transformer norm
    has the statistics of the 768-v model (ComfyUI's rule); epsilon otherwise."""
    if "v_pred" in state:
        return "v_prediction"
    if family == "sd2" and LDM_LAST_NORM_BIAS_KEY in state:
        bias = state[LDM_LAST_NORM_BIAS_KEY].float()
        if torch.std(bias, unbiased=False) > V_PREDICTION_NORM_STD:
            return "v_prediction"
    return "epsilon"


def _match_text_prefix(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5 dropped the ``text_model.`` level of CLIPTextModel; accept either layout."""
    wants_prefix = any(k.startswith(TEXT_MODEL_PREFIX) for k in model.state_dict())
    out = {}
    for key, value in state.items():
        bare = key[len(TEXT_MODEL_PREFIX) :] if key.startswith(TEXT_MODEL_PREFIX) else key
        out[TEXT_MODEL_PREFIX + bare if wants_prefix else bare] = value
    return out


def save_text_encoder(text_encoder, folder: str) -> str:
    """Save a CLIPTextModel as a folder that transformers 4.x and 5.x both read: its config, and its weights
    under the ``text_model.`` keys 4.x expects (5.x, whose own files drop that level, reads them too)."""
    from safetensors.torch import save_file

    from .files import write_atomic

    os.makedirs(folder, exist_ok=True)
    text_encoder.config.save_pretrained(folder)
    state = {
        TEXT_MODEL_PREFIX + key.removeprefix(TEXT_MODEL_PREFIX): value.detach().cpu().contiguous()
        for key, value in text_encoder.state_dict().items()
        if "position_ids" not in key
    }
    path = os.path.join(folder, TEXT_ENCODER_WEIGHTS)
    return write_atomic(path, lambda temporary: save_file(state, temporary, metadata={"format": "pt"}), overwrite=True)


def _build_and_load(build, config: dict, convert, state: dict, what: str, share_tensors: bool,
                    ignore: Sequence[str] = ()):
    """Build a model with ``build(config)`` on the meta device (no random initialisation of weights that are
    about to be replaced), convert ``state`` for it with ``convert(state, model)`` and assign the tensors.
    Position ids, which checkpoints need not hold, are counted out; anything else left unassigned falls back
    to a normal build and a copy."""
    with torch.device("meta"):
        module = build(config)
    converted = convert(state, module)
    if not share_tensors:
        converted = {key: value.detach().clone() for key, value in converted.items()}
    _load_exact(module, converted, what, ignore, assign=True)
    _fill_position_ids(module)
    if any(t.is_meta for t in list(module.parameters()) + list(module.buffers())):
        module = build(config)
        _load_exact(module, converted, what, ignore)
    return module


def _fill_position_ids(module) -> None:
    """Give a text encoder's unassigned ``position_ids`` buffers their values, 0 .. n-1."""
    for owner in module.modules():
        ids = owner._buffers.get("position_ids")
        if ids is not None and ids.is_meta:
            owner._buffers["position_ids"] = torch.arange(ids.shape[-1]).expand(ids.shape).to(ids.dtype)


def _load_exact(
    module, state: dict[str, torch.Tensor], what: str, ignore: Sequence[str] = (), *, assign: bool = False
) -> None:
    result = module.load_state_dict(state, strict=False, assign=assign)
    missing = [k for k in result.missing_keys if not any(i in k for i in ignore)]
    unexpected = [k for k in result.unexpected_keys if not any(i in k for i in ignore)]
    if missing or unexpected:
        raise ValueError(
            f"The checkpoint's {what} does not match the expected architecture "
            f"({len(missing)} missing weights, e.g. {missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]}). "
            f"ICE supports {SUPPORTED_TEXT}."
        )


# ---------------------------------------------------------------------- reading files
def check_safetensors_weights(folder: str) -> None:
    """``ValueError`` when a diffusers part folder has no ``.safetensors`` weights, naming any pickle file
    found instead (pickle files can run code when loaded; ICE never loads them)."""
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    if any(name.endswith(SAFE_WEIGHTS_SUFFIX) for name in names):
        return
    pickled = [name for name in names if name.endswith(PICKLE_WEIGHTS_SUFFIXES)]
    if pickled:
        raise ValueError(
            f"{os.path.join(folder, pickled[0])!r} is a pickle file; ICE reads only .safetensors weights (pickle "
            "files can run code). Save the model again as safetensors, e.g. with diffusers' "
            "save_pretrained(folder, safe_serialization=True)."
        )
    raise ValueError(f"{folder!r} holds no .safetensors weights; copy the model folder again.")


class _reading:
    """Turn a library's error while reading one part of a diffusers folder into a ``ValueError`` that names
    the part's folder and the fix."""

    def __init__(self, folder: str, part: str) -> None:
        self.where = os.path.join(folder, part)

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, traceback) -> bool:
        from safetensors import SafetensorError

        if error is None or not isinstance(error, (OSError, SafetensorError, ValueError, KeyError, RuntimeError)):
            return False
        raise ValueError(
            f"{self.where!r} cannot be loaded ({type(error).__name__}: {error}). A file in it is damaged or "
            "incomplete: copy the model folder again."
        ) from None


def _accelerate_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("accelerate") is not None


class _without_loading_bars:
    """transformers draws a bar for every weight file it loads (in 5.x); loading a small text encoder should
    leave the user's console as it was, so the bars are off for the load and restored after it."""

    def __enter__(self) -> None:
        from transformers.utils import logging as library_logging

        self.was_enabled = library_logging.is_progress_bar_enabled()
        library_logging.disable_progress_bar()

    def __exit__(self, *exc) -> bool:
        from transformers.utils import logging as library_logging

        if self.was_enabled:
            library_logging.enable_progress_bar()
        return False
