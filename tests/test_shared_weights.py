"""A bundle that borrows another framework's weights (as ICE borrows ComfyUI's): it computes what a bundle
with its own copy computes, in the lender's memory, follows the lender's current tensors, lets Stage Two
train through inference tensors, and holds nothing between runs."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from ice_ops.bundle import WEIGHT_PARTS, DiffusionBundle
from ice_ops.concepts import Concept, ConceptSet
from ice_ops.learn import learn_object_tokens
from ice_ops.shared_weights import (
    TensorView,
    bind_weights,
    borrowed,
    plan_views,
    release_weights,
    shared_bytes,
)

FP32 = dict.fromkeys(WEIGHT_PARTS, torch.float32)
CPU = torch.device("cpu")
IMAGE_SIDE = 64
PROBE_TIMESTEP = 500
CLIP_VOCABULARY = 49408  # CLIP's tokenizer (ice_ops/data); the test models read every id it gives


@pytest.fixture(scope="module")
def lender(tmp_path_factory):
    """(an LDM state dict loaded in inference mode, as ComfyUI loads checkpoints; the configs of its parts):
    a small SD 1.x-pattern model whose text encoder reads CLIP's whole vocabulary, so it encodes prompts."""
    from test_bundle import SD1_LIKE_TEXT, SD1_LIKE_UNET, SD1_LIKE_VAE, build_bundle

    from devtools.ldm_layout import save_single_file
    from ice_ops.text import END_OF_TEXT

    text = {**SD1_LIKE_TEXT, "vocab_size": CLIP_VOCABULARY}
    bundle = build_bundle(SD1_LIKE_UNET, SD1_LIKE_VAE, text, "epsilon", END_OF_TEXT, seed=3)
    path = save_single_file(bundle, str(tmp_path_factory.mktemp("lender") / "sd1_like.safetensors"))
    with torch.inference_mode():
        state = load_file(path)
    return state, {"unet": SD1_LIKE_UNET, "vae": SD1_LIKE_VAE, "text_encoder": text}


def _probe(bundle) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(3, IMAGE_SIDE, IMAGE_SIDE, generator=generator)
    with torch.no_grad():
        latent = bundle.encode_image(image, (IMAGE_SIDE, IMAGE_SIDE))
        context = bundle.encode_prompt(["a photo of a cat"])
        return bundle.unet(latent, torch.tensor([PROBE_TIMESTEP]), encoder_hidden_states=context).sample


def _parameter_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in module.parameters())


def test_a_borrowing_bundle_computes_in_the_lenders_memory_and_holds_nothing_between_runs(lender):
    state, configs = lender
    copying = DiffusionBundle.from_ldm_state_dict(state, configs=configs)
    bundle, plans = DiffusionBundle.borrowing(state, state, configs=configs)
    assert all(p.is_meta for part in WEIGHT_PARTS for p in bundle.part(part).parameters())
    # every parameter is a view of the lender's tensors; only position ids, which checkpoints need not hold, are ICE's
    assert all(set(plan.owned) <= {"text_model.embeddings.position_ids", "embeddings.position_ids"}
               for plan in plans.values())

    copied = bundle.bind(plans, state, WEIGHT_PARTS, device=CPU, dtypes=FP32)
    for part in WEIGHT_PARTS:
        assert shared_bytes(bundle.part(part), state) == _parameter_bytes(bundle.part(part))
    assert copied == sum(plan.owned_bytes() for plan in plans.values())
    # the same numbers up to float rounding (a view of a 1x1 kernel multiplies in another order than a copy)
    torch.testing.assert_close(_probe(bundle), _probe(copying), rtol=1e-4, atol=1e-5)

    bundle.release()
    assert all(t.is_meta for part in WEIGHT_PARTS for t in bundle.part(part).state_dict().values())


def test_binding_reads_the_lenders_current_tensors_after_it_replaced_them(lender):
    """ComfyUI replaces its tensors when it moves, casts or patches a model; each run binds the current ones."""
    state, configs = lender
    bundle, plans = DiffusionBundle.borrowing(state, state, configs=configs)
    with torch.inference_mode():
        patched = {key: value + 1 if value.is_floating_point() else value for key, value in state.items()}
    bundle.bind(plans, patched, ("unet",), device=CPU, dtypes=FP32)
    assert torch.equal(bundle.unet.conv_in.weight, patched["model.diffusion_model.input_blocks.0.0.weight"])
    assert bundle.unet.conv_in.weight.data_ptr() == patched["model.diffusion_model.input_blocks.0.0.weight"].data_ptr()
    assert all(p.is_meta for p in bundle.vae.parameters()), "parts not asked for stay without weights"
    bundle.release()


def test_stage_two_trains_through_borrowed_inference_tensors_and_leaves_them_unchanged(lender):
    state, configs = lender
    before = {key: value.clone() for key, value in state.items()}
    bundle, plans = DiffusionBundle.borrowing(state, state, configs=configs)
    mask = torch.zeros(IMAGE_SIDE, IMAGE_SIDE)
    mask[16:48, 16:48] = 1
    concepts = ConceptSet([Concept("thing", "cat", 1.0, mask)], (IMAGE_SIDE, IMAGE_SIDE))
    image = torch.rand(3, IMAGE_SIDE, IMAGE_SIDE, generator=torch.Generator().manual_seed(1))
    bundle.bind(plans, state, WEIGHT_PARTS, device=CPU, dtypes=FP32)
    learned = learn_object_tokens(bundle, image, concepts, steps=2, lr=1e-2)
    bundle.release()
    vectors = learned.get("thing").vectors
    assert vectors["object"].dtype == torch.float32 and not torch.equal(vectors["object"], vectors["instance"])
    assert all(torch.equal(before[key], state[key]) for key in state)


def test_a_weight_in_another_dtype_is_copied_for_the_run_and_the_copy_is_counted(lender):
    state, configs = lender
    bundle, plans = DiffusionBundle.borrowing(state, state, configs=configs)
    copied = bundle.bind(plans, state, ("vae",), device=CPU, dtypes={"vae": torch.bfloat16})
    assert {p.dtype for p in bundle.vae.parameters()} == {torch.bfloat16}
    assert copied == _parameter_bytes(bundle.vae) + plans["vae"].owned_bytes()
    assert shared_bytes(bundle.vae, state) == 0
    bundle.release()


def test_a_tensor_that_lies_in_no_source_is_kept_by_the_module():
    with torch.inference_mode():
        source = torch.arange(12.0).reshape(3, 4)
    module = torch.nn.Linear(4, 2)
    module.weight = torch.nn.Parameter(source[1:].detach().clone())  # a copy: another memory
    with torch.inference_mode(False):
        module.bias = torch.nn.Parameter(borrowed(source, TensorView("w", 4, (2,), (1,))))
    plan = plan_views(module, {"w": source})
    assert set(plan.views) == {"bias"} and set(plan.owned) == {"weight"}
    release_weights(module)
    bind_weights(module, plan, {"w": source}, device=CPU, dtype=torch.float32)
    assert module.bias.tolist() == [4.0, 5.0] and module.weight.tolist() == source[1:].tolist()
    assert not module.weight.requires_grad and not module.bias.is_inference()


def test_a_source_that_changed_its_layout_is_refused_with_a_way_out(lender):
    state, configs = lender
    bundle, plans = DiffusionBundle.borrowing(state, state, configs=configs)
    shrunk = dict(state)
    shrunk["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="Load ICE Model again"):
        bundle.bind(plans, shrunk, ("unet",), device=CPU, dtypes=FP32)
    missing = {key: value for key, value in state.items() if not key.startswith("model.diffusion_model.")}
    with pytest.raises(ValueError, match="load the model again"):
        bundle.bind(plans, missing, ("unet",), device=CPU, dtypes=FP32)


def test_a_part_is_named_by_what_it_is(lender):
    state, configs = lender
    bundle, _ = DiffusionBundle.borrowing(state, state, configs=configs)
    with pytest.raises(ValueError, match="unet, vae, text_encoder"):
        bundle.part("clip")
