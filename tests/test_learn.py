"""Stage Two on the tiny random model: what a user relies on when learning tokens."""
import pytest
import torch

from ice_ops import learn as learn_module
from ice_ops.attention import capture_attention
from ice_ops.concepts import Concept, ConceptSet
from ice_ops.imaging import resize_soft_mask
from ice_ops.learn import (
    PROMPT_TEMPLATES,
    TrainingDiverged,
    learn_intrinsic_tokens,
    learn_object_tokens,
    normalise_anchors,
)
from ice_ops.tokens import PlaceholderText, placeholder_string

SIZE = 64
MIN_MOVE = 0.1  # a learned token ends at least this far from its word, relative to the word's length
THIN_COLUMN = 13
# The Toy World case: learning settings, and what the learned tokens are read on (fixed noise per timestep).
TOY_SCENE_SEED = 2
TOY_STEPS = 20
TOY_LR = 5e-3
READ_TIMESTEPS = (100, 300, 500, 700, 900)
MIN_ERROR_FALL = 0.05  # measured: 18 % lower error inside the mask
MIN_ATTENTION_GAIN = 1.5  # measured: the instance token's attention share on the circle doubles


def _scene():
    generator = torch.Generator().manual_seed(0)
    image = 0.4 + 0.1 * torch.rand(3, SIZE, SIZE, generator=generator)
    ball = torch.zeros(SIZE, SIZE)
    ball[8:30, 6:28] = 1
    box = torch.zeros(SIZE, SIZE)
    box[36:60, 30:60] = 1
    image[:, ball > 0] = torch.tensor([0.9, 0.1, 0.1])[:, None]
    image[:, box > 0] = torch.tensor([0.1, 0.2, 0.9])[:, None]
    concepts = ConceptSet([Concept("ball", "ball", 0.9, ball), Concept("box", "box", 0.5, box)], (SIZE, SIZE))
    return image, concepts


def _snapshot(bundle):
    return {
        "unet": {k: v.clone() for k, v in bundle.unet.state_dict().items()},
        "text": {k: v.clone() for k, v in bundle.text_encoder.state_dict().items()},
        "vae": {k: v.clone() for k, v in bundle.vae.state_dict().items()},
        "vocab": len(bundle.tokenizer),
    }


def _assert_same(before, after):
    assert before["vocab"] == after["vocab"]
    for part in ("unet", "text", "vae"):
        assert before[part].keys() == after[part].keys()
        for key in before[part]:
            assert torch.equal(before[part][key], after[part][key]), f"{part}.{key} changed"


@pytest.fixture(scope="module")
def learned_objects(tiny_bundle):
    image, concepts = _scene()
    log = []
    result = learn_object_tokens(tiny_bundle, image, concepts, steps=12, lr=5e-3, seed=1,
                                 monitor=lambda step, values: log.append(values))
    return image, concepts, result, log


def test_phase_one_learns_object_and_instance_tokens(learned_objects, tiny_bundle):
    _, concepts, result, log = learned_objects
    text = PlaceholderText(tiny_bundle.tokenizer, tiny_bundle.text_encoder)
    assert result.names == ["ball", "box"]
    for concept in result.concepts:
        assert set(concept.vectors) == {"object", "instance"}
        word = text.word_init(concept.word)
        for vector in concept.vectors.values():
            assert vector.shape == (tiny_bundle.text_width,) and torch.isfinite(vector).all()
            assert float((vector - word).norm()) > MIN_MOVE * float(word.norm())  # learning moved it off the word
    assert len(log) == 12
    # the input set is left as it was
    assert all(not c.vectors for c in concepts.concepts)
    assert result.fingerprint["width"] == tiny_bundle.text_width


def test_object_and_instance_start_from_the_word_and_move_apart(learned_objects, tiny_bundle):
    _, _, result, _ = learned_objects
    word = PlaceholderText(tiny_bundle.tokenizer, tiny_bundle.text_encoder).word_init("ball")
    ball = result.get("ball")
    assert not torch.equal(ball.vectors["object"], ball.vectors["instance"])
    assert float((ball.vectors["object"] - word).norm()) < 1.0


def _toyworld_case():
    """A Toy World scene of a circle and a square, and one concept whose mask is the circle but whose word is
    "square": what the mask shows is known, and the initial word points elsewhere."""
    from ice_ops.toyworld import scenes

    scene = scenes.make_scene(TOY_SCENE_SEED, shapes=["circle", "square"], colours=["red", "blue"],
                              materials=["plain", "striped"])
    circle, square = (obj.mask.float() for obj in scene.objects)
    concepts = ConceptSet([Concept("thing", "square", 1.0, circle)], tuple(circle.shape))
    return scene.image, concepts, circle, square


def _read_tokens(bundle, image, vectors, masks):
    """What the model makes of an instance and an object token in a training prompt, on fixed noise at fixed
    timesteps: (the denoising error inside ``masks[0]``, the share of the instance token's cross-attention
    that falls in each of ``masks``)."""
    text = PlaceholderText(bundle.tokenizer, bundle.text_encoder)
    instance, obj = placeholder_string("thing", "instance"), placeholder_string("thing", "object")
    text.add(instance, vectors["instance"])
    text.add(obj, vectors["object"])
    ids = text.tokenize([PROMPT_TEMPLATES[0].format(instance + obj)])
    position = ids[0].tolist().index(text.token_id(instance))
    latent = bundle.encode_image(image, tuple(image.shape[-2:]))
    latent_mask = resize_soft_mask(masks[0], tuple(latent.shape[-2:]))
    errors, shares, maps_read = [], torch.zeros(len(masks)), 0
    with torch.no_grad():
        hidden, _ = text.encode(ids)
        for step in READ_TIMESTEPS:
            timestep = torch.tensor([step])
            noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(step))
            with capture_attention(bundle.unet, record_self=False, cross_positions=[position]) as store:
                prediction = bundle.unet(bundle.scheduler.add_noise(latent, noise, timestep), timestep,
                                         encoder_hidden_states=hidden).sample
            squared = (prediction - noise).square().mean(1)[0]
            errors.append(float((squared * latent_mask).sum() / latent_mask.sum()))
            for grid, maps in store.cross_maps.items():
                attention = maps[0, :, 0].reshape(grid)
                attention = attention / attention.sum()
                shares += torch.stack([(attention * resize_soft_mask(m, grid)).sum() for m in masks])
                maps_read += 1
    return sum(errors) / len(errors), (shares / maps_read).tolist()


def test_learned_tokens_explain_what_the_mask_shows_better_than_the_word(toyworld_model):
    bundle, _ = toyworld_model
    image, concepts, circle, square = _toyworld_case()
    word = PlaceholderText(bundle.tokenizer, bundle.text_encoder).word_init("square")
    learned = learn_object_tokens(bundle, image, concepts, steps=TOY_STEPS, lr=TOY_LR, seed=0).get("thing")
    word_error, (word_on_circle, word_on_square) = _read_tokens(
        bundle, image, {"instance": word, "object": word}, [circle, square])
    error, (on_circle, on_square) = _read_tokens(bundle, image, learned.vectors, [circle, square])
    # the masked loss falls: the learned tokens denoise the circle better than the word they started from
    assert error < (1 - MIN_ERROR_FALL) * word_error
    # the instance token ends closer to what the mask shows: its attention moves onto the circle, off the square
    assert on_circle > MIN_ATTENTION_GAIN * word_on_circle
    assert on_square < word_on_square and on_circle > on_square


def test_only_placeholder_vectors_change_and_the_callers_model_is_untouched(fresh_tiny_bundle):
    image, concepts = _scene()
    before = _snapshot(fresh_tiny_bundle)
    learned = learn_object_tokens(fresh_tiny_bundle, image, concepts, steps=3, lr=1e-2)
    learn_intrinsic_tokens(fresh_tiny_bundle, image, learned, steps=3)
    _assert_same(before, _snapshot(fresh_tiny_bundle))


def test_same_seed_same_vectors_other_seed_other_vectors(tiny_bundle):
    image, concepts = _scene()
    a = learn_object_tokens(tiny_bundle, image, concepts, steps=3, seed=5)
    b = learn_object_tokens(tiny_bundle, image, concepts, steps=3, seed=5)
    c = learn_object_tokens(tiny_bundle, image, concepts, steps=3, seed=6)
    for x, y, z in zip(a.concepts, b.concepts, c.concepts):
        assert torch.equal(x.vectors["object"], y.vectors["object"])
    assert any(not torch.equal(x.vectors["instance"], z.vectors["instance"]) for x, z in zip(a.concepts, c.concepts))


def test_phase_two_starts_intrinsics_from_the_instance_token_and_freezes_the_rest(learned_objects, tiny_bundle):
    image, _, objects, _ = learned_objects
    zero_lr = learn_intrinsic_tokens(tiny_bundle, image, objects, anchors=("material", "colour"), steps=1, lr=1e-12)
    for concept, source in zip(zero_lr.concepts, objects.concepts):
        assert set(concept.vectors) == {"object", "instance", "material", "colour"}
        assert torch.allclose(concept.vectors["material"], source.vectors["instance"], atol=1e-6)
    learned = learn_intrinsic_tokens(tiny_bundle, image, objects, anchors="material, colour, texture", steps=4)
    assert learned.anchors == ("material", "colour", "texture")
    for concept, source in zip(learned.concepts, objects.concepts):
        assert torch.equal(concept.vectors["object"], source.vectors["object"])
        assert torch.equal(concept.vectors["instance"], source.vectors["instance"])
        assert not torch.equal(concept.vectors["material"], source.vectors["instance"])


def test_raising_from_the_callback_stops_cleanly(tiny_bundle):
    image, concepts = _scene()

    class Cancelled(Exception):
        pass

    seen = []

    def callback(step, total, preview):
        seen.append((step, total))
        if step == 2:
            raise Cancelled()

    with pytest.raises(Cancelled):
        learn_object_tokens(tiny_bundle, image, concepts, steps=50, callback=callback)
    assert seen == [(1, 50), (2, 50)]
    assert all(not c.vectors for c in concepts.concepts)


class _CancelInsideTheStep:
    """A host's callback whose Cancel was pressed during the first step's forward pass."""

    class Cancelled(Exception):
        pass

    def __init__(self):
        self.calls = 0

    def check_cancel(self):
        raise self.Cancelled()

    def __call__(self, step, total, preview):
        self.calls += 1


def test_cancel_is_honoured_before_the_backward_pass_of_a_step(tiny_bundle):
    image, concepts = _scene()
    callback, updates = _CancelInsideTheStep(), []
    with pytest.raises(_CancelInsideTheStep.Cancelled):
        learn_object_tokens(tiny_bundle, image, concepts, steps=5, callback=callback,
                            monitor=lambda step, values: updates.append(step))
    assert updates == [] and callback.calls == 0  # no optimiser step ran and the step never finished


def test_nan_stops_with_a_clear_message_and_keeps_the_last_good_vectors(tiny_bundle, monkeypatch):
    image, concepts = _scene()
    calls = {"n": 0}
    real = learn_module.losses.masked_diffusion_loss

    def flaky(prediction, target, mask):
        calls["n"] += 1
        value = real(prediction, target, mask)
        return value * float("nan") if calls["n"] == 3 else value

    monkeypatch.setattr(learn_module.losses, "masked_diffusion_loss", flaky)
    with pytest.raises(TrainingDiverged, match="step 3") as caught:
        learn_object_tokens(tiny_bundle, image, concepts, steps=10, seed=2)
    kept = caught.value.concepts
    monkeypatch.setattr(learn_module.losses, "masked_diffusion_loss", real)
    reference = learn_object_tokens(tiny_bundle, image, concepts, steps=2, seed=2)
    for a, b in zip(kept.concepts, reference.concepts):
        assert torch.equal(a.vectors["object"], b.vectors["object"])


def test_a_word_of_several_tokens_starts_from_the_mean_of_its_pieces_and_learns(tiny_bundle):
    from ice_ops.text import word_pieces

    image, concepts = _scene()
    concepts.concepts[0].word = "saxophonist"
    pieces = word_pieces(tiny_bundle.tokenizer, "saxophonist")
    assert len(pieces) > 1
    mean = tiny_bundle.text_encoder.get_input_embeddings().weight[pieces].mean(0)
    unmoved = learn_object_tokens(tiny_bundle, image, concepts, steps=1, lr=1e-12).concepts[0]
    learned = learn_object_tokens(tiny_bundle, image, concepts, steps=4, lr=5e-3).concepts[0]
    for role in ("object", "instance"):
        assert torch.allclose(unmoved.vectors[role], mean, atol=1e-6)
        assert float((learned.vectors[role] - mean).norm()) > MIN_MOVE * float(mean.norm())


@pytest.mark.parametrize("steps", [0, -3])
def test_steps_must_be_positive(tiny_bundle, steps):
    image, concepts = _scene()
    with pytest.raises(ValueError, match="positive"):
        learn_object_tokens(tiny_bundle, image, concepts, steps=steps)


def test_bad_concept_sets_are_refused(tiny_bundle):
    image, concepts = _scene()
    with pytest.raises(ValueError, match="empty"):
        learn_object_tokens(tiny_bundle, image, ConceptSet([], (SIZE, SIZE)), steps=1)
    concepts.concepts[1].mask = torch.zeros(SIZE, SIZE)
    with pytest.raises(ValueError, match="empty"):
        learn_object_tokens(tiny_bundle, image, concepts, steps=1)
    _, concepts = _scene()
    with pytest.raises(ValueError, match="image is"):
        learn_object_tokens(tiny_bundle, torch.rand(3, 96, 96), concepts, steps=1)


def test_intrinsic_learning_needs_phase_one_and_distinct_anchors(learned_objects, tiny_bundle):
    image, concepts, objects, _ = learned_objects
    with pytest.raises(ValueError, match="LearnObjectTokens"):
        learn_intrinsic_tokens(tiny_bundle, image, concepts, steps=1)
    with pytest.raises(ValueError, match="also the word"):
        learn_intrinsic_tokens(tiny_bundle, image, objects, anchors=("ball", "colour"), steps=1)
    with pytest.raises(ValueError, match="repeat"):
        normalise_anchors("colour, colour")
    with pytest.raises(ValueError, match="at least one"):
        normalise_anchors(" , ")


def test_a_thin_object_keeps_its_weight_in_the_latent_and_attention_masks(tiny_bundle):
    image, concepts = _scene()
    line = torch.zeros(SIZE, SIZE)
    line[:, THIN_COLUMN] = 1  # one pixel wide: nearest sampling to a coarser grid can miss it entirely
    concepts.concepts[0].mask = line
    concepts.concepts[1].mask = 1 - line
    scene = learn_module._prepare_scene(tiny_bundle, image, concepts)
    for masks in (scene.latent_masks[:, :, 0], scene.attention_masks):  # [flip, concept, h, w]
        width = masks.shape[-1]
        column = THIN_COLUMN * width // SIZE
        share = width / SIZE  # the line's area share of the cell it lies in
        assert torch.allclose(masks[0, 0, :, column], torch.full((masks.shape[-2],), share))
        assert float(masks[0, 0].mean()) == pytest.approx(1 / SIZE)  # no weight lost or invented
        assert torch.allclose(masks[0, 0] + masks[0, 1], torch.ones_like(masks[0, 0]))
        assert torch.equal(masks[1], masks[0].flip(-1))  # the flipped image gets the mirrored mask


def test_the_transport_grid_keeps_16_cells_and_pools_larger_grids():
    from ice_ops.learn import transport_grid

    assert transport_grid((16, 16)) == (16, 16)  # SD at 512²: the reference's grid
    assert transport_grid((8, 12)) == (8, 12)
    assert transport_grid((24, 24)) == (12, 12)  # SD 2.x-v at 768²
    assert transport_grid((64, 48)) == (16, 12)


def test_textual_inversion_baseline_learns_one_token_per_concept_and_nothing_else(tiny_bundle):
    from ice_ops.composition import compose
    from ice_ops.learn import learn_textual_inversion
    from ice_ops.tokens import PlaceholderText

    image, concepts = _scene()
    before = _snapshot(tiny_bundle)
    log = []
    result = learn_textual_inversion(tiny_bundle, image, concepts, steps=8, lr=5e-2, seed=1,
                                     monitor=lambda step, values: log.append(values))
    _assert_same(before, _snapshot(tiny_bundle))
    text = PlaceholderText(tiny_bundle.tokenizer, tiny_bundle.text_encoder)
    for concept in result.concepts:
        assert set(concept.vectors) == {"object"}
        assert not torch.allclose(concept.vectors["object"], text.word_init(concept.word).float())  # it moved
    assert len(log) == 8 and all(values["regulariser"] == 0.0 for values in log)
    compose(tiny_bundle, result, "a photo of [ball]")  # [name] stands for the one token
    with pytest.raises(ValueError, match="colour"):
        compose(tiny_bundle, result, "a photo of [ball.colour]")


def test_running_out_of_memory_names_the_working_resolution_and_the_step(fresh_tiny_bundle, monkeypatch):
    image, concepts = _scene()
    real = fresh_tiny_bundle.unet.forward
    calls = {"n": 0}

    def short_of_memory(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(fresh_tiny_bundle.unet, "forward", short_of_memory)
    with pytest.raises(ValueError, match=r"step 2 of 5.*working_resolution") as caught:
        learn_object_tokens(fresh_tiny_bundle, image, concepts, steps=5)
    assert not isinstance(caught.value, torch.OutOfMemoryError)


def test_a_half_precision_frozen_model_still_learns_and_what_is_learned_stays_fp32(toyworld_model):
    """On a GPU the frozen UNet, VAE and text encoder are kept in half precision; the token vectors, the LoRA and
    the optimiser work in fp32. bf16 weights on the CPU exercise the same path."""
    import copy

    bundle, _ = toyworld_model
    half = copy.deepcopy(bundle).to(dtype=torch.bfloat16)
    assert {p.dtype for part in ("unet", "vae", "text_encoder") for p in half.part(part).parameters()} == {torch.bfloat16}
    image, concepts, circle, square = _toyworld_case()
    word = PlaceholderText(bundle.tokenizer, bundle.text_encoder).word_init("square")
    learned = learn_object_tokens(half, image, concepts, steps=TOY_STEPS, lr=TOY_LR, seed=0)
    refined = learn_intrinsic_tokens(half, image, learned, anchors=["colour"], steps=1, refine_steps=1)
    assert all(v.dtype == torch.float32 for c in refined.concepts for v in c.vectors.values())
    assert refined.lora and all(t.dtype == torch.float32 for t in refined.lora.values())
    assert all(not p.requires_grad for part in ("unet", "vae", "text_encoder") for p in half.part(part).parameters())
    # read in full precision, the tokens learned through the bf16 model denoise the mask better than their word
    word_error, _ = _read_tokens(bundle, image, {"instance": word, "object": word}, [circle, square])
    error, _ = _read_tokens(bundle, image, learned.get("thing").vectors, [circle, square])
    assert error < (1 - MIN_ERROR_FALL) * word_error


def test_learning_autocasts_to_the_frozen_unets_half_dtype_and_scales_losses_only_for_fp16(tiny_bundle):
    """A half-precision UNet is run in its own dtype (no weight is cast at each step); fp16, whose range is
    small, gets loss scaling so that gradients reaching the fp32 token vectors do not round to zero."""
    import copy

    from ice_ops.learn import gradient_scaler, training_autocast

    full = training_autocast(tiny_bundle)
    assert not full._enabled and not gradient_scaler(full).is_enabled()
    for dtype, scaled in ((torch.bfloat16, False), (torch.float16, True)):
        half = copy.deepcopy(tiny_bundle).to(dtype=dtype)
        autocast = training_autocast(half)
        assert autocast._enabled and autocast.fast_dtype == dtype
        assert gradient_scaler(autocast).is_enabled() == scaled


@pytest.mark.parametrize("arguments, words", [
    (dict(steps=0), "steps must be a positive whole number"),
    (dict(steps=2.5), "steps must be a positive whole number"),
    (dict(steps=1, refine_steps=-1), "refine_steps must be 0"),
    (dict(steps=1, refine_steps=1.5), "refine_steps must be 0"),
    (dict(steps=1, lr=0.0), "learning rate must be a positive number"),
    (dict(steps=1, lr=-1e-3), "learning rate must be a positive number"),
    (dict(steps=1, lr=float("inf")), "learning rate must be a positive number"),
    (dict(steps=1, lr=float("nan")), "learning rate must be a positive number"),
])
def test_bad_steps_and_learning_rates_are_refused_before_any_work(arguments, words):
    from ice_ops.learn import check_intrinsic_arguments

    _, concepts = _scene()
    with pytest.raises(ValueError, match=words):
        check_intrinsic_arguments(concepts, "colour", **arguments)


def test_one_step_and_a_small_learning_rate_are_accepted_and_anchors_come_back_normalised():
    from ice_ops.learn import check_intrinsic_arguments

    _, concepts = _scene()
    anchors = check_intrinsic_arguments(concepts, " Colour,material ", steps=1, refine_steps=1, lr=1e-3)
    assert anchors == ("colour", "material")


def test_the_attention_grid_is_set_by_the_coarsest_level_with_cross_attention():
    from types import SimpleNamespace

    from ice_ops.learn import attention_downsample_factor

    def unet(*kinds):
        return SimpleNamespace(config=SimpleNamespace(down_block_types=kinds))

    cross, plain = "CrossAttnDownBlock2D", "DownBlock2D"
    assert attention_downsample_factor(unet(cross, cross, cross, plain)) == 4  # SD 1.5 and 2.x: 16x16 at 512²
    assert attention_downsample_factor(unet(plain, cross, cross)) == 4  # SDXL's layout
    assert attention_downsample_factor(unet(cross, cross, cross, cross)) == 8
    assert attention_downsample_factor(unet(cross, plain)) == 1
    with pytest.raises(ValueError, match="no cross-attention"):
        attention_downsample_factor(unet(plain, plain))


def test_the_out_of_memory_message_names_the_device_the_step_and_where_to_lower_the_resolution():
    from ice_ops.learn import out_of_memory_error

    message = str(out_of_memory_error(6, 400, torch.device("cuda", 0)))
    assert "cuda memory at step 7 of 400" in message
    assert "working_resolution on Load ICE Model" in message  # the node and setting a user changes
    assert "Unload Models" in message  # ComfyUI's button of that name
