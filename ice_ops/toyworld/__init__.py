"""Toy World: synthetic scenes with known truth, and a tiny SD + CLIP trained on them (the embedded model).

The shipped weights (``weights/``) load through the project's normal loaders, so everything that takes a
``DiffusionBundle`` or a ``ClipRetriever`` runs on them with no download.
"""
from __future__ import annotations

import os

import torch

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
DIFFUSERS_FOLDER = os.path.join(WEIGHTS_DIR, "diffusers")
CLIP_CONFIG_PATH = os.path.join(WEIGHTS_DIR, "open_clip_config.json")
CLIP_WEIGHTS_PATH = os.path.join(WEIGHTS_DIR, "open_clip.safetensors")
# The toy CLIP's text space holds little more than the Toy World words, all close together (the retrieval
# template dominates), so only words already found are excluded, never their "near-synonyms".
SYNONYM_THRESHOLD = 1.0
# Stage One on this model thresholds the noun's cross-attention: its self-attention was taught to stay within
# objects, but DiffSeg's labelling of the segments still misses the nouns (docs/DECISIONS.md, Toy World).
SEGMENTATION = "cross-attention"
# Stop rule of cross-attention mode, chosen by `python -m devtools.toyworld.calibrate` on 64 validation scenes
# (never on the reported ones): stop when the next word attends less than 4x more to its mask than elsewhere.
MIN_CONTRAST = 4.0


def localize_settings() -> dict:
    """Keyword arguments of ``ice_ops.localization.localize`` for the Toy World model (the evaluation, the demo
    and the tests all localize with these)."""
    from .scenes import MAX_OBJECTS

    return {"segmentation": SEGMENTATION, "synonym_threshold": SYNONYM_THRESHOLD, "max_concepts": MAX_OBJECTS,
            "min_contrast": MIN_CONTRAST}


def embedded_weights_present() -> bool:
    """True when the trained Toy World weights ship with this install."""
    return os.path.isdir(DIFFUSERS_FOLDER) and os.path.isfile(CLIP_CONFIG_PATH) and os.path.isfile(CLIP_WEIGHTS_PATH)


def _require_weights() -> None:
    if not embedded_weights_present():
        raise ValueError(
            f"The Toy World weights are missing from {WEIGHTS_DIR}; reinstall the package, or train them with "
            f"`python -m devtools.toyworld.train --out DIR` and copy DIR's contents there."
        )


def embedded_bundle(device: str | torch.device = "cpu"):
    """The embedded Toy World diffusion model as a ``DiffusionBundle`` (fp32 compute)."""
    from ..bundle import DiffusionBundle

    _require_weights()
    return DiffusionBundle.from_pretrained(DIFFUSERS_FOLDER, device=device)


def embedded_retriever(device: str | torch.device = "cpu", vocabulary=None):
    """The embedded Toy World CLIP as a ``ClipRetriever`` over the Toy World shapes (or ``vocabulary``)."""
    from ..retrieve import ClipRetriever
    from .scenes import SHAPES

    _require_weights()
    words = list(SHAPES) if vocabulary is None else vocabulary
    return ClipRetriever.from_pretrained(
        CLIP_CONFIG_PATH, CLIP_WEIGHTS_PATH, vocabulary=words, device=device, synonym_threshold=SYNONYM_THRESHOLD
    )
