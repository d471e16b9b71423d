"""Stage One: automatic concept localization (training-free).

Loop: *retrieve* the word that best describes what is still unexplained in the image, *segment* it with
one UNet pass (DiffSeg on self-attention, labelled by cross-attention of ``"<word> things background"``),
remove what was explained, and repeat until less than ``stop_fraction`` of the real image is left or
``max_concepts`` concepts were found.

``segmentation="cross-attention"`` replaces DiffSeg by a threshold on the word's own cross-attention, for
small models whose self-attention groups nothing (the Toy World UNet's is uniform to within 0.2 %, so
DiffSeg merges the whole image into one segment). Only the word's pixels are then explained.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from .attention import capture_attention
from .concepts import Concept, ConceptSet, unique_name
from .defaults import (
    DEFAULT_MAX_CONCEPTS,
    DEFAULT_STOP_FRACTION,
    DIFFSEG,
    SEGMENTATIONS,
    Callback,
)
from .imaging import MASK_THRESHOLD, overlay_masks, resize_image, resize_mask, to_image_tensor, working_size
from .progress import cancel_point
from .segment import aggregate_cross_attention, diffseg, label_segments, split_instances
from .text import word_token_positions

# Constants of the method: paper's tau, the reference's DiffSeg settings and instance size.
SEGMENT_TIMESTEP_FRACTION = 0.15  # t = 150 of 1000 training steps, on the clean latent
DEFAULT_KL_THRESHOLDS = (1.1, 1.1, 1.1)
MIN_INSTANCE_FRACTION = 0.025
PROMPT_FILLERS = ("things", "background")  # the segmentation prompt is "<word> things background"
WORD_INDEX = 0  # the segmentation prompt's words are (word, *PROMPT_FILLERS)
BACKGROUND_INDEX = 1 + PROMPT_FILLERS.index("background")
# Cross-attention segmentation: the word's pixels are those whose (bilinearly upsampled, summed over the
# grids) attention to the word reaches this fraction of its range above the image's minimum.
CROSS_ATTENTION_FRACTION = 0.5


@dataclass
class SegmentResult:
    """Masks at input size: the word's union ``mask``, its ``instances`` above the minimum area, and
    ``removed`` (the word's and the background's segments, which the loop treats as explained)."""

    word: str
    mask: torch.Tensor
    instances: list[torch.Tensor]
    removed: torch.Tensor
    labels: torch.Tensor
    segment_words: dict[int, str] = field(default_factory=dict)
    contrast: float = float("inf")  # see attention_contrast


def segmentation_words(word: str) -> list[str]:
    cleaned = word.strip()
    if not cleaned or len(cleaned.split()) != 1:
        raise ValueError(f"The word to segment must be one word such as 'vase', got {word!r}.")
    return [cleaned, *PROMPT_FILLERS]


def segment_word(
    bundle,
    image,
    word: str,
    *,
    ignore: torch.Tensor | None = None,
    timestep: int | None = None,
    kl_thresholds: Sequence[float] = DEFAULT_KL_THRESHOLDS,
    refine: bool = True,
    min_instance_fraction: float = MIN_INSTANCE_FRACTION,
    segmentation: str = DIFFSEG,
    attention_fraction: float = CROSS_ATTENTION_FRACTION,
) -> SegmentResult:
    """Segment ``word`` in ``image`` with one UNet pass. ``ignore`` ([H, W], 1 = already explained) is
    blanked before encoding and never part of the result. ``segmentation``: ``"diffseg"`` (the paper) or
    ``"cross-attention"`` (see the module notes), which keeps the pixels whose attention to the word reaches
    ``attention_fraction`` of its range."""
    check_segmentation(segmentation)
    check_attention_fraction(attention_fraction)
    image, ignore, working = _prepare_input(bundle, image, ignore)
    size = tuple(working.shape[-2:])
    words = segmentation_words(word)
    column_groups = _column_groups(word_token_positions(bundle.tokenizer, words))
    self_maps, cross = _attend(bundle, working, words, record_self=segmentation == DIFFSEG, timestep=timestep)
    word_map = _word_map(cross, column_groups)
    if segmentation == DIFFSEG:
        labels, segment_to_word = _diffseg_segments(self_maps, cross, column_groups, size, kl_thresholds, refine)
    else:
        labels, segment_to_word = _word_map_segments(word_map, attention_fraction)
    return _segment_result(words, labels, segment_to_word, word_map, ignore, tuple(image.shape[-2:]),
                           min_instance_fraction)


def _diffseg_segments(self_maps, cross, column_groups, size, kl_thresholds, refine):
    """DiffSeg's segments of the self-attention, each given to the prompt word that attends to it most."""
    labels = diffseg(self_maps, size, kl_thresholds=tuple(kl_thresholds), refine=refine)
    return labels, label_segments(labels, cross, column_groups)


def _word_map_segments(word_map, attention_fraction):
    """Two segments: the word's pixels (segment 1) and the rest (segment 0, left unexplained)."""
    return cross_attention_labels(word_map, attention_fraction), {1: WORD_INDEX}


def _segment_result(words, labels, segment_to_word, word_map, ignore, image_size, min_instance_fraction):
    """The word's mask, what it explains (the word and the background) and its instances, at image size;
    ``ignore`` (already explained pixels) is never part of them."""
    size = tuple(labels.shape)
    word_mask = _union(labels, [s for s, w in segment_to_word.items() if w == WORD_INDEX])
    removed = _union(labels, [s for s, w in segment_to_word.items() if w in (WORD_INDEX, BACKGROUND_INDEX)])
    unexplained = torch.ones(size) if ignore is None else 1 - resize_mask(ignore, size)
    contrast = attention_contrast(word_map, word_mask > MASK_THRESHOLD, unexplained > MASK_THRESHOLD)
    labels_full = torch.nn.functional.interpolate(labels[None, None].float(), size=image_size, mode="nearest")
    word_mask, removed = resize_mask(word_mask, image_size), resize_mask(removed, image_size)
    if ignore is not None:
        keep = 1 - ignore
        word_mask, removed = word_mask * keep, removed * keep
    instances = split_instances(word_mask > MASK_THRESHOLD, min_fraction=min_instance_fraction)
    return SegmentResult(
        word=words[WORD_INDEX],
        mask=word_mask,
        instances=instances,
        removed=removed,
        labels=labels_full[0, 0].long(),
        segment_words={int(s): words[w] for s, w in segment_to_word.items()},
        contrast=contrast,
    )


def attention_contrast(word_map: torch.Tensor, word_mask: torch.Tensor, region: torch.Tensor) -> float:
    """How much more the word attends to its own mask than to the rest of ``region`` (the unexplained
    pixels): the ratio of the mean attention inside to the mean outside. A word whose object is in the
    image concentrates its attention there; a word with nothing to point at spreads it, and the ratio
    falls towards 1. ``inf`` when the mask covers the whole region, 0 when it is empty."""
    inside = word_mask & region
    outside = region & ~word_mask
    if not bool(inside.any()):
        return 0.0
    if not bool(outside.any()):
        return float("inf")
    return float(word_map[inside].mean() / word_map[outside].mean().clamp(min=torch.finfo(word_map.dtype).tiny))


def _prepare_input(bundle, image, ignore: torch.Tensor | None):
    """(the image as a CPU tensor, the checked ``ignore`` mask, the image at the model's working size with the
    ignored pixels blanked)."""
    image = to_image_tensor(image).cpu()
    height, width = image.shape[-2:]
    ignore = _check_mask(ignore, (height, width), "ignore")
    size = working_size(height, width, bundle.native_resolution, bundle.size_multiple)
    working = resize_image(image, size)
    if ignore is not None:
        working = working * (1 - resize_mask(ignore, size))[None]
    return image, ignore, working


def _attend(bundle, working: torch.Tensor, words: Sequence[str], *, record_self: bool, timestep: int | None = None):
    """One UNet pass on the clean latent of ``working`` with the prompt ``words``: (self-attention maps per
    grid, or {} without ``record_self``; cross-attention of every word's tokens aggregated to ``[h, w, P]``)."""
    size = tuple(working.shape[-2:])
    columns = [position for group in word_token_positions(bundle.tokenizer, words) for position in group]
    step = timestep if timestep is not None else int(round(SEGMENT_TIMESTEP_FRACTION * bundle.num_train_timesteps))
    with torch.no_grad():
        latent = bundle.encode_image(working, size).to(bundle.unet_dtype)
        context = bundle.text_encoder(bundle.tokenize([" ".join(words)]))[0].to(bundle.unet_dtype)
        with capture_attention(bundle.unet, record_self=record_self, cross_positions=columns) as store:
            bundle.unet(latent, torch.tensor([step], device=bundle.device), encoder_hidden_states=context)
        self_maps = {grid: maps[0].float().cpu() for grid, maps in store.self_maps.items()}
        cross_maps = {grid: maps[0].float().cpu() for grid, maps in store.cross_maps.items()}
    return self_maps, aggregate_cross_attention(cross_maps, size)


def _word_map(cross: torch.Tensor, column_groups: Sequence[Sequence[int]]) -> torch.Tensor:
    """The segmented word's (the prompt's first word) ``[h, w]`` map: the mean over its token columns."""
    return cross[..., list(column_groups[0])].mean(-1)


def word_attention_map(bundle, image, word: str, *, ignore: torch.Tensor | None = None) -> torch.Tensor:
    """``[H, W]`` (input size) cross-attention of ``word`` in Stage One's prompt, aggregated over the UNet's
    grids as segmentation reads it (mean over the word's tokens); explained pixels (``ignore``) are 0."""
    image, ignore, working = _prepare_input(bundle, image, ignore)
    height, width = image.shape[-2:]
    words = segmentation_words(word)
    groups = _column_groups(word_token_positions(bundle.tokenizer, words))
    _, cross = _attend(bundle, working, words, record_self=False)
    word_map = _word_map(cross, groups)
    full = torch.nn.functional.interpolate(word_map[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]
    return full if ignore is None else full * (1 - ignore)


def check_segmentation(segmentation: str) -> None:
    if segmentation not in SEGMENTATIONS:
        raise ValueError(f"Unknown segmentation {segmentation!r}; choose one of {', '.join(SEGMENTATIONS)}.")


def check_attention_fraction(fraction: float) -> None:
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"attention_fraction must lie between 0 and 1 (default {CROSS_ATTENTION_FRACTION}), got {fraction}.")


def cross_attention_labels(word_map: torch.Tensor, fraction: float = CROSS_ATTENTION_FRACTION) -> torch.Tensor:
    """``[H, W]`` segment ids from one word's attention map: 1 where the map reaches ``fraction`` of its range
    above its minimum, else 0 (all 0 for a flat map)."""
    low, high = word_map.min(), word_map.max()
    if float(high - low) <= 0:
        return torch.zeros(word_map.shape, dtype=torch.long)
    return ((word_map - low) >= fraction * (high - low)).long()


def localize(
    bundle,
    retriever,
    image,
    stop_fraction: float = DEFAULT_STOP_FRACTION,
    max_concepts: int = DEFAULT_MAX_CONCEPTS,
    seed: int = 0,
    callback: Callback | None = None,
    *,
    kl_thresholds: Sequence[float] = DEFAULT_KL_THRESHOLDS,
    min_instance_fraction: float = MIN_INSTANCE_FRACTION,
    synonym_threshold: float | None = None,
    segmentation: str = DIFFSEG,
    min_score: float | None = None,
    min_contrast: float | None = None,
    attention_fraction: float = CROSS_ATTENTION_FRACTION,
) -> ConceptSet:
    """Find the objects in ``image`` until at most ``stop_fraction`` of it is unexplained; returns a ConceptSet of words, scores and disjoint masks at input size.

    At most ``max_concepts`` retrieval iterations run, and at most ``max_concepts`` concepts are kept; the
    loop also ends when every vocabulary word is a found word or a near-synonym of one (cosine at or above
    ``synonym_threshold``; ``None`` uses the retriever's own, 0.85 as in the reference unless the retriever says).
    Two optional stop rules end the search early, before the found word becomes a concept: ``min_score``
    (the retrieval probability of the next word is below it) and ``min_contrast`` (the next word's
    :func:`attention_contrast` is below it: the model finds nothing of it in what is left). They matter for
    ``segmentation="cross-attention"`` (whose masks keep the pixels at ``attention_fraction`` of the word's
    attention range or above), which explains only the words' pixels, so that the unexplained fraction
    never falls below ``stop_fraction``; ``None`` turns a rule off.
    Everything is deterministic (no sampling happens); ``seed`` seeds torch's RNG inside a forked RNG
    state for any stochastic component a custom model may have, and is recorded in the settings.
    """
    if not 0.0 <= stop_fraction < 1.0:
        raise ValueError(f"stop_fraction must be in [0, 1), got {stop_fraction}; the paper uses 0.05.")
    if max_concepts < 1:
        raise ValueError(f"max_concepts must be at least 1, got {max_concepts}.")
    check_segmentation(segmentation)
    check_attention_fraction(attention_fraction)
    for name, value in (("min_score", min_score), ("min_contrast", min_contrast)):
        if value is not None and not value >= 0:
            raise ValueError(f"{name} must be a number >= 0, or None to turn that stop rule off; got {value}.")
    image = to_image_tensor(image).cpu()
    if float(image.max()) <= 0:
        raise ValueError("The image is entirely black; there is nothing to localize. Load a photo with visible objects.")
    height, width = image.shape[-2:]
    working_size(height, width, bundle.native_resolution, bundle.size_multiple)  # validates the size early

    explained = torch.zeros(height, width)
    concepts: list[Concept] = []
    found_words: list[str] = []
    cuda_devices = [bundle.device] if bundle.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        for iteration in range(max_concepts):
            if unexplained_fraction(explained) <= stop_fraction or len(concepts) >= max_concepts:
                break
            if nothing_left_visible(image, explained):
                break  # what is left unexplained is black: there is nothing more to see
            if not retriever.remaining_words(found_words, synonym_threshold):
                break  # every word left is a found word or a near-synonym of one
            ranked = retriever.rank(
                image, explained=explained, exclude=found_words, top_k=1, synonym_threshold=synonym_threshold
            )
            word, score = ranked[0]
            if min_score is not None and score < min_score:
                break  # the retriever is not confident that anything more is there
            found_words.append(word)
            cancel_point(callback)  # retrieval is done; the UNet pass of the segmentation comes next
            result = segment_word(
                bundle,
                image,
                word,
                ignore=explained,
                kl_thresholds=kl_thresholds,
                min_instance_fraction=min_instance_fraction,
                segmentation=segmentation,
                attention_fraction=attention_fraction,
            )
            if min_contrast is not None and result.contrast < min_contrast:
                found_words.pop()
                break  # the model finds nothing of the word in what is left
            for instance in result.instances[: max_concepts - len(concepts)]:
                name = unique_name(word, (c.name for c in concepts))
                concepts.append(Concept(name=name, word=word, score=float(score), mask=instance))
            explained = torch.maximum(explained, result.removed)
            if callback is not None:
                callback(iteration + 1, max_concepts, localization_preview(image, concepts))

    return ConceptSet(
        concepts=concepts,
        image_size=(int(height), int(width)),
        settings={
            "stop_fraction": stop_fraction,
            "max_concepts": max_concepts,
            "seed": seed,
            "kl_thresholds": list(kl_thresholds),
            "min_instance_fraction": min_instance_fraction,
            "segmentation": segmentation,
            "min_score": min_score,
            "min_contrast": min_contrast,
            "attention_fraction": attention_fraction,
            "retrieved_words": found_words,
            "unexplained_fraction": unexplained_fraction(explained),
        },
    )


def nothing_left_visible(image: torch.Tensor, explained: torch.Tensor) -> bool:
    """True when every pixel that is not yet explained is black."""
    unexplained = explained <= MASK_THRESHOLD
    return not bool((image.amax(0)[unexplained] > 0).any())


def unexplained_fraction(explained: torch.Tensor) -> float:
    return float(1.0 - explained.float().mean())


def localization_preview(image: torch.Tensor, concepts: Sequence[Concept]) -> torch.Tensor:
    if not concepts:
        return image.clone()
    return overlay_masks(image, torch.stack([c.mask for c in concepts]))


def _column_groups(positions: Sequence[Sequence[int]]) -> list[list[int]]:
    """Map each word's token positions to the columns of the captured cross-attention."""
    groups, cursor = [], 0
    for group in positions:
        groups.append(list(range(cursor, cursor + len(group))))
        cursor += len(group)
    return groups


def _union(labels: torch.Tensor, segment_ids: Sequence[int]) -> torch.Tensor:
    if not segment_ids:
        return torch.zeros(labels.shape, dtype=torch.float32)
    return torch.isin(labels, torch.tensor(list(segment_ids), dtype=labels.dtype)).float()


def _check_mask(mask: torch.Tensor | None, size: tuple[int, int], what: str) -> torch.Tensor | None:
    if mask is None:
        return None
    mask = mask.detach().float().cpu()
    if mask.ndim == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if tuple(mask.shape) != tuple(size):
        raise ValueError(
            f"The {what} mask is {tuple(mask.shape)} but the image is {tuple(size)}; give a mask of the image's size."
        )
    return mask
