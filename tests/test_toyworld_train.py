"""The Toy World trainer: every stage runs, the output loads through the normal loaders, and the attention
supervision and probe do what the model card says."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from devtools.toyworld import supervision as sv
from devtools.toyworld import train


def test_trainer_runs_every_stage_and_writes_a_model_that_loads(tmp_path):
    from ice_ops.bundle import DiffusionBundle
    from ice_ops.retrieve import ClipRetriever
    from ice_ops.toyworld.scenes import SHAPES

    out = str(tmp_path / "model")
    argv = ["--out", out, "--scenes", "24", "--clip-steps", "2", "--clip-batch", "8", "--vae-steps", "2",
            "--vae-batch", "4", "--unet-steps", "3", "--unet-batch", "4", "--probe-every", "2", "--probe-scenes", "2"]
    assert train.main(argv) == 0
    with open(os.path.join(out, "training_metrics.json"), encoding="utf-8") as handle:
        metrics = json.load(handle)
    assert metrics["unet_steps"] == 3 and metrics["clip_steps"] == 2 and metrics["vae_steps"] == 2
    assert [point["step"] for point in metrics["probe_curve"]] == [0, 2, 3]  # before, every 2 steps, at the end
    assert 0.0 <= metrics["probe_pointing"] <= 1.0
    card = open(os.path.join(out, "MODEL_CARD.md"), encoding="utf-8").read()
    assert "| step | seconds | pointing |" in card and " ".join(argv) in card
    assert sorted(os.listdir(os.path.join(out, "diffusers", "tokenizer"))) == [
        "merges.txt", "tokenizer_config.json", "vocab.json"]  # the layout transformers 4 and 5 both read
    bundle = DiffusionBundle.from_pretrained(os.path.join(out, "diffusers"))
    retriever = ClipRetriever.from_pretrained(os.path.join(out, "open_clip_config.json"),
                                              os.path.join(out, "open_clip.safetensors"), vocabulary=list(SHAPES))
    # One CLIP for both roles: the diffusion model's text encoder is the retriever's text tower.
    ids = retriever_ids = train.clip_tokenizer()(["a red plain square"])
    with torch.no_grad():
        ours = bundle.text_encoder(ids)[0]
        x = retriever.model.token_embedding(retriever_ids) + retriever.model.positional_embedding
        theirs = retriever.model.ln_final(retriever.model.transformer(x, attn_mask=retriever.model.attn_mask))
    assert torch.allclose(ours, theirs.to(ours.dtype), atol=2e-2)  # both stored in fp16
    with pytest.raises(ValueError, match="already holds"):
        train.main(argv)


def test_training_seeds_never_reach_the_validation_or_held_out_scenes():
    from ice_ops.toyworld.scenes import VALIDATION_SEED_OFFSET

    plan = train.Plan(seed=3, scenes=8000)
    assert train.training_first_seed(plan) + plan.scenes <= VALIDATION_SEED_OFFSET
    with pytest.raises(ValueError, match="smaller --seed"):
        train.training_first_seed(train.Plan(seed=VALIDATION_SEED_OFFSET // 8000, scenes=8000))


def test_captions_name_each_word_with_its_region_and_stage_one_prompt_is_covered():
    caption = sv.phrase_caption([(2, ("square", "red", "striped")), (0, ("circle", "orange", "plain"))],
                                photo=False, background=True)
    assert caption.text == "a red striped square and an orange plain circle on a textured background"
    regions = caption.token_regions(16, background=3)
    # position 0 is the start token; "a" is not supervised; red/striped/square -> region 2
    assert regions[:5] == [-100, -100, 2, 2, 2]
    assert regions[6:9] == [-100, 0, 0] and regions[9] == 0
    assert regions[13] == 3 and regions[14:] == [-100, -100]  # "background" -> the background region
    stage_one = sv.stage_one_caption(1, "star")
    assert stage_one.text == "star things background"
    assert stage_one.token_regions(4, background=3) == [-100, 1, -100, 3]


def test_every_caption_word_is_one_token_so_positions_are_exact():
    from ice_ops.text import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(pad_token=train.PAD_TOKEN)
    rng = np.random.default_rng(0)
    data = train.build_dataset(20, 0)
    for objects in data.attributes:
        caption = train.unet_caption(objects, list(range(len(objects))), rng)
        ids = tokenizer(caption.text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(caption.words)


def _probs_on(region: torch.Tensor, tokens: int, token: int) -> torch.Tensor:
    """[1, N, T] cross-attention where ``token`` attends only to ``region`` pixels (uniform elsewhere)."""
    n = region.numel()
    probs = torch.full((1, n, tokens), 1.0 / tokens)
    probs[0, :, token] = 0.0
    probs[0, region.flatten(), token] = 0.5
    return probs / probs.sum(-1, keepdim=True)


def test_cross_attention_loss_is_lower_when_the_word_attends_to_its_own_object():
    side = 8
    regions = torch.zeros(1, 2, side, side)
    regions[0, 0, :4, :4] = 1.0  # the object, top-left
    regions[0, 1] = 1.0 - regions[0, 0]  # the background
    targets = sv.SupervisionTargets(regions, torch.tensor([[-100, 0, -100]]), torch.ones(1))
    losses = sv.AttentionLosses()
    on_object = torch.zeros(side, side, dtype=torch.bool)
    on_object[:4, :4] = True
    elsewhere = torch.zeros(side, side, dtype=torch.bool)
    elsewhere[4:, 4:] = True
    losses.start(targets)
    losses.add_cross(_probs_on(on_object, 3, 1))
    right = float(losses.cross_loss())
    losses.start(targets)
    losses.add_cross(_probs_on(elsewhere, 3, 1))
    wrong = float(losses.cross_loss())
    assert right < 1e-4 < 1.0 < wrong
    losses.start(sv.SupervisionTargets(regions, torch.tensor([[-100, 0, -100]]), torch.zeros(1)))
    losses.add_cross(_probs_on(elsewhere, 3, 1))
    assert float(losses.cross_loss()) == 0.0  # unsupervised samples (noisy timesteps) add nothing


def test_self_attention_loss_rewards_staying_inside_the_own_region():
    side = 8
    regions = torch.zeros(1, 2, side, side)
    regions[0, 0, :, :4] = 1.0
    regions[0, 1] = 1.0 - regions[0, 0]
    labels = regions[0].argmax(0).flatten()
    same = (labels[:, None] == labels[None, :]).float()
    inside = (same / same.sum(-1, keepdim=True))[None]
    uniform = torch.full_like(inside, 1.0 / side**2)
    losses = sv.AttentionLosses()
    losses.start(sv.SupervisionTargets(regions, torch.full((1, 3), -100), torch.ones(1)))
    losses.add_self(inside)
    losses.add_self(uniform)
    within, spread = (float(t) for t in losses.self_terms)
    assert within < 1e-6 and abs(spread - np.log(2)) < 1e-5  # half the mass leaves the region


def test_calibration_picks_the_mask_threshold_by_miou_then_the_stop_rule_by_count(monkeypatch):
    from devtools.toyworld import calibrate

    def figures(bundle, retriever, scenes, overrides):
        fraction = overrides["attention_fraction"]
        miou = 1.0 - abs(fraction - 0.4)  # best mask threshold: 0.4
        contrast = overrides.get("min_contrast")
        count = 0.9 if contrast == 3.0 else 0.5  # only min_contrast 3 counts objects right
        if overrides.get("min_score") is not None:
            count = 0.6
        return {"count_accuracy": count, "stage_one_miou": miou, "word_top1": 1.0}

    monkeypatch.setattr(calibrate, "stage_one_figures", figures)
    rows = []
    chosen = calibrate.calibrate(None, None, [], rows.append)
    assert chosen["attention_fraction"] == 0.4
    assert chosen["min_contrast"] == 3.0 and chosen["min_score"] is None
    assert chosen["count_accuracy"] == 0.9
    swept = {(row["setting"], row["value"]) for row in rows}
    assert ("min_contrast", 3.0) in swept and ("min_score", 0.5) in swept
    assert {row["value"] for row in rows if row["setting"] == "attention_fraction"} == set(calibrate.ATTENTION_FRACTIONS)
