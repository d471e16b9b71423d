"""Benchmark the batch command on Toy World scenes with the embedded model. One JSON line.

- ``overhead``: what ``run_batch`` costs beyond the work itself: the same images processed by the engine
  calls alone (``process_image`` per image, one model, nothing written) against ``run_batch`` (the same calls
  plus the folders, records, summary and page), interleaved ``--repeats`` times; goal < 5 %.
- ``ranks``: the command under ``torchrun --nproc_per_node 2`` (gloo, one thread per rank) against the same
  command in one process, wall time including each run's model loading; goal <= 0.6 on two free cores.

    python bench/batch.py --scenes 8
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

from _common import ROOT, emit

STEPS = ["--object-steps", "20", "--intrinsic-steps", "20", "--samples", "2", "--composition-samples", "1",
         "--sample-steps", "10"]


def write_scenes(folder: str, count: int) -> list[str]:
    from ice_ops.imaging import tensor_to_pil
    from ice_ops.toyworld.scenes import held_out_seed, make_scene

    os.makedirs(folder, exist_ok=True)
    paths = []
    for index in range(count):
        path = os.path.join(folder, f"scene_{index}.png")
        tensor_to_pil(make_scene(held_out_seed(index)).image).save(path)
        paths.append(path)
    return paths


def settings_of(steps: list[str]):
    from ice_ops.batch import BatchSettings
    from ice_ops.toyworld import localize_settings

    values = dict(zip(steps[::2], steps[1::2]))
    return BatchSettings(
        localize=localize_settings(), object_steps=int(values["--object-steps"]),
        intrinsic_steps=int(values["--intrinsic-steps"]), samples=int(values["--samples"]),
        composition_samples=int(values["--composition-samples"]), sample_steps=int(values["--sample-steps"]),
    ).checked()


def time_engine_only(bundle, retriever, paths, settings) -> float:
    from ice_ops.batch import item_names, process_image
    from ice_ops.imaging import read_image

    start = time.perf_counter()
    for path, item in zip(paths, item_names(paths)):
        process_image(bundle, retriever, read_image(path), settings, item)
    return time.perf_counter() - start


def time_batch(bundle, retriever, paths, settings, out: str) -> float:
    from ice_ops.batch import run_batch

    start = time.perf_counter()
    run_batch(bundle, retriever, paths, out, settings)
    return time.perf_counter() - start


def time_command(source: str, out: str, ranks: int) -> float:
    launcher = [sys.executable]
    env = dict(os.environ)
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // ranks))
    command = launcher + ["-m", "ice_ops", "--quiet", "batch", source, "--model", "toyworld", "--device", "cpu",
                          "--out", out, *STEPS]
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, env=env, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats of each in-process timing")
    parser.add_argument("--skip-ranks", action="store_true", help="only the in-process overhead")
    args = parser.parse_args()

    from ice_ops.toyworld import embedded_bundle, embedded_retriever

    with tempfile.TemporaryDirectory() as scratch:
        paths = write_scenes(os.path.join(scratch, "in"), args.scenes)
        bundle, retriever = embedded_bundle(), embedded_retriever()
        settings = settings_of(STEPS)
        engine, batched = [], []
        for repeat in range(args.repeats):
            engine.append(time_engine_only(bundle, retriever, paths, settings))
            batched.append(time_batch(bundle, retriever, paths, settings, os.path.join(scratch, f"out{repeat}")))
        record = {
            "bench": "batch", "scenes": args.scenes, "steps": " ".join(STEPS), "cpus": os.cpu_count(),
            "engine_only_s": [round(t, 2) for t in engine], "batch_s": [round(t, 2) for t in batched],
            "overhead": round(min(batched) / min(engine) - 1, 4),
        }
        if not args.skip_ranks:
            source = os.path.join(scratch, "in")
            one = time_command(source, os.path.join(scratch, "one"), 1)
            two = time_command(source, os.path.join(scratch, "two"), 2)
            record.update(one_process_s=round(one, 2), two_ranks_s=round(two, 2), ranks_ratio=round(two / one, 3))
    emit(record)


if __name__ == "__main__":
    main()
