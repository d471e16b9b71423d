"""Benchmark Stage One (localize): seconds per iteration, total seconds, peak memory; one JSON line.

Default: tiny random models on CPU. ``--full``: SD 1.5-sized random weights and a ViT-L-14-sized retriever at
512x512 (run it on a GPU).
"""
from __future__ import annotations

import argparse
import time

import torch

from _common import TINY_CLIP_CONFIG, Timer, emit, parameter_count, peak_memory_bytes, pick_device, reset_peak, sync, synthetic_scene


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--full", action="store_true", help="SD 1.5 architecture at 512x512 (GPU recommended)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available)")
    parser.add_argument("--iterations", type=int, default=3, help="localization iterations to time (default 3)")
    parser.add_argument("--size", type=int, default=None, help="image side (default 512 full, 64 tiny)")
    args = parser.parse_args()

    from ice_ops.localization import localize
    from devtools.random_models import build_random_bundle
    from ice_ops.retrieve import ClipRetriever

    device = pick_device(args.device)
    dtype = torch.float16 if (args.full and device.type == "cuda") else torch.float32
    bundle = build_random_bundle("sd15" if args.full else "tiny", device=device, dtype=dtype)
    retriever = ClipRetriever.from_pretrained("ViT-L-14" if args.full else TINY_CLIP_CONFIG, None, device=device)
    size = args.size or (512 if args.full else 64)
    image, _ = synthetic_scene(size)

    stamps = []

    def callback(step, total, preview):
        sync(device)
        stamps.append(time.perf_counter())

    retriever.rank(image, top_k=1)  # vocabulary embeddings are computed once and cached; not part of the loop
    reset_peak(device)
    with Timer(device) as timer:
        start = time.perf_counter()
        localize(bundle, retriever, image, stop_fraction=0.0, max_concepts=args.iterations, callback=callback)
    durations = [b - a for a, b in zip([start] + stamps[:-1], stamps)]
    emit({
        "bench": "stage_one",
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "model": "sd15" if args.full else "tiny",
        "unet_params": parameter_count(bundle.unet),
        "dtype": str(dtype).replace("torch.", ""),
        "image_size": size,
        "iterations": len(durations),
        "seconds_per_iteration": round(sum(durations) / max(1, len(durations)), 4),
        "total_seconds": round(timer.seconds, 4),
        "peak_memory_bytes": peak_memory_bytes(device),
    })


if __name__ == "__main__":
    main()
