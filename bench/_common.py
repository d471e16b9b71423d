"""Shared helpers for the benchmarks: models, a synthetic scene, timing and peak memory."""
from __future__ import annotations

import json
import os
import resource
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

TINY_CLIP_CONFIG = os.path.join(ROOT, "devtools", "configs", "tiny_open_clip.json")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def synthetic_scene(size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A [3, size, size] image with three flat-coloured objects on a textured background, and its label map."""
    generator = torch.Generator().manual_seed(seed)
    image = 0.35 + 0.1 * torch.rand(3, size, size, generator=generator)
    labels = torch.zeros(size, size, dtype=torch.long)
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disc = (ys - size * 0.3) ** 2 + (xs - size * 0.3) ** 2 < (size * 0.18) ** 2
    square = (ys > size * 0.55) & (ys < size * 0.9) & (xs > size * 0.5) & (xs < size * 0.85)
    stripe = (ys > size * 0.1) & (ys < size * 0.4) & (xs > size * 0.62) & (xs < size * 0.9)
    for label, (region, colour) in enumerate(((disc, (0.9, 0.2, 0.1)), (square, (0.1, 0.3, 0.9)),
                                              (stripe, (0.2, 0.8, 0.2))), start=1):
        image[:, region] = torch.tensor(colour)[:, None]
        labels[region] = label
    return image, labels


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    def __init__(self, device):
        self.device = device

    def __enter__(self):
        sync(self.device)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.seconds = time.perf_counter() - self.start


def parameter_count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def emit(record: dict) -> None:
    sys.stdout.write(json.dumps(record, sort_keys=True) + "\n")
