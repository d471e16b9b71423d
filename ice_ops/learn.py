"""Stage Two: structured concept learning.

Phase one (:func:`learn_object_tokens`) learns, per concept, an *object* token (what the object is; kept
near its word) and an *instance* token (what makes this object unique; pushed away from the word) with a
masked diffusion loss, an attention-alignment loss and a triplet loss. Phase two
(:func:`learn_intrinsic_tokens`) starts one *intrinsic* token per anchor (material, colour, ...) from the
instance token and learns them with an intrinsic triplet loss. Only the placeholder vectors are trained:
the user's UNet, VAE and text encoder are never modified.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from . import losses
from .attention import capture_attention
from .bundle import frozen_dtype
from .concepts import ConceptSet, text_encoder_fingerprint
from .defaults import BASE_ROLES, DEFAULT_ANCHORS, DEFAULT_LR, DEFAULT_STEPS, INSTANCE_ROLE, OBJECT_ROLE, Callback
from .imaging import resize_image, resize_soft_mask, to_image_tensor, working_size
from .lora import DEFAULT_RANK, apply_lora, init_lora, trainable_lora
from .progress import cancel_point
from .tokens import PlaceholderText, placeholder_string

Monitor = Callable[[int, dict], None]  # (step, {"loss", "diffusion", "attention", "regulariser"}) per step

# The reference's schedule: 400 + 400 steps, AdamW lr 5e-4, weight decay 1e-2, clip 1.0.
ADAM_BETAS = (0.9, 0.999)
ADAM_WEIGHT_DECAY = 1e-2
ADAM_EPS = 1e-8
MAX_GRAD_NORM = 1.0
HALF_DTYPES = (torch.float16, torch.bfloat16)
TIMESTEP_DENSITY_AMPLITUDE = 0.5  # density 1 - 0.5 cos(pi t / T)
FLIP_PROBABILITY = 0.5
# The reference weighs its Wasserstein loss by 1e-5 with a cost in pixel units of a 16x16 grid; our cost is
# in units of the grid side, so the same weight on the same map is 1e-5 * 16.
ATTENTION_LOSS_WEIGHT = 1e-5 * 16
MAX_TRANSPORT_GRID_SIDE = 16  # the reference's attention-loss grid (16x16 at SD 512²)
OBJECT_TRIPLET_WEIGHT = 1.0  # reg_weight
INTRINSIC_TRIPLET_WEIGHT = 5e-2  # reg_intrinsic_weight
# Refinement: the reference fine-tunes the whole UNet (and the intrinsic rows) at 2e-6. A rank-4 LoRA starts
# at zero and moves only low-rank factors, so it needs a far larger step to change the UNet as much; 1e-4 is
# the customary LoRA rate for SD (diffusers/kohya examples). The token rows keep the reference's 2e-6.
REFINE_LORA_LR = 1e-4
REFINE_TOKEN_LR = 2e-6

# The 27 prompt templates of the reference (the textual-inversion templates).
PROMPT_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
)


class TrainingDiverged(ValueError):
    """Raised when a loss becomes NaN/inf; ``concepts`` holds the vectors of the last good step."""

    def __init__(self, message: str, concepts: ConceptSet):
        super().__init__(message)
        self.concepts = concepts


@dataclass
class _Scene:
    """The training image prepared once: latent posteriors (plain and flipped) and per-concept masks."""

    latent_mean: torch.Tensor  # [2, C, h, w]: index 0 plain, 1 flipped
    latent_std: torch.Tensor
    latent_masks: torch.Tensor  # [2, K, 1, h, w]
    attention_masks: torch.Tensor  # [2, K, oh, ow] at the transport grid (see transport_grid)
    attention_factor: int


# ---------------------------------------------------------------------- public API
def learn_object_tokens(
    bundle,
    image,
    concepts: ConceptSet,
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    seed: int = 0,
    callback: Callback | None = None,
    *,
    triplet_margin: float = losses.DEFAULT_TRIPLET_MARGIN,
    attention_weight: float = ATTENTION_LOSS_WEIGHT,
    triplet_weight: float = OBJECT_TRIPLET_WEIGHT,
    monitor: Monitor | None = None,
    relearn: bool = False,
) -> ConceptSet:
    """Phase one: learn an object and an instance token per concept. Returns a new ConceptSet.

    Tokens always start again from the concepts' words. A set whose tokens were learned on another model is
    refused (its fingerprint names that model) unless ``relearn``, which drops those tokens."""
    image, text = _start_from_words(bundle, image, concepts, steps, lr, BASE_ROLES, relearn)
    word_pooled = _pooled_words(text, [c.word for c in concepts.concepts])
    trainable = [placeholder_string(c.name, r) for c in concepts.concepts for r in BASE_ROLES]

    def prompt_tokens(index: int) -> list[str]:
        name = concepts.concepts[index].name
        return [placeholder_string(name, INSTANCE_ROLE), placeholder_string(name, OBJECT_ROLE)]

    def regulariser(index: int) -> torch.Tensor:
        name = concepts.concepts[index].name
        pooled = _pooled_tokens(text, [placeholder_string(name, OBJECT_ROLE), placeholder_string(name, INSTANCE_ROLE)])
        return triplet_weight * losses.object_instance_triplet(
            word_pooled[index : index + 1], pooled[0:1], pooled[1:2], margin=triplet_margin
        )

    objective = _Objective(text, trainable, prompt_tokens, regulariser, attention_weight)
    vectors = _train(bundle, image, concepts, objective, steps=steps, lr=lr, seed=seed, callback=callback,
                     monitor=monitor)
    settings = dict(concepts.settings, object_steps=steps, object_lr=lr, seed=seed, triplet_margin=triplet_margin)
    return _with_vectors(_without_tokens(concepts), vectors, bundle, settings=settings, anchors=())


def learn_intrinsic_tokens(
    bundle,
    image,
    concepts: ConceptSet,
    anchors: Sequence[str] = DEFAULT_ANCHORS,
    steps: int = DEFAULT_STEPS,
    refine_steps: int = 0,
    seed: int = 0,
    callback: Callback | None = None,
    *,
    lr: float = DEFAULT_LR,
    refine_lr: float = REFINE_LORA_LR,
    refine_rank: int = DEFAULT_RANK,
    attention_weight: float = ATTENTION_LOSS_WEIGHT,
    triplet_weight: float = INTRINSIC_TRIPLET_WEIGHT,
    monitor: Monitor | None = None,
) -> ConceptSet:
    """Phase two: learn one intrinsic token per anchor, initialised from each concept's instance token.

    With ``refine_steps > 0`` a LoRA on the UNet's attention projections is then trained together with the
    intrinsic tokens (the reference's optional step 2, which fine-tunes the whole UNet at lr 2e-6); the
    result's ``lora`` holds it in ComfyUI's kohya layout. The user's UNet itself is never changed."""
    anchors = check_intrinsic_arguments(concepts, anchors, steps=steps, refine_steps=refine_steps, lr=lr)
    image = to_image_tensor(image).cpu()
    concepts.validate(tuple(image.shape[-2:]))
    concepts.check_text_encoder(bundle.text_encoder)
    for concept in concepts.concepts:
        missing = [r for r in BASE_ROLES if r not in concept.vectors]
        if missing:
            raise ValueError(
                f"{concept.name!r} has no {' or '.join(missing)} token yet; run LearnObjectTokens "
                "(learn_object_tokens) before learning intrinsic tokens."
            )

    text = PlaceholderText(bundle.tokenizer, bundle.text_encoder)
    for concept in concepts.concepts:
        for role in BASE_ROLES:
            text.add(placeholder_string(concept.name, role), concept.vectors[role])
        for anchor in anchors:
            text.add(placeholder_string(concept.name, anchor), concept.vectors[INSTANCE_ROLE])
    anchor_pooled = _pooled_words(text, anchors)
    word_pooled = _pooled_words(text, [c.word for c in concepts.concepts])
    object_pooled = _pooled_tokens(text, [placeholder_string(c.name, OBJECT_ROLE) for c in concepts.concepts]).detach()
    margins = []
    for index in range(len(concepts)):
        margins.append(losses.anchor_margins(anchor_pooled, word_pooled[index]))
    trainable = [placeholder_string(c.name, a) for c in concepts.concepts for a in anchors]

    def prompt_tokens(index: int) -> list[str]:
        name = concepts.concepts[index].name
        return [placeholder_string(name, OBJECT_ROLE)] + [placeholder_string(name, a) for a in anchors]

    def regulariser(index: int) -> torch.Tensor:
        name = concepts.concepts[index].name
        intrinsic = _pooled_tokens(text, [placeholder_string(name, a) for a in anchors])
        pair_margins, object_margins = margins[index]
        return triplet_weight * losses.intrinsic_triplet(
            anchor_pooled, intrinsic, pair_margins, word_pooled[index], object_pooled[index], object_margins
        )

    total = steps + refine_steps
    objective = _Objective(text, trainable, prompt_tokens, regulariser, attention_weight)
    vectors = _train(bundle, image, concepts, objective, steps=steps, lr=lr, seed=seed, callback=callback,
                     monitor=monitor, progress_total=total)
    lora = None
    if refine_steps:
        vectors, lora = _refine_with_lora(bundle, image, concepts, objective, vectors, steps=refine_steps,
                                          rank=refine_rank, lr=refine_lr, seed=seed, callback=callback,
                                          monitor=monitor, progress_offset=steps, progress_total=total)
    settings = dict(concepts.settings, intrinsic_steps=steps, intrinsic_lr=lr, intrinsic_seed=seed,
                    refine_steps=refine_steps, refine_lr=refine_lr if refine_steps else None)
    result = _with_vectors(concepts, vectors, bundle, settings=settings, anchors=anchors)
    result.lora = lora
    return result


def learn_textual_inversion(
    bundle,
    image,
    concepts: ConceptSet,
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    seed: int = 0,
    callback: Callback | None = None,
    *,
    monitor: Monitor | None = None,
    relearn: bool = False,
) -> ConceptSet:
    """The baseline ICE is measured against: plain textual inversion, one token per concept learned with the
    masked diffusion loss alone (no instance token, no attention or triplet loss, no intrinsic tokens).

    The token is stored as the concept's ``object`` vector, so ``[name]`` in a composed prompt stands for it;
    roles such as ``[name.colour]`` do not exist in the result."""
    image, text = _start_from_words(bundle, image, concepts, steps, lr, (OBJECT_ROLE,), relearn)
    trainable = [placeholder_string(c.name, OBJECT_ROLE) for c in concepts.concepts]
    no_regulariser = torch.zeros((), device=bundle.device)
    objective = _Objective(
        text, trainable,
        prompt_tokens=lambda index: [placeholder_string(concepts.concepts[index].name, OBJECT_ROLE)],
        regulariser=lambda index: no_regulariser,
        attention_weight=0.0,
    )
    vectors = _train(bundle, image, concepts, objective, steps=steps, lr=lr, seed=seed, callback=callback,
                     monitor=monitor)
    settings = dict(concepts.settings, textual_inversion_steps=steps, textual_inversion_lr=lr, seed=seed)
    return _with_vectors(_without_tokens(concepts), vectors, bundle, settings=settings, anchors=())


def check_intrinsic_arguments(concepts: ConceptSet, anchors: Sequence[str] | str, *, steps: int,
                              refine_steps: int = 0, lr: float = DEFAULT_LR) -> tuple[str, ...]:
    """Check phase two's arguments against a concept set before any work (a command line that runs both phases
    calls this first); returns the normalised anchors."""
    _check_steps(steps, "steps")
    _check_lr(lr)
    if int(refine_steps) != refine_steps or refine_steps < 0:
        raise ValueError(f"refine_steps must be 0 (no refinement) or a positive whole number, got {refine_steps}.")
    anchors = normalise_anchors(anchors)
    for concept in concepts.concepts:
        clash = [a for a in anchors if a == concept.word]
        if clash:
            raise ValueError(
                f"The anchor {clash[0]!r} is also the word of concept {concept.name!r}; choose anchors that differ "
                "from the objects' words."
            )
    return anchors


def normalise_anchors(anchors: Sequence[str] | str) -> tuple[str, ...]:
    """Anchor words from a list or a comma-separated string; ``ValueError`` for empty or repeated ones."""
    if isinstance(anchors, str):
        anchors = anchors.split(",")
    cleaned = tuple(a.strip().lower() for a in anchors if a.strip())
    if not cleaned:
        raise ValueError("Give at least one anchor word, e.g. 'material, colour'.")
    if len(set(cleaned)) != len(cleaned):
        raise ValueError(f"Anchors repeat a word: {list(cleaned)}; list each anchor once.")
    for anchor in cleaned:
        if len(anchor.split()) != 1 or not anchor.replace("-", "").isalpha():
            raise ValueError(f"The anchor {anchor!r} must be a single word such as 'material' or 'colour'.")
        if anchor in BASE_ROLES:
            raise ValueError(f"{anchor!r} is a reserved role name; use another anchor word.")
    return cleaned


def attention_downsample_factor(unet) -> int:
    """Downsampling of the coarsest down/up level that has cross-attention (latent/4 = 16x16 at SD 512²,
    where the reference computes its attention loss)."""
    levels = [i for i, kind in enumerate(unet.config.down_block_types) if "CrossAttn" in kind]
    if not levels:
        raise ValueError("This UNet has no cross-attention blocks; it cannot be conditioned on learned tokens.")
    return 2 ** max(levels)


def _start_from_words(bundle, image, concepts: ConceptSet, steps: int, lr: float, roles: Sequence[str],
                      relearn: bool):
    """Check the arguments, then (the image as a CPU tensor, placeholder text with a token per concept and
    role, each starting at the embedding of the concept's word)."""
    _check_steps(steps, "steps")
    _check_lr(lr)
    image = to_image_tensor(image).cpu()
    concepts.validate(tuple(image.shape[-2:]))
    if not relearn and any(concept.vectors for concept in concepts.concepts):
        concepts.check_text_encoder(bundle.text_encoder, relearn_hint=True)
    text = PlaceholderText(bundle.tokenizer, bundle.text_encoder)
    for concept in concepts.concepts:
        initial = text.word_init(concept.word)
        for role in roles:
            text.add(placeholder_string(concept.name, role), initial)
    return image, text


# ---------------------------------------------------------------------- training loop
@dataclass
class _Objective:
    """What a learning phase optimises: the placeholder ``text`` and which of its tokens are ``trainable``;
    for the concept drawn at a step (its index), the tokens its prompt holds and its regularising loss; and
    the weight of the attention-alignment loss."""

    text: PlaceholderText
    trainable: list[str]
    prompt_tokens: Callable[[int], list[str]]
    regulariser: Callable[[int], torch.Tensor]
    attention_weight: float


def _refine_with_lora(bundle, image, concepts, objective: _Objective, vectors, *, steps, rank, lr, seed, callback,
                      monitor, progress_offset, progress_total):
    """The optional refinement after phase two: a LoRA on the UNet's attention, trained with the intrinsic
    tokens (at the reference's small token rate) from where phase two left them. Returns (vectors, LoRA
    tensors on the CPU)."""
    for name, vector in vectors.items():
        objective.text.set_vector(name, vector)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    lora = trainable_lora(init_lora(bundle.unet, rank, generator=generator), bundle.device)
    vectors = _train(bundle, image, concepts, objective, steps=steps, lr=REFINE_TOKEN_LR, seed=seed + 1,
                     callback=callback, monitor=monitor, lora=lora, lora_lr=lr, progress_offset=progress_offset,
                     progress_total=progress_total)
    return vectors, {key: value.detach().cpu().clone() for key, value in lora.items()}


def _train(bundle, image, concepts, objective: _Objective, *, steps, lr, seed, callback, monitor=None, lora=None,
           lora_lr=None, progress_offset=0, progress_total=None) -> dict[str, torch.Tensor]:
    text, trainable = objective.text, objective.trainable
    device = bundle.device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    scene = _prepare_scene(bundle, image, concepts)
    timestep_weights = losses.timestep_weights(bundle.num_train_timesteps, TIMESTEP_DENSITY_AMPLITUDE)
    parameters = list(text.trainable(trainable))
    groups = [{"params": parameters, "lr": lr}]
    if lora:
        lora_parameters = [value for value in lora.values() if value.requires_grad]
        groups.append({"params": lora_parameters, "lr": lora_lr})
        parameters = parameters + lora_parameters
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=ADAM_BETAS, weight_decay=ADAM_WEIGHT_DECAY, eps=ADAM_EPS)
    progress_total = progress_total or steps
    autocast = training_autocast(bundle)
    scaler = gradient_scaler(autocast)
    last_good = {name: text.vector(name).detach().clone() for name in text.names}

    for step in range(steps):
        try:
            report, problem = _step(bundle, scene, objective, concepts, optimizer, scaler, autocast, parameters,
                                    lora, timestep_weights, generator, callback)
        except torch.OutOfMemoryError:
            raise out_of_memory_error(step, steps, device) from None
        if problem is not None:
            raise _diverged(step, steps, problem, concepts, last_good, bundle)
        last_good = {name: text.vector(name).detach().clone() for name in text.names}
        if monitor is not None:
            monitor(step + 1, report)
        if callback is not None:
            callback(progress_offset + step + 1, progress_total, None)
    return last_good


def _step(bundle, scene, objective, concepts, optimizer, scaler, autocast, parameters, lora, timestep_weights,
          generator, callback) -> tuple[dict, str | None]:
    """One optimisation step on a randomly drawn concept, template, flip, noise and timestep: (the losses,
    what became NaN or infinite, or None). With loss scaling, a step whose gradients overflowed is skipped."""
    text, prompt_tokens, regulariser = objective.text, objective.prompt_tokens, objective.regulariser
    device = bundle.device
    index = int(torch.randint(len(concepts), (1,), generator=generator))
    flip = int(torch.rand((), generator=generator) < FLIP_PROBABILITY)
    template = PROMPT_TEMPLATES[int(torch.randint(len(PROMPT_TEMPLATES), (1,), generator=generator))]
    tokens = prompt_tokens(index)
    prompt = template.format("".join(tokens))

    latent = scene.latent_mean[flip : flip + 1] + scene.latent_std[flip : flip + 1] * _randn(
        scene.latent_mean[:1], generator
    )
    noise = losses.offset_noise(latent, losses.NOISE_OFFSET, generator=generator).to(device)
    timestep = losses.sample_timesteps(timestep_weights, 1, generator).to(device)
    noisy = bundle.scheduler.add_noise(latent, noise, timestep)
    target = losses.diffusion_target(bundle.scheduler, latent, noise, timestep)

    ids = text.tokenize([prompt]).to(device)
    positions = _token_positions(ids[0], [text.token_id(t) for t in tokens])
    with autocast:
        hidden, _ = text.encode(ids)
        with capture_attention(
            bundle.unet,
            record_self=False,
            cross_positions=positions,
            downsample_factors={scene.attention_factor},
            keep_graph=True,
        ) as store, apply_lora(bundle.unet, lora):
            prediction = bundle.unet(noisy.to(bundle.unet_dtype), timestep,
                                     encoder_hidden_states=hidden.to(bundle.unet_dtype)).sample
    diffusion = losses.masked_diffusion_loss(prediction.float(), target.float(), scene.latent_masks[flip, index : index + 1])
    attention_map = _concept_attention(store, scene.attention_masks.shape[-2:])
    alignment = losses.attention_alignment_loss(attention_map, scene.attention_masks[flip, index : index + 1])
    regularisation = regulariser(index)
    loss = diffusion + objective.attention_weight * alignment + regularisation
    report = {"loss": float(loss.detach()), "diffusion": float(diffusion.detach()),
              "attention": float(alignment.detach()), "regulariser": float(regularisation.detach())}
    if not torch.isfinite(loss):
        return report, f"the loss became {report['loss']}"
    cancel_point(callback)  # the forward pass is done; the backward pass takes as long again
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    gradient_norm = torch.nn.utils.clip_grad_norm_(parameters, MAX_GRAD_NORM)
    if not torch.isfinite(gradient_norm) and not scaler.is_enabled():
        return report, "the gradients became NaN or infinite"
    scaler.step(optimizer)
    scaler.update()
    return report, None


def _diverged(step, steps, what, concepts, last_good, bundle) -> TrainingDiverged:
    return TrainingDiverged(
        f"Training diverged at step {step + 1} of {steps} ({what}); the vectors of the last good step were kept. "
        "Lower the learning rate or try another seed.",
        _with_vectors(concepts, last_good, bundle),
    )


def _prepare_scene(bundle, image, concepts) -> _Scene:
    height, width = image.shape[-2:]
    size = working_size(height, width, bundle.native_resolution, bundle.size_multiple)
    working = resize_image(image, size)
    posteriors = []
    with torch.no_grad():
        for view in (working, working.flip(-1)):  # one at a time: the VAE's activations at full size are large
            posteriors.append(bundle.vae.encode((view[None] * 2 - 1).to(bundle.device, bundle.vae_dtype)).latent_dist)
    mean = torch.cat([p.mean for p in posteriors]).float() * bundle.latent_scaling
    std = torch.cat([p.std for p in posteriors]).float() * bundle.latent_scaling
    latent_size = tuple(mean.shape[-2:])
    factor = attention_downsample_factor(bundle.unet)
    grid = transport_grid((latent_size[0] // factor, latent_size[1] // factor))
    masks = concepts.masks()  # [K, H, W] at image size
    masks = torch.stack([masks, masks.flip(-1)])  # [2, K, H, W]
    latent_masks = resize_soft_mask(masks, latent_size)[:, :, None].to(bundle.device)
    attention_masks = resize_soft_mask(masks, grid).to(bundle.device)
    return _Scene(mean.to(bundle.device), std.to(bundle.device), latent_masks, attention_masks, factor)


def transport_grid(grid: tuple[int, int]) -> tuple[int, int]:
    """The grid the Wasserstein loss is computed on: the attention grid, area-pooled by a whole factor until
    no side exceeds the reference's 16 cells. Transport costs grow with the square of the cell count, so
    this bounds the loss's cost on large or unusual UNets while SD at its native size keeps its 16x16."""
    factor = max(1, math.ceil(max(grid) / MAX_TRANSPORT_GRID_SIDE))
    return (math.ceil(grid[0] / factor), math.ceil(grid[1] / factor))


def _concept_attention(store, grid) -> torch.Tensor:
    """Mean over the concept's tokens of the recorded cross-attention, area-pooled to ``grid``: ``[1, oh, ow]``."""
    if not store.cross_maps:
        raise ValueError("No cross-attention was recorded at the attention-loss resolution; the UNet layout is unusual.")
    (grid_hw, maps), = store.cross_maps.items()
    attention = maps[0].float().mean(-1).reshape(1, 1, *grid_hw)
    if tuple(grid_hw) != tuple(grid):
        attention = torch.nn.functional.adaptive_avg_pool2d(attention, tuple(grid))
    return attention[:, 0]


def _token_positions(ids: torch.Tensor, token_ids: Sequence[int]) -> list[int]:
    positions = []
    for token_id in token_ids:
        hits = (ids == token_id).nonzero().flatten().tolist()
        if not hits:
            raise ValueError("A placeholder token was cut off by the tokenizer; the prompt is too long.")
        positions.append(hits[0])
    return positions


def _pooled_words(text: PlaceholderText, words: Sequence[str]) -> torch.Tensor:
    with torch.no_grad():
        _, pooled = text.encode(text.tokenize(list(words)))
    return pooled.float()


def _pooled_tokens(text: PlaceholderText, tokens: Sequence[str]) -> torch.Tensor:
    _, pooled = text.encode(text.tokenize(list(tokens)))
    return pooled.float()


def _randn(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(like.shape, generator=generator).to(like.device, like.dtype)


def training_autocast(bundle):
    """The precision learning runs the frozen models in: autocast to the UNet's own half dtype when it is
    kept in bf16 or fp16 (so no weight is cast at each step); on a GPU with an fp32 UNet, autocast to the
    GPU's :func:`~ice_ops.bundle.frozen_dtype`; none for an fp32 UNet on the CPU (benchmarks time a bare UNet
    step under the same context)."""
    device_type = bundle.device.type
    if bundle.unet_dtype in HALF_DTYPES:
        return torch.autocast(device_type, dtype=bundle.unet_dtype)
    if device_type == "cuda":
        return torch.autocast("cuda", dtype=frozen_dtype(bundle.device))
    return torch.autocast(device_type, enabled=False)


def gradient_scaler(autocast) -> torch.amp.GradScaler:
    """Loss scaling for fp16 autocast, whose small gradients would round to zero on their way back to the
    fp32 token vectors (bf16 has fp32's range and needs none)."""
    return torch.amp.GradScaler(autocast.device, enabled=autocast._enabled and autocast.fast_dtype == torch.float16)


def out_of_memory_error(step: int, steps: int, device: torch.device) -> ValueError:
    return ValueError(
        f"Learning ran out of {device.type} memory at step {step + 1} of {steps}. Lower working_resolution on Load "
        "ICE Model (e.g. 384 or 256; it sets the size learning works at), close other programs that use the GPU, "
        "or free models with ComfyUI's Unload Models button; the number of steps does not change the memory a "
        "step needs."
    )


def _without_tokens(concepts: ConceptSet) -> ConceptSet:
    """A copy with no learned vectors, anchors or LoRA: what a learner that starts from the words returns
    besides its own tokens (phase-two tokens learned from older phase-one tokens would no longer match)."""
    result = concepts.replace(lora=None, anchors=())
    for concept in result.concepts:
        concept.vectors = {}
    return result


def _with_vectors(concepts: ConceptSet, vectors: dict[str, torch.Tensor], bundle, *, settings=None, anchors=None):
    updated = concepts.replace()
    for concept in updated.concepts:
        for role in list(BASE_ROLES) + list(anchors or concepts.anchors):
            name = placeholder_string(concept.name, role)
            if name in vectors:
                concept.vectors[role] = vectors[name].detach().float().cpu().clone()
    updated.fingerprint = text_encoder_fingerprint(bundle.text_encoder)
    if settings is not None:
        updated.settings = settings
    if anchors is not None:
        updated.anchors = tuple(anchors)
    return updated


def _check_steps(steps: int, what: str) -> None:
    if int(steps) != steps or steps <= 0:
        raise ValueError(f"{what} must be a positive whole number (the reference uses 400), got {steps}.")


def _check_lr(lr: float) -> None:
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"The learning rate must be a positive number (the reference uses 5e-4), got {lr}.")
