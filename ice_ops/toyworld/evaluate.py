"""Score the whole ICE pipeline on held-out Toy World scenes against their ground truth.

``python -m ice_ops.toyworld.evaluate --scenes 50 --seed S`` prints one JSON line:
Stage One mIoU (predicted and true masks paired by Hungarian matching on IoU; an unmatched true object
scores 0), word top-1 accuracy of the matched concepts, count accuracy; Stage Two attribute accuracy
(images generated from ``[c.colour]`` and ``[c.material]`` alone, read by the pixel classifiers of
``scenes``) and attribute-swap accuracy (``a square in [c.colour]``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .scenes import MAX_OBJECTS, SHAPES, Scene, classify_colour, classify_material, held_out_seed, make_scene

DEFAULT_LEARN_STEPS = 100
DEFAULT_SAMPLE_STEPS = 25
SWAP_SHAPES = ("square", "circle")  # the swap prompt's shape: the first one that differs from the concept's word
MATCH_MIN_IOU = 0.0  # a pairing with no overlap at all counts as unmatched


@dataclass
class SceneScore:
    ious: list[float]  # one per true object (0 when unmatched)
    words_right: list[bool]  # one per true object
    count_right: bool
    colour_right: list[bool]
    material_right: list[bool]
    swap_right: list[bool]


def match_masks(predicted: torch.Tensor, truth: torch.Tensor) -> list[tuple[int, int, float]]:
    """Hungarian pairing of predicted ``[P, H, W]`` and true ``[T, H, W]`` boolean masks maximising IoU;
    returns ``(predicted index, true index, IoU)`` for pairs that overlap."""
    from scipy.optimize import linear_sum_assignment

    if len(predicted) == 0 or len(truth) == 0:
        return []
    p = predicted.reshape(len(predicted), -1).float()
    t = truth.reshape(len(truth), -1).float()
    intersection = p @ t.T
    union = p.sum(1, keepdim=True) + t.sum(1)[None] - intersection
    iou = (intersection / union.clamp(min=1)).numpy()
    rows, cols = linear_sum_assignment(iou, maximize=True)
    return [(int(r), int(c), float(iou[r, c])) for r, c in zip(rows, cols) if iou[r, c] > MATCH_MIN_IOU]


def oracle_concepts(scene: Scene):
    """The scene's true words and masks as a Stage One result (to score Stage Two on its own)."""
    from ..concepts import Concept, ConceptSet, unique_name

    concepts: list = []
    for obj in scene.objects:
        name = unique_name(obj.shape, (c.name for c in concepts))
        concepts.append(Concept(name=name, word=obj.shape, score=1.0, mask=obj.mask.float()))
    return ConceptSet(concepts=concepts, image_size=tuple(scene.image.shape[-2:]), settings={"oracle": True})


def run_pipeline(bundle, retriever, image: torch.Tensor, *, learn_steps: int, seed: int, synonym_threshold: float | None = None,
                 oracle: Scene | None = None):
    """Stage One (or ``oracle``'s true masks) then both phases of Stage Two; returns the learned ConceptSet."""
    from ..learn import learn_intrinsic_tokens, learn_object_tokens
    from ..localize import localize
    from . import SEGMENTATION

    if oracle is not None:
        concepts = oracle_concepts(oracle)
    else:
        concepts = localize(bundle, retriever, image, seed=seed, synonym_threshold=synonym_threshold,
                            max_concepts=MAX_OBJECTS, segmentation=SEGMENTATION)
    if len(concepts) == 0 or learn_steps == 0:
        return concepts
    concepts = learn_object_tokens(bundle, image, concepts, steps=learn_steps, seed=seed)
    return learn_intrinsic_tokens(bundle, image, concepts, steps=learn_steps, seed=seed)


def sample(bundle, concepts, prompt: str, *, seed: int, steps: int = DEFAULT_SAMPLE_STEPS) -> torch.Tensor:
    from ..compose import compose, generate

    return generate(bundle, compose(bundle, concepts, prompt), seed=seed, steps=steps)[0].cpu()


def swap_shape(word: str) -> str:
    return next(shape for shape in SWAP_SHAPES if shape != word)


def score_scene(bundle, retriever, scene: Scene, *, learn_steps: int, seed: int, synonym_threshold: float | None = None,
                oracle_masks: bool = False) -> SceneScore:
    concepts = run_pipeline(bundle, retriever, scene.image, learn_steps=learn_steps, seed=seed,
                            synonym_threshold=synonym_threshold, oracle=scene if oracle_masks else None)
    truth = scene.masks
    predicted = concepts.masks() > 0.5
    pairs = match_masks(predicted, truth)
    ious = [0.0] * len(truth)
    words = [False] * len(truth)
    colour, material, swap = [], [], []
    for p, t, iou in pairs:
        ious[t] = iou
        concept, obj = concepts.concepts[p], scene.objects[t]
        words[t] = concept.word == obj.shape
        if learn_steps == 0:
            continue
        name = concept.name
        colour.append(classify_colour(sample(bundle, concepts, f"[{name}.colour]", seed=seed)) == obj.colour)
        material.append(classify_material(sample(bundle, concepts, f"[{name}.material]", seed=seed)) == obj.material)
        swapped = sample(bundle, concepts, f"a {swap_shape(concept.word)} in [{name}.colour]", seed=seed)
        swap.append(classify_colour(swapped) == obj.colour)
    return SceneScore(ious, words, len(concepts) == len(truth), colour, material, swap)


def summarise(scores: Sequence[SceneScore]) -> dict:
    def mean(values: list) -> float | None:
        return round(float(np.mean(values)), 4) if values else None

    flat = lambda attr: [v for s in scores for v in getattr(s, attr)]  # noqa: E731
    attributes = flat("colour_right") + flat("material_right")
    return {
        "stage_one_miou": mean(flat("ious")),
        "word_top1": mean(flat("words_right")),
        "count_accuracy": mean([s.count_right for s in scores]),
        "attribute_accuracy": mean(attributes),
        "colour_accuracy": mean(flat("colour_right")),
        "material_accuracy": mean(flat("material_right")),
        "swap_accuracy": mean(flat("swap_right")),
    }


def load_models(model: str | None, device: str):
    """(bundle, retriever): the embedded Toy World model, or the output folder of the training script."""
    from . import SYNONYM_THRESHOLD, embedded_bundle, embedded_retriever

    if model is None:
        return embedded_bundle(device), embedded_retriever(device)
    import os

    from ..bundle import DiffusionBundle
    from ..retrieve import ClipRetriever

    bundle = DiffusionBundle.from_pretrained(os.path.join(model, "diffusers"), device=device)
    retriever = ClipRetriever.from_pretrained(
        os.path.join(model, "open_clip_config.json"), os.path.join(model, "open_clip.safetensors"),
        vocabulary=list(SHAPES), device=device, synonym_threshold=SYNONYM_THRESHOLD,
    )
    return bundle, retriever


def evaluate(
    bundle, retriever, *, scenes: int, seed: int, learn_steps: int, synonym_threshold: float | None = None,
    stage_two_scenes: int | None = None, oracle_masks: bool = False,
) -> dict:
    """Score ``scenes`` held-out scenes; Stage Two runs on the first ``stage_two_scenes`` (all when None).
    ``oracle_masks`` replaces Stage One by the true words and masks (Stage Two scored on its own)."""
    start = time.time()
    stage_two = scenes if stage_two_scenes is None else min(stage_two_scenes, scenes)
    scores = [
        score_scene(bundle, retriever, make_scene(held_out_seed(i, seed)), learn_steps=learn_steps if i < stage_two else 0,
                    seed=seed, synonym_threshold=synonym_threshold, oracle_masks=oracle_masks)
        for i in range(scenes)
    ]
    result = {"scenes": scenes, "seed": seed, **summarise(scores), "stage_two_scenes": stage_two if learn_steps else 0,
              "learn_steps": learn_steps, "oracle_masks": oracle_masks, "seconds": round(time.time() - start, 1), "device": str(bundle.device)}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ice_ops.toyworld.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--scenes", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--learn-steps", type=int, default=DEFAULT_LEARN_STEPS, help="steps per Stage Two phase (0: Stage One only)")
    parser.add_argument("--stage-two-scenes", type=int, default=None,
                        help="run Stage Two on only the first N scenes (Stage One runs on all); default all")
    parser.add_argument("--oracle-masks", action="store_true",
                        help="use the true words and masks instead of Stage One (scores Stage Two on its own)")
    parser.add_argument("--model", default=None, help="a training output folder (default: the embedded model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--synonym-threshold", type=float, default=None,
                        help="retrieval near-synonym cut (default: the retriever's own, 1.0 for Toy World CLIPs: "
                             "only words already found are excluded, since the toy CLIP "
                             "places all shape words close together)")
    args = parser.parse_args(argv)
    if args.scenes < 1:
        raise ValueError("--scenes must be at least 1.")
    bundle, retriever = load_models(args.model, args.device)
    result = evaluate(bundle, retriever, scenes=args.scenes, seed=args.seed, learn_steps=args.learn_steps,
                      synonym_threshold=args.synonym_threshold, stage_two_scenes=args.stage_two_scenes, oracle_masks=args.oracle_masks)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
