"""The ICE demo on the embedded Toy World model: Stage One, Stage Two and compositions on one scene.

``run_demo(out_dir)`` writes ``ice_demo.png`` (a one-page sheet: the scene, each mask with its word,
images generated from each concept's learned tokens, and attribute swaps) and ``ice_demo.json`` (what
was found, and the prompts), and returns the sheet's path. A few minutes on a CPU.
"""
from __future__ import annotations

import json
import os
from typing import Callable

import torch

from ..concepts import write_bytes_atomic
from .evaluate import run_pipeline, sample, swap_shape
from .scenes import held_out_seed, make_scene

# A held-out scene (never trained on): a blue striped square, a pink checked cross, an orange striped triangle.
DEMO_SCENE_SEED = held_out_seed(3)
DEMO_LEARN_STEPS = 100
CELL_SCALE = 3  # 64 px scenes are shown at 192 px
LABEL_HEIGHT = 14
MASK_TINT = (1.0, 0.2, 0.2)
MASK_ALPHA = 0.55
SHEET_NAME = "ice_demo.png"
REPORT_NAME = "ice_demo.json"


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
    progress: Callable[[str], None] | None = None,
) -> str:
    """Run the whole pipeline on a bundled scene with the embedded model; returns the sheet's path."""
    from . import embedded_bundle, embedded_retriever

    sheet_path = os.path.join(out_dir, SHEET_NAME)
    if os.path.exists(sheet_path) and not overwrite:
        raise ValueError(f"{sheet_path} exists; choose another folder or pass overwrite=True.")
    report = progress or (lambda message: None)
    report("loading the embedded Toy World model")
    bundle, retriever = embedded_bundle(device), embedded_retriever(device)
    scene = make_scene(scene_seed)
    report(f"scene: {scene.caption}; running Stage One and Stage Two ({learn_steps} steps per phase)")
    concepts = run_pipeline(bundle, retriever, scene.image, learn_steps=learn_steps, seed=seed)
    rows = [[("scene", scene.image), ("found", _overlay(scene.image, concepts.masks()))]]
    prompts_used = {}
    for concept in concepts.concepts:
        report(f"generating from the tokens of {concept.name}")
        row = [(f"{concept.name} mask", _overlay(scene.image, concept.mask[None]))]
        for label, prompt in demo_prompts(concept.name, concept.word):
            row.append((label, sample(bundle, concepts, prompt, seed=seed)))
            prompts_used.setdefault(concept.name, []).append(prompt)
        rows.append(row)
    os.makedirs(out_dir, exist_ok=True)
    write_bytes_atomic(sheet_path, _sheet_png(rows), overwrite=overwrite)
    summary = {
        "scene_seed": scene_seed,
        "caption": scene.caption,
        "found": [{"name": c.name, "word": c.word, "score": round(c.score, 4)} for c in concepts.concepts],
        "prompts": prompts_used,
        "learn_steps": learn_steps,
    }
    write_bytes_atomic(os.path.join(out_dir, REPORT_NAME), json.dumps(summary, indent=1).encode(), overwrite=overwrite)
    return sheet_path


def _overlay(image: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    if masks.numel() == 0:
        return image
    covered = (masks > 0.5).any(0).float()[None]
    tint = torch.tensor(MASK_TINT).view(3, 1, 1)
    return image * (1 - MASK_ALPHA * covered) + tint * MASK_ALPHA * covered


def _sheet_png(rows: list[list[tuple[str, torch.Tensor]]]) -> bytes:
    import io

    from PIL import Image, ImageDraw

    side = max(t.shape[-1] for row in rows for _, t in row) * CELL_SCALE
    columns = max(len(row) for row in rows)
    sheet = Image.new("RGB", (columns * side, len(rows) * (side + LABEL_HEIGHT)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, row in enumerate(rows):
        top = r * (side + LABEL_HEIGHT)
        for c, (label, tensor) in enumerate(row):
            pixels = (tensor.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
            tile = Image.fromarray(pixels).resize((side, side), Image.NEAREST)
            sheet.paste(tile, (c * side, top + LABEL_HEIGHT))
            draw.text((c * side + 2, top + 1), label, fill="black")
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m ice_ops.toyworld.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="ice_demo")
    parser.add_argument("--learn-steps", type=int, default=DEMO_LEARN_STEPS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    path = run_demo(args.out, learn_steps=args.learn_steps, device=args.device, overwrite=args.overwrite,
                    progress=lambda message: sys.stderr.write(message + "\n"))
    sys.stdout.write(path + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
