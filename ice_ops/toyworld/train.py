"""Train the Toy World models in Stable Diffusion's order: CLIP, then the VAE, then the UNet.

``python -m ice_ops.toyworld.train --out DIR --device cpu|cuda`` writes ``DIR/diffusers`` (a diffusers
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

from ..files import write_bytes_atomic
from ..text import build_clip_tokenizer
from .scenes import COLOURS, MATERIALS, SHAPES, make_caption, make_scene

SCENE_SIZE = 64
TEXT_CONTEXT = 77
PAD_TOKEN = "!"  # open_clip pads with id 0, which is "!" (as in SD 2.x)
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
RETRIEVER_TEMPLATE = "a photo of a {}."  # ClipRetriever's default template

CLIP_CONFIG = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": SCENE_SIZE, "layers": 4, "width": 128, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": TEXT_CONTEXT, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4},
}
# The retriever: a small ResNet CLIP. On a busy 2-core CPU the ViT above learns colours in minutes but
# shapes only slowly (zero-shot shape 0.23 after 243 steps); a convolutional image tower learns shapes far
# faster per CPU second. Its text tower only has to rank the shape words, so it is narrower.
RETRIEVER_CONFIG = {
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
VAE_KL_WEIGHT = 1e-6  # LDM's KL-f autoencoders
WARMUP_STEPS = 50
# Toy World captions need at most 21 tokens with start and end; the towers are causal, so training on the
# first TRAIN_TEXT_LENGTH positions gives the same features as the full context at a third of the cost.
TRAIN_TEXT_LENGTH = 24
LOG_EVERY = 10


@dataclass
class Plan:
    seed: int = 0
    scenes: int = 12000
    clip_steps: int = 3000
    clip_minutes: float = 10.0
    clip_batch: int = 128
    clip_lr: float = 5e-4
    vae_steps: int = 4000
    vae_minutes: float = 12.0
    vae_batch: int = 32
    vae_lr: float = 1e-3
    unet_steps: int = 20000
    unet_minutes: float = 30.0
    unet_batch: int = 32
    unet_lr: float = 3e-4
    # > 0: also train the ResNet retriever (RETRIEVER_CONFIG) for this long and ship it as the retriever
    # instead of the ViT CLIP; 0: the ViT CLIP whose text tower the UNet uses is also the retriever.
    retriever_minutes: float = 0.0


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
        padded = torch.zeros(3, size, size, dtype=torch.bool)
        padded[: len(scene.objects)] = scene.masks
        masks.append(padded)
        attributes.append([(o.shape, o.colour, o.material) for o in scene.objects])
    return Dataset(torch.stack(images), torch.stack(masks), attributes)


def _phrase_caption(objects: list[tuple[str, str, str]]) -> str:
    from .scenes import SceneObject

    fake = [SceneObject(s, c, m, torch.zeros(0), (0.0, 0.0), 0.0) for s, c, m in objects]
    return make_caption(fake)


def clip_batch(data: Dataset, index: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, list[str]]:
    """Images with some objects blanked to black (as Stage One blanks explained regions) and a caption
    of what is left: the full caption or the retriever's template with one remaining shape."""
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
        if rng.random() < 0.5:
            captions.append(_phrase_caption(kept))
        else:
            captions.append(RETRIEVER_TEMPLATE.format(kept[0][0]))
    return images, captions


def unet_caption(objects: list[tuple[str, str, str]], rng: np.random.Generator) -> str:
    if rng.random() < CAPTION_DROPOUT:
        return ""
    shuffled = list(objects)
    rng.shuffle(shuffled)
    caption = _phrase_caption(shuffled)
    return "a photo of " + caption if rng.random() < 0.25 else caption


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


def train_clip(data: Dataset, plan: Plan, device: torch.device, config: dict = CLIP_CONFIG) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(plan.seed)
    rng = np.random.default_rng(plan.seed)
    model = build_clip(config).to(device).train()
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


def open_clip_text_to_transformers(model):
    """The open_clip text tower as a transformers ``CLIPTextModel`` (same hidden states)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    text_cfg = CLIP_CONFIG["text_cfg"]
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
        projection_dim=CLIP_CONFIG["embed_dim"],
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
def encode_dataset(vae, data: Dataset, device: torch.device, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for start in range(0, len(data.images), batch):
        index = torch.arange(start, min(start + batch, len(data.images)))
        posterior = vae.encode(data.floats(index).to(device) * 2 - 1).latent_dist
        means.append(posterior.mean.cpu())
        stds.append(posterior.std.cpu())
    return torch.cat(means), torch.cat(stds)


def train_unet(data: Dataset, vae, text_encoder, tokenizer, plan: Plan, device: torch.device, unet=None):
    """Train ``unet`` (a fresh UNET_CONFIG model when None) on the scenes' latents."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from ..bundle import scheduler_config

    torch.manual_seed(plan.seed + 2)
    rng = np.random.default_rng(plan.seed + 2)
    scheduler = DDPMScheduler.from_config(scheduler_config("epsilon"))
    unet = (unet if unet is not None else UNet2DConditionModel.from_config(UNET_CONFIG)).float().to(device).train()
    text_encoder = text_encoder.to(device).eval().requires_grad_(False)
    means, stds = encode_dataset(vae, data, device)
    scaling = float(vae.config.scaling_factor)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=plan.unet_lr, weight_decay=1e-2)
    budget = Budget(plan.unet_steps, plan.unet_minutes)
    generator = torch.Generator().manual_seed(plan.seed + 2)
    alphas = scheduler.alphas_cumprod.to(device)
    use_amp = device.type == "cuda"
    while not budget.done():
        index = torch.randint(len(data.images), (plan.unet_batch,), generator=generator)
        latents = (means[index] + stds[index] * torch.randn(means[index].shape, generator=generator)).to(device) * scaling
        captions = [unet_caption(data.attributes[i], rng) for i in index.tolist()]
        ids = tokenizer(captions, padding="max_length", max_length=TEXT_CONTEXT, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            context = text_encoder(ids.to(device))[0]
        noise = torch.randn(latents.shape, generator=generator).to(device)
        steps = torch.randint(0, scheduler.config.num_train_timesteps, (len(index),), generator=generator).to(device)
        alpha = alphas[steps].view(-1, 1, 1, 1)
        noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            prediction = unet(noisy, steps, encoder_hidden_states=context).sample
        loss = F.mse_loss(prediction.float(), noise)
        _update(optimizer, loss, budget, plan.unet_lr, "unet", clip_parameters=unet.parameters())
    unet.eval()
    return unet, {"unet_steps": budget.step, "unet_seconds": round(budget.elapsed), "unet_final_loss": round(loss.item(), 4)}


@torch.no_grad()
def noun_localisation(bundle, count: int = 20) -> dict:
    """Stage One's segmentation of the true noun on held-out scenes: mean IoU with the true mask."""
    from ..localize import segment_word

    ious = []
    for i in range(count):
        scene = make_scene(3 * 10**8 + i)
        obj = scene.objects[0]
        mask = segment_word(bundle, scene.image, obj.shape).mask > 0.5
        union = (mask | obj.mask).sum().item()
        ious.append((mask & obj.mask).sum().item() / max(union, 1))
    return {"noun_segment_iou": round(float(np.mean(ious)), 3)}


# --------------------------------------------------------------------------------------------- output
def write_outputs(out: str, retriever, text_encoder, vae, unet, tokenizer, metrics: dict, plan: Plan, argv: list[str]) -> None:
    from diffusers import DDPMScheduler

    from ..bundle import scheduler_config, write_model_index

    folder = os.path.join(out, "diffusers")
    for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        module.to("cpu", torch.float16).save_pretrained(os.path.join(folder, name), safe_serialization=True)
        module.to(torch.float32)
    tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
    DDPMScheduler.from_config(scheduler_config("epsilon")).save_pretrained(os.path.join(folder, "scheduler"))
    write_model_index(folder)
    write_clip(out, retriever, CLIP_CONFIG if retriever_is_vit(retriever) else RETRIEVER_CONFIG)
    _write_text(os.path.join(out, "metrics.json"), json.dumps(metrics, indent=1))
    _write_text(os.path.join(out, "MODEL_CARD.md"), model_card(metrics, plan, argv))


def retriever_is_vit(model) -> bool:
    return type(model.visual).__name__ == "VisionTransformer"


def write_clip(out: str, model, config: dict, stem: str = "open_clip") -> None:
    """``{stem}_config.json`` (model + preprocessing config) and ``{stem}.safetensors`` (fp16) in ``out``."""
    from safetensors.torch import save_file

    full = {"model_cfg": config, "preprocess_cfg": {"mean": list(IMAGE_MEAN), "std": list(IMAGE_STD)}}
    _write_text(os.path.join(out, f"{stem}_config.json"), json.dumps(full, indent=1))
    state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(out, f"{stem}.safetensors"))


def train_retriever_only(out: str, plan: Plan, device: torch.device, argv: list[str]) -> int:
    """Train the ResNet retriever CLIP alone; writes ``retriever_config.json``/``retriever.safetensors``."""
    start = time.time()
    data = build_dataset(plan.scenes, plan.seed * plan.scenes)
    model, metrics = train_clip(data, plan, device, RETRIEVER_CONFIG)
    model = model.cpu().float()
    metrics.update(clip_zero_shot(model, torch.device("cpu")))
    metrics["total_seconds"] = round(time.time() - start)
    _log(f"retriever done {metrics}")
    os.makedirs(out, exist_ok=True)
    write_clip(out, model, RETRIEVER_CONFIG, stem="retriever")
    _write_text(os.path.join(out, "retriever_metrics.json"), json.dumps({"command": argv, **metrics}, indent=1))
    return 0


def continue_unet(source: str, out: str, plan: Plan, device: torch.device, argv: list[str]) -> int:
    """Train the UNet of the model in ``source`` further (on the scenes of ``plan.seed``'s range, with its
    frozen text encoder and its VAE) and write the result to ``out`` with ``source``'s CLIP and a card that
    records both runs."""
    import shutil

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = os.path.join(source, "diffusers")
    if not os.path.isfile(os.path.join(source, "metrics.json")) or not os.path.isdir(folder):
        raise ValueError(f"{source!r} is not an output folder of this script (no metrics.json or diffusers/).")
    start = time.time()
    earlier = json.loads(open(os.path.join(source, "metrics.json"), encoding="utf-8").read())
    data = build_dataset(earlier.get("scenes", plan.scenes), plan.seed * earlier.get("scenes", plan.scenes))
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True).float().to(device).eval()
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", local_files_only=True).float()
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True)
    tokenizer = build_clip_tokenizer(pad_token=PAD_TOKEN, model_max_length=TEXT_CONTEXT)
    unet, found = train_unet(data, vae, text_encoder, tokenizer, plan, device, unet=unet)
    metrics = dict(earlier)
    metrics["unet_steps"] = earlier["unet_steps"] + found["unet_steps"]
    metrics["unet_seconds"] = earlier["unet_seconds"] + found["unet_seconds"]
    metrics["unet_final_loss"] = found["unet_final_loss"]
    from ..bundle import DiffusionBundle

    bundle = DiffusionBundle.from_components(unet.float().cpu(), vae.float().cpu(), text_encoder.cpu(), tokenizer, device="cpu")
    metrics.update(noun_localisation(bundle))
    metrics["total_seconds"] = earlier["total_seconds"] + round(time.time() - start)
    _log(f"continued {metrics}")
    os.makedirs(out, exist_ok=True)
    for name in ("open_clip_config.json", "open_clip.safetensors"):
        shutil.copy(os.path.join(source, name), os.path.join(out, name))
    target = os.path.join(out, "diffusers")
    shutil.copytree(folder, target)
    unet.to("cpu", torch.float16).save_pretrained(os.path.join(target, "unet"), safe_serialization=True)
    _write_text(os.path.join(out, "metrics.json"), json.dumps(metrics, indent=1))
    card = open(os.path.join(source, "MODEL_CARD.md"), encoding="utf-8").read()
    card += (f"\n## Continued\n\nThe UNet was then trained further with "
             f"`python -m ice_ops.toyworld.train {' '.join(argv)}` ({found['unet_steps']} steps, "
             f"{found['unet_seconds']} s); the metrics above are those of the first run, the totals:\n\n"
             f"```json\n{json.dumps(metrics, indent=1)}\n```\n")
    _write_text(os.path.join(out, "MODEL_CARD.md"), card)
    return 0


def model_card(metrics: dict, plan: Plan, argv: list[str]) -> str:
    lines = [
        "# Toy World model (tiny Stable Diffusion + tiny CLIP)",
        "",
        "Trained from scratch on synthetic Toy World scenes (ice_ops/toyworld/scenes.py); no downloaded data or weights.",
        "",
        f"Command: `python -m ice_ops.toyworld.train {' '.join(argv)}`",
        f"Seed: {plan.seed}. Machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs,"
        f" torch {torch.__version__}, device {metrics.get('device')}.",
        f"Wall time: {metrics.get('total_seconds')} s.",
        "",
        f"Vocabulary: shapes {', '.join(SHAPES)}; colours {', '.join(COLOURS)}; materials {', '.join(MATERIALS)}.",
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
    parser = argparse.ArgumentParser(prog="python -m ice_ops.toyworld.train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder (must not exist yet)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--retriever-only", action="store_true",
                        help="train only the ResNet retriever CLIP (for --clip-minutes/--clip-steps)")
    parser.add_argument("--continue-from", default=None,
                        help="an earlier --out folder: keep its CLIP, text encoder and VAE and train its UNet further "
                             "(for --unet-minutes/--unet-steps); the new card records both runs")
    defaults = Plan()
    for name, value in asdict(defaults).items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    args = parser.parse_args(argv)
    plan = Plan(**{name: getattr(args, name) for name in asdict(defaults)})
    return args, plan


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, plan = parse_args(argv)
    if args.retriever_only:
        if os.path.exists(os.path.join(args.out, "retriever.safetensors")):
            raise ValueError(f"{args.out!r} already holds a retriever; choose a new --out folder.")
        return train_retriever_only(args.out, plan, torch.device(args.device), argv)
    if os.path.exists(os.path.join(args.out, "diffusers")):
        raise ValueError(f"{args.out!r} already holds a trained model; choose a new --out folder.")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was given but no CUDA device is available; use --device cpu.")
    if args.continue_from:
        return continue_unet(args.continue_from, args.out, plan, device, argv)
    start = time.time()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    _log(f"building {plan.scenes} scenes")
    data = build_dataset(plan.scenes, plan.seed * plan.scenes)
    metrics: dict = {"device": str(device), "scenes": plan.scenes}

    clip_model, found = train_clip(data, plan, device)
    metrics.update(found)
    clip_model = clip_model.cpu().float()
    metrics.update(clip_zero_shot(clip_model, torch.device("cpu")))
    _log(f"clip done {metrics}")
    text_encoder = open_clip_text_to_transformers(clip_model)
    captions = [make_scene(i).caption for i in range(8)] + ["", "circle things background"]
    metrics["text_tower_max_abs_difference"] = text_tower_difference(clip_model, text_encoder, captions)

    retriever = clip_model
    if plan.retriever_minutes > 0:
        retriever_plan = Plan(**{**asdict(plan), "clip_minutes": plan.retriever_minutes, "clip_steps": 10**9})
        retriever, found = train_clip(data, retriever_plan, device, RETRIEVER_CONFIG)
        retriever = retriever.cpu().float()
        metrics.update({f"retriever_{k.removeprefix('clip_')}": v for k, v in found.items()})
        metrics.update({f"retriever_{k.removeprefix('clip_')}": v for k, v in clip_zero_shot(retriever, torch.device("cpu")).items()})
        _log(f"retriever done {metrics}")

    vae, found = train_vae(data, plan, device)
    metrics.update(found)
    _log(f"vae done {metrics}")

    tokenizer = build_clip_tokenizer(pad_token=PAD_TOKEN, model_max_length=TEXT_CONTEXT)
    unet, found = train_unet(data, vae, text_encoder, tokenizer, plan, device)
    metrics.update(found)

    from ..bundle import DiffusionBundle

    bundle = DiffusionBundle.from_components(unet.float().cpu(), vae.float().cpu(), text_encoder.cpu(), tokenizer, device="cpu")
    metrics.update(noun_localisation(bundle))
    metrics["total_seconds"] = round(time.time() - start)
    _log(f"all done {metrics}")
    write_outputs(args.out, retriever, text_encoder, vae, unet, tokenizer, metrics, plan, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
