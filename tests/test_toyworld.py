"""Toy World: scene generator, pixel classifiers, and (when the weights ship) the embedded model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ice_ops.text import build_clip_tokenizer, word_pieces
from ice_ops.toyworld import scenes as sc


@pytest.fixture(scope="module")
def tokenizer():
    return build_clip_tokenizer()


@pytest.fixture(scope="module")
def many_scenes():
    return [sc.make_scene(seed) for seed in range(200)]


def test_same_seed_gives_the_same_scene():
    first, second = sc.make_scene(1234), sc.make_scene(1234)
    assert torch.equal(first.image, second.image)
    assert first.caption == second.caption
    assert torch.equal(first.masks, second.masks)


def test_different_seeds_give_different_scenes():
    assert not torch.equal(sc.make_scene(1).image, sc.make_scene(2).image)


def test_scenes_hold_one_to_three_objects_of_distinct_shapes(many_scenes):
    counts = {len(s.objects) for s in many_scenes}
    assert counts == {1, 2, 3}
    for scene in many_scenes:
        assert len(set(scene.words)) == len(scene.words)


def test_objects_do_not_overlap_and_masks_are_not_empty(many_scenes):
    for scene in many_scenes:
        masks = scene.masks
        assert masks.sum(dim=(1, 2)).min() > 0
        assert masks.sum(0).max() <= 1


def test_masks_mark_exactly_the_painted_object_pixels(many_scenes):
    for scene in many_scenes[:50]:
        painted = sc.foreground_mask(scene.image)
        union = scene.masks.any(0)
        assert torch.equal(painted, union)
        for obj in scene.objects:
            colours = scene.image[:, obj.mask]
            expected = torch.tensor(sc.COLOURS[obj.colour])
            # every object pixel is the object's colour at full or dark shade
            ratio = colours / expected[:, None]
            assert torch.allclose(ratio, ratio[:1].expand_as(ratio), atol=1e-5)


def test_caption_names_every_object_in_order(many_scenes):
    for scene in many_scenes:
        for obj in scene.objects:
            assert f"{obj.colour} {obj.material} {obj.shape}" in scene.caption
    scene = sc.make_scene(5, shapes=["circle", "square"], colours=["red", "orange"], materials=["striped", "plain"])
    assert scene.caption == "a red striped circle and an orange plain square"


def test_attributes_can_be_fixed():
    scene = sc.make_scene(9, shapes=["star"], colours=["blue"], materials=["dotted"])
    assert (scene.words, scene.colours, scene.materials) == (["star"], ["blue"], ["dotted"])


def test_bad_attributes_are_refused_with_a_fix():
    with pytest.raises(ValueError, match="choose from"):
        sc.make_scene(0, shapes=["blob"])
    with pytest.raises(ValueError, match="1 to 3"):
        sc.make_scene(0, count=4)


def test_every_word_is_one_clip_token(tokenizer):
    for word in (*sc.SHAPES, *sc.COLOURS, *sc.MATERIALS):
        assert len(word_pieces(tokenizer, word)) == 1, word


EVALUATION_SEEDS = (0, 1, 83_333, 10**6)  # --seed of the evaluation; 83 333 is where 8000-scene training seeds used to reach
EVALUATED_SCENES = 20


def _evaluated_scene_seeds(monkeypatch, seed: int) -> list[int]:
    """The scene seeds ``evaluate --seed SEED`` scores, read from the scenes it hands to the scorer."""
    from types import SimpleNamespace

    from ice_ops.toyworld import evaluate as ev

    seen = []

    def score_scene(bundle, retriever, scene, **kwargs):
        seen.append(scene.seed)
        return ev.SceneScore([1.0], [True], True), {}

    monkeypatch.setattr(ev, "score_scene", score_scene)
    ev.evaluate(SimpleNamespace(device="cpu"), None, scenes=EVALUATED_SCENES, seed=seed, learn_steps=0)
    return seen


def test_evaluated_scenes_are_never_training_or_validation_scenes(monkeypatch):
    from devtools.toyworld import train

    plan = train.Plan()
    last_accepted = sc.VALIDATION_SEED_OFFSET // plan.scenes - 1  # the largest --seed the trainer takes
    highest_training_seed = train.training_first_seed(train.Plan(seed=last_accepted, scenes=plan.scenes)) + plan.scenes - 1
    with pytest.raises(ValueError, match="smaller --seed"):
        train.training_first_seed(train.Plan(seed=last_accepted + 1, scenes=plan.scenes))
    highest_validation_seed = sc.validation_seed(sc.HELD_OUT_SEED_OFFSET - sc.VALIDATION_SEED_OFFSET - 1)
    with pytest.raises(ValueError, match="validation range"):
        sc.validation_seed(sc.HELD_OUT_SEED_OFFSET - sc.VALIDATION_SEED_OFFSET)
    runs = {seed: _evaluated_scene_seeds(monkeypatch, seed) for seed in EVALUATION_SEEDS}
    for seed, seeds in runs.items():
        assert len(set(seeds)) == EVALUATED_SCENES, seed  # every scored scene is another scene
        assert min(seeds) > max(highest_training_seed, highest_validation_seed), seed
    everything = [s for seeds in runs.values() for s in seeds]
    assert len(set(everything)) == len(everything)  # another --seed scores other scenes


@pytest.mark.parametrize("read", ["mask", "whole image"])
def test_colour_and_material_classifiers_read_ground_truth_renders(read):
    colour_hits = material_hits = total = 0
    for seed in range(300):
        scene = sc.make_scene(seed, count=1)
        obj = scene.objects[0]
        mask = obj.mask if read == "mask" else None
        colour_hits += sc.classify_colour(scene.image, mask) == obj.colour
        material_hits += sc.classify_material(scene.image, mask) == obj.material
        total += 1
    assert colour_hits / total == 1.0
    assert material_hits / total >= 0.98


def test_classifiers_see_nothing_on_a_bare_background():
    for seed in range(20):
        background = sc.render_background(np.random.default_rng(seed), sc.DEFAULT_SIZE)
        assert not sc.foreground_mask(torch.from_numpy(background.transpose(2, 0, 1).copy())).any()
    empty = torch.zeros(3, sc.DEFAULT_SIZE, sc.DEFAULT_SIZE)
    assert sc.classify_colour(empty) is None
    assert sc.classify_material(empty) is None


def test_every_colour_material_pair_is_read_back():
    for colour in sc.COLOURS:
        for material in sc.MATERIALS:
            scene = sc.make_scene(11, shapes=["square"], colours=[colour], materials=[material])
            assert sc.classify_colour(scene.image) == colour
            assert sc.classify_material(scene.image) == material


# ------------------------------------------------------------------------------------------ scoring
def test_hungarian_matching_pairs_each_true_mask_with_its_best_prediction():
    from ice_ops.toyworld.evaluate import match_masks

    scene = sc.make_scene(21, count=3)
    truth = scene.masks
    predicted = truth.flip(0).clone()
    predicted[0, :, :2] = False  # slightly damaged copy
    pairs = match_masks(predicted, truth)
    assert sorted((p, t) for p, t, _ in pairs) == [(0, 2), (1, 1), (2, 0)]
    assert all(iou > 0.8 for _, _, iou in pairs)
    assert match_masks(torch.zeros(0, *truth.shape[-2:], dtype=torch.bool), truth) == []


def test_summary_counts_unmatched_objects_as_misses():
    from ice_ops.toyworld.evaluate import ICE, MethodScore, SceneScore, summarise

    ice = MethodScore(colour=[True], material=[False], swap=[True, False], swap_attribute=[True, True],
                      swap_shape=[True, False])
    scores = [SceneScore([1.0, 0.0], [True, False], False, {ICE: ice})]
    summary = summarise(scores)
    assert summary["stage_one_miou"] == 0.5
    assert summary["word_top1"] == 0.5
    assert summary["count_accuracy"] == 0.0
    assert summary["attribute_accuracy"] == 0.5
    assert summary["swap_accuracy"] == 0.5 and summary["swap_attribute_accuracy"] == 1.0


def test_each_method_is_summarised_from_its_own_results_only():
    from ice_ops.toyworld.evaluate import BASELINE, ICE, MethodScore, SceneScore, summarise_method

    scores = [
        SceneScore([1.0], [True], True, {ICE: MethodScore(swap=[True]), BASELINE: MethodScore(swap=[False])}),
        SceneScore([1.0], [True], True, {ICE: MethodScore(swap=[True])}),
    ]
    assert summarise_method(scores, ICE)["swap_accuracy"] == 1.0
    assert summarise_method(scores, BASELINE)["swap_accuracy"] == 0.0
    assert summarise_method(scores, BASELINE)["colour_accuracy"] is None


def test_progress_line_names_the_scene_the_words_and_the_time_left():
    from ice_ops.toyworld.evaluate import ICE, progress_line

    row = {"seed": 7, "true_words": ["square"], "found_words": ["square"], "ious": [0.8125],
           ICE: {"colour": [True], "material": [False], "swap": [True, False]}}
    line = progress_line(1, 4, row, elapsed=60.0)
    assert line.startswith("scene 2/4 (seed 7)")
    assert "IoU 0.81" in line and "attributes 1/2" in line and "swaps 1/2" in line
    assert "1.0 min left" in line  # 30 s a scene, two scenes left


def test_oracle_concepts_carry_the_true_words_and_masks():
    from ice_ops.toyworld.evaluate import match_masks, oracle_concepts

    scene = sc.make_scene(8)
    concepts = oracle_concepts(scene)
    assert [c.word for c in concepts.concepts] == scene.words
    assert len(set(concepts.names)) == len(concepts.concepts)
    assert all(iou == 1.0 for _, _, iou in match_masks(concepts.masks() > 0.5, scene.masks))


# ------------------------------------------------------------------------------------------ training
def test_open_clip_text_tower_converts_to_an_equal_clip_text_model():
    from devtools.toyworld import train

    torch.manual_seed(0)
    model = train.build_clip().eval()
    with torch.no_grad():  # move the LayerNorms off their identity init so a swapped mapping would show
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)
    encoder = train.open_clip_text_to_transformers(model)
    prompts = [sc.make_scene(3).caption, "circle things background", ""]
    assert train.text_tower_difference(model, encoder, prompts) < 1e-4
    tokenizer = build_clip_tokenizer(pad_token=train.PAD_TOKEN, model_max_length=train.TEXT_CONTEXT)
    ours = tokenizer(prompts, padding="max_length", max_length=train.TEXT_CONTEXT, return_tensors="pt").input_ids
    assert torch.equal(ours, train.clip_tokenizer()(prompts))


# ------------------------------------------------------------------------------------------ shipped model
from ice_ops.toyworld import embedded_weights_present, localize_settings  # noqa: E402

needs_weights = pytest.mark.skipif(not embedded_weights_present(), reason="the Toy World weights are not shipped")

# Regression floors for the shipped model on the demo scene (localization is deterministic), set below what
# the shipped weights measure: mIoU 0.65 (square 0.61, cross 0.60, triangle 0.74) with three concepts for three
# objects, but all three named "square" (word accuracy 1/3): the noun's attention covers every object of this
# scene. The issue-5 model measured mIoU 0.39 here. Held-out figures are in the model card.
FIXED_SCENE_SEED = sc.held_out_seed(3)
MIN_FIXED_SCENE_MIOU = 0.55
MIN_FIXED_SCENE_WORD_ACCURACY = 0.3
MAX_SHIPPED_BYTES = 50 * 1024 * 1024  # the budget for the shipped weights


@pytest.fixture(scope="module")
def embedded(toyworld_model):
    return toyworld_model


@needs_weights
def test_shipped_weights_are_fp16_load_through_the_normal_loaders_and_fit_the_budget(embedded):
    import os

    from safetensors import safe_open

    from ice_ops.toyworld import WEIGHTS_DIR

    bundle, retriever = embedded
    assert bundle.native_resolution == sc.DEFAULT_SIZE
    assert retriever.vocabulary == list(sc.SHAPES)
    files = [os.path.join(d, f) for d, _, names in os.walk(WEIGHTS_DIR) for f in names]
    assert sum(os.path.getsize(f) for f in files) <= MAX_SHIPPED_BYTES
    for path in (f for f in files if f.endswith(".safetensors")):
        with safe_open(path, framework="pt") as handle:
            assert all(handle.get_slice(k).get_dtype() == "F16" for k in handle.keys()), path


@needs_weights
def test_shipped_model_localizes_and_learns_a_fixed_scene(embedded):
    from ice_ops.learn import learn_object_tokens
    from ice_ops.localization import localize
    from ice_ops.toyworld.evaluate import match_masks

    bundle, retriever = embedded
    scene = sc.make_scene(FIXED_SCENE_SEED)
    concepts = localize(bundle, retriever, scene.image, **localize_settings())
    assert len(concepts) == len(scene.objects)
    pairs = match_masks(concepts.masks() > 0.5, scene.masks)
    ious = [0.0] * len(scene.objects)
    words = [False] * len(scene.objects)
    for p, t, iou in pairs:
        ious[t] = iou
        words[t] = concepts.concepts[p].word == scene.objects[t].shape
    assert np.mean(ious) >= MIN_FIXED_SCENE_MIOU
    assert np.mean(words) >= MIN_FIXED_SCENE_WORD_ACCURACY
    learned = learn_object_tokens(bundle, scene.image, concepts, steps=10)
    for concept in learned.concepts:
        assert {"object", "instance"} <= set(concept.vectors)
        assert all(torch.isfinite(v).all() for v in concept.vectors.values())


@needs_weights
def test_demo_command_writes_the_sheet_and_report_and_never_overwrites(tmp_path, capsys):
    import json
    import os

    from PIL import Image

    from ice_ops.__main__ import main
    from ice_ops.toyworld.demo import DEMO_SCENE_SEED, REPORT_NAME, SHEET_NAME, TILE_MIN_PX, demo_prompts

    out = str(tmp_path / "demo")
    assert main(["demo", "--out", out, "--learn-steps", "2", "--device", "cpu"]) == 0
    printed = capsys.readouterr()
    assert os.path.join(out, SHEET_NAME) in printed.out
    # stderr is not a terminal here: a few plain progress lines per phase, no bar redrawn in place
    lines = printed.err.split("\n")
    for phase in ("Stage One: finding objects: ", "Stage Two: object tokens: 2/2", "Stage Two: intrinsic tokens: 2/2",
                  "generating: "):
        assert any(line.startswith(phase) for line in lines), phase
    assert "\rStage" not in printed.err and "\rgenerating" not in printed.err
    with open(os.path.join(out, REPORT_NAME), encoding="utf-8") as handle:
        report = json.load(handle)
    assert {"scene_seed", "caption", "found", "prompts", "learn_steps"} <= set(report)
    assert report["found"] and all(entry["word"] in sc.SHAPES for entry in report["found"])
    true_words = sc.make_scene(DEMO_SCENE_SEED).words
    for entry in report["found"]:
        assert {"name", "word", "score", "true_word", "iou"} <= set(entry)
        assert entry["true_word"] is None or (entry["true_word"] in true_words and 0 < entry["iou"] <= 1)
    assert any(entry["true_word"] for entry in report["found"]), "the demo scene's objects are found"
    # a first row (scene, found, truth), then per concept: found mask, true mask, one tile per prompt
    columns = 2 + len(demo_prompts("square", "square"))
    with Image.open(os.path.join(out, SHEET_NAME)) as sheet:
        assert sheet.format == "PNG"
        assert sheet.width >= columns * TILE_MIN_PX and sheet.height >= (1 + len(report["found"])) * TILE_MIN_PX
    with pytest.raises(SystemExit) as stopped:
        main(["--quiet", "demo", "--out", out, "--learn-steps", "2", "--device", "cpu"])
    assert stopped.value.code == 2
    assert "exists" in capsys.readouterr().err
