"""The refinement LoRA: kohya key layout for ComfyUI's LoraLoader, hooks that leave the UNet untouched."""
import re

import pytest
import torch

from ice_ops.lora import apply_lora, attention_projection_names, init_lora

KOHYA = re.compile(r"^lora_unet_(down|up)_blocks_\d+_attentions_\d+_transformer_blocks_\d+_attn[12]_"
                   r"(to_q|to_k|to_v|to_out_0)\.(lora_down\.weight|lora_up\.weight|alpha)$|"
                   r"^lora_unet_mid_block_attentions_0_transformer_blocks_\d+_attn[12]_"
                   r"(to_q|to_k|to_v|to_out_0)\.(lora_down\.weight|lora_up\.weight|alpha)$")


def _unet_call(bundle):
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 4, 16, 16, generator=generator)
    context = torch.randn(1, 77, bundle.text_width, generator=generator)
    return lambda: bundle.unet(latent, torch.tensor([10]), encoder_hidden_states=context).sample


def test_keys_follow_the_kohya_layout_with_documented_shapes(tiny_bundle):
    tensors = init_lora(tiny_bundle.unet, rank=3)
    names = attention_projection_names(tiny_bundle.unet)
    assert len(tensors) == 3 * len(names) and names
    modules = dict(tiny_bundle.unet.named_modules())
    for key in tensors:
        assert KOHYA.match(key), key
    first = names[0]
    key = "lora_unet_" + first.replace(".", "_")
    assert tensors[key + ".lora_down.weight"].shape == (3, modules[first].in_features)
    assert tensors[key + ".lora_up.weight"].shape == (modules[first].out_features, 3)
    assert float(tensors[key + ".alpha"]) == 3.0


def test_fresh_lora_is_a_no_op_and_a_trained_one_acts_only_inside_the_block(tiny_bundle):
    run = _unet_call(tiny_bundle)
    with torch.no_grad():
        plain = run()
        tensors = init_lora(tiny_bundle.unet)
        with apply_lora(tiny_bundle.unet, tensors):
            assert torch.allclose(run(), plain, atol=1e-6)
        for key in tensors:
            if key.endswith("lora_up.weight"):
                tensors[key] = torch.full_like(tensors[key], 0.05)
        with apply_lora(tiny_bundle.unet, tensors):
            changed = run()
        assert not torch.allclose(changed, plain, atol=1e-4)
        assert torch.equal(run(), plain)


def test_lora_from_another_model_is_refused(tiny_bundle):
    with pytest.raises(ValueError, match="another model"):
        with apply_lora(tiny_bundle.unet, {"lora_unet_nowhere.lora_down.weight": torch.zeros(1, 1),
                                           "lora_unet_nowhere.lora_up.weight": torch.zeros(1, 1)}):
            pass


def test_refinement_trains_a_lora_and_leaves_the_unet_alone(fresh_tiny_bundle):
    from ice_ops.concepts import Concept, ConceptSet
    from ice_ops.learn import learn_intrinsic_tokens, learn_object_tokens

    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(64, 64)
    mask[10:40, 10:40] = 1
    concepts = ConceptSet([Concept("ball", "ball", 1.0, mask)], (64, 64))
    before = {k: v.clone() for k, v in fresh_tiny_bundle.unet.state_dict().items()}
    learned = learn_object_tokens(fresh_tiny_bundle, image, concepts, steps=2)
    progress = []
    refined = learn_intrinsic_tokens(fresh_tiny_bundle, image, learned, steps=2, refine_steps=3,
                                     callback=lambda step, total, _: progress.append((step, total)))
    assert progress == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]
    assert refined.lora is not None
    ups = [v for k, v in refined.lora.items() if k.endswith("lora_up.weight")]
    assert any(float(v.abs().max()) > 0 for v in ups)
    for key, value in fresh_tiny_bundle.unet.state_dict().items():
        assert torch.equal(value, before[key]), key
    with pytest.raises(ValueError, match="refine_steps"):
        learn_intrinsic_tokens(fresh_tiny_bundle, image, learned, steps=1, refine_steps=-1)
