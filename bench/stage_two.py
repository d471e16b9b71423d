"""Benchmark Stage Two (learn_object_tokens): steps/s and peak memory, against a bare UNet forward+backward
step at the same precision (the ratio is the figure we track; goal <= 1.3). One JSON line.

Default: tiny random models on CPU. ``--full``: SD 1.5- or SD 2.1-base-sized random weights at 512x512 (GPU).
"""
from __future__ import annotations

import argparse

import torch

from _common import Timer, emit, parameter_count, peak_memory_bytes, pick_device, reset_peak, synthetic_scene


def bare_unet_step(bundle, latent, context, autocast) -> None:
    """One UNet forward and a backward pass into the text features (what token learning must pay at least)."""
    context = context.detach().to(bundle.unet_dtype).requires_grad_(True)
    timestep = torch.tensor([500], device=bundle.device)
    with autocast:
        prediction = bundle.unet(latent.to(bundle.unet_dtype), timestep, encoder_hidden_states=context).sample
    prediction.float().square().mean().backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--full", action="store_true", help="full-size architecture at 512x512 (GPU recommended)")
    parser.add_argument("--model", default="sd15", choices=("sd15", "sd21"), help="architecture with --full")
    parser.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available)")
    parser.add_argument("--steps", type=int, default=None, help="training steps to time (default 20 tiny, 50 full)")
    args = parser.parse_args()

    from ice_ops.concepts import Concept, ConceptSet
    from ice_ops.bundle import frozen_dtypes
    from ice_ops.learn import learn_object_tokens, training_autocast
    from devtools.random_models import build_random_bundle

    device = pick_device(args.device)
    kind = args.model if args.full else "tiny"
    bundle = build_random_bundle(kind, device=device, dtype=frozen_dtypes(device))  # what users run
    size = bundle.native_resolution
    steps = args.steps or (50 if args.full else 20)
    image, labels = synthetic_scene(size)
    concepts = ConceptSet(
        [Concept(f"c{k}", word, 1.0, (labels == k).float()) for k, word in ((1, "ball"), (2, "box"))], (size, size)
    )

    # Bare UNet step at the same precision (half-precision weights and autocast on GPU, fp32 on CPU).
    latent = bundle.encode_image(image, (size, size))
    context = bundle.encode_prompt(["a photo of a ball"])
    autocast = training_autocast(bundle)
    bare_unet_step(bundle, latent, context, autocast)  # warm-up
    reset_peak(device)
    with Timer(device) as bare:
        for _ in range(steps):
            bare_unet_step(bundle, latent, context, autocast)
    bare_peak = peak_memory_bytes(device)

    learn_object_tokens(bundle, image, concepts, steps=2)  # warm-up (kernels, allocator)
    reset_peak(device)
    with Timer(device) as learn:
        learn_object_tokens(bundle, image, concepts, steps=steps)
    learn_peak = peak_memory_bytes(device)

    emit({
        "bench": "stage_two",
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "model": kind,
        "unet_params": parameter_count(bundle.unet),
        "precision": str(bundle.unet_dtype).removeprefix("torch."),
        "image_size": size,
        "steps": steps,
        "steps_per_second": round(steps / learn.seconds, 3),
        "bare_unet_steps_per_second": round(steps / bare.seconds, 3),
        "time_ratio_vs_bare_unet": round(learn.seconds / bare.seconds, 3),
        "projected_seconds_800_steps": round(800 * learn.seconds / steps, 1),
        "peak_memory_bytes": learn_peak,
        "bare_unet_peak_memory_bytes": bare_peak,
    })


if __name__ == "__main__":
    main()
