"""nodes/_adapters.py on plain tensors and stand-in objects: what ComfyUI hands the nodes and what they hand
back (IMAGE [B,H,W,C], MASK [B,H,W], CONDITIONING [[cond, {"pooled_output"}]]), model checks and progress."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from nodes import _adapters as A

# ComfyUI 0.3.64 unet_config of each model (comfy/model_detection.py, after convert_config), and of the
# tiny SD1.5 variant built by tests/comfyui/make_fixtures.py as ComfyUI detects it.
COMFY_SD15 = {
    "in_channels": 4, "out_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
}
COMFY_SD21 = {
    "in_channels": 4, "out_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": True, "context_dim": 1024, "num_head_channels": 64,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
}
COMFY_TINY_SD15 = {
    "in_channels": 4, "out_channels": 4, "model_channels": 320, "num_res_blocks": [1, 1],
    "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1], "channel_mult": [1, 2],
    "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768,
    "num_heads": 8, "num_head_channels": -1,
}


def comfy_image(batch: int = 1, height: int = 48, width: int = 64, channels: int = 3) -> torch.Tensor:
    return torch.rand(batch, height, width, channels, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------- IMAGE
def test_image_to_engine_is_channels_first_with_the_same_pixels():
    image = comfy_image()
    engine_image = A.image_to_engine(image)
    assert engine_image.shape == (3, 48, 64)
    assert torch.equal(engine_image[:, 5, 7], image[0, 5, 7])


def test_image_round_trip_is_exact():
    image = comfy_image()
    assert torch.equal(A.image_from_engine(A.image_to_engine(image)), image)


def test_an_image_batch_is_refused_with_a_way_out():
    with pytest.raises(ValueError, match="batch of 2 images.*ImageFromBatch"):
        A.image_to_engine(comfy_image(batch=2))


def test_rgba_images_drop_alpha_and_grey_images_expand():
    rgba = comfy_image(channels=4)
    assert torch.equal(A.image_to_engine(rgba), A.image_to_engine(rgba[..., :3]))
    grey = comfy_image(channels=1)
    out = A.image_to_engine(grey)
    assert out.shape == (3, 48, 64) and torch.equal(out[0], out[2])


def test_images_of_other_shapes_are_refused():
    with pytest.raises(ValueError, match="IMAGE"):
        A.image_to_engine(torch.rand(48, 64, 3))
    with pytest.raises(ValueError, match="channels"):
        A.image_to_engine(comfy_image(channels=2))


def test_tensors_made_under_inference_mode_come_out_usable_for_autograd():
    with torch.inference_mode():  # ComfyUI runs nodes like this
        image = comfy_image()
        mask = torch.ones(1, 48, 64)
        engine_image = A.image_to_engine(image)
        engine_mask = A.mask_to_engine(mask, (48, 64))
    assert not torch.is_inference(engine_image) and not torch.is_inference(engine_mask)
    weight = torch.ones((), requires_grad=True)
    (engine_image * engine_mask * weight).sum().backward()
    assert weight.grad is not None


def test_engine_image_batches_become_comfy_images():
    images = torch.rand(2, 3, 8, 9)
    out = A.image_from_engine(images)
    assert out.shape == (2, 8, 9, 3) and out.dtype == torch.float32
    with pytest.raises(ValueError):
        A.image_from_engine(torch.rand(4, 8, 9))


# ---------------------------------------------------------------------- MASK
def test_mask_to_engine_accepts_one_mask_of_the_image_size():
    mask = torch.zeros(1, 48, 64)
    mask[0, :10] = 1
    out = A.mask_to_engine(mask, (48, 64))
    assert out.shape == (48, 64) and out[:10].all() and not out[10:].any()
    assert A.mask_to_engine(mask[0], (48, 64)).shape == (48, 64)
    assert A.mask_to_engine(None, (48, 64)) is None


def test_mask_of_another_size_is_refused_naming_both_sizes():
    with pytest.raises(ValueError, match="64x64 but the image is 64x48"):
        A.mask_to_engine(torch.zeros(1, 64, 64), (48, 64), "ignore_mask")


def test_a_mask_batch_is_refused_where_one_mask_is_expected():
    with pytest.raises(ValueError, match="batch of 3 masks"):
        A.mask_to_engine(torch.zeros(3, 48, 64), (48, 64))


def test_engine_masks_become_a_mask_batch_and_an_empty_set_one_empty_mask():
    masks = torch.rand(3, 8, 9)
    assert torch.equal(A.masks_from_engine(masks, (8, 9)), masks)
    empty = A.masks_from_engine(torch.zeros(0, 8, 9), (8, 9))
    assert empty.shape == (1, 8, 9) and not empty.any()


def _concepts(count: int = 2, size=(8, 9)):
    from ice_ops.concepts import Concept, ConceptSet

    concepts = [
        Concept(f"word{i}", f"word{i}", 0.5, torch.zeros(size), {"object": torch.full((4,), float(i))})
        for i in range(count)
    ]
    return ConceptSet(concepts=concepts, image_size=size)


def test_replace_masks_puts_one_mask_per_concept_and_keeps_vectors():
    concepts = _concepts()
    masks = torch.stack([torch.ones(8, 9), torch.zeros(8, 9)])
    masks[1, 0, 0] = 1
    replaced = A.replace_masks(concepts, masks)
    assert torch.equal(replaced.concepts[0].mask, masks[0]) and torch.equal(replaced.concepts[1].mask, masks[1])
    assert torch.equal(replaced.concepts[1].vectors["object"], concepts.concepts[1].vectors["object"])
    assert not concepts.concepts[0].mask.any(), "the input concept set must not change"
    assert A.replace_masks(concepts, None) is concepts


def test_a_mask_batch_that_does_not_match_the_concepts_is_refused():
    with pytest.raises(ValueError, match="3 masks but the concept set has 2 concepts"):
        A.replace_masks(_concepts(), torch.zeros(3, 8, 9))
    with pytest.raises(ValueError, match="image is 9x8"):
        A.replace_masks(_concepts(), torch.zeros(2, 16, 16))


# ---------------------------------------------------------------------- CONDITIONING
def test_composed_prompt_becomes_comfy_conditioning():
    composed = SimpleNamespace(hidden_states=torch.rand(1, 77, 768, dtype=torch.float16), pooled=torch.rand(1, 768))
    conditioning = A.conditioning_from_composed(composed)
    assert isinstance(conditioning, list) and len(conditioning) == 1
    cond, extras = conditioning[0]
    assert cond.shape == (1, 77, 768) and cond.dtype == torch.float32 and cond.device.type == "cpu"
    assert set(extras) == {"pooled_output"} and extras["pooled_output"].shape == (1, 768)
    assert torch.allclose(cond, composed.hidden_states.float())


def test_conditioning_refuses_mismatched_widths():
    with pytest.raises(ValueError):
        A.conditioning_from_composed(SimpleNamespace(hidden_states=torch.rand(1, 77, 768), pooled=torch.rand(1, 1024)))
    with pytest.raises(ValueError):
        A.conditioning_from_composed(SimpleNamespace(hidden_states=torch.rand(2, 77, 768), pooled=torch.rand(2, 768)))


def _empty_prompt(width: int = 128):
    return SimpleNamespace(hidden_states=torch.full((1, 77, width), 7.0), pooled=torch.full((1, width), 7.0))


def test_conditioning_round_trips_into_an_engine_prompt_for_generate():
    positive = A.conditioning_from_composed(SimpleNamespace(hidden_states=torch.rand(1, 77, 128), pooled=torch.rand(1, 128)))
    negative = A.conditioning_from_composed(SimpleNamespace(hidden_states=torch.rand(1, 77, 128), pooled=torch.rand(1, 128)))
    prompt = A.composed_from_conditioning(positive, negative, _empty_prompt(), width=128)
    assert torch.equal(prompt.hidden_states, positive[0][0]) and torch.equal(prompt.pooled, positive[0][1]["pooled_output"])
    assert torch.equal(prompt.negative_hidden_states, negative[0][0])
    assert prompt.hidden_states.requires_grad is False and not prompt.hidden_states.is_inference()


def test_without_a_negative_the_empty_prompt_is_used():
    positive = [[torch.rand(1, 77, 128), {}]]
    prompt = A.composed_from_conditioning(positive, None, _empty_prompt(), width=128)
    assert torch.equal(prompt.negative_hidden_states, _empty_prompt().hidden_states)
    assert prompt.pooled.shape == (1, 128)


def test_conditioning_of_another_text_encoder_is_refused_with_the_fix():
    sd15 = [[torch.rand(1, 77, 768), {"pooled_output": torch.rand(1, 768)}]]
    with pytest.raises(ValueError, match="Compose Concepts using the same ICE model"):
        A.composed_from_conditioning(sd15, None, _empty_prompt(), width=128)
    with pytest.raises(ValueError, match="negative"):
        A.composed_from_conditioning([[torch.rand(1, 77, 128), {}]], sd15, _empty_prompt(), width=128)


def test_combined_conditioning_is_refused():
    two = [[torch.rand(1, 77, 128), {}], [torch.rand(1, 77, 128), {}]]
    with pytest.raises(ValueError, match="got 2 entries"):
        A.composed_from_conditioning(two, None, _empty_prompt(), width=128)


# ---------------------------------------------------------------------- text and pictures
def test_split_words():
    assert A.split_words(" vase, table\nwall ,, ") == ["vase", "table", "wall"]
    assert A.split_words("  ") == []


def test_labelled_overlay_colours_the_masks_and_draws_the_labels():
    from ice_ops.imaging import overlay_masks, upscale_nearest

    image = torch.full((3, 96, 96), 0.5)
    masks = torch.zeros(2, 96, 96)
    masks[0, :, :48] = 1
    masks[1, :, 48:] = 1
    out = A.labelled_overlay(image, masks, ["vase", "table"])
    assert out.shape == (3, 288, 288) and 0 <= out.min() and out.max() <= 1, "enlarged 3x so the words are legible"
    plain = overlay_masks(upscale_nearest(image, 3), upscale_nearest(masks, 3))
    assert (out - plain).abs().amax(0).gt(0.2).any(), "the labels should be drawn"
    assert (out[:, 0, 0] - out[:, 0, 287]).abs().max() > 0.1, "each mask has its own colour"
    assert torch.equal(A.labelled_overlay(image, torch.zeros(0, 96, 96), []), torch.full((3, 288, 288), 0.5))


# ---------------------------------------------------------------------- progress and cancel
class FakeBar:
    def __init__(self, total):
        self.total, self.updates = total, []

    def update_absolute(self, value, total=None, preview=None):
        self.updates.append((value, total, preview))


def test_progress_reporter_drives_the_bar_and_sends_previews():
    bars = []
    reporter = A.ProgressReporter(bar_factory=lambda total: bars.append(FakeBar(total)) or bars[-1],
                                  interrupt_check=lambda: None, preview_size=256)
    reporter(1, 4, None)
    reporter(2, 4, torch.rand(3, 16, 16))
    assert len(bars) == 1 and bars[0].total == 4
    (first, total, none), (second, _, preview) = bars[0].updates
    assert (first, total, none, second) == (1, 4, None, 2)
    kind, picture, size = preview
    assert kind == "JPEG" and picture.size == (16, 16) and size == 256


def test_cancel_raises_out_of_the_engine_callback_before_any_update():
    class Interrupted(Exception):
        pass

    def interrupt():
        raise Interrupted()

    bars = []
    reporter = A.ProgressReporter(bar_factory=lambda total: bars.append(FakeBar(total)) or bars[-1],
                                  interrupt_check=interrupt, preview_size=256)
    with pytest.raises(Interrupted):
        reporter(1, 10, None)
    assert bars == []


def test_the_engine_asks_comfyui_for_cancel_inside_a_step():
    from ice_ops.progress import cancel_point

    class Interrupted(Exception):
        pass

    def interrupt():
        raise Interrupted()

    reporter = A.ProgressReporter(bar_factory=lambda total: None, interrupt_check=interrupt, preview_size=256)
    with pytest.raises(Interrupted):
        cancel_point(reporter)
    cancel_point(lambda step, total, preview: None)  # plain callbacks have no cancel check: nothing happens


# ---------------------------------------------------------------------- model checks (stand-ins for ComfyUI objects)
# The ComfyUI tier runs model_family on every model class of a real ComfyUI
# (test_of_every_model_class_comfyui_detects_only_sd1_and_sd2_are_taken); here, stand-ins cover the branches.
def fake_model(config_class: str, unet_config: dict | None = None, model_type: str = "EPS"):
    config = type(config_class, (), {})()
    config.unet_config = unet_config or {"in_channels": 4}
    return SimpleNamespace(model=SimpleNamespace(model_config=config, model_type=SimpleNamespace(name=model_type)))


@pytest.mark.parametrize("name, family", [("SD15", "sd1"), ("SD20", "sd2")])
def test_sd1_and_sd2_models_are_accepted(name, family):
    assert A.model_family(fake_model(name)) == (family, name)


@pytest.mark.parametrize("name", ["SDXL", "Flux", "SD3", "SD21UnclipH", "SD15_instructpix2pix"])
def test_other_model_types_are_refused_naming_what_is_supported(name):
    with pytest.raises(ValueError, match=f"detected it as {name}.*SD15.*SD20"):
        A.model_family(fake_model(name))


def test_inpainting_unets_are_refused():
    with pytest.raises(ValueError, match="9 input channels"):
        A.model_family(fake_model("SD15", {"in_channels": 9}))


def test_something_that_is_not_a_model_is_refused():
    with pytest.raises(ValueError, match="MODEL output of Load Checkpoint"):
        A.model_family(SimpleNamespace())


def test_prediction_type_follows_comfyui():
    assert A.prediction_type(fake_model("SD20", model_type="V_PREDICTION")) == "v_prediction"
    assert A.prediction_type(fake_model("SD15")) == "epsilon"
    with pytest.raises(ValueError):
        A.prediction_type(fake_model("SD15", model_type="FLOW"))


def test_clip_must_belong_to_the_model_family():
    sd2_clip = SimpleNamespace(cond_stage_model=type("SD2ClipModel", (), {})())
    A.check_clip(sd2_clip, "sd2")
    with pytest.raises(ValueError, match="CLIP output of the same Load Checkpoint"):
        A.check_clip(sd2_clip, "sd1")


# ---------------------------------------------------------------------- UNet configs from ComfyUI's
def _shipped(family: str, part: str) -> dict:
    from ice_ops.bundle import read_config

    return read_config(family, part)


@pytest.mark.parametrize("family, comfy", [("sd1", COMFY_SD15), ("sd2", COMFY_SD21)])
def test_comfy_unet_config_of_a_real_model_gives_the_shipped_diffusers_config(family, comfy):
    shipped = _shipped(family, "unet")
    derived = A.diffusers_unet_config(comfy, shipped, shipped["sample_size"])
    for key in ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types",
                "attention_head_dim", "cross_attention_dim", "in_channels", "out_channels", "sample_size"):
        assert derived[key] == shipped[key], key
    assert derived["use_linear_projection"] == shipped.get("use_linear_projection", False)


def test_comfy_unet_config_of_the_tiny_variant_builds_a_unet_with_its_layout():
    from diffusers import UNet2DConditionModel

    shipped = _shipped("sd1", "unet")
    derived = A.diffusers_unet_config(COMFY_TINY_SD15, shipped, shipped["sample_size"])
    assert derived["block_out_channels"] == [320, 640] and derived["layers_per_block"] == 1
    assert derived["down_block_types"] == ["CrossAttnDownBlock2D"] * 2
    unet = UNet2DConditionModel.from_config({**derived, "block_out_channels": [32, 64], "norm_num_groups": 8,
                                             "attention_head_dim": 2, "cross_attention_dim": 16})
    assert len(unet.down_blocks) == 2 and all(hasattr(b, "attentions") for b in unet.down_blocks)


def test_working_resolution_sets_the_sample_size_in_multiples_the_model_can_take():
    unet, vae = _shipped("sd1", "unet"), _shipped("sd1", "vae")
    assert A.sample_size_for(512, unet, vae) == 64
    assert A.sample_size_for(256, unet, vae) == 32
    with pytest.raises(ValueError, match="multiple of 64"):
        A.sample_size_for(500, unet, vae)
    tiny = A.diffusers_unet_config(COMFY_TINY_SD15, unet, unet["sample_size"])
    assert A.sample_size_for(64, tiny, vae) == 8
