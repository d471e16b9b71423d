"""Compose prompts from learned concept tokens, and a small sampler for the CLI and tests.

Prompt syntax: ``[name.role]`` is that role's token of concept ``name`` (roles: ``object``, ``instance``
and each anchor, e.g. ``material``, ``colour``); ``[name]`` is the object token followed by the
concept's intrinsic tokens in anchor order (the reference's object-level prompt ``<&i><#i><%i><$i>``);
``\\[``, ``\\]`` and ``\\\\`` are literal ``[``, ``]`` and ``\\``; everything else is plain text.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .defaults import BASE_ROLES, DEFAULT_GUIDANCE, DEFAULT_SAMPLE_STEPS, OBJECT_ROLE, SCHEDULERS
from .tokens import PlaceholderText, placeholder_string

# British and American spellings of the same anchor; either is accepted when the other is the one learned.
ROLE_ALIASES = {"colour": "color", "color": "colour"}
ESCAPABLE = "[]\\"


# ---------------------------------------------------------------------- parsing (pure)
def parse_prompt(prompt: str) -> list[str | tuple[str, str | None]]:
    """Split a prompt into plain-text strings and ``(name, role)`` references (``role`` is ``None`` for
    ``[name]``). Adjacent text is merged; ``ValueError`` for unbalanced or empty brackets."""
    if not isinstance(prompt, str):
        raise ValueError(f"A prompt must be text, not {type(prompt).__name__}.")
    parts: list[str | tuple[str, str | None]] = []
    text: list[str] = []
    position = 0
    while position < len(prompt):
        char = prompt[position]
        if char == "\\" and position + 1 < len(prompt) and prompt[position + 1] in ESCAPABLE:
            text.append(prompt[position + 1])
            position += 2
        elif char == "[":
            end = _closing_bracket(prompt, position)
            if text:
                parts.append("".join(text))
                text = []
            parts.append(_reference(prompt[position + 1 : end]))
            position = end + 1
        elif char == "]":
            raise ValueError(
                f"Unbalanced ']' at character {position} of {prompt!r}; references look like [name.role], "
                "and a literal bracket is written \\]."
            )
        else:
            text.append(char)
            position += 1
    if text:
        parts.append("".join(text))
    return parts


def _closing_bracket(prompt: str, start: int) -> int:
    for position in range(start + 1, len(prompt)):
        if prompt[position] == "]":
            return position
        if prompt[position] == "[":
            break
    raise ValueError(
        f"Unbalanced '[' at character {start} of {prompt!r}; close it as in [bust.material], "
        "or write a literal bracket as \\[."
    )


def _reference(inside: str) -> tuple[str, str | None]:
    name, dot, role = inside.strip().rpartition(".")
    if not dot:
        name, role = role, ""
    name, role = name.strip(), role.strip()
    if not name or (dot and not role):
        raise ValueError(
            f"[{inside}] is not a concept reference; write [name] or [name.role], e.g. [bust] or [bust.material]."
        )
    return name, (role if dot else None)


# ---------------------------------------------------------------------- resolving against a concept set
def expand_prompt(prompt: str, concepts: Any) -> str:
    """The prompt with every reference replaced by placeholder strings (``<ice:name:role>``)."""
    pieces = [
        part if isinstance(part, str) else "".join(_placeholders(concepts, *part)) for part in parse_prompt(prompt)
    ]
    return "".join(pieces)


def referenced_vectors(prompt: str, concepts: Any) -> dict[str, torch.Tensor]:
    """Placeholder string -> learned vector for every token the prompt refers to."""
    vectors: dict[str, torch.Tensor] = {}
    for part in parse_prompt(prompt):
        if isinstance(part, str):
            continue
        concept = concepts.get(part[0])
        for role in _roles_of_reference(concepts, concept, part[1]):
            vectors[placeholder_string(concept.name, role)] = concept.vectors[role]
    return vectors


def _placeholders(concepts: Any, name: str, role: str | None) -> list[str]:
    concept = concepts.get(name)
    return [placeholder_string(concept.name, r) for r in _roles_of_reference(concepts, concept, role)]


def _roles_of_reference(concepts: Any, concept: Any, role: str | None) -> list[str]:
    """The learned roles ``[name.role]`` (one) or ``[name]`` (object + anchors in order) stands for."""
    anchors = tuple(concepts.anchors)
    wanted = [OBJECT_ROLE, *anchors] if role is None else [_resolve_role(concept, anchors, role)]
    for resolved in wanted:
        if resolved not in concept.vectors:
            raise ValueError(_not_learned_message(concept.name, resolved))
    return wanted


def _known_roles(concept: Any, anchors: Sequence[str]) -> list[str]:
    roles = [*BASE_ROLES, *anchors]
    return roles + [r for r in concept.vectors if r not in roles]


def _resolve_role(concept: Any, anchors: Sequence[str], role: str) -> str:
    known = _known_roles(concept, anchors)
    if role in known:
        return role
    alias = ROLE_ALIASES.get(role)
    if alias is not None and alias in known:
        return alias
    raise ValueError(f"Concept {concept.name!r} has no role {role!r}; its roles are: {', '.join(known)}.")


def _not_learned_message(name: str, role: str) -> str:
    if role in BASE_ROLES:
        how = "run learn_object_tokens (the LearnObjectTokens node) first"
    else:
        how = f"run learn_intrinsic_tokens with {role!r} among its anchors (the LearnIntrinsicTokens node) first"
    return f"The {role!r} token of concept {name!r} has not been learned yet; {how}."


# ---------------------------------------------------------------------- encoding
@dataclass
class ComposedPrompt:
    """Text-encoder conditioning of a composed prompt and its negative prompt."""

    hidden_states: torch.Tensor  # [1, L, D]
    pooled: torch.Tensor  # [1, D]
    negative_hidden_states: torch.Tensor  # [1, L, D]
    negative_pooled: torch.Tensor  # [1, D]
    text: str  # the prompt with placeholder strings
    negative_text: str = ""


def compose(bundle: Any, concepts: Any, prompt: str, *, negative: str = "") -> ComposedPrompt:
    """Encode ``prompt`` (and ``negative``, which may use references too) with the learned tokens.
    The bundle's tokenizer and text encoder are only read. Vectors learned on another text encoder are
    refused (``ValueError`` naming the model they were learned on)."""
    check = getattr(concepts, "check_text_encoder", None)
    if check is not None and (referenced_vectors(prompt, concepts) or referenced_vectors(negative, concepts)):
        check(bundle.text_encoder)
    text = expand_prompt(prompt, concepts)
    negative_text = expand_prompt(negative, concepts)
    placeholders = PlaceholderText(bundle.tokenizer, bundle.text_encoder)
    for source in (prompt, negative):
        for name, vector in referenced_vectors(source, concepts).items():
            if name not in placeholders.names:
                placeholders.add(name, vector)
    with torch.no_grad():
        hidden, pooled = placeholders.encode(placeholders.tokenize([text, negative_text]))
    return ComposedPrompt(hidden[:1], pooled[:1], hidden[1:], pooled[1:], text, negative_text)


# ---------------------------------------------------------------------- sampling
def generate(
    bundle: Any,
    cond: ComposedPrompt,
    *,
    seed: int = 0,
    steps: int = DEFAULT_SAMPLE_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    height: int | None = None,
    width: int | None = None,
    scheduler: str = "dpm++",
    callback: Callable[[int, int, Any], None] | None = None,
) -> torch.Tensor:
    """Sample one image ``[1, 3, H, W]`` in 0..1 with classifier-free guidance. The initial noise comes
    from a CPU generator seeded with ``seed`` (same seed, same image); ``callback(step, total, None)`` runs
    after every step, and an exception raised from it stops sampling."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a whole number of at least 1; got {steps!r}.")
    height = _checked_side("height", bundle.native_resolution if height is None else height, bundle.size_multiple)
    width = _checked_side("width", bundle.native_resolution if width is None else width, bundle.size_multiple)
    sampler = build_scheduler(bundle, scheduler)
    sampler.set_timesteps(steps, device=bundle.device)

    factor = bundle.vae_scale_factor
    shape = (1, int(bundle.unet.config.in_channels), height // factor, width // factor)
    noise = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(seed)), dtype=torch.float32)
    latents = noise.to(bundle.device) * sampler.init_noise_sigma

    guided = guidance != 1.0  # at guidance 1 the unconditional branch cancels out exactly
    context = torch.cat([cond.negative_hidden_states, cond.hidden_states]) if guided else cond.hidden_states
    context = context.to(bundle.device, bundle.unet_dtype)
    total = len(sampler.timesteps)
    with torch.no_grad():
        for step, timestep in enumerate(sampler.timesteps):
            model_input = torch.cat([latents, latents]) if guided else latents
            model_input = sampler.scale_model_input(model_input, timestep).to(bundle.unet_dtype)
            prediction = bundle.unet(model_input, timestep, encoder_hidden_states=context).sample.float()
            if guided:
                unconditional, conditional = prediction.chunk(2)
                prediction = unconditional + guidance * (conditional - unconditional)
            latents = sampler.step(prediction, timestep, latents).prev_sample
            if callback is not None:
                callback(step + 1, total, None)
    return bundle.decode_latents(latents)


def build_scheduler(bundle: Any, name: str) -> Any:
    """A diffusers sampling scheduler made from the bundle's training scheduler config (no download)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    classes = dict(zip(SCHEDULERS, (DPMSolverMultistepScheduler, DDIMScheduler, EulerDiscreteScheduler)))
    if name not in classes:
        raise ValueError(f"Unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}.")
    return classes[name].from_config(bundle.scheduler.config)


def _checked_side(label: str, value: int, multiple: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{label} must be a positive whole number of pixels; got {value!r}.")
    if value % multiple:
        lower = value // multiple * multiple
        options = [str(v) for v in (lower, lower + multiple) if v > 0]
        raise ValueError(
            f"{label} {value} is not a multiple of {multiple}, which this model needs; use {' or '.join(options)}."
        )
    return value
