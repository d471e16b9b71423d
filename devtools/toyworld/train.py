"""Train the Toy World models in Stable Diffusion's order: CLIP, then the VAE, then the UNet.

``python -m devtools.toyworld.train --out DIR --device cpu|cuda`` writes ``DIR/diffusers`` (a diffusers
Stable Diffusion folder that ``DiffusionBundle.from_pretrained`` loads), ``DIR/open_clip_config.json`` +
``DIR/open_clip.safetensors`` (``ClipRetriever.from_pretrained`` loads them) and ``DIR/MODEL_CARD.md``.

The CLIP text tower is trained contrastively, then frozen and exported as the pipeline's
``CLIPTextModel``; the UNet learns epsilon prediction on SD's DDPM schedule with 10 % empty captions.
Every stage stops at its step count or its time budget, whichever comes first, and the card records what
was reached. Nothing is downloaded: the tokenizer is built from open_clip's shipped BPE file.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ice_ops.files import write_bytes_atomic
from ice_ops.text import build_clip_tokenizer
from ice_ops.toyworld.scenes import (
    COLOURS, HELD_OUT_SEED_OFFSET, MATERIALS, MAX_OBJECTS, SHAPES, VALIDATION_SEED_OFFSET, make_scene, validation_seed,
)
from .supervision import (
    EMPTY_CAPTION, SUPERVISED_TIMESTEP_FRACTION, AttentionLosses, Caption, SupervisionTargets, attention_probe, install_supervision,
    phrase_caption, remove_supervision, stage_one_caption,
)

SCENE_SIZE = 64
TEXT_CONTEXT = 77
PAD_TOKEN = "!"  # open_clip pads with id 0, which is "!" (as in SD 2.x)
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
RETRIEVER_TEMPLATE = "a photo of a {}."  # ClipRetriever's default template

# One CLIP for both roles, as in Stable Diffusion: its image and text towers rank words for Stage One (the
# retriever) and its frozen text tower is the UNet's text encoder. A small ResNet image tower: on a 2-core
# CPU a ViT of the same budget learns colours in minutes but shapes only slowly (zero-shot shape 0.36 after
# 11 minutes), a convolutional tower reaches 0.98.
CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": SCENE_SIZE, "layers": [1, 1, 1, 1], "width": 32, "head_width": 32},
    "text_cfg": {"context_length": TEXT_CONTEXT, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [32, 64, 64],
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "layers_per_block": 1,
    "norm_num_groups": 16,
    "sample_size": SCENE_SIZE,
}
UNET_CONFIG = {
    "sample_size": SCENE_SIZE // 4,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [64, 128, 128],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": CLIP_CONFIG["text_cfg"]["width"],
    "attention_head_dim": 4,  # diffusers reads this as the number of heads
    "norm_num_groups": 32,
}
CAPTION_DROPOUT = 0.1  # SD's unconditional share
STAGE_ONE_CAPTION_SHARE = 0.3  # captions in Stage One's prompt form "<shape> things background"
SINGLE_PHRASE_SHARE = 0.15  # captions naming one object of the scene
BLANKED_SHARE = 0.3  # training images with some objects painted black, as Stage One sees later iterations
VAE_KL_WEIGHT = 1e-6  # LDM's KL-f autoencoders
WARMUP_STEPS = 50
# Toy World captions need at most 21 tokens with start and end; the towers are causal, so training on the
# first TRAIN_TEXT_LENGTH positions gives the same features as the full context at a third of the cost.
TRAIN_TEXT_LENGTH = 24
LOG_EVERY = 10


@dataclass
class Plan:
    seed: int = 0
    scenes: int = 8000
    clip_steps: int = 3000
    clip_minutes: float = 35.0
    clip_batch: int = 64
    clip_lr: float = 1e-3
    vae_steps: int = 4000
    vae_minutes: float = 10.0
    vae_batch: int = 32
    vae_lr: float = 1e-3
    unet_steps: int = 20000
    unet_minutes: float = 45.0
    unet_batch: int = 32
    unet_lr: float = 3e-4
    # Attention supervision on the training scenes (devtools.toyworld.supervision); 0 turns a term off.
    cross_attention_weight: float = 1.0
    self_attention_weight: float = 0.3
    # Every probe_every UNet steps the pointing probe runs on probe_scenes validation scenes; the best
    # checkpoint by its IoU is the one written.
    probe_every: int = 300
    probe_scenes: int = 64


# --------------------------------------------------------------------------------------------- data
@dataclass
class Dataset:
    images: torch.Tensor  # uint8 [N, 3, H, W]
    masks: torch.Tensor  # bool [N, MAX, H, W]
    attributes: list[list[tuple[str, str, str]]]  # per scene: (shape, colour, material) per object

    def floats(self, index: torch.Tensor) -> torch.Tensor:
        return self.images[index].float() / 255.0


def build_dataset(count: int, first_seed: int, size: int = SCENE_SIZE) -> Dataset:
    images, masks, attributes = [], [], []
    for seed in range(first_seed, first_seed + count):
        scene = make_scene(seed, size)
        images.append((scene.image * 255).round().to(torch.uint8))
        padded = torch.zeros(MAX_OBJECTS, size, size, dtype=torch.bool)
        padded[: len(scene.objects)] = scene.masks
        masks.append(padded)
        attributes.append([(o.shape, o.colour, o.material) for o in scene.objects])
    return Dataset(torch.stack(images), torch.stack(masks), attributes)


def training_first_seed(plan: Plan) -> int:
    """First scene seed of ``plan``'s training range (``plan.scenes`` consecutive seeds)."""
    first = plan.seed * plan.scenes
    if first + plan.scenes > min(VALIDATION_SEED_OFFSET, HELD_OUT_SEED_OFFSET):
        raise ValueError(
            f"--seed {plan.seed} with --scenes {plan.scenes} reaches the validation and held-out seed ranges; "
            "use a smaller --seed."
        )
    return first


def blanked_variant(data: Dataset, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage One blanks what it has explained: for every scene with several objects, a copy with a random
    non-empty proper subset of them painted black. Returns (uint8 images, bool ``[N, MAX]`` objects kept)."""
    images = data.images.clone()
    kept = torch.zeros(len(data.images), MAX_OBJECTS, dtype=torch.bool)
    for row, objects in enumerate(data.attributes):
        count = len(objects)
        kept[row, :count] = True
        if count > 1:
            drop = rng.choice(count, size=int(rng.integers(1, count)), replace=False)
            for d in drop.tolist():
                kept[row, d] = False
                images[row][:, data.masks[row, d]] = 0
    return images, kept


def clip_caption(objects: list[tuple[str, str, str]], rng: np.random.Generator) -> str:
    """A caption of ``objects`` for contrastive training: the retriever's template with one shape (half
    the time), Stage One's prompt form, or the objects' phrases, often naming the background."""
    draw = rng.random()
    if draw < 0.5:
        return RETRIEVER_TEMPLATE.format(objects[0][0])
    if draw < 0.6:
        return stage_one_caption(0, objects[0][0]).text
    regions = list(enumerate(objects))
    return phrase_caption(regions, photo=rng.random() < 0.25, background=rng.random() < 0.5).text


def clip_batch(data: Dataset, index: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, list[str]]:
    """Images with some objects blanked to black (as Stage One blanks explained regions) and a caption
    of what is left."""
    images = data.floats(index)
    captions = []
    for row, scene_index in enumerate(index.tolist()):
        objects = list(data.attributes[scene_index])
        keep = list(range(len(objects)))
        if len(objects) > 1 and rng.random() < 0.3:
            drop = rng.choice(keep, size=int(rng.integers(1, len(objects))), replace=False)
            for d in drop:
                images[row][:, data.masks[scene_index, d]] = 0.0
            keep = [k for k in keep if k not in set(drop.tolist())]
        kept = [objects[k] for k in keep]
        rng.shuffle(kept)
        captions.append(clip_caption(kept, rng))
    return images, captions


def unet_caption(objects: list[tuple[str, str, str]], present: list[int], rng: np.random.Generator) -> Caption:
    """A training caption for the objects whose indices are in ``present``, with the region of each word:
    empty (SD's unconditional share), Stage One's prompt for one object, one object's phrase, or all of them
    in random order, often with "a photo of" and "on a textured background"."""
    draw = rng.random()
    if draw < CAPTION_DROPOUT:
        return EMPTY_CAPTION
    if draw < CAPTION_DROPOUT + STAGE_ONE_CAPTION_SHARE:
        region = int(rng.choice(present))
        return stage_one_caption(region, objects[region][0])
    if draw < CAPTION_DROPOUT + STAGE_ONE_CAPTION_SHARE + SINGLE_PHRASE_SHARE:
        region = int(rng.choice(present))
        return phrase_caption([(region, objects[region])], photo=False, background=rng.random() < 0.5)
    order = list(present)
    rng.shuffle(order)
    return phrase_caption([(r, objects[r]) for r in order], photo=rng.random() < 0.25, background=rng.random() < 0.5)


# --------------------------------------------------------------------------------------------- schedule
class Budget:
    """Progress in 0..1 from steps and wall time, whichever runs out first."""

    def __init__(self, steps: int, minutes: float):
        self.steps, self.seconds, self.start = steps, minutes * 60.0, time.time()
        self.step = 0

    @property
    def progress(self) -> float:
        return min(1.0, max(self.step / self.steps, (time.time() - self.start) / self.seconds))

    def done(self) -> bool:
        return self.progress >= 1.0

    def lr_factor(self) -> float:
        warm = min(1.0, (self.step + 1) / WARMUP_STEPS)
        return warm * 0.5 * (1 + math.cos(math.pi * self.progress))

    @property
    def elapsed(self) -> float:
        return time.time() - self.start


def _set_lr(optimizer, base: float, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = base * factor


def _update(optimizer, loss: torch.Tensor, budget: Budget, base_lr: float, label: str,
            clip_parameters=None) -> None:
    """One optimiser step at the schedule's learning rate (gradients clipped to norm 1 when
    ``clip_parameters`` are given), then the budget's step count and the periodic log line."""
    _set_lr(optimizer, base_lr, budget.lr_factor())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_parameters is not None:
        torch.nn.utils.clip_grad_norm_(clip_parameters, 1.0)
    optimizer.step()
    budget.step += 1
    if budget.step % LOG_EVERY == 0:
        _log(f"{label} step {budget.step} loss {loss.item():.4f} progress {budget.progress:.2f}")


def _log(message: str) -> None:
    sys.stderr.write(f"{time.strftime('%H:%M:%S')} {message}\n")
    sys.stderr.flush()


def _normalise(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGE_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


# --------------------------------------------------------------------------------------------- CLIP
def build_clip(config: dict = CLIP_CONFIG):
    import open_clip

    return open_clip.CLIP(**json.loads(json.dumps(config)))


def clip_tokenizer():
    import open_clip

    return open_clip.SimpleTokenizer(context_length=TEXT_CONTEXT)


def load_clip(folder: str, config: dict = CLIP_CONFIG) -> torch.nn.Module:
    """The CLIP saved by :func:`write_clip` in ``folder`` (fp32)."""
    from safetensors.torch import load_file

    saved = json.loads(open(os.path.join(folder, "open_clip_config.json"), encoding="utf-8").read())["model_cfg"]
    if saved != json.loads(json.dumps(config)):
        raise ValueError(f"The CLIP in {folder!r} has another architecture than train.CLIP_CONFIG; train a new one.")
    model = build_clip(config)
    model.load_state_dict({k: v.float() for k, v in load_file(os.path.join(folder, "open_clip.safetensors")).items()})
    return model


def train_clip(data: Dataset, plan: Plan, device: torch.device, config: dict = CLIP_CONFIG,
               init: torch.nn.Module | None = None) -> tuple[torch.nn.Module, dict]:
    """Contrastive training of a fresh CLIP (or further training of ``init``)."""
    torch.manual_seed(plan.seed)
    rng = np.random.default_rng(plan.seed)
    model = (init if init is not None else build_clip(config)).to(device).train()
    tokenizer = clip_tokenizer()
    optimizer = torch.optim.AdamW(model.parameters(), lr=plan.clip_lr, weight_decay=0.1, betas=(0.9, 0.98))
    budget = Budget(plan.clip_steps, plan.clip_minutes)
    generator = torch.Generator().manual_seed(plan.seed)
    while not budget.done():
        index = torch.randint(len(data.images), (plan.clip_batch,), generator=generator)
        images, captions = clip_batch(data, index, rng)
        image_features = model.encode_image(_normalise(images.to(device)), normalize=True)
        text_features = encode_text_prefix(model, tokenizer(captions).to(device), TRAIN_TEXT_LENGTH)
        logits = model.logit_scale.exp() * image_features @ text_features.T
        target = torch.arange(len(captions), device=device)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        _update(optimizer, loss, budget, plan.clip_lr, "clip")
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
    model.eval()
    return model, {"clip_steps": budget.step, "clip_seconds": round(budget.elapsed), "clip_final_loss": round(loss.item(), 4)}


def encode_text_prefix(model, ids: torch.Tensor, length: int) -> torch.Tensor:
    """open_clip's normalised text features computed on the first ``length`` tokens (causal, so exact when
    every end token lies inside them)."""
    if bool((ids[:, length:] != 0).any()):
        raise ValueError(f"A caption is longer than {length} tokens; raise TRAIN_TEXT_LENGTH.")
    ids = ids[:, :length]
    x = model.token_embedding(ids) + model.positional_embedding[:length]
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))
    pooled = x[torch.arange(len(ids)), ids.argmax(dim=-1)] @ model.text_projection
    return F.normalize(pooled, dim=-1)


@torch.no_grad()
def clip_zero_shot(model, device: torch.device, count: int = 300) -> dict:
    """Top-1 accuracy on held-out single-object scenes for shape (retriever template) and colour."""
    tokenizer = clip_tokenizer()
    scenes = [make_scene(10**8 + i, count=1) for i in range(count)]
    images = torch.stack([s.image for s in scenes]).to(device)
    features = model.encode_image(_normalise(images), normalize=True)
    shape_text = model.encode_text(tokenizer([RETRIEVER_TEMPLATE.format(s) for s in SHAPES]).to(device), normalize=True)
    shape_pick = (features @ shape_text.T).argmax(1).cpu()
    shape_acc = float(np.mean([SHAPES[int(p)] == s.words[0] for p, s in zip(shape_pick, scenes)]))
    colour_names = list(COLOURS)
    prompts = [f"a {c} {s.materials[0]} {s.words[0]}" for s in scenes for c in colour_names]
    text = model.encode_text(tokenizer(prompts).to(device), normalize=True).view(count, len(colour_names), -1)
    picks = torch.einsum("nd,ncd->nc", features, text).argmax(1).cpu()
    correct = sum(colour_names[int(p)] == s.colours[0] for p, s in zip(picks, scenes))
    return {"clip_zero_shot_shape": round(shape_acc, 3), "clip_zero_shot_colour": round(correct / count, 3)}


def open_clip_text_to_transformers(model, config: dict = CLIP_CONFIG):
    """The open_clip text tower as a transformers ``CLIPTextModel`` (same hidden states)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    text_cfg = config["text_cfg"]
    width = text_cfg["width"]
    config = CLIPTextConfig(
        vocab_size=text_cfg["vocab_size"],
        hidden_size=width,
        intermediate_size=width * 4,  # open_clip's default mlp_ratio
        num_hidden_layers=text_cfg["layers"],
        num_attention_heads=text_cfg["heads"],
        max_position_embeddings=text_cfg["context_length"],
        hidden_act="gelu",  # open_clip uses exact GELU unless quick_gelu is set
        layer_norm_eps=1e-5,
        projection_dim=config["embed_dim"],
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=0,
    )
    encoder = CLIPTextModel(config)
    source = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    state = {
        "text_model.embeddings.token_embedding.weight": source["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": source["positional_embedding"],
        "text_model.final_layer_norm.weight": source["ln_final.weight"],
        "text_model.final_layer_norm.bias": source["ln_final.bias"],
    }
    pairs = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
             "attn.out_proj": "self_attn.out_proj"}
    for layer in range(text_cfg["layers"]):
        src = f"transformer.resblocks.{layer}."
        dst = f"text_model.encoder.layers.{layer}."
        for old, new in pairs.items():
            for kind in ("weight", "bias"):
                state[f"{dst}{new}.{kind}"] = source[f"{src}{old}.{kind}"]
        for kind in ("weight", "bias"):
            q, k, v = source[f"{src}attn.in_proj_{kind}"].chunk(3, dim=0)
            state[f"{dst}self_attn.q_proj.{kind}"] = q
            state[f"{dst}self_attn.k_proj.{kind}"] = k
            state[f"{dst}self_attn.v_proj.{kind}"] = v
    expected = set(encoder.state_dict())
    if "embeddings.token_embedding.weight" in expected:  # transformers 5 drops the text_model. prefix
        state = {key.removeprefix("text_model."): value for key, value in state.items()}
    unknown = set(state) - expected
    missing = {k for k in expected - set(state) if not k.endswith("position_ids")}
    if unknown or missing:
        raise ValueError(f"open_clip -> CLIPTextModel mapping incomplete: missing {sorted(missing)}, unknown {sorted(unknown)}")
    encoder.load_state_dict(state, strict=False)
    return encoder.eval()


@torch.no_grad()
def text_tower_difference(model, encoder, prompts: list[str]) -> float:
    """Largest absolute difference of the final hidden states of both towers on ``prompts``."""
    ids = clip_tokenizer()(prompts)
    x = model.token_embedding(ids) + model.positional_embedding
    x = model.transformer(x, attn_mask=model.attn_mask)
    reference = model.ln_final(x)
    ours = encoder(ids)[0]
    return float((reference - ours).abs().max())


# --------------------------------------------------------------------------------------------- VAE
def train_vae(data: Dataset, plan: Plan, device: torch.device):
    from diffusers import AutoencoderKL

    torch.manual_seed(plan.seed + 1)
    vae = AutoencoderKL.from_config(VAE_CONFIG).to(device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=plan.vae_lr, weight_decay=0.0)
    budget = Budget(plan.vae_steps, plan.vae_minutes)
    generator = torch.Generator().manual_seed(plan.seed + 1)
    while not budget.done():
        index = torch.randint(len(data.images), (plan.vae_batch,), generator=generator)
        pixels = data.floats(index).to(device) * 2 - 1
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(reconstruction, pixels) + VAE_KL_WEIGHT * posterior.kl().mean()
        _update(optimizer, loss, budget, plan.vae_lr, "vae", clip_parameters=vae.parameters())
    vae.eval()
    held_out = torch.stack([make_scene(2 * 10**8 + i).image for i in range(64)]).to(device) * 2 - 1
    with torch.no_grad():
        latents = vae.encode(held_out).latent_dist.mean
        reconstruction = vae.decode(latents).sample.clamp(-1, 1)
    mse = F.mse_loss((reconstruction + 1) / 2, (held_out + 1) / 2).item()
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    return vae, {"vae_steps": budget.step, "vae_seconds": round(budget.elapsed),
                 "vae_psnr_db": round(10 * math.log10(1.0 / mse), 2), "vae_scaling_factor": round(scaling, 5)}


# --------------------------------------------------------------------------------------------- UNet
@torch.no_grad()
def encode_images(vae, images: torch.Tensor, device: torch.device, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and standard deviations of uint8 ``images``."""
    means, stds = [], []
    for start in range(0, len(images), batch):
        pixels = images[start:start + batch].float().to(device) / 255.0 * 2 - 1
        posterior = vae.encode(pixels).latent_dist
        means.append(posterior.mean.cpu())
        stds.append(posterior.std.cpu())
    return torch.cat(means), torch.cat(stds)


def region_stack(masks: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """float ``[B, MAX + 1, H, W]``: the kept objects' masks, then the background (everything else)."""
    objects = (masks & kept[:, :, None, None]).float()
    background = 1.0 - objects.amax(1, keepdim=True)
    return torch.cat([objects, background], dim=1)


@dataclass
class UnetTraining:
    """What one UNet training run needs besides the UNet."""

    data: Dataset
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    device: torch.device


def new_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_config(UNET_CONFIG)


def initialise_unet_from(unet, folder: str) -> dict:
    """Copy every tensor of the diffusers UNet in ``folder`` whose name and shape match (a warm start: a
    text encoder of another width changes only the cross-attention key and value projections)."""
    from safetensors.torch import load_file

    source = load_file(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))
    target = unet.state_dict()
    copied = {k: v.float() for k, v in source.items() if k in target and target[k].shape == v.shape}
    unet.load_state_dict(copied, strict=False)
    return {"unet_init_tensors_copied": len(copied), "unet_init_tensors_new": len(target) - len(copied)}


def validation_scenes(count: int) -> list:
    return [make_scene(validation_seed(i)) for i in range(count)]


def probe_unet(unet, job: UnetTraining, scenes: list) -> dict:
    """The attention probe on ``unet`` as Stage One would use it (plain attention, eval mode)."""
    from ice_ops.bundle import DiffusionBundle

    remove_supervision(unet)
    bundle = DiffusionBundle.from_components(unet, job.vae, job.text_encoder, job.tokenizer, device=job.device)
    result = attention_probe(bundle, scenes)
    unet.requires_grad_(True).train()
    return result


def probe_score(probe: dict) -> float:
    """How well Stage One can use the attention: the better of its two segmentations' IoU."""
    return max(probe["iou_cross_attention"], probe["iou_diffseg"])


def train_unet(job: UnetTraining, plan: Plan, unet=None):
    """Train ``unet`` (a fresh UNET_CONFIG model when None) on the scenes' latents with attention
    supervision; returns the best checkpoint by the probe, its metrics and the probe's curve."""
    from diffusers import DDPMScheduler

    from ice_ops.bundle import scheduler_config

    device, data = job.device, job.data
    torch.manual_seed(plan.seed + 2)
    rng = np.random.default_rng(plan.seed + 2)
    scheduler = DDPMScheduler.from_config(scheduler_config("epsilon"))
    unet = (unet if unet is not None else new_unet()).float().to(device).train().requires_grad_(True)
    job.text_encoder.to(device).eval().requires_grad_(False)
    job.vae.to(device).eval().requires_grad_(False)
    variant_images, variant_kept = blanked_variant(data, rng)
    means, stds = encode_images(job.vae, data.images, device)
    variant_means, variant_stds = encode_images(job.vae, variant_images, device)
    full_kept = data.masks.flatten(2).any(-1)  # [N, MAX]: the scene's objects (padding masks are empty)
    scaling = float(job.vae.config.scaling_factor)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=plan.unet_lr, weight_decay=1e-2)
    budget = Budget(plan.unet_steps, plan.unet_minutes)
    generator = torch.Generator().manual_seed(plan.seed + 2)
    alphas = scheduler.alphas_cumprod.to(device)
    supervised_below = SUPERVISED_TIMESTEP_FRACTION * scheduler.config.num_train_timesteps
    losses = AttentionLosses()
    supervise = plan.cross_attention_weight > 0 or plan.self_attention_weight > 0
    scenes = validation_scenes(plan.probe_scenes)
    curve, best, best_state = [], None, None

    def probe_now() -> None:
        nonlocal best, best_state
        found = {"step": budget.step, "seconds": round(budget.elapsed), **probe_unet(unet, job, scenes)}
        curve.append(found)
        _log(f"probe {json.dumps(found)}")
        if best is None or probe_score(found) > probe_score(best):
            best, best_state = found, {k: v.detach().clone() for k, v in unet.state_dict().items()}

    probe_now()
    if supervise:
        install_supervision(unet, losses, supervise_self=plan.self_attention_weight > 0)
    while not budget.done():
        index = torch.randint(len(data.images), (plan.unet_batch,), generator=generator)
        blanked = torch.from_numpy(rng.random(len(index)) < BLANKED_SHARE)
        mean = torch.where(blanked[:, None, None, None], variant_means[index], means[index])
        std = torch.where(blanked[:, None, None, None], variant_stds[index], stds[index])
        kept = torch.where(blanked[:, None], variant_kept[index], full_kept[index])
        latents = (mean + std * torch.randn(mean.shape, generator=generator)).to(device) * scaling
        captions = [unet_caption(data.attributes[i], torch.nonzero(k).flatten().tolist(), rng)
                    for i, k in zip(index.tolist(), kept)]
        ids = job.tokenizer([c.text for c in captions], padding="max_length", max_length=TEXT_CONTEXT,
                            truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            context = job.text_encoder(ids.to(device))[0]
        noise = torch.randn(latents.shape, generator=generator).to(device)
        steps = torch.randint(0, scheduler.config.num_train_timesteps, (len(index),), generator=generator).to(device)
        alpha = alphas[steps].view(-1, 1, 1, 1)
        noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
        if supervise:
            token_regions = torch.tensor([c.token_regions(TEXT_CONTEXT, background=MAX_OBJECTS) for c in captions])
            weights = ((steps < supervised_below).float().cpu()
                       * torch.tensor([float(bool(c.words)) for c in captions]))
            losses.start(SupervisionTargets(region_stack(data.masks[index], kept).to(device),
                                            token_regions.to(device), weights.to(device)))
        prediction = unet(noisy, steps, encoder_hidden_states=context).sample
        denoising = F.mse_loss(prediction.float(), noise)
        loss = denoising
        if supervise:
            loss = (loss + plan.cross_attention_weight * losses.cross_loss().to(device)
                    + plan.self_attention_weight * losses.self_loss().to(device))
            if budget.step % LOG_EVERY == 0:
                _log(f"unet step {budget.step} denoising {denoising.item():.4f} cross {losses.cross_loss().item():.4f}"
                     f" self {losses.self_loss().item():.4f}")
            losses.start(None)
        _update(optimizer, loss, budget, plan.unet_lr, "unet", clip_parameters=unet.parameters())
        if budget.step % plan.probe_every == 0 or budget.done():
            probe_now()
            if supervise and not budget.done():
                install_supervision(unet, losses, supervise_self=plan.self_attention_weight > 0)
    remove_supervision(unet)
    unet.load_state_dict(best_state)
    unet.eval()
    metrics = {"unet_steps": budget.step, "unet_seconds": round(budget.elapsed),
               "unet_final_loss": round(denoising.item(), 4), "unet_chosen_step": best["step"],
               "probe_pointing": best["pointing"], "probe_iou_cross_attention": best["iou_cross_attention"],
               "probe_iou_diffseg": best["iou_diffseg"]}
    return unet, metrics, curve


# --------------------------------------------------------------------------------------------- output
def write_outputs(out: str, clip_model, text_encoder, vae, unet, tokenizer, metrics: dict, curve: list[dict],
                  plan: Plan, argv: list[str]) -> None:
    from diffusers import DDPMScheduler

    from ice_ops.bundle import save_text_encoder, scheduler_config, write_model_index

    folder = os.path.join(out, "diffusers")
    for name, module in (("unet", unet), ("vae", vae)):
        module.to("cpu", torch.float16).save_pretrained(os.path.join(folder, name), safe_serialization=True)
        module.to(torch.float32)
    save_text_encoder(text_encoder.to("cpu", torch.float16), os.path.join(folder, "text_encoder"))
    text_encoder.to(torch.float32)
    write_tokenizer(os.path.join(folder, "tokenizer"), tokenizer)
    DDPMScheduler.from_config(scheduler_config("epsilon")).save_pretrained(os.path.join(folder, "scheduler"))
    write_model_index(folder)
    write_clip(out, clip_model, CLIP_CONFIG)
    _write_text(os.path.join(out, "training_metrics.json"), json.dumps({**metrics, "probe_curve": curve}, indent=1))
    _write_text(os.path.join(out, "MODEL_CARD.md"), model_card(metrics, curve, plan, argv))


def write_tokenizer(folder: str, tokenizer) -> None:
    """``vocab.json`` + ``merges.txt`` + ``tokenizer_config.json``: the slow-tokenizer layout that
    transformers 4.x and 5.x both read, 1.5 MB smaller than a ``tokenizer.json`` (docs/DECISIONS.md)."""
    import shutil

    from ice_ops.text import _clip_vocabulary_files

    os.makedirs(folder, exist_ok=True)
    for source in _clip_vocabulary_files():
        shutil.copy(source, os.path.join(folder, os.path.basename(source)))
    config = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "model_max_length": TEXT_CONTEXT,
              "pad_token": tokenizer.pad_token, "tokenizer_class": "CLIPTokenizer", "unk_token": "<|endoftext|>"}
    _write_text(os.path.join(folder, "tokenizer_config.json"), json.dumps(config, indent=2))


def write_clip(out: str, model, config: dict, stem: str = "open_clip") -> None:
    """``{stem}_config.json`` (model + preprocessing config) and ``{stem}.safetensors`` (fp16) in ``out``."""
    from safetensors.torch import save_file

    full = {"model_cfg": config, "preprocess_cfg": {"mean": list(IMAGE_MEAN), "std": list(IMAGE_STD)}}
    _write_text(os.path.join(out, f"{stem}_config.json"), json.dumps(full, indent=1))
    state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(out, f"{stem}.safetensors"))


def curve_table(curve: list[dict]) -> list[str]:
    rows = ["| step | seconds | pointing | IoU (cross-attention) | IoU (DiffSeg) |", "|---|---|---|---|---|"]
    for point in curve:
        rows.append(f"| {point['step']} | {point['seconds']} | {point['pointing']:.3f} | "
                    f"{point['iou_cross_attention']:.3f} | {point['iou_diffseg']:.3f} |")
    return rows


def model_card(metrics: dict, curve: list[dict], plan: Plan, argv: list[str]) -> str:
    lines = [
        "# Toy World model (tiny Stable Diffusion + tiny CLIP)",
        "",
        "Trained on synthetic Toy World scenes (ice_ops/toyworld/scenes.py); no downloaded data or weights. Models "
        "named by --clip-from, --vae-from and --unet-from in the command are starting points trained earlier by "
        "this script; without them every model starts from random weights.",
        "",
        f"Command: `python -m devtools.toyworld.train {' '.join(argv)}`",
        f"Seed: {plan.seed}. Machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs,"
        f" torch {torch.__version__}, device {metrics.get('device')}.",
        f"Wall time: {metrics.get('total_seconds')} s.",
        "",
        f"Vocabulary: shapes {', '.join(SHAPES)}; colours {', '.join(COLOURS)}; materials {', '.join(MATERIALS)}.",
        "",
        "## Attention probe",
        "",
        f"Every {plan.probe_every} UNet steps, on {plan.probe_scenes} validation scenes (seeds from "
        f"{VALIDATION_SEED_OFFSET}, used neither for training nor for the reported evaluation), with Stage One's "
        "prompt `<word> things background`: pointing (the noun's cross-attention peaks inside its object) and the "
        "IoU of Stage One's word mask with the true mask. The checkpoint written is the one with the best IoU "
        f"(step {metrics.get('unet_chosen_step')}). Seconds count from the start of the UNet stage, latent encoding "
        "included.",
        "",
        *curve_table(curve),
        "",
        "## Plan",
        "```json",
        json.dumps(asdict(plan), indent=1),
        "```",
        "## Metrics",
        "```json",
        json.dumps(metrics, indent=1),
        "```",
    ]
    return "\n".join(lines) + "\n"


def _write_text(path: str, text: str) -> None:
    """Atomic write inside the fresh output folder (main() refuses a folder that already holds a model)."""
    write_bytes_atomic(path, text.encode("utf-8"), overwrite=True)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, Plan]:
    parser = argparse.ArgumentParser(prog="python -m devtools.toyworld.train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder (must not exist yet)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--clip-from", default=None,
                        help="a folder with open_clip_config.json + open_clip.safetensors (an earlier --out): train "
                             "that CLIP further instead of a fresh one")
    parser.add_argument("--vae-from", default=None,
                        help="a diffusers folder whose vae/ is used as it is (no VAE training)")
    parser.add_argument("--unet-from", default=None,
                        help="a diffusers folder whose UNet tensors of matching shape start the UNet (a warm start)")
    defaults = Plan()
    for name, value in asdict(defaults).items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    args = parser.parse_args(argv)
    plan = Plan(**{name: getattr(args, name) for name in asdict(defaults)})
    return args, plan


def check_plan(args: argparse.Namespace, plan: Plan) -> None:
    if os.path.exists(os.path.join(args.out, "diffusers")):
        raise ValueError(f"{args.out!r} already holds a trained model; choose a new --out folder.")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was given but no CUDA device is available; use --device cpu.")
    steps_and_minutes = {"clip": (plan.clip_steps, plan.clip_minutes), "vae": (plan.vae_steps, plan.vae_minutes),
                         "unet": (plan.unet_steps, plan.unet_minutes)}
    for stage, (steps, minutes) in steps_and_minutes.items():
        if steps < 0 or minutes < 0:
            raise ValueError(f"--{stage}-steps and --{stage}-minutes must not be negative.")
    if (plan.clip_steps == 0 or plan.clip_minutes == 0) and args.clip_from is None:
        raise ValueError("--clip-steps 0 (or --clip-minutes 0) keeps the CLIP of --clip-from; give --clip-from too.")
    if min(plan.unet_steps, plan.unet_minutes) <= 0:
        raise ValueError("--unet-steps and --unet-minutes must be positive.")
    if args.vae_from is None and min(plan.vae_steps, plan.vae_minutes) <= 0:
        raise ValueError("--vae-steps and --vae-minutes must be positive unless --vae-from gives the VAE.")
    if plan.probe_every < 1 or plan.probe_scenes < 1:
        raise ValueError("--probe-every and --probe-scenes must be at least 1.")
    for flag, folder in (("--clip-from", args.clip_from), ("--vae-from", args.vae_from), ("--unet-from", args.unet_from)):
        if folder is not None and not os.path.isdir(folder):
            raise ValueError(f"{flag} {folder!r} is not a folder.")
    training_first_seed(plan)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, plan = parse_args(argv)
    check_plan(args, plan)
    device = torch.device(args.device)
    start = time.time()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    _log(f"building {plan.scenes} scenes")
    data = build_dataset(plan.scenes, training_first_seed(plan))
    metrics: dict = {"device": str(device), "scenes": plan.scenes}

    init = load_clip(args.clip_from) if args.clip_from else None
    if init is not None:
        metrics.update({f"clip_from_{k.removeprefix('clip_')}": v for k, v in clip_zero_shot(init, torch.device("cpu")).items()})
    if init is not None and (plan.clip_steps == 0 or plan.clip_minutes == 0):
        clip_model, found = init, {"clip_steps": 0}  # the CLIP of --clip-from as it is
    else:
        clip_model, found = train_clip(data, plan, device, init=init)
    metrics.update(found)
    clip_model = clip_model.cpu().float().eval()
    metrics.update(clip_zero_shot(clip_model, torch.device("cpu")))
    _log(f"clip done {metrics}")
    text_encoder = open_clip_text_to_transformers(clip_model)
    captions = [make_scene(i).caption for i in range(8)] + ["", "circle things background"]
    metrics["text_tower_max_abs_difference"] = text_tower_difference(clip_model, text_encoder, captions)

    if args.vae_from:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.vae_from, subfolder="vae", local_files_only=True).float().to(device).eval()
        metrics["vae_from"] = args.vae_from
    else:
        vae, found = train_vae(data, plan, device)
        metrics.update(found)
    _log(f"vae done {metrics}")

    tokenizer = build_clip_tokenizer(pad_token=PAD_TOKEN, model_max_length=TEXT_CONTEXT)
    unet = new_unet()
    if args.unet_from:
        metrics.update(initialise_unet_from(unet, args.unet_from))
    job = UnetTraining(data, vae, text_encoder, tokenizer, device)
    unet, found, curve = train_unet(job, plan, unet)
    metrics.update(found)
    metrics["total_seconds"] = round(time.time() - start)
    _log(f"all done {metrics}")
    write_outputs(args.out, clip_model, text_encoder.cpu(), vae.cpu(), unet.cpu(), tokenizer, metrics, curve, plan, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
