"""Attention supervision for training the Toy World UNet, and the probe that chooses its checkpoint.

Real Stable Diffusion learned from web-scale data that a noun's cross-attention lands on its object and that
self-attention stays within objects; ICE's Stage One relies on both. A toy UNet trained for an hour on a CPU
does not learn that from the diffusion loss alone (pointing 39 % with Stage One's prompt after 3 480 steps),
so the trainer adds two losses computed on the *training* scenes, whose masks it knows:

- cross-attention: for every supervised word (nouns, their colour and material words, and "background"), the
  KL divergence from the word's true region (normalised to a distribution over the attention grid) to the
  word's head-averaged attention map (normalised over pixels). It pulls the word's attention onto its region
  and spreads it over the whole region, which is what thresholding the map into a mask needs;
- self-attention: for every query pixel, minus the log of the attention mass it gives to its own region
  (its object, or the background), so that DiffSeg's KL merging separates objects.

The ICE pipeline itself never sees a mask of a held-out scene: the probe below measures pointing and IoU on
scenes of a validation seed range that neither training nor the reported evaluation uses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

# Region index of the background in a scene's region stack: objects take 0..MAX_OBJECTS-1.
BACKGROUND_REGION = -1
# Supervise only timesteps whose noisy latent still shows the layout (t < this fraction of the schedule);
# Stage One reads attention at t = 0.15 and Stage Two trains on all t, but at t near 1000 the latent is noise.
SUPERVISED_TIMESTEP_FRACTION = 0.7
# Self-attention supervision only on grids whose cells are smaller than an object (4x4 cells cover objects).
MIN_SELF_SUPERVISED_SIDE = 8
PROBABILITY_FLOOR = 1e-8


@dataclass
class SupervisionTargets:
    """Targets of one training batch.

    ``regions``: float ``[B, R, H, W]`` region indicators at image size (objects, then the background last).
    ``token_regions``: long ``[B, T]`` region index per text position, -100 for unsupervised positions.
    ``weights``: float ``[B]``, 0 for samples not supervised (noisy timesteps, empty captions).
    """

    regions: torch.Tensor
    token_regions: torch.Tensor
    weights: torch.Tensor
    _pooled: dict = field(default_factory=dict)

    def pooled(self, side: int) -> torch.Tensor:
        """Region fractions ``[B, R, side*side]`` (area pooling: the share of each cell in each region)."""
        if side not in self._pooled:
            pooled = F.adaptive_avg_pool2d(self.regions, (side, side))
            self._pooled[side] = pooled.flatten(2)
        return self._pooled[side]


class AttentionLosses:
    """Accumulates the supervision losses of the attention layers during one UNet call."""

    def __init__(self) -> None:
        self.targets: SupervisionTargets | None = None
        self.cross_terms: list[torch.Tensor] = []
        self.self_terms: list[torch.Tensor] = []

    def start(self, targets: SupervisionTargets | None) -> None:
        self.targets = targets
        self.cross_terms, self.self_terms = [], []

    def cross_loss(self) -> torch.Tensor:
        return torch.stack(self.cross_terms).mean() if self.cross_terms else torch.zeros(())

    def self_loss(self) -> torch.Tensor:
        return torch.stack(self.self_terms).mean() if self.self_terms else torch.zeros(())

    def add_cross(self, probs: torch.Tensor) -> None:
        """``probs``: head-averaged ``[B, N, T]`` cross-attention of one layer."""
        targets = self.targets
        if targets is None or float(targets.weights.sum()) == 0:
            return
        side = int(round(math.sqrt(probs.shape[1])))
        fractions = targets.pooled(side)  # [B, R, N]
        supervised = targets.token_regions >= 0  # [B, T]
        if not bool(supervised.any()):
            return
        index = targets.token_regions.clamp(min=0)
        # Target distribution over pixels for each token: its region's fractions, normalised.
        region_maps = torch.gather(fractions, 1, index[..., None].expand(-1, -1, fractions.shape[-1]))  # [B, T, N]
        mass = region_maps.sum(-1, keepdim=True)
        supervised = supervised & (mass[..., 0] > 0)
        target = region_maps / mass.clamp(min=PROBABILITY_FLOOR)
        attention = probs.transpose(1, 2)  # [B, T, N]
        attention = attention / attention.sum(-1, keepdim=True).clamp(min=PROBABILITY_FLOOR)
        kl = (target * (target.clamp(min=PROBABILITY_FLOOR).log() - attention.clamp(min=PROBABILITY_FLOOR).log())).sum(-1)
        weight = supervised.float() * targets.weights[:, None]
        if float(weight.sum()) > 0:
            self.cross_terms.append((kl * weight).sum() / weight.sum())

    def add_self(self, probs: torch.Tensor) -> None:
        """``probs``: head-averaged ``[B, N, N]`` self-attention of one layer."""
        targets = self.targets
        if targets is None or float(targets.weights.sum()) == 0:
            return
        side = int(round(math.sqrt(probs.shape[1])))
        if side < MIN_SELF_SUPERVISED_SIDE:
            return
        labels = targets.pooled(side).argmax(1)  # [B, N]: the region holding most of each cell
        same = (labels[:, :, None] == labels[:, None, :]).float()
        mass = (probs * same).sum(-1)  # [B, N]
        loss = -mass.clamp(min=PROBABILITY_FLOOR).log().mean(-1)
        self.self_terms.append((loss * targets.weights).sum() / targets.weights.sum())


class SupervisedAttnProcessor:
    """``AttnProcessor2_0``'s computation with explicit probabilities, fed to :class:`AttentionLosses`.

    Covers what the Toy World UNet's transformer blocks use (no spatial norm, no group norm, no masks)."""

    def __init__(self, losses: AttentionLosses, supervise_self: bool) -> None:
        self.losses = losses
        self.supervise_self = supervise_self

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if attention_mask is not None or attn.spatial_norm is not None or attn.group_norm is not None:
            raise ValueError("SupervisedAttnProcessor supports plain transformer attention only.")
        is_cross = encoder_hidden_states is not None
        context = encoder_hidden_states if is_cross else hidden_states
        batch, queries, _ = hidden_states.shape
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        probs = (torch.matmul(query, key.transpose(-1, -2)) * attn.scale).softmax(dim=-1)
        if self.losses.targets is not None:
            if is_cross:
                self.losses.add_cross(probs.mean(1))
            elif self.supervise_self:
                self.losses.add_self(probs.mean(1))
        out = torch.matmul(probs, value).transpose(1, 2).reshape(batch, queries, attn.heads * head_dim)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def install_supervision(unet, losses: AttentionLosses, supervise_self: bool) -> None:
    unet.set_attn_processor(SupervisedAttnProcessor(losses, supervise_self))


def remove_supervision(unet) -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())


# --------------------------------------------------------------------------------------------- captions
@dataclass(frozen=True)
class Caption:
    """A caption as words (each one CLIP token) and the region each word is supervised onto (None: none)."""

    words: tuple[str, ...]
    regions: tuple[int | None, ...]

    @property
    def text(self) -> str:
        return " ".join(self.words)

    def token_regions(self, length: int, background: int) -> list[int]:
        """Region per text position (position 0 is the start token); -100 where unsupervised."""
        out = [-100] * length
        for position, region in enumerate(self.regions, start=1):
            if region is not None and position < length:
                out[position] = background if region == BACKGROUND_REGION else region
        return out


EMPTY_CAPTION = Caption((), ())


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def phrase_caption(objects: list[tuple[int, tuple[str, str, str]]], *, photo: bool, background: bool) -> Caption:
    """``"a red striped square , a blue plain circle and a ... on a textured background"``; ``objects`` are
    (region index, (shape, colour, material)) in the order to name them."""
    words: list[str] = []
    regions: list[int | None] = []
    if photo:
        words += ["a", "photo", "of"]
        regions += [None] * 3
    for number, (region, (shape, colour, material)) in enumerate(objects):
        if number:
            separator = "and" if number == len(objects) - 1 else ","
            words.append(separator)
            regions.append(None)
        words += [_article(colour), colour, material, shape]
        regions += [None, region, region, region]
    if background:
        words += ["on", "a", "textured", "background"]
        regions += [None, None, None, BACKGROUND_REGION]
    return Caption(tuple(words), tuple(regions))


def stage_one_caption(region: int, shape: str) -> Caption:
    """Stage One's segmentation prompt ``"<shape> things background"`` (ice_ops.localization)."""
    from ice_ops.localization import PROMPT_FILLERS

    return Caption((shape, *PROMPT_FILLERS), (region, None, BACKGROUND_REGION))


# --------------------------------------------------------------------------------------------- probe
@torch.no_grad()
def attention_probe(bundle, scenes, segmentations: tuple[str, ...] = ("cross-attention", "diffseg")) -> dict:
    """Pointing and IoU of every object's noun with Stage One's own prompt, over ``scenes``.

    ``pointing``: share of objects whose noun's aggregated cross-attention peaks inside the object.
    ``iou_<segmentation>``: mean IoU of Stage One's word mask (``segment_word``) with the true mask.
    """
    from ice_ops.localization import word_attention_map, segment_word

    pointing, ious = [], {s: [] for s in segmentations}
    for scene in scenes:
        for obj in scene.objects:
            attention = word_attention_map(bundle, scene.image, obj.shape)
            peak = int(attention.flatten().argmax())
            pointing.append(bool(obj.mask.flatten()[peak]))
            for segmentation in segmentations:
                mask = segment_word(bundle, scene.image, obj.shape, segmentation=segmentation).mask > 0.5
                union = int((mask | obj.mask).sum())
                ious[segmentation].append(int((mask & obj.mask).sum()) / max(union, 1))
    result = {"pointing": round(float(np.mean(pointing)), 4)}
    for segmentation, values in ious.items():
        result[f"iou_{segmentation.replace('-', '_')}"] = round(float(np.mean(values)), 4)
    return result
