"""ICE's models under ComfyUI's memory management.

A checkpoint loaded by ComfyUI: ICE keeps no weights of its own. Load ICE Model records where each of
the engine's diffusers parameters lies in ComfyUI's MODEL, CLIP and VAE (``DiffusionBundle.borrowing``).
Each ICE node then asks ComfyUI to load the parts it uses (``load_models_gpu``, ComfyUI freeing room by
offloading other models), binds the engine's modules to the memory of those weights (with the user's LoRAs
patched in, in ComfyUI's dtype: fp16/bf16 on a GPU, fp32 on the CPU) and releases them when it ends. So
ICE's weights are ComfyUI's, counted once, and a KSampler after an ICE node finds them already loaded.

A diffusers folder (no ComfyUI model) and the CLIP retriever are ICE's own modules; each is wrapped in a
ComfyUI ``ModelPatcher``, so ComfyUI loads and offloads them like its own models.

ComfyUI runs every node under ``torch.inference_mode()``; engine calls run inside :func:`engine_session`,
where autograd is allowed again.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import weakref
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Sequence

import torch

from . import _adapters as adapters
from ._engine import engine

ALL_PARTS = engine("bundle").WEIGHT_PARTS
TEXT_ONLY = ("text_encoder",)
DIFFUSERS_MODEL_CLASS = "diffusers"  # IceModel.model_class of models loaded from a diffusers folder
# Source-name prefixes of the ComfyUI modules a borrowing bundle reads its weights from.
COMFY_SOURCES = {"unet": "model/", "text_encoder": "clip/", "vae": "vae/"}
COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
GLIBC = "libc.so.6"


@dataclass
class IceModel:
    """What travels on an ICE_MODEL socket: the engine bundle, its parts' owner (:class:`BorrowedParts` for a
    checkpoint loaded by ComfyUI, :class:`OwnedParts` for a diffusers folder), and the ComfyUI MODEL it came
    from (LoRA refinement is applied to a clone of it; None for a diffusers folder)."""

    bundle: Any
    parts: Any
    model: Any | None
    family: str
    model_class: str


@dataclass
class BorrowedParts:
    """The ComfyUI MODEL, CLIP and VAE whose weights a borrowing bundle uses, and where each lies."""

    model: Any
    clip: Any
    vae: Any
    plans: dict
    # ICE computes with the weights themselves, so ComfyUI must patch the user's LoRAs into them when it loads
    patch_weights: ClassVar[bool] = True

    def patchers(self, parts: Sequence[str]) -> list:
        by_part = {"unet": self.model, "text_encoder": self.clip.patcher, "vae": self.vae.patcher}
        return [by_part[part] for part in parts]

    def modules(self) -> dict[str, torch.nn.Module]:
        """ComfyUI's modules per part: the model (its UNet inside), the text encoder and the VAE."""
        return {"unet": self.model.model, "text_encoder": self.clip.cond_stage_model, "vae": self.vae.first_stage_model}

    def sources(self) -> dict[str, torch.Tensor]:
        """Every current tensor of ComfyUI's modules, by part prefix and name."""
        shared = engine("shared_weights")
        return {COMFY_SOURCES[part] + name: tensor
                for part, module in self.modules().items() for name, tensor in shared.module_tensors(module).items()}

    def compute_dtypes(self, device: torch.device) -> dict[str, torch.dtype]:
        """The dtype each part computes in. On the CPU fp32 (ComfyUI keeps the text encoder in fp16 there and
        computes it in fp32; ICE does the same from a copy made for the node's run). On a GPU the dtype of
        ComfyUI's weights, shared as they are, or the model's cast dtype when ComfyUI stores them in a format
        modules cannot compute in (fp8)."""
        if torch.device(device).type == "cpu":
            return dict.fromkeys(ALL_PARTS, torch.float32)
        dtypes = {}
        for part, module in self.modules().items():
            stored = _common_floating_dtype(module)
            cast = getattr(module, "manual_cast_dtype", None)
            dtypes[part] = stored if stored in COMPUTE_DTYPES else (cast or torch.float32)
        return dtypes

    @contextlib.contextmanager
    def ready(self, bundle, parts: Sequence[str], device: torch.device) -> Iterator[None]:
        try:
            bundle.bind(self.plans, self.sources(), parts, device=device, dtypes=self.compute_dtypes(device))
            yield
        finally:
            bundle.release()


@dataclass
class OwnedParts:
    """A bundle that holds its own weights, each part wrapped in a ComfyUI ModelPatcher."""

    by_part: dict
    patch_weights: ClassVar[bool] = False  # nothing is ever patched into them

    def patchers(self, parts: Sequence[str]) -> list:
        return [self.by_part[part] for part in parts]

    @contextlib.contextmanager
    def ready(self, bundle, parts: Sequence[str], device: torch.device) -> Iterator[None]:
        bundle.device = device
        yield


def bundle_from_comfy(model, clip, vae, working_resolution: int = 0) -> IceModel:
    """An ICE_MODEL that borrows the weights of ComfyUI's MODEL, CLIP and VAE (nothing is copied).

    The engine's configs come from ComfyUI's detected model; ``working_resolution`` (pixels, 0 = the model's
    native one) sets the bundle's native resolution, which the engine works at. ComfyUI's objects are not
    modified."""
    family, name = adapters.model_family(model)
    adapters.check_clip(clip, family)
    prediction = adapters.prediction_type(model)
    bundle_module = engine("bundle")
    configs = {part: bundle_module.read_config(family, part) for part in ALL_PARTS}
    native = bundle_module.SD2_V_NATIVE_SAMPLE_SIZE if prediction == "v_prediction" else configs["unet"]["sample_size"]
    configs["unet"] = adapters.diffusers_unet_config(model.model.model_config.unet_config, configs["unet"], native)
    if working_resolution:
        configs["unet"]["sample_size"] = adapters.sample_size_for(working_resolution, configs["unet"], configs["vae"])
    parts = BorrowedParts(model, clip, vae, plans={})
    state = model.model.state_dict_for_saving(clip.get_sd(), vae.get_sd())
    with torch.inference_mode(False):
        bundle, parts.plans = bundle_module.DiffusionBundle.borrowing(
            state, parts.sources(), prediction_type=prediction, configs=configs
        )
    return IceModel(bundle=bundle, parts=parts, model=model, family=family, model_class=name)


def bundle_from_diffusers(folder: str) -> IceModel:
    """An ICE_MODEL from a diffusers folder, its parts ComfyUI-managed models kept in the dtype ICE computes
    in on ComfyUI's device. It has no ComfyUI MODEL, so its images are sampled with the Generate Image node,
    and LoRA refinement cannot hand back a MODEL."""
    import comfy.model_management as management

    load_device = management.get_torch_device()
    offload_device = management.unet_offload_device()
    with torch.inference_mode(False):
        bundle = engine("bundle").DiffusionBundle.from_pretrained(
            folder, device=offload_device, dtype=engine("bundle").frozen_dtypes(load_device)
        )
    parts = OwnedParts({part: managed(bundle.part(part), load_device, offload_device) for part in ALL_PARTS})
    return IceModel(bundle=bundle, parts=parts, model=None, family=bundle.family, model_class=DIFFUSERS_MODEL_CLASS)


class ManagedPart(torch.nn.Module):
    """Holds one of ICE's own modules for a ComfyUI ModelPatcher, which writes bookkeeping attributes such as
    ``device`` onto the module it manages (diffusers and transformers models have a read-only ``device``)."""

    def __init__(self, part: torch.nn.Module) -> None:
        super().__init__()
        self.part = part


def managed(module: torch.nn.Module, load_device, offload_device):
    """A ComfyUI ModelPatcher around one of ICE's own modules."""
    import comfy.model_patcher

    return comfy.model_patcher.ModelPatcher(ManagedPart(module), load_device=load_device, offload_device=offload_device)


_RETRIEVER_PATCHERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def retriever_patcher(retriever):
    """The ModelPatcher of a retriever's CLIP model: one per retriever, so ComfyUI counts it once, and kept only
    as long as the retriever (ComfyUI itself holds loaded models weakly)."""
    import comfy.model_management as management

    if retriever not in _RETRIEVER_PATCHERS:
        _RETRIEVER_PATCHERS[retriever] = managed(
            retriever.model, management.get_torch_device(), management.unet_offload_device()
        )
    return _RETRIEVER_PATCHERS[retriever]


@contextlib.contextmanager
def engine_session(ice_model: IceModel | None = None, parts: Sequence[str] = ALL_PARTS,
                   retriever=None) -> Iterator[None]:
    """Run engine code inside a node: ComfyUI loads the ``parts`` of ``ice_model`` this node uses (and the
    retriever) onto its device, freeing room by offloading other models; autograd is allowed (ComfyUI runs
    nodes in inference mode). Borrowed weights are given back when the block ends, also on cancel."""
    import comfy.model_management as management

    device = management.get_torch_device()
    patchers = list(ice_model.parts.patchers(parts)) if ice_model is not None else []
    if retriever is not None:
        patchers.append(retriever_patcher(retriever))
    patch_weights = ice_model is not None and ice_model.parts.patch_weights
    management.load_models_gpu(patchers, force_patch_weights=patch_weights, force_full_load=True)
    ready = contextlib.nullcontext() if ice_model is None else ice_model.parts.ready(ice_model.bundle, parts, device)
    try:
        with ready, torch.inference_mode(False), torch.enable_grad():
            if retriever is not None:
                retriever.to(device)  # the model is there already; this moves its word table
            yield
    finally:
        management.soft_empty_cache()
        return_freed_host_memory()


def return_freed_host_memory() -> None:
    """Hand the memory a node freed back to the operating system. glibc keeps freed blocks below its mmap
    threshold in the process heap, and a training step frees gigabytes of activations in such blocks:
    measured with a full-size SD 1.5 on the CPU, 2.2 GB stayed resident after Learn (no tensor alive) and
    KSampler then peaked that much higher. ComfyUI empties the GPU's cache after nodes; this is the same for the
    host. A no-op where the C library is not glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        return ctypes.CDLL(GLIBC).malloc_trim
    except (OSError, AttributeError):
        return None


def _common_floating_dtype(module: torch.nn.Module) -> torch.dtype | None:
    counts: dict[torch.dtype, int] = {}
    for parameter in module.parameters():
        if parameter.is_floating_point():
            counts[parameter.dtype] = counts.get(parameter.dtype, 0) + parameter.numel()
    return max(counts, key=counts.get) if counts else None
