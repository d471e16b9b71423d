"""Compare the engine bundle built by Load ICE Model with ComfyUI's own models (ComfyUI test tier).

    python tests/comfyui/check_equivalence.py --comfyui /path/to/ComfyUI --checkpoint ckpt.safetensors

Loads the checkpoint with ComfyUI (CheckpointLoaderSimple's code path, inside inference mode as nodes run),
builds the bundle through the pack's adapter and prints, as JSON, the largest differences between:
- CLIPTextEncode's conditioning and the bundle's text encoder (SD1: last layer; SD2: ComfyUI's penultimate
  layer of its 24-layer OpenCLIP-H with the final layer norm);
- ComposeConcepts with a learned vector equal to a word's own embedding and CLIPTextEncode of that word;
- the UNet's noise prediction and the VAE's latent;
whether ComfyUI's MODEL weights were left untouched, how much of each engine part lies in ComfyUI's own
weight memory while a node runs, and whether the engine holds no weights once the node is done.
"""
from __future__ import annotations

import json
import sys

# this script's folder is first on sys.path
from check_extension import checkpoint_check_arguments, pack_modules_in_comfyui

PROMPT_TEMPLATE = "a photo of a {} on a table"
WORD = "cat"  # one CLIP token
PROBE_TIMESTEP = 500
LATENT_SIDE = 8
IMAGE_SIDE = 64


def main() -> None:
    parser = checkpoint_check_arguments(__doc__)
    args = parser.parse_args()
    pack_module = pack_modules_in_comfyui(args.comfyui)
    import comfy.sd
    import torch

    adapters, memory, shared, concepts_module, compose_module = map(pack_module, (
        "nodes._adapters", "nodes._memory", "ice_ops.shared_weights", "ice_ops.concepts", "ice_ops.composition"))
    report: dict = {}
    with torch.inference_mode():
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(args.checkpoint, output_vae=True, output_clip=True)[:3]
        before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
        ice = memory.bundle_from_comfy(model, clip, vae)
        bundle = ice.bundle
        report["family"], report["model_class"] = ice.family, ice.model_class

        text = PROMPT_TEMPLATE.format(WORD)
        conditioning = clip.encode_from_tokens_scheduled(clip.tokenize(text))
        reference = conditioning[0][0]
        with memory.engine_session(ice):
            ours = bundle.encode_prompt([text]).float()
            sources = ice.parts.sources()
            report["shared_fraction"] = {
                part: shared.shared_bytes(bundle.part(part), sources) / _bytes(bundle.part(part))
                for part in memory.ALL_PARTS
            }
        report["released_after_session"] = all(p.is_meta for p in bundle.unet.parameters())
        report["text_max_abs_diff"] = float((reference - ours).abs().max())
        report["text_scale"] = float(reference.abs().max())

        with memory.engine_session(ice, parts=memory.TEXT_ONLY):
            word_id = bundle.tokenizer(WORD, add_special_tokens=False).input_ids
            vector = bundle.text_encoder.get_input_embeddings().weight[word_id[0]].detach().clone()
            concept = concepts_module.Concept("thing", WORD, 1.0, torch.ones(IMAGE_SIDE, IMAGE_SIDE), {"object": vector})
            concepts = concepts_module.ConceptSet([concept], (IMAGE_SIDE, IMAGE_SIDE))
            composed = compose_module.compose(bundle, concepts, PROMPT_TEMPLATE.format("[thing.object]"))
        composed_conditioning = adapters.conditioning_from_composed(composed)
        report["compose_max_abs_diff"] = float((composed_conditioning[0][0] - reference).abs().max())
        report["compose_layout_matches"] = (
            composed_conditioning[0][0].shape == reference.shape
            and composed_conditioning[0][1]["pooled_output"].shape == conditioning[0][1]["pooled_output"].shape
        )

        generator = torch.Generator().manual_seed(0)
        latent = torch.randn(1, 4, LATENT_SIDE, LATENT_SIDE, generator=generator)
        sigma = model.model.model_sampling.sigma(torch.tensor([PROBE_TIMESTEP]))
        noisy = latent * (sigma ** 2 + 1) ** 0.5  # ComfyUI's sigma-space input for an epsilon model
        denoised = model.model.apply_model(noisy, sigma, c_crossattn=reference)
        comfy_eps = (noisy - denoised) / sigma
        with memory.engine_session(ice), torch.no_grad():
            our_eps = bundle.unet(latent, torch.tensor([PROBE_TIMESTEP]), encoder_hidden_states=ours).sample
        report["unet_max_abs_diff"] = float((comfy_eps - our_eps).abs().max())

        image = torch.rand(1, IMAGE_SIDE, IMAGE_SIDE, 3, generator=generator)
        comfy_latent = vae.encode(image) * bundle.latent_scaling
        with memory.engine_session(ice), torch.no_grad():
            our_latent = bundle.encode_image(image[0].permute(2, 0, 1), (IMAGE_SIDE, IMAGE_SIDE)).float()
        report["vae_max_abs_diff"] = float((comfy_latent - our_latent).abs().max())

        after = model.model.diffusion_model.state_dict()
        report["comfy_model_unchanged"] = all(torch.equal(before[k], after[k]) for k in before)
    sys.stdout.write(json.dumps(report) + "\n")


def _bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in module.parameters())


if __name__ == "__main__":
    main()
