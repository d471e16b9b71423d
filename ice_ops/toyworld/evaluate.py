"""Score the whole ICE pipeline on held-out Toy World scenes against their ground truth.

``python -m ice_ops.toyworld.evaluate --scenes 50 --seed S`` prints one JSON line for ICE and one for the
textual-inversion baseline, and one progress line per scene on stderr:

- Stage One: mIoU (predicted and true masks paired by Hungarian matching on IoU; an unmatched true object
  scores 0), word top-1 accuracy of the matched concepts, count accuracy;
- Stage Two: attribute accuracy (images generated from ``[c.colour]`` and ``[c.material]`` alone, read by the
  pixel classifiers of ``scenes``) and swap accuracy: ``a circle in [c.colour]`` and ``a circle made of
  [c.material]`` must show the concept's colour (material) *and* be read as a circle by the retriever CLIP;
- the baseline: plain textual inversion (one token per concept, the same masks, as many steps as ICE's two
  phases together) on the same prompts with ``[c]`` in place of ``[c.colour]`` and ``[c.material]``.

``--details FILE`` writes one JSON row per scene as it goes, so a long run keeps its partial results.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from ..defaults import DEFAULT_SAMPLE_STEPS
from .scenes import SHAPES, Scene, classify_colour, classify_material, held_out_seed, make_scene

DEFAULT_LEARN_STEPS = 100
SWAP_SHAPES = ("circle", "square")  # the swap prompt's shape: the first one that differs from the concept's word
MATCH_MIN_IOU = 0.0  # a pairing with no overlap at all counts as unmatched
ICE = "ice"
BASELINE = "textual_inversion"
# Per concept: what each method generates and reads back. "{c}" is the concept's name, "{other}" the swap shape.
ATTRIBUTE_PROMPTS = {
    ICE: {"colour": "[{c}.colour]", "material": "[{c}.material]"},
    BASELINE: {"colour": "[{c}]", "material": "[{c}]"},
}
SWAP_PROMPTS = {
    ICE: {"colour": "a {other} in [{c}.colour]", "material": "a {other} made of [{c}.material]"},
    BASELINE: {"colour": "a {other} in [{c}]", "material": "a {other} made of [{c}]"},
}
CLASSIFIERS = {"colour": classify_colour, "material": classify_material}


@dataclass
class MethodScore:
    """One method's Stage Two results for the matched concepts of a scene (one entry per concept)."""

    colour: list[bool] = field(default_factory=list)
    material: list[bool] = field(default_factory=list)
    swap: list[bool] = field(default_factory=list)  # attribute read back and the swap shape recognised
    swap_attribute: list[bool] = field(default_factory=list)
    swap_shape: list[bool] = field(default_factory=list)


@dataclass
class SceneScore:
    ious: list[float]  # one per true object (0 when unmatched)
    words_right: list[bool]  # one per true object
    count_right: bool
    methods: dict[str, MethodScore] = field(default_factory=dict)


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


def stage_one(bundle, retriever, image: torch.Tensor, *, seed: int, oracle: Scene | None = None,
              overrides: dict | None = None):
    """Stage One with the Toy World settings, some replaced by ``overrides`` (or ``oracle``'s true words
    and masks)."""
    from ..localization import localize
    from . import localize_settings

    if oracle is not None:
        return oracle_concepts(oracle)
    return localize(bundle, retriever, image, seed=seed, **{**localize_settings(), **(overrides or {})})


def stage_two(bundle, image: torch.Tensor, concepts, *, learn_steps: int, seed: int):
    """Both phases of ICE's Stage Two."""
    from ..learn import learn_intrinsic_tokens, learn_object_tokens

    concepts = learn_object_tokens(bundle, image, concepts, steps=learn_steps, seed=seed)
    return learn_intrinsic_tokens(bundle, image, concepts, steps=learn_steps, seed=seed)


def textual_inversion(bundle, image: torch.Tensor, concepts, *, learn_steps: int, seed: int):
    """The baseline: as many steps as ICE's two phases together."""
    from ..learn import learn_textual_inversion

    return learn_textual_inversion(bundle, image, concepts, steps=2 * learn_steps, seed=seed)


def run_pipeline(bundle, retriever, image: torch.Tensor, *, learn_steps: int, seed: int, oracle: Scene | None = None):
    """Stage One (or ``oracle``'s true masks) then both phases of Stage Two; returns the learned ConceptSet."""
    concepts = stage_one(bundle, retriever, image, seed=seed, oracle=oracle)
    if len(concepts) == 0 or learn_steps == 0:
        return concepts
    return stage_two(bundle, image, concepts, learn_steps=learn_steps, seed=seed)


def sample(bundle, concepts, prompt: str, *, seed: int, steps: int = DEFAULT_SAMPLE_STEPS) -> torch.Tensor:
    from ..composition import compose, generate

    return generate(bundle, compose(bundle, concepts, prompt), seed=seed, steps=steps)[0].cpu()


def swap_shape(word: str) -> str:
    return next(shape for shape in SWAP_SHAPES if shape != word)


def read_shape(retriever, image: torch.Tensor) -> str:
    """The shape the retriever CLIP sees in a generated image."""
    return retriever.rank(image, top_k=1)[0][0]


def score_method(bundle, retriever, concepts, method: str, pairs, scene: Scene, *, seed: int) -> MethodScore:
    """Generate each matched concept's attribute and swap prompts with ``method``'s tokens and read them."""
    score = MethodScore()
    generated: dict[str, torch.Tensor] = {}

    def generate_once(prompt: str) -> torch.Tensor:
        if prompt not in generated:
            generated[prompt] = sample(bundle, concepts, prompt, seed=seed)
        return generated[prompt]

    for p, t, _ in pairs:
        concept, obj = concepts.concepts[p], scene.objects[t]
        other = swap_shape(concept.word)
        truth = {"colour": obj.colour, "material": obj.material}
        for attribute, classify in CLASSIFIERS.items():
            prompt = ATTRIBUTE_PROMPTS[method][attribute].format(c=concept.name)
            getattr(score, attribute).append(classify(generate_once(prompt)) == truth[attribute])
            swapped = generate_once(SWAP_PROMPTS[method][attribute].format(c=concept.name, other=other))
            attribute_right = classify(swapped) == truth[attribute]
            shape_right = read_shape(retriever, swapped) == other
            score.swap_attribute.append(attribute_right)
            score.swap_shape.append(shape_right)
            score.swap.append(attribute_right and shape_right)
    return score


def score_scene(bundle, retriever, scene: Scene, *, learn_steps: int, seed: int, oracle_masks: bool = False,
                baseline: bool = True, overrides: dict | None = None) -> tuple[SceneScore, dict]:
    """Score one scene; returns the score and a details row (words, masks' IoU, per-method results).
    ``overrides`` replace some of Stage One's Toy World settings."""
    found = stage_one(bundle, retriever, scene.image, seed=seed, oracle=scene if oracle_masks else None,
                      overrides=overrides)
    truth = scene.masks
    pairs = match_masks(found.masks() > 0.5, truth)
    ious = [0.0] * len(truth)
    words = [False] * len(truth)
    for p, t, iou in pairs:
        ious[t] = iou
        words[t] = found.concepts[p].word == scene.objects[t].shape
    score = SceneScore(ious, words, len(found) == len(truth))
    if learn_steps and len(found):
        learned = stage_two(bundle, scene.image, found, learn_steps=learn_steps, seed=seed)
        score.methods[ICE] = score_method(bundle, retriever, learned, ICE, pairs, scene, seed=seed)
        if baseline:
            inverted = textual_inversion(bundle, scene.image, found, learn_steps=learn_steps, seed=seed)
            score.methods[BASELINE] = score_method(bundle, retriever, inverted, BASELINE, pairs, scene, seed=seed)
    details = {
        "seed": scene.seed,
        "caption": scene.caption,
        "true_words": scene.words,
        "found_words": [c.word for c in found.concepts],
        "ious": [round(v, 4) for v in ious],
        "words_right": words,
        "count_right": score.count_right,
        **{method: asdict(result) for method, result in score.methods.items()},
    }
    return score, details


def _mean(values: list) -> float | None:
    return round(float(np.mean(values)), 4) if values else None


def summarise(scores: Sequence[SceneScore]) -> dict:
    """Stage One figures and ICE's Stage Two figures (the keys of earlier reports)."""
    flat = lambda attr: [v for s in scores for v in getattr(s, attr)]  # noqa: E731
    return {
        "stage_one_miou": _mean(flat("ious")),
        "word_top1": _mean(flat("words_right")),
        "count_accuracy": _mean([s.count_right for s in scores]),
        **summarise_method(scores, ICE),
    }


def summarise_method(scores: Sequence[SceneScore], method: str) -> dict:
    def flat(attr: str) -> list[bool]:
        return [v for s in scores if method in s.methods for v in getattr(s.methods[method], attr)]

    return {
        "attribute_accuracy": _mean(flat("colour") + flat("material")),
        "colour_accuracy": _mean(flat("colour")),
        "material_accuracy": _mean(flat("material")),
        "swap_accuracy": _mean(flat("swap")),
        "swap_attribute_accuracy": _mean(flat("swap_attribute")),
        "swap_shape_accuracy": _mean(flat("swap_shape")),
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


def progress_line(index: int, total: int, details: dict, elapsed: float) -> str:
    """One line a person can follow: the scene, what was found and how each method did, and the time left."""
    ious = " ".join(f"{v:.2f}" for v in details["ious"])
    parts = [f"scene {index + 1}/{total} (seed {details['seed']}): true {details['true_words']} "
             f"found {details['found_words']} IoU {ious}"]
    for method in (ICE, BASELINE):
        if method in details:
            result = details[method]
            right = sum(result["colour"]) + sum(result["material"])
            parts.append(f"{method}: attributes {right}/{len(result['colour']) + len(result['material'])} "
                         f"swaps {sum(result['swap'])}/{len(result['swap'])}")
    remaining = elapsed / (index + 1) * (total - index - 1)
    parts.append(f"{elapsed:.0f} s, about {remaining / 60:.1f} min left")
    return " | ".join(parts)


def evaluate(
    bundle, retriever, *, scenes: int, seed: int, learn_steps: int, stage_two_scenes: int | None = None,
    oracle_masks: bool = False, baseline: bool = True, on_scene: Callable[[int, dict], None] | None = None,
) -> tuple[dict, dict | None]:
    """Score ``scenes`` held-out scenes; Stage Two runs on the first ``stage_two_scenes`` (all when None).
    ``oracle_masks`` replaces Stage One by the true words and masks (Stage Two scored on its own).
    ``on_scene(index, details)`` is called after each scene. Returns (ICE's line, the baseline's line or None)."""
    start = time.time()
    stage_two_count = scenes if stage_two_scenes is None else min(stage_two_scenes, scenes)
    scores = []
    for i in range(scenes):
        score, details = score_scene(
            bundle, retriever, make_scene(held_out_seed(i, seed)), learn_steps=learn_steps if i < stage_two_count else 0,
            seed=seed, oracle_masks=oracle_masks, baseline=baseline,
        )
        scores.append(score)
        if on_scene is not None:
            on_scene(i, details)
    common = {"scenes": scenes, "seed": seed, "stage_two_scenes": stage_two_count if learn_steps else 0,
              "learn_steps": learn_steps, "oracle_masks": oracle_masks, "seconds": round(time.time() - start, 1),
              "device": str(bundle.device)}
    ice = {"method": ICE, **summarise(scores), **common}
    other = None
    if baseline and learn_steps:
        other = {"method": BASELINE, **summarise_method(scores, BASELINE), **common, "learn_steps": 2 * learn_steps}
    return ice, other


class DetailsFile:
    """Per-scene JSON rows, rewritten atomically after every scene (a stopped run keeps what it scored)."""

    def __init__(self, path: str | None) -> None:
        self.path, self.rows = path, []

    def add(self, row: dict) -> None:
        from ..files import write_bytes_atomic

        self.rows.append(row)
        if self.path:
            text = "".join(json.dumps(r) + "\n" for r in self.rows)
            write_bytes_atomic(self.path, text.encode("utf-8"), overwrite=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ice_ops.toyworld.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--scenes", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--learn-steps", type=int, default=DEFAULT_LEARN_STEPS, help="steps per Stage Two phase (0: Stage One only)")
    parser.add_argument("--stage-two-scenes", type=int, default=None,
                        help="run Stage Two on only the first N scenes (Stage One runs on all); default all")
    parser.add_argument("--oracle-masks", action="store_true",
                        help="use the true words and masks instead of Stage One (scores Stage Two on its own)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the textual-inversion baseline")
    parser.add_argument("--details", default=None, help="write one JSON row per scene to this file as the run goes")
    parser.add_argument("--model", default=None, help="a training output folder (default: the embedded model)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.scenes < 1:
        raise ValueError("--scenes must be at least 1.")
    if args.learn_steps < 0:
        raise ValueError("--learn-steps must be 0 (Stage One only) or more.")
    import os

    if args.details and os.path.exists(args.details):
        raise ValueError(f"{args.details} exists; choose another --details file.")
    bundle, retriever = load_models(args.model, args.device)
    details = DetailsFile(args.details)
    start = time.time()

    def on_scene(index: int, row: dict) -> None:
        details.add(row)
        sys.stderr.write(progress_line(index, args.scenes, row, time.time() - start) + "\n")
        sys.stderr.flush()

    ice, baseline = evaluate(bundle, retriever, scenes=args.scenes, seed=args.seed, learn_steps=args.learn_steps,
                             stage_two_scenes=args.stage_two_scenes, oracle_masks=args.oracle_masks,
                             baseline=not args.no_baseline, on_scene=on_scene)
    sys.stdout.write(json.dumps(ice) + "\n")
    if baseline is not None:
        sys.stdout.write(json.dumps(baseline) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
