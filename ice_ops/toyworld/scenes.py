"""Toy World scenes: seeded RGB images of 1-3 non-overlapping shapes with known words, masks and attributes.

Every object has a shape (its noun), a colour and a material rendered as a surface pattern; the
background is a low-saturation texture, so saturation alone separates objects from the background.
All words are single pieces of the CLIP BPE vocabulary (checked in the tests), which makes token
positions and labels unambiguous. Rendering is pure numpy and deterministic for a given seed.

Seeds: training uses seeds below :data:`VALIDATION_SEED_OFFSET`; validation (choosing checkpoints and
thresholds) uses seeds from there up to :data:`HELD_OUT_SEED_OFFSET`; the reported evaluation adds that
offset, so the three sets never share a scene.
"""
from __future__ import annotations

import colorsys
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

DEFAULT_SIZE = 64
MAX_OBJECTS = 3
VALIDATION_SEED_OFFSET = 500_000_000  # validation seeds start here; training seeds stay below it
HELD_OUT_SEED_OFFSET = 1_000_000_000  # evaluation seeds start here

SHAPES = ("circle", "square", "triangle", "star", "heart", "cross")
# Fully saturated palette with hues at least 25 degrees apart, so a hue read-out separates them.
COLOURS = {
    "red": (0.90, 0.10, 0.10),
    "orange": (0.95, 0.50, 0.05),
    "yellow": (0.95, 0.85, 0.10),
    "green": (0.15, 0.75, 0.15),
    "blue": (0.15, 0.30, 0.95),
    "purple": (0.55, 0.15, 0.85),
    "pink": (0.95, 0.35, 0.70),
}
MATERIALS = ("plain", "striped", "dotted", "checked")

# Object size: bounding radius as a fraction of the image side (at 64 px: about 8 to 13 px).
MIN_RADIUS_FRACTION = 0.13
MAX_RADIUS_FRACTION = 0.20
GAP_FRACTION = 0.03  # free space between the bounding circles of two objects
PLACEMENT_ATTEMPTS = 200
# Patterns: period in pixels at 64 px (scaled with the size); dark parts are the colour at this brightness.
PATTERN_PERIOD_FRACTION = 8 / 64
DOT_RADIUS_FRACTION = 0.28  # of the period
DARK_SHADE = 0.4
# Background: value noise, low saturation so it never reads as an object colour.
BACKGROUND_VALUE_RANGE = (0.25, 0.55)
BACKGROUND_SATURATION_MAX = 0.15
BACKGROUND_CELLS = (4, 8)  # coarse noise grid sizes
BACKGROUND_GRAIN = 0.03

# Pixel classifiers (validated on ground-truth renders in tests/test_toyworld.py).
FOREGROUND_MIN_SATURATION = 0.45  # objects are >= 0.8 saturated; the background <= BACKGROUND_SATURATION_MAX
FOREGROUND_MIN_VALUE = 0.12
DARK_SPLIT = 0.5 * (1 + DARK_SHADE)  # brightness (relative to the object's bright level) between shades
PLAIN_MAX_DARK_FRACTION = 0.08
STRIPED_MIN_ROW_PURITY = 0.75
DOTTED_MAX_DARK_FRACTION = 0.36


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    material: str
    mask: torch.Tensor  # bool [H, W]
    centre: tuple[float, float]  # (row, column) in pixels
    radius: float

    @property
    def phrase(self) -> str:
        return f"{self.colour} {self.material} {self.shape}"


@dataclass(frozen=True)
class Scene:
    image: torch.Tensor  # float [3, H, W] in 0..1
    objects: tuple[SceneObject, ...]
    seed: int
    caption: str = field(default="")

    @property
    def words(self) -> list[str]:
        return [o.shape for o in self.objects]

    @property
    def colours(self) -> list[str]:
        return [o.colour for o in self.objects]

    @property
    def materials(self) -> list[str]:
        return [o.material for o in self.objects]

    @property
    def masks(self) -> torch.Tensor:
        """bool ``[N, H, W]``, one mask per object."""
        height, width = self.image.shape[-2:]
        if not self.objects:
            return torch.zeros(0, height, width, dtype=torch.bool)
        return torch.stack([o.mask for o in self.objects])


# ------------------------------------------------------------------------------------------ captions
def make_caption(objects: Sequence[SceneObject]) -> str:
    """``"a red striped circle and a blue plain square"`` (objects in the given order)."""
    if not objects:
        return "an empty background"
    phrases = [f"{_article(o.phrase)} {o.phrase}" for o in objects]
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _article(phrase: str) -> str:
    return "an" if phrase[0] in "aeiou" else "a"


# ------------------------------------------------------------------------------------------ geometry
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    coords = np.arange(size, dtype=np.float64) + 0.5
    return np.meshgrid(coords, coords, indexing="ij")  # rows, cols


def _polygon_inside(u: np.ndarray, v: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Even-odd test of points (u, v) against a closed polygon of (u, v) vertices."""
    inside = np.zeros(u.shape, dtype=bool)
    count = len(vertices)
    for i in range(count):
        u1, v1 = vertices[i]
        u2, v2 = vertices[(i + 1) % count]
        crosses = (v1 > v) != (v2 > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            at = u1 + (v - v1) * (u2 - u1) / (v2 - v1)
        inside ^= crosses & (u < at)
    return inside


def _star_vertices(points: int = 5, inner: float = 0.45) -> np.ndarray:
    angles = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


_TRIANGLE = np.array([[0.0, -1.0], [0.95, 0.72], [-0.95, 0.72]])
_STAR = _star_vertices()
SQUARE_HALF_SIDE = 0.8  # of the bounding radius
CROSS_ARM_HALF_WIDTH = 0.32
HEART_SCALE = 1.25


def shape_mask(shape: str, centre: tuple[float, float], radius: float, size: int) -> np.ndarray:
    """bool ``[size, size]``: pixels whose centres lie inside ``shape`` (u right, v down, in radii)."""
    rows, cols = _grid(size)
    u = (cols - centre[1]) / radius
    v = (rows - centre[0]) / radius
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= SQUARE_HALF_SIDE
    if shape == "triangle":
        return _polygon_inside(u, v, _TRIANGLE)
    if shape == "star":
        return _polygon_inside(u, v, _STAR)
    if shape == "heart":
        x, y = u * HEART_SCALE, -(v * HEART_SCALE - 0.15)
        return (x * x + y * y - 1) ** 3 - x * x * y**3 <= 0
    if shape == "cross":
        arm = (np.abs(u) <= CROSS_ARM_HALF_WIDTH) & (np.abs(v) <= 1.0)
        return arm | ((np.abs(v) <= CROSS_ARM_HALF_WIDTH) & (np.abs(u) <= 1.0))
    raise ValueError(f"Unknown shape {shape!r}; choose one of {', '.join(SHAPES)}.")


def material_shade(material: str, size: int) -> np.ndarray:
    """float ``[size, size]``: 1 where the pattern is bright, :data:`DARK_SHADE` where it is dark."""
    period = max(2, int(round(PATTERN_PERIOD_FRACTION * size)))
    rows, cols = np.indices((size, size))
    if material == "plain":
        dark = np.zeros((size, size), dtype=bool)
    elif material == "striped":  # horizontal bands, half a period each
        dark = (rows // (period // 2)) % 2 == 1
    elif material == "checked":
        half = period // 2
        dark = ((rows // half) + (cols // half)) % 2 == 1
    elif material == "dotted":
        dr = (rows % period) + 0.5 - period / 2
        dc = (cols % period) + 0.5 - period / 2
        dark = dr * dr + dc * dc <= (DOT_RADIUS_FRACTION * period) ** 2
    else:
        raise ValueError(f"Unknown material {material!r}; choose one of {', '.join(MATERIALS)}.")
    return np.where(dark, DARK_SHADE, 1.0)


def render_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """float ``[size, size, 3]``: smooth low-saturation value noise with a little grain."""
    low, high = BACKGROUND_VALUE_RANGE
    value = np.zeros((size, size))
    for cells in BACKGROUND_CELLS:
        coarse = torch.from_numpy(rng.random((1, 1, cells, cells)))
        value += torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[0, 0].numpy()
    value = low + (high - low) * np.clip(value / len(BACKGROUND_CELLS), 0, 1)
    value += rng.normal(0.0, BACKGROUND_GRAIN, (size, size))
    hue = rng.random()
    saturation = rng.random() * BACKGROUND_SATURATION_MAX
    tint = np.array(colorsys.hsv_to_rgb(hue, saturation, 1.0))
    return np.clip(value[..., None] * tint[None, None], 0.0, 1.0)


def paint_object(canvas: np.ndarray, mask: np.ndarray, colour: str, material: str) -> None:
    rgb = np.array(COLOURS[colour])
    shade = material_shade(material, canvas.shape[0])
    canvas[mask] = shade[mask][:, None] * rgb[None]


# ------------------------------------------------------------------------------------------ scenes
def _place(rng: np.random.Generator, count: int, size: int) -> list[tuple[tuple[float, float], float]]:
    """Centres and radii of ``count`` non-overlapping bounding circles inside the image."""
    gap = GAP_FRACTION * size
    for _ in range(PLACEMENT_ATTEMPTS):
        placed: list[tuple[tuple[float, float], float]] = []
        for _ in range(count):
            radius = rng.uniform(MIN_RADIUS_FRACTION, MAX_RADIUS_FRACTION) * size
            centre = tuple(rng.uniform(radius + 1, size - radius - 1, 2))
            clear = all(
                np.hypot(centre[0] - c[0], centre[1] - c[1]) >= radius + r + gap for c, r in placed
            )
            if not clear:
                break
            placed.append((centre, radius))
        if len(placed) == count:
            return placed
    raise ValueError(f"Could not place {count} objects in a {size}px image; use a larger size or fewer objects.")


def make_scene(
    seed: int,
    size: int = DEFAULT_SIZE,
    *,
    count: int | None = None,
    shapes: Sequence[str] | None = None,
    colours: Sequence[str] | None = None,
    materials: Sequence[str] | None = None,
    background: bool = True,
) -> Scene:
    """The scene of ``seed``: ``count`` objects (1..3, random when None), distinct shapes per scene.

    ``shapes``/``colours``/``materials`` fix the attributes of the objects in order (their lengths set the
    count); ``background=False`` renders on black, as Stage One sees explained regions.
    """
    if size < 32:
        raise ValueError(f"Scenes need a size of at least 32 px, got {size}.")
    rng = np.random.default_rng(seed)
    fixed = [len(a) for a in (shapes, colours, materials) if a is not None]
    if count is None:
        count = fixed[0] if fixed else int(rng.integers(1, MAX_OBJECTS + 1))
    if not 1 <= count <= MAX_OBJECTS or any(n != count for n in fixed):
        raise ValueError(f"A scene holds 1 to {MAX_OBJECTS} objects and fixed attribute lists must match the count.")
    chosen_shapes = list(shapes) if shapes is not None else [SHAPES[i] for i in rng.permutation(len(SHAPES))[:count]]
    chosen_colours = list(colours) if colours is not None else [str(rng.choice(list(COLOURS))) for _ in range(count)]
    chosen_materials = list(materials) if materials is not None else [str(rng.choice(MATERIALS)) for _ in range(count)]
    for name, value, allowed in (("shape", chosen_shapes, SHAPES), ("colour", chosen_colours, COLOURS), ("material", chosen_materials, MATERIALS)):
        unknown = [v for v in value if v not in allowed]
        if unknown:
            raise ValueError(f"Unknown {name} {unknown[0]!r}; choose from {', '.join(allowed)}.")
    canvas = render_background(rng, size) if background else np.zeros((size, size, 3))
    objects = []
    for (centre, radius), shape, colour, material in zip(_place(rng, count, size), chosen_shapes, chosen_colours, chosen_materials):
        mask = shape_mask(shape, centre, radius, size)
        paint_object(canvas, mask, colour, material)
        objects.append(SceneObject(shape, colour, material, torch.from_numpy(mask), (float(centre[0]), float(centre[1])), float(radius)))
    image = torch.from_numpy(canvas.transpose(2, 0, 1).copy()).float()
    return Scene(image=image, objects=tuple(objects), seed=seed, caption=make_caption(objects))


def validation_seed(index: int) -> int:
    """Seed of validation scene ``index``: for choosing checkpoints and thresholds, never reported."""
    if not 0 <= index < HELD_OUT_SEED_OFFSET - VALIDATION_SEED_OFFSET:
        raise ValueError(f"Validation scene index {index} is outside the validation range.")
    return VALIDATION_SEED_OFFSET + index


def held_out_seed(index: int, seed: int = 0) -> int:
    """Seed of evaluation scene ``index`` for evaluation seed ``seed`` (never a training seed)."""
    return HELD_OUT_SEED_OFFSET + seed * 100_003 + index


# ------------------------------------------------------------------------------------------ classifiers
def _hsv(image: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rgb = image.detach().float().cpu().clamp(0, 1).numpy()
    high, low = rgb.max(axis=0), rgb.min(axis=0)
    value = high
    saturation = np.where(high > 0, (high - low) / np.maximum(high, 1e-8), 0.0)
    r, g, b = rgb
    delta = np.maximum(high - low, 1e-8)
    hue = np.where(high == r, ((g - b) / delta) % 6, np.where(high == g, (b - r) / delta + 2, (r - g) / delta + 4))
    return hue * 60.0, saturation, value


def foreground_mask(image: torch.Tensor) -> torch.Tensor:
    """bool ``[H, W]``: saturated, not-too-dark pixels (object pixels; the background is grey-ish)."""
    _, saturation, value = _hsv(image)
    return torch.from_numpy((saturation >= FOREGROUND_MIN_SATURATION) & (value >= FOREGROUND_MIN_VALUE))


_PALETTE_HUES = {name: colorsys.rgb_to_hsv(*rgb)[0] * 360.0 for name, rgb in COLOURS.items()}


def classify_colour(image: torch.Tensor, mask: torch.Tensor | None = None) -> str | None:
    """The palette colour whose hue is nearest the circular mean hue of the object pixels (None if none)."""
    region = foreground_mask(image) if mask is None else (torch.as_tensor(mask).bool() & foreground_mask(image))
    hue, _, _ = _hsv(image)
    picked = hue[region.numpy()]
    if picked.size == 0:
        return None
    angles = np.deg2rad(picked)
    mean = np.rad2deg(np.arctan2(np.sin(angles).mean(), np.cos(angles).mean())) % 360.0
    distance = {name: min(abs(mean - h), 360.0 - abs(mean - h)) for name, h in _PALETTE_HUES.items()}
    return min(distance, key=distance.get)


def classify_material(image: torch.Tensor, mask: torch.Tensor | None = None) -> str | None:
    """Read the pattern of the object pixels: share of dark pixels and how uniform each row is.

    Dark pixels are those below :data:`DARK_SPLIT` of the object's bright level. Plain has almost none;
    stripes (horizontal) make rows all-dark or all-bright; dots have a small dark share; checks half.
    """
    region = foreground_mask(image) if mask is None else (torch.as_tensor(mask).bool() & foreground_mask(image))
    region = region.numpy()
    if region.sum() == 0:
        return None
    _, _, value = _hsv(image)
    bright = np.percentile(value[region], 90)
    dark = (value < DARK_SPLIT * bright) & region
    dark_fraction = dark.sum() / region.sum()
    if dark_fraction < PLAIN_MAX_DARK_FRACTION:
        return "plain"
    rows = region.sum(axis=1) > 0
    row_dark = dark.sum(axis=1)[rows] / region.sum(axis=1)[rows]
    weights = region.sum(axis=1)[rows]
    purity = float(np.average(np.abs(2 * row_dark - 1), weights=weights))
    if purity >= STRIPED_MIN_ROW_PURITY:
        return "striped"
    return "dotted" if dark_fraction <= DOTTED_MAX_DARK_FRACTION else "checked"
