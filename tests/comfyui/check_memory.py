"""Which models ComfyUI holds while ICE's nodes run, in one ComfyUI process (ComfyUI test tier).

    python tests/comfyui/check_memory.py --comfyui /path/to/ComfyUI --checkpoint ckpt.safetensors [--diffusers DIR]

Loads the checkpoint as CheckpointLoaderSimple does, then runs the pack's nodes as ComfyUI runs them (inside
inference mode): Load ICE Model, Learn Object Tokens (a few steps), Compose Concepts after ComfyUI unloaded
every model, and a stock KSampler pass after it. Prints one JSON object:
- ``loaded_after_learn``: the classes of the models in ComfyUI's loaded list after Learn;
- ``ice_parts_loaded_after_learn``: whether the MODEL, CLIP and VAE patchers ICE computed with are in it;
- ``shared_during_learn``: per part, the share of the engine's weight bytes that lay in ComfyUI's memory
  during a training step; ``released_after_learn``: the engine holds no weights once the node is done;
- ``loaded_after_compose``: the classes loaded by Compose Concepts alone;
- ``ksampler_after_learn``: the shape of the latent a stock KSampler made afterwards;
- ``ice_sees_model_patches``: a patch added to the MODEL (as LoraLoader adds one) is in ICE's weights;
  ``plain_model_restored``: the unpatched MODEL has its own weights again when ComfyUI loads it next;
- with ``--diffusers``: ``owned_loaded_after_text_session``, the classes loaded when a diffusers-folder model's
  text encoder is asked for.
"""
from __future__ import annotations

import json
import sys

# this script's folder is first on sys.path
from check_extension import checkpoint_check_arguments, pack_modules_in_comfyui

IMAGE_SIDE = 64
WORKING_RESOLUTION = 64
LEARN_STEPS = 2
LEARNING_RATE = 1e-2
SAMPLE_STEPS = 1
GUIDANCE = 7.0
PATCHED_KEY = "diffusion_model.input_blocks.0.0.weight"  # the UNet's first convolution (diffusers' conv_in)


def main() -> None:
    parser = checkpoint_check_arguments(__doc__)
    parser.add_argument("--diffusers", help="a diffusers model folder to check as an ICE-owned model")
    args = parser.parse_args()
    pack_module = pack_modules_in_comfyui(args.comfyui)
    import comfy.model_management as management
    import comfy.sd
    import nodes as comfy_nodes
    import torch

    model_nodes, learn_nodes, compose_nodes, memory, shared, concepts_module, learn_module = map(pack_module, (
        "nodes.model_nodes", "nodes.learn_nodes", "nodes.compose_nodes", "nodes._memory", "ice_ops.shared_weights",
        "ice_ops.concepts", "ice_ops.learn"))

    def loaded_classes() -> list[str]:
        held = [entry.model.model for entry in management.current_loaded_models]
        return sorted(type(getattr(module, "part", module)).__name__ for module in held)  # ICE's own: ManagedPart

    def is_loaded(patcher) -> bool:
        held = [entry.model for entry in management.current_loaded_models]
        return any(model is patcher or model.is_clone(patcher) for model in held)

    report: dict = {}
    with torch.inference_mode():
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(args.checkpoint, output_vae=True, output_clip=True)[:3]
        ice = model_nodes.LoadICEModel.execute(model, clip, vae, WORKING_RESOLUTION).args[0]
        mask = torch.zeros(IMAGE_SIDE, IMAGE_SIDE)
        mask[IMAGE_SIDE // 4: 3 * IMAGE_SIDE // 4, IMAGE_SIDE // 4: 3 * IMAGE_SIDE // 4] = 1
        concepts = concepts_module.ConceptSet([concepts_module.Concept("thing", "cat", 1.0, mask)],
                                              (IMAGE_SIDE, IMAGE_SIDE))
        image = torch.rand(1, IMAGE_SIDE, IMAGE_SIDE, 3, generator=torch.Generator().manual_seed(0))

        shares: dict = {}
        real_step = learn_module._step

        def measured_step(bundle, *step_args, **step_kwargs):
            sources = ice.parts.sources()
            for part in memory.ALL_PARTS:
                module = bundle.part(part)
                total = sum(p.numel() * p.element_size() for p in module.parameters())
                shares[part] = shared.shared_bytes(module, sources) / total
            return real_step(bundle, *step_args, **step_kwargs)

        learn_module._step = measured_step
        learned = learn_nodes.LearnObjectTokens.execute(ice, image, concepts, LEARN_STEPS, LEARNING_RATE, 0).args[0]
        learn_module._step = real_step
        report["shared_during_learn"] = shares
        report["released_after_learn"] = all(
            t.is_meta for part in memory.ALL_PARTS for t in ice.bundle.part(part).parameters()
        )
        report["loaded_after_learn"] = loaded_classes()
        report["ice_parts_loaded_after_learn"] = all(is_loaded(p) for p in ice.parts.patchers(memory.ALL_PARTS))

        management.unload_all_models()
        (positive,) = compose_nodes.ComposeConcepts.execute(ice, learned, "a photo of a [thing.object]").args
        report["loaded_after_compose"] = loaded_classes()

        (negative,) = comfy_nodes.CLIPTextEncode().encode(clip, "")
        (latent,) = comfy_nodes.EmptyLatentImage().generate(IMAGE_SIDE, IMAGE_SIDE, 1)
        (sampled,) = comfy_nodes.common_ksampler(model, 0, SAMPLE_STEPS, GUIDANCE, "euler", "normal", positive,
                                                 negative, latent)
        report["ksampler_after_learn"] = list(sampled["samples"].shape)

        # A LoRA on the MODEL (as LoraLoader adds it) is in the weights ICE computes with, and leaves the plain MODEL
        original = model.model.state_dict()[PATCHED_KEY].clone()
        patched = model.clone()
        patched.add_patches({PATCHED_KEY: ("diff", (torch.ones_like(original),))}, 1.0)
        ice_patched = model_nodes.LoadICEModel.execute(patched, clip, vae, WORKING_RESOLUTION).args[0]
        with memory.engine_session(ice_patched, parts=("unet",)):
            seen = ice_patched.bundle.unet.conv_in.weight.detach().clone()
        report["ice_sees_model_patches"] = bool(torch.allclose(seen, original + 1))
        management.load_models_gpu([model])
        report["plain_model_restored"] = bool(torch.equal(model.model.state_dict()[PATCHED_KEY], original))

        if args.diffusers:
            owned = memory.bundle_from_diffusers(args.diffusers)
            management.unload_all_models()
            with memory.engine_session(owned, parts=memory.TEXT_ONLY):
                pass
            report["owned_loaded_after_text_session"] = loaded_classes()
    sys.stdout.write(json.dumps(report) + "\n")


if __name__ == "__main__":
    main()
