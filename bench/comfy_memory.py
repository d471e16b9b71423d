"""Peak memory of the ICE node chain against a plain sampling graph, each run in its own process inside a
real ComfyUI checkout. One JSON line.

- ``baseline`` child: CheckpointLoaderSimple -> CLIPTextEncode (positive, negative) -> EmptyLatentImage ->
  KSampler -> VAEDecode;
- ``ice`` child: CheckpointLoaderSimple -> Load ICE Model -> Load CLIP Retriever (a tiny random open_clip) ->
  Localize Concepts (one concept of a synthetic scene) -> Learn Object Tokens -> Compose Concepts -> the same
  KSampler (Compose's conditioning as positive, the baseline's negative) -> VAEDecode.

The nodes run in-process as ComfyUI runs them: the pack is imported as a package (``load_pack`` of
tests/comfyui/check_extension.py) and its classes come from its ComfyExtension; the stock nodes of ComfyUI's
``nodes.py`` are called through their FUNCTION; every call is made inside ``torch.inference_mode()``.
CheckpointLoaderSimple gets the checkpoint's file name, its folder registered with
``folder_paths.add_model_folder_path("checkpoints", folder)``. ComfyUI's base folder (models/, user/) is
``WORK/base``, so the checkout is only read; without CUDA ComfyUI runs in CPU mode. Localize runs with
``--segmentation`` (DiffSeg, the paper's); random weights seldom give the word a DiffSeg segment, so when it
finds no concept it runs again with cross-attention (``localize_segmentations`` lists what ran; the DiffSeg
pass still counts towards the peak).

A child's peak is ``ru_maxrss`` (everything resident: imports, the mapped checkpoint, the models) and, on
CUDA, ``torch.cuda.max_memory_allocated()``. ``ice_extra_peak_bytes`` is the ice peak minus the baseline
peak: process memory on CPU, GPU memory on CUDA. The children run one after the other; the parent imports
neither torch nor ComfyUI, because Linux carries a parent's peak resident size into a child across exec
(``parent_peak_bytes`` is that floor). ``checkpoint_fp16_bytes`` is 2 bytes per floating-point element of
the checkpoint, read from the safetensors header.

Without ``--checkpoint`` the checkpoint is a full-size SD 1.5 architecture (ice_ops/configs/sd1) with
random weights, in the original LDM single-file layout written through ComfyUI's own key mappings
(``ldm_checkpoint_state`` of tests/comfyui/make_fixtures.py), stored fp16 and built once into
``WORK/checkpoints``; the retriever's files are built once into ``WORK/base/models/ice``. Existing files are
reused, never replaced. Each child's stderr goes to ``WORK/logs/<child>.log`` (replaced on every run).

    python bench/comfy_memory.py --comfyui /work/comfyui
    python bench/comfy_memory.py --checkpoint /tmp/bench-tiny/checkpoints/ice_tiny_sd15.safetensors --resolution 64
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(1, ROOT)  # after bench/ (this folder); ComfyUI's folder goes before both in the children

from ice_ops.defaults import CROSS_ATTENTION, DIFFSEG, SEGMENTATIONS  # noqa: E402  (imports nothing)

COMFYUI_TESTS = os.path.join(ROOT, "tests", "comfyui")
DEFAULT_COMFYUI = "/work/comfyui"
DEFAULT_WORK = "/tmp/ice-comfy-memory"
COMFYUI_PATH_VARIABLE = "COMFYUI_PATH"
CHILD_ROLES = ("prepare", "baseline", "ice")

DEFAULT_RESOLUTION = 512
RESOLUTION_MULTIPLE = 64  # Load ICE Model's working_resolution step (nodes/_spec.py WORKING_RESOLUTION_STEP)
DEFAULT_SAMPLE_STEPS = 2
DEFAULT_LEARN_STEPS = 2
SEED = 0
SAMPLE_CFG = 7.0
SAMPLER_NAME = "euler"
SCHEDULER_NAME = "normal"
FULL_DENOISE = 1.0
POSITIVE_PROMPT = "a photo of a ball on a table"
NEGATIVE_PROMPT = ""
ICE_PROMPT_TEMPLATE = "a photo of a [{}.object] on a table"  # [name.object]: the concept's learned token
MAX_CONCEPTS = 1
NO_MIN_CONTRAST = 0.0  # Localize's default: no contrast rule
SCENE_SEED = 0

FULL_SIZE_KIND = "sd15"  # devtools/random_models.py: the configs shipped in ice_ops/configs/sd1
FULL_SIZE_CHECKPOINT_NAME = "ice_random_sd15_full_fp16.safetensors"
CHECKPOINT_SEED = 0
CHECKPOINT_SUFFIX = ".safetensors"
TINY_CLIP_ARCHITECTURE = "tiny_open_clip"  # the stem of devtools/configs/tiny_open_clip.json
FP16_BYTES = 2
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"})  # safetensors dtype names
KIB = 1024  # Linux reports ru_maxrss and VmHWM in KiB
CLEAR_REFS = "/proc/self/clear_refs"
RESET_HIGH_WATER_MARK = "5"  # proc(5): writing 5 to clear_refs resets the peak resident set size
PROCESS_STATUS = "/proc/self/status"
HIGH_WATER_MARK_FIELD = "VmHWM:"
STDERR_TAIL_CHARS = 6000


# ---------------------------------------------------------------------------------------------- arguments
def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", default=os.environ.get(COMFYUI_PATH_VARIABLE, DEFAULT_COMFYUI),
                        help=f"ComfyUI checkout (default: ${COMFYUI_PATH_VARIABLE} or {DEFAULT_COMFYUI})")
    parser.add_argument("--checkpoint", default=None,
                        help="SD 1.x/2.x .safetensors checkpoint (default: full-size random SD 1.5, built in --work)")
    parser.add_argument("--work", default=DEFAULT_WORK, help="cache and scratch folder (models, logs)")
    parser.add_argument("--resolution", type=int, default=DEFAULT_RESOLUTION,
                        help=f"image side in pixels, a multiple of {RESOLUTION_MULTIPLE}")
    parser.add_argument("--sample-steps", type=int, default=DEFAULT_SAMPLE_STEPS, help="KSampler steps")
    parser.add_argument("--learn-steps", type=int, default=DEFAULT_LEARN_STEPS, help="Learn Object Tokens steps")
    parser.add_argument("--segmentation", default=DIFFSEG, choices=SEGMENTATIONS,
                        help=f"Localize's segmentation; {DIFFSEG} falls back to {CROSS_ATTENTION} when it finds "
                             "no concept (random weights rarely give the word a DiffSeg segment)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto: cuda if available (ComfyUI runs in CPU mode otherwise)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--role", default="parent", choices=("parent", *CHILD_ROLES), help=argparse.SUPPRESS)
    return checked(parser.parse_args(argv))


def checked(args: argparse.Namespace) -> argparse.Namespace:
    """Absolute paths and ``ValueError`` with a fix for arguments that cannot work."""
    args.comfyui = os.path.abspath(args.comfyui)
    args.work = os.path.abspath(args.work)
    if not os.path.isfile(os.path.join(args.comfyui, "nodes.py")):
        raise ValueError(f"{args.comfyui!r} is not a ComfyUI checkout (no nodes.py); pass --comfyui or set "
                         f"{COMFYUI_PATH_VARIABLE} to the folder holding ComfyUI's main.py and nodes.py.")
    if args.checkpoint is not None:
        args.checkpoint = os.path.abspath(args.checkpoint)
        if not args.checkpoint.endswith(CHECKPOINT_SUFFIX) or not os.path.isfile(args.checkpoint):
            raise ValueError(f"--checkpoint {args.checkpoint!r} is not an existing {CHECKPOINT_SUFFIX} file; pass "
                             "one, or leave the option out to build the random full-size SD 1.5 checkpoint.")
    if args.resolution < RESOLUTION_MULTIPLE or args.resolution % RESOLUTION_MULTIPLE:
        nearest = max(RESOLUTION_MULTIPLE, args.resolution // RESOLUTION_MULTIPLE * RESOLUTION_MULTIPLE)
        raise ValueError(f"--resolution {args.resolution} must be a positive multiple of {RESOLUTION_MULTIPLE} "
                         f"(e.g. {nearest}).")
    for name in ("sample_steps", "learn_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1; got {getattr(args, name)}.")
    return args


def checkpoint_path(args: argparse.Namespace) -> str:
    return args.checkpoint or os.path.join(args.work, "checkpoints", FULL_SIZE_CHECKPOINT_NAME)


def comfy_base(args: argparse.Namespace) -> str:
    return os.path.join(args.work, "base")


def ice_models_folder(args: argparse.Namespace) -> str:
    """ComfyUI's default ``models/ice`` folder (the pack registers it) under the bench's base folder."""
    return os.path.join(comfy_base(args), "models", "ice")


def retriever_files(args: argparse.Namespace) -> list[str]:
    folder = ice_models_folder(args)
    return [os.path.join(folder, TINY_CLIP_ARCHITECTURE + ext) for ext in (".json", CHECKPOINT_SUFFIX)]


def forwarded_arguments(args: argparse.Namespace) -> list[str]:
    forwarded = ["--comfyui", args.comfyui, "--work", args.work, "--resolution", str(args.resolution),
                 "--sample-steps", str(args.sample_steps), "--learn-steps", str(args.learn_steps),
                 "--segmentation", args.segmentation, "--device", args.device]
    return forwarded + (["--checkpoint", args.checkpoint] if args.checkpoint else [])


# ---------------------------------------------------------------------------------------------- parent
def process_peak_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * KIB


def progress(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        sys.stderr.write(f"comfy_memory: {message}\n")


def stderr_tail(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as handle:
        return handle.read()[-STDERR_TAIL_CHARS:]


def last_json_line(stdout: str, role: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"The {role} child exited 0 without its JSON line; its stdout ends:\n{stdout[-2000:]}")
    return json.loads(lines[-1])


def run_child(args: argparse.Namespace, role: str) -> tuple[dict, float]:
    """Run this script as the ``role`` child; its JSON record and wall seconds. Exits non-zero if it fails."""
    logs = os.path.join(args.work, "logs")
    os.makedirs(logs, exist_ok=True)
    log_path = os.path.join(logs, f"{role}.log")
    command = [sys.executable, os.path.abspath(__file__), "--role", role, *forwarded_arguments(args)]
    progress(args, f"{role} child (stderr: {log_path})")
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        completed = subprocess.run(command, stdout=subprocess.PIPE, stderr=log, text=True, cwd=args.work)
    seconds = time.perf_counter() - start
    if completed.returncode != 0:
        sys.exit(f"comfy_memory: the {role} child failed (exit {completed.returncode}) after {seconds:.0f} s; "
                 f"the end of its stderr ({log_path}):\n{stderr_tail(log_path)}")
    return last_json_line(completed.stdout, role), seconds


def models_missing(args: argparse.Namespace) -> bool:
    wanted = retriever_files(args) + ([] if args.checkpoint else [checkpoint_path(args)])
    return not all(os.path.isfile(path) for path in wanted)


def checkpoint_fp16_bytes(path: str) -> int:
    """2 bytes per floating-point element of a .safetensors file (shapes from its header; nothing is loaded)."""
    from safetensors import safe_open

    elements = 0
    with safe_open(path, framework="numpy") as handle:
        for key in handle.keys():
            tensor = handle.get_slice(key)
            if tensor.get_dtype() in FLOAT_DTYPES:
                elements += math.prod(tensor.get_shape())
    return FP16_BYTES * elements


def compared_peak(record: dict) -> int:
    """The peak the comparison uses: GPU memory on CUDA, process memory otherwise."""
    return record["gpu_peak_bytes"] if record["device"] == "cuda" else record["process_peak_bytes"]


def summary(args, baseline, baseline_seconds, ice, ice_seconds) -> dict:
    if baseline["device"] != ice["device"]:
        raise RuntimeError(f"The children ran on different devices ({baseline['device']}, {ice['device']}).")
    path = checkpoint_path(args)
    baseline_peak, ice_peak = compared_peak(baseline), compared_peak(ice)
    fp16_bytes = checkpoint_fp16_bytes(path)
    return {
        "bench": "comfy_memory",
        "device": ice["device"],
        "device_name": ice["device_name"],
        "comfyui_version": ice["comfyui_version"],
        "checkpoint": path,
        "checkpoint_fp16_bytes": fp16_bytes,
        "resolution": args.resolution,
        "sample_steps": args.sample_steps,
        "learn_steps": args.learn_steps,
        "baseline_peak_bytes": baseline_peak,
        "ice_peak_bytes": ice_peak,
        "ice_extra_peak_bytes": ice_peak - baseline_peak,
        "ice_extra_vs_checkpoint_fp16": round((ice_peak - baseline_peak) / fp16_bytes, 3),
        "baseline_process_peak_bytes": baseline["process_peak_bytes"],
        "ice_process_peak_bytes": ice["process_peak_bytes"],
        "parent_peak_bytes": process_peak_bytes(),
        "baseline_seconds": round(baseline_seconds, 1),
        "ice_seconds": round(ice_seconds, 1),
        "baseline_node_seconds": baseline["node_seconds"],
        "ice_node_seconds": ice["node_seconds"],
        "baseline_node_peak_bytes": baseline["node_peak_bytes"],
        "ice_node_peak_bytes": ice["node_peak_bytes"],
        "concepts": ice["concepts"],
        "localize_segmentations": ice["localize_segmentations"],
    }


def run_parent(args: argparse.Namespace) -> None:
    if models_missing(args):
        run_child(args, "prepare")
    baseline, baseline_seconds = run_child(args, "baseline")
    ice, ice_seconds = run_child(args, "ice")
    sys.stdout.write(json.dumps(summary(args, baseline, baseline_seconds, ice, ice_seconds), sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------- children
def start_comfyui(args: argparse.Namespace) -> str:
    """Put ComfyUI first on sys.path (its ``nodes`` must win over the pack's) and set its options before any
    ``comfy`` module reads them; returns the device name."""
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device; use --device cpu or auto.")
    device = "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu"
    sys.path.insert(0, args.comfyui)
    if COMFYUI_TESTS not in sys.path:
        sys.path.append(COMFYUI_TESTS)
    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = device == "cpu"  # must precede any comfy.model_management import
    comfy_args.base_directory = comfy_base(args)
    return device


def run_stock_node(node_class, **inputs) -> tuple:
    """Call one of ComfyUI's nodes.py nodes through its FUNCTION, in inference mode as ComfyUI does."""
    import torch

    with torch.inference_mode():
        return getattr(node_class(), node_class.FUNCTION)(**inputs)


def run_pack_node(node_class, *inputs, **options) -> tuple:
    """Call a V3 node's ``execute`` in inference mode; its NodeOutput's values."""
    import torch

    with torch.inference_mode():
        return node_class.execute(*inputs, **options).args


class NodeClock:
    """Seconds and peak resident bytes per node, in the order they ran. A node's peak is the kernel's high-water
    mark of resident memory, reset before the node (``/proc/self/clear_refs``; Linux only, else absent); the
    process peak before each reset is kept, so :meth:`process_peak` still covers the whole run."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.peaks: dict[str, int] = {}
        self.earlier_peak = 0

    def run(self, name: str, call, *inputs, **options):
        self.earlier_peak = max(self.earlier_peak, process_peak_bytes())
        resettable = reset_resident_high_water_mark()
        start = time.perf_counter()
        result = call(*inputs, **options)
        self.seconds[name] = round(time.perf_counter() - start, 2)
        if resettable:
            self.peaks[name] = resident_high_water_mark()
        return result

    def process_peak(self) -> int:
        return max(self.earlier_peak, process_peak_bytes())


def reset_resident_high_water_mark() -> bool:
    """Reset the kernel's peak resident size of this process (VmHWM); False where that is not possible."""
    try:
        with open(CLEAR_REFS, "w", encoding="ascii") as handle:
            handle.write(RESET_HIGH_WATER_MARK)
        return True
    except OSError:
        return False


def resident_high_water_mark() -> int:
    with open(PROCESS_STATUS, encoding="ascii") as handle:
        for line in handle:
            if line.startswith(HIGH_WATER_MARK_FIELD):
                return int(line.split()[1]) * KIB
    raise RuntimeError(f"{PROCESS_STATUS} has no {HIGH_WATER_MARK_FIELD} line.")


def load_checkpoint(args, clock: NodeClock):
    import folder_paths
    import nodes

    path = checkpoint_path(args)
    folder_paths.add_model_folder_path("checkpoints", os.path.dirname(path))
    return clock.run("CheckpointLoaderSimple", run_stock_node, nodes.CheckpointLoaderSimple,
                     ckpt_name=os.path.basename(path))


def encode_text(clip, text: str, clock: NodeClock, name: str):
    import nodes

    return clock.run(name, run_stock_node, nodes.CLIPTextEncode, clip=clip, text=text)[0]


def sample_and_decode(args, model, vae, positive, negative, clock: NodeClock):
    """EmptyLatentImage -> KSampler -> VAEDecode; the decoded image batch."""
    import nodes

    latent = clock.run("EmptyLatentImage", run_stock_node, nodes.EmptyLatentImage,
                       width=args.resolution, height=args.resolution)[0]
    samples = clock.run("KSampler", run_stock_node, nodes.KSampler, model=model, seed=SEED,
                        steps=args.sample_steps, cfg=SAMPLE_CFG, sampler_name=SAMPLER_NAME,
                        scheduler=SCHEDULER_NAME, positive=positive, negative=negative, latent_image=latent,
                        denoise=FULL_DENOISE)[0]
    return clock.run("VAEDecode", run_stock_node, nodes.VAEDecode, vae=vae, samples=samples)[0]


def check_decoded(images, args) -> None:
    expected = (1, args.resolution, args.resolution, 3)
    if tuple(images.shape) != expected:
        raise RuntimeError(f"VAEDecode returned images of shape {tuple(images.shape)}, expected {expected}.")


def peak_record(device: str, clock: NodeClock) -> dict:
    import torch

    from comfyui_version import __version__

    record = {"device": device, "process_peak_bytes": clock.process_peak(), "node_seconds": clock.seconds,
              "node_peak_bytes": clock.peaks, "comfyui_version": __version__, "device_name": "cpu"}
    if device == "cuda":
        torch.cuda.synchronize()
        record["gpu_peak_bytes"] = int(torch.cuda.max_memory_allocated())
        record["device_name"] = torch.cuda.get_device_name()
    return record


def run_baseline(args: argparse.Namespace) -> dict:
    device = start_comfyui(args)
    clock = NodeClock()
    model, clip, vae = load_checkpoint(args, clock)
    positive = encode_text(clip, POSITIVE_PROMPT, clock, "CLIPTextEncode (positive)")
    negative = encode_text(clip, NEGATIVE_PROMPT, clock, "CLIPTextEncode (negative)")
    check_decoded(sample_and_decode(args, model, vae, positive, negative, clock), args)
    return {**peak_record(device, clock), "concepts": [], "localize_segmentations": []}


def pack_node_classes(pack) -> dict:
    """``{node_id: class}`` of the pack's ComfyExtension, as ComfyUI collects them."""
    import asyncio

    async def node_list():
        extension = await pack.comfy_entrypoint()
        return await extension.get_node_list()

    return {node_class.GET_SCHEMA().node_id: node_class for node_class in asyncio.run(node_list())}


def scene_image(resolution: int):
    """The synthetic scene as a ComfyUI IMAGE: [1, H, W, 3] in 0..1."""
    from _common import synthetic_scene

    image, _ = synthetic_scene(resolution, seed=SCENE_SEED)
    return image.permute(1, 2, 0)[None].contiguous()


def localize(node_class, ice_model, retriever, image, segmentation: str, stop_fraction: float, clock: NodeClock):
    """Localize Concepts with ``segmentation``, then with cross-attention if DiffSeg found nothing (random weights
    seldom give the word a DiffSeg segment; the DiffSeg pass still counts towards the peak). Returns the
    concepts and the segmentations that ran."""
    ran = []
    for method in dict.fromkeys([segmentation, CROSS_ATTENTION]):
        ran.append(method)
        concepts = clock.run(f"ICE_IterativeLocalize ({method})", run_pack_node, node_class, ice_model, retriever,
                             image, stop_fraction, MAX_CONCEPTS, SEED, segmentation=method,
                             min_contrast=NO_MIN_CONTRAST)[0]
        if len(concepts):
            return concepts, ran
    raise RuntimeError(f"Localize Concepts found no concept in the synthetic scene with {' or '.join(ran)}; "
                       "nothing to learn.")


def run_ice(args: argparse.Namespace) -> dict:
    import importlib

    device = start_comfyui(args)
    from check_extension import load_pack

    clock = NodeClock()
    model, clip, vae = load_checkpoint(args, clock)
    negative = encode_text(clip, NEGATIVE_PROMPT, clock, "CLIPTextEncode (negative)")
    pack = load_pack(ROOT)
    spec = importlib.import_module(pack.__name__ + ".nodes._spec")
    node = pack_node_classes(pack)
    (ice_model,) = clock.run("ICE_LoadICEModel", run_pack_node, node["ICE_LoadICEModel"], model, clip, vae,
                             args.resolution)
    (retriever,) = clock.run("ICE_LoadCLIPRetriever", run_pack_node, node["ICE_LoadCLIPRetriever"],
                             TINY_CLIP_ARCHITECTURE + CHECKPOINT_SUFFIX, TINY_CLIP_ARCHITECTURE,
                             spec.BUILTIN_VOCABULARY)
    image = scene_image(args.resolution)
    concepts, segmentations = localize(node["ICE_IterativeLocalize"], ice_model, retriever, image,
                                       args.segmentation, spec.DEFAULT_STOP_FRACTION, clock)
    (learned,) = clock.run("ICE_LearnObjectTokens", run_pack_node, node["ICE_LearnObjectTokens"], ice_model, image,
                           concepts, args.learn_steps, spec.DEFAULT_LR, SEED)
    (positive,) = clock.run("ICE_ComposeConcepts", run_pack_node, node["ICE_ComposeConcepts"], ice_model, learned,
                            ICE_PROMPT_TEMPLATE.format(learned.names[0]))
    check_decoded(sample_and_decode(args, model, vae, positive, negative, clock), args)
    return {**peak_record(device, clock), "concepts": list(learned.names), "localize_segmentations": segmentations}


def build_full_size_checkpoint(path: str) -> str:
    """Random-weight full-size SD 1.5 in the LDM single-file layout (ComfyUI's key mappings), fp16, atomically."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from devtools.random_models import model_configs
    from ice_ops.files import write_atomic
    from make_fixtures import ldm_checkpoint_state

    unet_config, vae_config, text_config, _ = model_configs(FULL_SIZE_KIND)
    torch.manual_seed(CHECKPOINT_SEED)
    state = ldm_checkpoint_state(UNet2DConditionModel.from_config(unet_config), AutoencoderKL.from_config(vae_config),
                                 CLIPTextModel(CLIPTextConfig(**text_config)), "sd1")
    state = {key: value.detach().to(torch.float16).contiguous() for key, value in state.items()}
    return write_atomic(path, lambda temporary: save_file(state, temporary, metadata={"format": "pt"}))


def build_retriever_files(args: argparse.Namespace) -> None:
    """The tiny random open_clip (config and weights) in models/ice, through make_fixtures.build_open_clip."""
    from _common import TINY_CLIP_CONFIG
    from make_fixtures import build_open_clip

    present = [path for path in retriever_files(args) if os.path.exists(path)]
    if present:
        raise ValueError(f"Only some retriever files exist ({present}); delete them so that both are built again.")
    build_open_clip(TINY_CLIP_CONFIG, ice_models_folder(args))


def run_prepare(args: argparse.Namespace) -> dict:
    start_comfyui(args)
    built = []
    if not args.checkpoint and not os.path.isfile(checkpoint_path(args)):
        built.append(build_full_size_checkpoint(checkpoint_path(args)))
    if not all(os.path.isfile(path) for path in retriever_files(args)):
        build_retriever_files(args)
        built.extend(retriever_files(args))
    return {"built": built}


def run_child_role(args: argparse.Namespace) -> None:
    """Do the child's work with stdout sent to stderr (ComfyUI may print), then write its one JSON line."""
    stdout = sys.stdout
    sys.stdout = sys.stderr
    try:
        record = {"prepare": run_prepare, "baseline": run_baseline, "ice": run_ice}[args.role](args)
    finally:
        sys.stdout = stdout
    stdout.write(json.dumps(record, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> None:
    args = parse_arguments(argv)
    if args.role == "parent":
        run_parent(args)
    else:
        run_child_role(args)


if __name__ == "__main__":
    main()
