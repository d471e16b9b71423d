"""Choose the Toy World model's Stage One stop rule on validation scenes, never on the reported ones.

``python -m devtools.toyworld.calibrate [--model DIR] [--scenes 100]`` runs Stage One on validation scenes
(seeds from :data:`~ice_ops.toyworld.scenes.VALIDATION_SEED_OFFSET`, which neither training nor the
evaluation uses) once per candidate threshold of each stop rule of :func:`ice_ops.localization.localize`
(``min_contrast``, ``min_score``) and of the cross-attention mask threshold (``attention_fraction``), prints
a JSON row per candidate and, last, the chosen settings (see :func:`calibrate`). The chosen value is then written into ``ice_ops/toyworld/__init__.py``
by hand, with the command's output in ``docs/DECISIONS.md``.
"""
from __future__ import annotations

import argparse
import json
import sys

from ice_ops.toyworld.evaluate import load_models, score_scene, summarise
from ice_ops.toyworld.scenes import make_scene, validation_seed

ATTENTION_FRACTIONS = (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6)
STOP_RULES = {
    "min_contrast": (None, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 15.0, 20.0),
    "min_score": (None, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
}
STAGE_ONE_FIGURES = ("count_accuracy", "stage_one_miou", "word_top1")


def stage_one_figures(bundle, retriever, scenes, overrides: dict) -> dict:
    scores = [score_scene(bundle, retriever, scene, learn_steps=0, seed=0, overrides=overrides)[0] for scene in scenes]
    summary = summarise(scores)
    return {key: summary[key] for key in STAGE_ONE_FIGURES}


def sweep(bundle, retriever, scenes, name: str, candidates, fixed: dict, report) -> list[dict]:
    """Stage One's figures on ``scenes`` for each candidate value of setting ``name`` (``fixed`` for the rest)."""
    rows = []
    for value in candidates:
        row = {"setting": name, "value": value, **stage_one_figures(bundle, retriever, scenes, {**fixed, name: value})}
        report(row)
        rows.append(row)
    return rows


def best_mask(rows: list[dict]) -> dict:
    return max(rows, key=lambda row: row["stage_one_miou"])


def best_stop(rows: list[dict]) -> dict:
    return max(rows, key=lambda row: (row["count_accuracy"], row["stage_one_miou"]))


def calibrate(bundle, retriever, scenes, report=lambda row: None) -> dict:
    """First the mask threshold (``attention_fraction``, best mIoU with no stop rule), then each stop rule
    with it (best count accuracy, then mIoU); returns the chosen settings and their figures."""
    no_rules = {rule: None for rule in STOP_RULES}
    fraction = best_mask(sweep(bundle, retriever, scenes, "attention_fraction", ATTENTION_FRACTIONS, no_rules, report))
    chosen = {**no_rules, "attention_fraction": fraction["value"]}
    best = None
    for rule, candidates in STOP_RULES.items():
        row = best_stop(sweep(bundle, retriever, scenes, rule, candidates, chosen, report))
        if best is None or best_stop([best, row]) is row:
            best = row
    return {**chosen, best["setting"]: best["value"], **{key: best[key] for key in STAGE_ONE_FIGURES}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.toyworld.calibrate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a training output folder (default: the embedded model)")
    parser.add_argument("--scenes", type=int, default=100, help="validation scenes (default 100)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.scenes < 1:
        raise ValueError("--scenes must be at least 1.")
    bundle, retriever = load_models(args.model, args.device)
    scenes = [make_scene(validation_seed(i)) for i in range(args.scenes)]

    def report(row: dict) -> None:
        sys.stdout.write(json.dumps(row) + "\n")
        sys.stdout.flush()

    sys.stdout.write(json.dumps({"chosen": calibrate(bundle, retriever, scenes, report)}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
