"""The ICE demo on the embedded Toy World model: Stage One, Stage Two and compositions on one scene.

``run_demo(out_dir)`` writes ``ice_demo.png`` and ``ice_demo.json`` and returns the sheet's path. The sheet
(every tile enlarged without smoothing to at least ``TILE_MIN_PX``): a first row with the scene, every mask
Stage One found with its word written on it, and the scene's true masks with their true words; then one row
per found concept: its mask, the true mask it matches (Hungarian matching on IoU) with the IoU, and images
generated from its learned tokens (:func:`demo_prompts`). The JSON report says what was found, which true
object each concept matches and how well, and the prompts. A few minutes on a CPU.
"""
from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass

import torch

from ..files import write_bytes_atomic
from ..imaging import (
    MASK_THRESHOLD,
    draw_label,
    label_font,
    labelled_overlay,
    tensor_to_pil,
    to_image_tensor,
    upscale_nearest,
)
from ..progress import ProgressReporter
from .evaluate import match_masks, sample, swap_shape
from .scenes import Scene, held_out_seed, make_scene

# A held-out scene (never trained on): a blue striped square, a pink checked cross, an orange striped triangle.
DEMO_SCENE_SEED = held_out_seed(3)
DEMO_LEARN_STEPS = 100
SHEET_NAME = "ice_demo.png"
REPORT_NAME = "ice_demo.json"

# Sheet layout, in pixels of the sheet.
TILE_MIN_PX = 256  # each tile is its image enlarged by a whole factor to at least this side
MASK_LABEL_PX = 22  # words written on masks
HEADER_PX = 16  # column labels above each tile
TITLE_PX = 20  # the sheet's title (the scene's caption)
PAD_PX = 6  # around text, and between tiles
UNMATCHED_DIM = 0.35  # brightness of the scene behind "no true object" when a concept matches nothing
SHEET_DECIMALS = 2  # retrieval scores and IoUs as written on the sheet
REPORT_DECIMALS = 4  # ... and in the JSON report
ELLIPSIS = "..."  # ends a column label cut to its tile's width (the default font may lack the one-glyph ellipsis)
BACKGROUND = "white"
TEXT_COLOUR = (0, 0, 0)


@dataclass(frozen=True)
class Match:
    """The true object a found concept matches (``true_index`` into the scene's objects), and their IoU."""

    true_index: int
    iou: float


def demo_prompts(name: str, word: str) -> list[tuple[str, str]]:
    """(label, prompt) pairs generated for one concept."""
    other = swap_shape(word)
    return [
        (f"[{name}]", f"a [{name}]"),
        (f"[{name}.colour]", f"[{name}.colour]"),
        (f"[{name}.material]", f"[{name}.material]"),
        (f"{other} in colour", f"a {other} in [{name}.colour]"),
        (f"{other} of material", f"a {other} made of [{name}.material]"),
    ]


def run_demo(
    out_dir: str,
    *,
    scene_seed: int = DEMO_SCENE_SEED,
    learn_steps: int = DEMO_LEARN_STEPS,
    seed: int = 0,
    device: str = "cpu",
    overwrite: bool = False,
    progress: ProgressReporter | None = None,
) -> str:
    """Run the whole pipeline on a bundled scene with the embedded model; returns the sheet's path.

    ``progress`` receives a message per step of the demo and a phase for Stage One, each learning phase and
    the generations (default: silent)."""
    from ..learn import learn_intrinsic_tokens, learn_object_tokens
    from ..localization import localize
    from . import embedded_bundle, embedded_retriever, localize_settings

    sheet_path, report_path = os.path.join(out_dir, SHEET_NAME), os.path.join(out_dir, REPORT_NAME)
    for path in (sheet_path, report_path):
        if os.path.exists(path) and not overwrite:
            raise ValueError(f"{path} exists; choose another folder or pass overwrite=True.")
    reporter = progress or ProgressReporter(quiet=True)
    reporter.message("loading the embedded Toy World model")
    bundle, retriever = embedded_bundle(device), embedded_retriever(device)
    scene = make_scene(scene_seed)
    reporter.message(f"scene: {scene.caption}")
    concepts = localize(bundle, retriever, scene.image, seed=seed,
                        callback=reporter.phase("Stage One: finding objects"), **localize_settings())
    reporter.message("found: " + (", ".join(concepts.names) or "nothing"))
    if len(concepts):
        concepts = learn_object_tokens(bundle, scene.image, concepts, steps=learn_steps, seed=seed,
                                       callback=reporter.phase("Stage Two: object tokens"))
        concepts = learn_intrinsic_tokens(bundle, scene.image, concepts, steps=learn_steps, seed=seed,
                                          callback=reporter.phase("Stage Two: intrinsic tokens"))
    prompts = {c.name: demo_prompts(c.name, c.word) for c in concepts.concepts}
    images = generate_all(bundle, concepts, prompts, seed=seed, callback=reporter.phase("generating"))
    reporter.finish()

    matches = match_concepts(concepts, scene)
    os.makedirs(out_dir, exist_ok=True)
    rows = [overview_row(scene, concepts, matches)]
    rows += [concept_row(scene, i, concept, matches.get(i), prompts[concept.name], images[concept.name])
             for i, concept in enumerate(concepts.concepts)]
    write_bytes_atomic(sheet_path, sheet_png(rows, title=f"Toy World scene {scene_seed}: {scene.caption}"),
                       overwrite=overwrite)
    summary = demo_report(scene, concepts, matches, prompts, learn_steps)
    write_bytes_atomic(report_path, json.dumps(summary, indent=1).encode(), overwrite=overwrite)
    return sheet_path


def generate_all(bundle, concepts, prompts: dict[str, list[tuple[str, str]]], *, seed: int, callback=None):
    """``{name: [image [3, H, W], ...]}``, one image per prompt; ``callback(done, total, None)`` after each."""
    total = sum(len(pairs) for pairs in prompts.values())
    images: dict[str, list[torch.Tensor]] = {}
    for name, pairs in prompts.items():
        for _label, prompt in pairs:
            images.setdefault(name, []).append(sample(bundle, concepts, prompt, seed=seed))
            if callback is not None:
                callback(sum(len(done) for done in images.values()), total, None)
    return images


def match_concepts(concepts, scene: Scene) -> dict[int, Match]:
    """For each found concept that overlaps a true object, the one it matches (Hungarian matching on IoU)."""
    pairs = match_masks(concepts.masks() > MASK_THRESHOLD, scene.masks)
    return {p: Match(t, iou) for p, t, iou in pairs}


def true_colours(matches: dict[int, Match], found: int, true_count: int) -> list[int]:
    """Palette index of each true mask: its matching concept's, so a pair shares a colour; others follow."""
    by_truth = {m.true_index: p for p, m in matches.items()}
    unmatched = iter(range(found, found + true_count))
    return [by_truth[t] if t in by_truth else next(unmatched) for t in range(true_count)]


def overview_row(scene: Scene, concepts, matches: dict[int, Match]) -> list[tuple[str, torch.Tensor]]:
    """The scene, every found mask with its concept's name, every true mask with its true word."""
    factor = enlargement(scene.image)
    image = upscale_nearest(scene.image, factor)
    found = labelled_overlay(image, upscale_nearest(concepts.masks(), factor), concepts.names,
                             text_px=MASK_LABEL_PX)
    truth = labelled_overlay(image, upscale_nearest(scene.masks, factor), scene.words, text_px=MASK_LABEL_PX,
                             colour_indices=true_colours(matches, len(concepts), len(scene.objects)))
    return [("scene", image), ("found by Stage One", found), ("true objects", truth)]


def concept_row(scene: Scene, index: int, concept, match: Match | None, prompts: list[tuple[str, str]],
                images: list[torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """Concept ``index``'s found mask, the true mask it matches with their IoU, and its generations (the
    masks keep the concept's colour from the overview row)."""
    factor = enlargement(scene.image)
    image = upscale_nearest(scene.image, factor)
    found = labelled_overlay(image, upscale_nearest(concept.mask[None], factor), [concept.name],
                             text_px=MASK_LABEL_PX, colour_indices=[index])
    row = [(f"found: {concept.name}, score {concept.score:.{SHEET_DECIMALS}f}", found)]
    if match is None:
        row.append(("true: no match", unmatched_tile(image)))
    else:
        true_mask = upscale_nearest(scene.masks[match.true_index][None], factor)
        truth = labelled_overlay(image, true_mask, [scene.words[match.true_index]], text_px=MASK_LABEL_PX,
                                 colour_indices=[index])
        row.append((f"true: {scene.words[match.true_index]}, IoU {match.iou:.{SHEET_DECIMALS}f}", truth))
    for (label, _prompt), generated in zip(prompts, images):
        row.append((label, upscale_nearest(generated, enlargement(generated))))
    return row


def unmatched_tile(image: torch.Tensor) -> torch.Tensor:
    """The scene dimmed, with "no true object" written across it."""
    picture = tensor_to_pil(image * UNMATCHED_DIM)
    draw_label(picture, "no true object", (picture.width // 2, picture.height // 2), MASK_LABEL_PX)
    return to_image_tensor(picture)


def enlargement(image: torch.Tensor) -> int:
    """The whole factor that brings an image's longer side to at least ``TILE_MIN_PX``."""
    return max(1, math.ceil(TILE_MIN_PX / max(image.shape[-2:])))


def demo_report(scene: Scene, concepts, matches: dict[int, Match], prompts, learn_steps: int) -> dict:
    """What ``ice_demo.json`` holds."""
    found = []
    for index, concept in enumerate(concepts.concepts):
        match = matches.get(index)
        found.append({
            "name": concept.name,
            "word": concept.word,
            "score": round(concept.score, REPORT_DECIMALS),
            "true_word": None if match is None else scene.words[match.true_index],
            "iou": None if match is None else round(match.iou, REPORT_DECIMALS),
        })
    return {
        "scene_seed": scene.seed,
        "caption": scene.caption,
        "found": found,
        "prompts": {name: [prompt for _label, prompt in pairs] for name, pairs in prompts.items()},
        "learn_steps": learn_steps,
    }


def sheet_png(rows: list[list[tuple[str, torch.Tensor]]], *, title: str) -> bytes:
    """The rows of (column label, image ``[3, S, S]``) as one PNG: a title, then each tile under its label."""
    from PIL import Image, ImageDraw

    side = max(max(t.shape[-2:]) for row in rows for _, t in row)
    columns = max(len(row) for row in rows)
    title_height, header_height = TITLE_PX + 2 * PAD_PX, HEADER_PX + 2 * PAD_PX
    row_height = header_height + side + PAD_PX
    width = PAD_PX + columns * (side + PAD_PX)
    sheet = Image.new("RGB", (width, title_height + len(rows) * row_height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    title_font = label_font(TITLE_PX)
    title = fit_text(draw, title, title_font, width - 2 * PAD_PX)
    draw.text((PAD_PX, PAD_PX), title, font=title_font, fill=TEXT_COLOUR)
    header_font = label_font(HEADER_PX)
    for r, row in enumerate(rows):
        top = title_height + r * row_height
        for c, (label, tensor) in enumerate(row):
            left = PAD_PX + c * (side + PAD_PX)
            header = fit_text(draw, label, header_font, side)
            draw.text((left, top + PAD_PX), header, font=header_font, fill=TEXT_COLOUR)
            sheet.paste(tensor_to_pil(tensor), (left, top + header_height))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()


def fit_text(draw, text: str, font, width: int) -> str:
    """``text``, cut short with an ellipsis if it is wider than ``width`` pixels in ``font``."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + ELLIPSIS, font=font) > width:
        text = text[:-1]
    return text + ELLIPSIS


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m ice_ops.toyworld.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="ice_demo")
    parser.add_argument("--learn-steps", type=int, default=DEMO_LEARN_STEPS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    path = run_demo(args.out, learn_steps=args.learn_steps, device=args.device, overwrite=args.overwrite,
                    progress=ProgressReporter(sys.stderr, quiet=args.quiet))
    sys.stdout.write(path + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
