"""Command line: ``python -m ice_ops {demo,localize,learn,compose,export,batch,benchmark} ...`` (``--help`` on each)."""
from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from typing import Sequence

from .batch import CONCEPT_SET_NAME, MASK_PATTERN, OVERLAY_NAME  # what `localize` writes into --out

MODEL_LIBRARIES = ("diffusers", "transformers")  # libraries that log notices and draw loading bars of their own
USER_ERROR_STATUS = 2  # argparse's own status for bad arguments
SYSTEM_ERROR_STATUS = 1
TOYWORLD_MODEL = "toyworld"  # --model value of `batch` for the embedded Toy World model
INTERRUPTED_STATUS = 130  # what shells report for a program stopped by Ctrl-C (128 + SIGINT)
OS_ERROR_FIXES = {
    errno.ENOSPC: "free some disk space and run again",
    errno.ENAMETOOLONG: "choose a shorter name or folder",
    errno.EACCES: "choose a folder you may write to",
    errno.EPERM: "choose a folder you may write to",
    errno.EROFS: "choose a folder on a writable disk",
    errno.ENOENT: "check that the path exists",
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if not args.quiet else logging.WARNING, format="%(message)s")
    if args.quiet:
        quiet_model_libraries()
    try:
        return int(args.handler(args) or 0)
    except ValueError as error:
        parser.exit(USER_ERROR_STATUS, f"error: {error}\n")
    except KeyboardInterrupt:
        parser.exit(INTERRUPTED_STATUS, "interrupted; nothing was written\n")
    except OSError as error:
        parser.exit(SYSTEM_ERROR_STATUS, f"error: {describe_os_error(error)}\n")


def describe_os_error(error: OSError) -> str:
    """One line for an error the system gave while reading or writing a file: the file, what happened, and
    what to do about it."""
    where = error.filename or "a file"
    what = error.strerror or str(error)
    fix = OS_ERROR_FIXES.get(error.errno, "check the path and try again")
    return f"{where}: {what}; {fix} (nothing was written)"


def build_parser() -> argparse.ArgumentParser:
    from . import defaults

    parser = argparse.ArgumentParser(
        prog="python -m ice_ops",
        description="ICE: find the objects in one image (localize), learn tokens for what they are and their "
        "material and colour (learn), and generate with them (compose). No weights are ever downloaded.",
    )
    parser.add_argument("--quiet", action="store_true", help="only print errors and final results")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="try ICE with the embedded Toy World model (no weights to download)",
                               description="Runs Stage One, Stage Two and compositions on a bundled Toy World "
                               "scene with the embedded tiny model, and writes a one-page PNG sheet.")
    demo.add_argument("--out", default="ice_demo", help="output folder (default ./ice_demo)")
    demo.add_argument("--learn-steps", type=int, default=None,
                      help="Stage Two steps per phase (default: the demo's, a few minutes on a CPU)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    demo.add_argument("--overwrite", action="store_true", help="replace the sheet if --out already holds one")
    demo.set_defaults(handler=run_demo)

    loc = commands.add_parser("localize", help="Stage One: find objects, write masks and a concept set",
                              description="Stage One: retrieve a word, segment it, remove it, repeat.")
    loc.add_argument("image", help="the photo to analyse (any format Pillow reads)")
    _model_arguments(loc)
    loc.add_argument("--clip-arch", required=True,
                     help="open_clip architecture of the retriever (e.g. ViT-L-14 for SD 1.x, ViT-H-14 for SD 2.x), "
                     "or the path of an open_clip model-config JSON for custom or tiny models")
    loc.add_argument("--clip-weights", default=None,
                     help="the retriever's weights as a local .safetensors file (open_clip state dict)")
    loc.add_argument("--vocabulary", default=None,
                     help="a text file with one noun per line (default: the vocabulary shipped with ICE)")
    loc.add_argument("--cache-dir", default=None,
                     help="folder where the vocabulary's text embeddings are cached (default: no cache)")
    loc.add_argument("--stop-fraction", type=float, default=defaults.DEFAULT_STOP_FRACTION,
                     help="stop when less than this fraction of the image is unexplained "
                     f"(default {defaults.DEFAULT_STOP_FRACTION}, the paper's)")
    loc.add_argument("--max-concepts", type=int, default=defaults.DEFAULT_MAX_CONCEPTS,
                     help=f"at most this many concepts (default {defaults.DEFAULT_MAX_CONCEPTS})")
    loc.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    loc.add_argument("--segmentation", default=defaults.DIFFSEG, choices=defaults.SEGMENTATIONS,
                     help="diffseg (the paper, default) or cross-attention (for small models whose self-attention "
                     "groups nothing, such as the Toy World model)")
    loc.add_argument("--min-contrast", type=float, default=None,
                     help="stop when the next word attends less than this many times more to its mask than to the "
                     "rest of what is unexplained (default: off; the Toy World model's calibrated value is in "
                     "ice_ops.toyworld.MIN_CONTRAST)")
    loc.add_argument("--out", required=True, help="output folder for mask_*.png, overlay.png and concepts.safetensors")
    loc.add_argument("--overwrite", action="store_true", help="replace files that already exist in --out")
    loc.set_defaults(handler=run_localize)

    lrn = commands.add_parser("learn", help="Stage Two: learn object, instance and intrinsic tokens",
                              description="Stage Two: phase one (object + instance tokens) then phase two "
                              "(one intrinsic token per anchor).")
    lrn.add_argument("concepts", help="concept-set file written by 'localize'")
    lrn.add_argument("--image", required=True, help="the same image that was localized")
    _model_arguments(lrn)
    _learning_arguments(lrn, defaults)
    lrn.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    lrn.add_argument("--out", required=True, help="where to write the learned concept set (.safetensors)")
    lrn.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    lrn.add_argument("--relearn", action="store_true",
                     help="learn new tokens from the words even if the concept set's tokens were learned on another "
                     "model (those tokens are dropped)")
    lrn.set_defaults(handler=run_learn)

    cmp_ = commands.add_parser("compose", help="generate an image from a prompt with [name.role] placeholders",
                               description="Prompts may use [name.role] (e.g. [bust.material]) and [name].")
    cmp_.add_argument("concepts", help="learned concept-set file")
    cmp_.add_argument("prompt", help='e.g. "a cup made of [bust.material]"')
    _model_arguments(cmp_)
    cmp_.add_argument("--negative", default="", help="negative prompt (default empty)")
    cmp_.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    cmp_.add_argument("--steps", type=int, default=defaults.DEFAULT_SAMPLE_STEPS,
                      help=f"sampling steps (default {defaults.DEFAULT_SAMPLE_STEPS})")
    cmp_.add_argument("--guidance", type=float, default=defaults.DEFAULT_GUIDANCE,
                      help=f"classifier-free guidance scale (default {defaults.DEFAULT_GUIDANCE})")
    cmp_.add_argument("--height", type=int, default=None, help="image height (default: the model's native size)")
    cmp_.add_argument("--width", type=int, default=None, help="image width (default: the model's native size)")
    cmp_.add_argument("--out", required=True, help="output PNG path")
    cmp_.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    cmp_.set_defaults(handler=run_compose)

    exp = commands.add_parser("export", help="write one ComfyUI embedding file per learned token",
                              description="Writes <prefix>_<concept>_<role>.safetensors files, usable as "
                              "embedding:<prefix>_<concept>_<role> in ComfyUI's CLIPTextEncode.")
    exp.add_argument("concepts", help="learned concept-set file")
    exp.add_argument("--embeddings-dir", required=True, help="folder to write to, e.g. ComfyUI/models/embeddings")
    exp.add_argument("--prefix", default=None, help="file-name prefix (default: the concept-set file's name)")
    exp.add_argument("--overwrite", action="store_true", help="replace existing embedding files")
    exp.set_defaults(handler=run_export)

    _batch_parser(commands, defaults)

    bench = commands.add_parser(
        "benchmark", help="score a batch output with the UCE metrics (SIM^I, SIM^C, ACC^1/ACC^3) on local CLIP/DINO",
        description="Reads what `batch` wrote to DIR and scores it as ConceptExpress does (docs/DECISIONS.md, "
        "'UCE benchmark protocol'): one JSON line on stdout and a per-concept table.")
    bench.add_argument("folder", metavar="DIR", help="the --out folder of `python -m ice_ops batch`")
    bench.add_argument("--clip-arch", required=True,
                       help="open_clip architecture: a name (ViT-B-32, ...) or the path of a model-config JSON")
    bench.add_argument("--clip-weights", required=True, help="the CLIP weights, a local .safetensors file")
    bench.add_argument("--dino", default=None,
                       help="a local transformers folder with a DINO ViT and its image processor (e.g. "
                       "facebook/dino-vits16 saved with save_pretrained); adds the _dino metrics")
    bench.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    bench.add_argument("--table", default=None, help="write the per-concept table to this file instead of standard error")
    bench.add_argument("--overwrite", action="store_true", help="replace --table if it exists")
    bench.set_defaults(handler=run_benchmark)
    return parser


def _batch_parser(commands, defaults) -> None:
    bat = commands.add_parser(
        "batch", help="localize, learn, export and sample every image of a folder (resumable; shards over torchrun)",
        description="Runs localize, learn, export and a few generations per concept for every image of SOURCE, "
        "writing one folder per image to --out (each whole or not at all), summary.jsonl and index.html. A rerun "
        "skips finished images. Under torchrun (torchrun --nproc_per_node N -m ice_ops batch ...) the images are "
        "shared out over the ranks. Exit status 1 when an image failed (the summary says why).")
    bat.add_argument("source", help="a folder of images, or a text file with one image path per line")
    bat.add_argument("--model", required=True,
                     help=f"Stable Diffusion 1.x/2.x: a diffusers folder or a single-file .safetensors checkpoint; or "
                     f"{TOYWORLD_MODEL!r} for the embedded Toy World model and its CLIP")
    bat.add_argument("--device", default="auto",
                     help="cpu, cuda, cuda:1, ... (default: cuda if available; under torchrun each rank takes the GPU "
                     "of its LOCAL_RANK)")
    bat.add_argument("--clip-arch", default=None, help="open_clip config JSON of the retriever (not with --model "
                     f"{TOYWORLD_MODEL})")
    bat.add_argument("--clip-weights", default=None, help="its .safetensors weights")
    bat.add_argument("--vocabulary", default=None, help="word list for retrieval (default: the built-in one)")
    bat.add_argument("--cache-dir", default=None, help="where the vocabulary's text embeddings are cached")
    bat.add_argument("--stop-fraction", type=float, default=None,
                     help=f"Stage One stops when less than this fraction is unexplained (default "
                     f"{defaults.DEFAULT_STOP_FRACTION})")
    bat.add_argument("--max-concepts", type=int, default=None,
                     help=f"at most this many objects per image (default {defaults.DEFAULT_MAX_CONCEPTS})")
    bat.add_argument("--segmentation", default=None, choices=defaults.SEGMENTATIONS,
                     help=f"default {defaults.DIFFSEG} ({defaults.CROSS_ATTENTION} with --model {TOYWORLD_MODEL})")
    bat.add_argument("--min-contrast", type=float, default=None,
                     help="cross-attention stop rule (default off; calibrated value with the Toy World model)")
    _learning_arguments(bat, defaults)
    bat.add_argument("--seed", type=int, default=0, help="random seed of every stage (default 0)")
    bat.add_argument("--samples", type=int, default=None,
                     help="generations per concept (default: the UCE benchmark's number; 0 for none)")
    bat.add_argument("--composition-samples", type=int, default=None,
                     help="generations of all an image's concepts together (default: the benchmark's number)")
    bat.add_argument("--sample-steps", type=int, default=defaults.DEFAULT_SAMPLE_STEPS,
                     help=f"sampling steps per generation (default {defaults.DEFAULT_SAMPLE_STEPS})")
    bat.add_argument("--guidance", type=float, default=defaults.DEFAULT_GUIDANCE,
                     help=f"classifier-free guidance (default {defaults.DEFAULT_GUIDANCE})")
    bat.add_argument("--out", required=True, help="output folder (created; finished images in it are skipped)")
    bat.set_defaults(handler=run_batch)


def _learning_arguments(parser: argparse.ArgumentParser, defaults) -> None:
    """Stage Two's options, the same for `learn` and `batch`."""
    parser.add_argument("--object-steps", type=int, default=defaults.DEFAULT_STEPS,
                        help=f"phase-one steps (default {defaults.DEFAULT_STEPS})")
    parser.add_argument("--intrinsic-steps", type=int, default=defaults.DEFAULT_STEPS,
                        help=f"phase-two steps (default {defaults.DEFAULT_STEPS}; 0 skips phase two)")
    parser.add_argument("--anchors", default=",".join(defaults.DEFAULT_ANCHORS),
                        help=f"comma-separated intrinsic anchors (default {','.join(defaults.DEFAULT_ANCHORS)})")
    parser.add_argument("--refine-steps", type=int, default=0,
                        help="optional LoRA refinement steps on the UNet after phase two (default 0 = off)")
    parser.add_argument("--lr", type=float, default=defaults.DEFAULT_LR,
                        help=f"learning rate of the token vectors (default {defaults.DEFAULT_LR})")


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="Stable Diffusion 1.x/2.x: a diffusers folder or a single-file .safetensors checkpoint")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")


# ---------------------------------------------------------------------- commands
def run_demo(args) -> int:
    from .toyworld.demo import DEMO_LEARN_STEPS
    from .toyworld.demo import run_demo as run

    steps = DEMO_LEARN_STEPS if args.learn_steps is None else args.learn_steps
    if steps < 1:
        raise ValueError("--learn-steps must be at least 1.")
    sheet = run(args.out, learn_steps=steps, seed=args.seed, device=resolve_device(args.device),
                overwrite=args.overwrite, progress=progress_reporter(args))
    sys.stdout.write(f"wrote: {sheet}\n")
    return 0


def run_localize(args) -> int:
    from .files import write_files_atomic
    from .localization import localize
    from .retrieve import ClipRetriever

    image = load_image(args.image)
    _refuse_existing_outputs(args.out, [CONCEPT_SET_NAME, OVERLAY_NAME], args.overwrite)
    bundle = load_bundle(args.model, args.device)
    retriever = ClipRetriever.from_pretrained(
        args.clip_arch, args.clip_weights, vocabulary=args.vocabulary, device=bundle.device, cache_dir=args.cache_dir
    )
    progress = progress_reporter(args)
    concepts = localize(bundle, retriever, image, stop_fraction=args.stop_fraction, max_concepts=args.max_concepts,
                        seed=args.seed, callback=progress.phase("Stage One"), segmentation=args.segmentation,
                        min_contrast=args.min_contrast)
    progress.finish()
    outputs = localization_outputs(args.out, image, concepts)
    stale = stale_masks(args.out, outputs) if args.overwrite else []
    write_files_atomic(outputs, overwrite=args.overwrite)
    for path in stale:
        os.remove(path)
    found = ", ".join(f"{c.name} ({c.score:.2f})" for c in concepts.concepts) or "nothing"
    sys.stdout.write(f"found: {found}\nwrote: {os.path.join(args.out, CONCEPT_SET_NAME)}\n")
    return 0


def localization_outputs(folder: str, image, concepts) -> dict[str, bytes]:
    """``{path: bytes}`` of what ``localize`` writes: a PNG per mask, the labelled overlay, the concept set."""
    from .batch import localization_files

    return {os.path.join(folder, name): payload for name, payload in localization_files(image, concepts).items()}


def stale_masks(folder: str, outputs) -> list[str]:
    """Mask files of an earlier run in ``folder`` that this run does not write (removed with --overwrite)."""
    import glob

    earlier = glob.glob(os.path.join(glob.escape(folder), MASK_PATTERN.format("*")))
    return sorted(path for path in earlier if path not in outputs)


def run_learn(args) -> int:
    from .batch import check_stage_two_steps
    from .concepts import ConceptSet
    from .learn import check_intrinsic_arguments, learn_intrinsic_tokens, learn_object_tokens

    concepts = ConceptSet.load(args.concepts)
    image = load_image(args.image)
    concepts.validate(tuple(image.shape[-2:]))
    check_stage_two_steps(args.object_steps, args.intrinsic_steps, args.refine_steps)
    if args.intrinsic_steps:
        check_intrinsic_arguments(concepts, args.anchors, steps=args.intrinsic_steps, refine_steps=args.refine_steps,
                                  lr=args.lr)
    _refuse_existing_outputs(os.path.dirname(args.out), [os.path.basename(args.out)], args.overwrite)
    bundle = load_bundle(args.model, args.device)

    progress = progress_reporter(args)
    learned = learn_object_tokens(bundle, image, concepts, steps=args.object_steps, lr=args.lr, seed=args.seed,
                                  callback=progress.phase("object tokens"), relearn=args.relearn)
    if args.intrinsic_steps:
        learned = learn_intrinsic_tokens(bundle, image, learned, anchors=args.anchors, steps=args.intrinsic_steps,
                                         refine_steps=args.refine_steps, lr=args.lr, seed=args.seed,
                                         callback=progress.phase("intrinsic tokens"))
    progress.finish()
    learned.save(args.out, overwrite=args.overwrite)
    roles = ", ".join(f"{c.name}: {'/'.join(c.roles)}" for c in learned.concepts)
    sys.stdout.write(f"learned: {roles}\nwrote: {args.out}\n")
    return 0


def run_compose(args) -> int:
    from .composition import compose, generate
    from .concepts import ConceptSet
    from .imaging import tensor_to_pil
    from .lora import apply_lora

    concepts = ConceptSet.load(args.concepts)
    bundle = load_bundle(args.model, args.device)
    concepts.check_text_encoder(bundle.text_encoder)
    if os.path.exists(args.out) and not args.overwrite:
        raise ValueError(f"{args.out} already exists; choose another --out or pass --overwrite.")
    condition = compose(bundle, concepts, args.prompt, negative=args.negative)
    progress = progress_reporter(args)
    with apply_lora(bundle.unet, concepts.lora):
        images = generate(bundle, condition, seed=args.seed, steps=args.steps, guidance=args.guidance,
                          height=args.height, width=args.width, callback=progress.phase("sampling"))
    progress.finish()
    _save_png(tensor_to_pil(images[0]), args.out, args.overwrite)
    sys.stdout.write(f"prompt: {condition.text}\nwrote: {args.out}\n")
    return 0


def run_batch(args) -> int:
    from .batch import DONE, FAILED, INDEX_NAME, SKIPPED, SUMMARY_NAME, BatchSettings, World, count_statuses, list_images
    from .batch import run_batch as run

    paths = list_images(args.source)
    if args.model != TOYWORLD_MODEL and args.clip_arch is None:
        raise ValueError(f"--clip-arch is needed with --model {args.model} (or use --model {TOYWORLD_MODEL}).")
    localize_options = {"stop_fraction": args.stop_fraction, "max_concepts": args.max_concepts,
                        "segmentation": args.segmentation, "min_contrast": args.min_contrast}
    base = toyworld_localize_settings() if args.model == TOYWORLD_MODEL else {}
    settings = BatchSettings(
        localize={**base, **{key: value for key, value in localize_options.items() if value is not None}},
        object_steps=args.object_steps, intrinsic_steps=args.intrinsic_steps, anchors=args.anchors,
        refine_steps=args.refine_steps, lr=args.lr, seed=args.seed, samples=args.samples,
        composition_samples=args.composition_samples, sample_steps=args.sample_steps, guidance=args.guidance,
    ).checked()
    device = resolve_device(args.device)
    world = World.from_environment(use_cuda=device.type == "cuda")
    try:
        if world.size > 1 and device.type == "cuda" and device.index is None:
            import torch

            device = torch.device("cuda", world.local_rank)
        bundle, retriever = batch_models(args, device)
        rows = run(bundle, retriever, paths, args.out, settings, world=world, progress=progress_reporter(args))
    finally:
        world.close()
    if rows is None:  # ranks other than 0: rank 0 reports
        return 0
    counts = count_statuses(rows)
    for row in rows:
        if row["status"] == FAILED:
            sys.stderr.write(f"failed: {row['image']}: {row['error']}\n")
    sys.stdout.write(f"{len(rows)} images: {counts[DONE]} done, {counts[SKIPPED]} finished earlier, "
                     f"{counts[FAILED]} failed\nwrote: {os.path.join(args.out, SUMMARY_NAME)} and "
                     f"{os.path.join(args.out, INDEX_NAME)}\n")
    return SYSTEM_ERROR_STATUS if counts[FAILED] else 0


def run_benchmark(args) -> int:
    """The summary as one JSON line on standard output, the per-concept table on standard error (or --table)."""
    import json

    from .benchmark import ClipImageEncoder, DinoImageEncoder, format_table
    from .benchmark import run_benchmark as score
    from .files import write_bytes_atomic

    if args.table is not None and os.path.exists(args.table) and not args.overwrite:
        raise ValueError(f"{args.table} already exists; choose another --table or add --overwrite.")
    device = resolve_device(args.device)
    clip_encoder = ClipImageEncoder.from_files(args.clip_arch, args.clip_weights, device=device)
    dino_encoder = DinoImageEncoder.from_folder(args.dino, device=device) if args.dino else None
    summary, rows = score(args.folder, clip_encoder, dino_encoder)
    table = format_table(rows)
    if args.table is None:
        sys.stderr.write(table)
    else:
        write_bytes_atomic(args.table, table.encode("utf-8"), overwrite=args.overwrite)
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0


def toyworld_localize_settings() -> dict:
    from .toyworld import localize_settings

    return localize_settings()


def batch_models(args, device):
    """The diffusion model and the CLIP retriever of a batch run (the embedded pair for the Toy World)."""
    from .retrieve import ClipRetriever

    if args.model == TOYWORLD_MODEL:
        from .toyworld import embedded_bundle, embedded_retriever

        return embedded_bundle(device), embedded_retriever(device, vocabulary=args.vocabulary)
    bundle = load_bundle(args.model, str(device))
    retriever = ClipRetriever.from_pretrained(args.clip_arch, args.clip_weights, vocabulary=args.vocabulary,
                                              device=bundle.device, cache_dir=args.cache_dir)
    return bundle, retriever


def run_export(args) -> int:
    from .concepts import ConceptSet, embedding_name

    concepts = ConceptSet.load(args.concepts)
    prefix = args.prefix or os.path.splitext(os.path.basename(args.concepts))[0]
    written = concepts.export_embeddings(args.embeddings_dir, prefix, overwrite=args.overwrite)
    names = " ".join(embedding_name(path) for path in written)
    sys.stdout.write(f"wrote {len(written)} embeddings: {names}\n")
    return 0


# ---------------------------------------------------------------------- helpers
def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is available; use --device cpu.")
    return device


def load_bundle(path: str, device_name: str = "auto"):
    from .bundle import DiffusionBundle

    device = resolve_device(device_name)
    if os.path.isdir(path):
        return DiffusionBundle.from_pretrained(path, device=device)
    return DiffusionBundle.from_single_file(path, device=device)


def load_image(path: str):
    from .imaging import read_image

    return read_image(path)


def quiet_model_libraries() -> None:
    """For --quiet: the model libraries' own notices and loading bars (diffusers, transformers) stay off too."""
    import importlib

    for package in MODEL_LIBRARIES:
        library_logging = importlib.import_module(f"{package}.utils.logging")
        library_logging.set_verbosity_error()
        library_logging.disable_progress_bar()


def progress_reporter(args):
    """Progress on stderr: a bar on a terminal, a few lines per phase in a log, nothing with --quiet."""
    from .progress import ProgressReporter

    return ProgressReporter(sys.stderr, quiet=args.quiet)


def _refuse_existing_outputs(folder: str, names: Sequence[str], overwrite: bool) -> None:
    from .files import refuse_existing

    refuse_existing([os.path.join(folder, name) for name in names], overwrite)


def _save_png(picture, path: str, overwrite: bool) -> str:
    from .files import write_bytes_atomic
    from .imaging import png_bytes

    return write_bytes_atomic(path, png_bytes(picture), overwrite=overwrite)


if __name__ == "__main__":
    sys.exit(main())
