"""The defaults and names a user sees, in one place: the engine, the command line, the nodes' widgets and the
example workflows all read them from here. Imports nothing, so that ``nodes/_spec.py`` and the generators
can read it without loading torch.
"""
from __future__ import annotations

from typing import Callable

# The engine's progress callback: ``callback(step, total, preview)``; ``preview`` is an image tensor or None.
Callback = Callable[[int, int, object], None]
# An attention map's size, (height, width) in cells of the UNet level it comes from.
Grid = tuple[int, int]

# Stage One (the reference's defaults).
DEFAULT_STOP_FRACTION = 0.05  # stop when less than this fraction of the image is unexplained
DEFAULT_MAX_CONCEPTS = 6
DIFFSEG = "diffseg"  # the paper's segmentation: DiffSeg on self-attention, labelled by cross-attention
CROSS_ATTENTION = "cross-attention"  # threshold the word's cross-attention (small models)
SEGMENTATIONS = (DIFFSEG, CROSS_ATTENTION)
DEFAULT_TOP_K = 5  # words a retrieval reports

# Stage Two.
OBJECT_ROLE = "object"
INSTANCE_ROLE = "instance"
BASE_ROLES = (OBJECT_ROLE, INSTANCE_ROLE)
DEFAULT_STEPS = 400  # per phase, as in the reference
DEFAULT_LR = 5e-4
DEFAULT_ANCHORS = ("material", "colour")

# Sampling (Generate Image and `python -m ice_ops compose`).
SCHEDULERS = ("dpm++", "ddim", "euler")
DEFAULT_SAMPLE_STEPS = 25
DEFAULT_GUIDANCE = 7.5
