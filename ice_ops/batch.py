"""Concept extraction over many images: ``python -m ice_ops batch SOURCE --model ... --out DIR``.

For each image of a folder (or of a list file) the batch runs Stage One, Stage Two, the exports and a few
generations per concept, and writes them to one folder per image::

    DIR/<item>/record.json               its row of the summary; present only in a finished folder
    DIR/<item>/source.png                the image as it was read
    DIR/<item>/concepts.safetensors      the learned concept set (names, masks, token vectors, LoRA)
    DIR/<item>/overlay.png, mask_<name>.png
    DIR/<item>/embeddings/<item>_<name>_<role>.safetensors   one ComfyUI embedding per token
    DIR/<item>/lora.safetensors          when refinement ran (--refine-steps)
    DIR/<item>/identity/<name>_<k>.png   generations of each concept alone (the UCE benchmark's prompts)
    DIR/<item>/composition/<k>.png       generations of all the image's concepts together (two or more)
    DIR/summary.jsonl                    one row per image, in the order of SOURCE
    DIR/index.html                       every image, its masks with their words and some generations

An image's folder is written under a hidden name (``.<item>.partial``) and renamed into place when it is
complete, so a folder either holds everything or does not exist: a rerun skips finished images and redoes
the rest, including one that was cut off when the run was killed. An image that cannot be processed is
reported in the summary with its error, and the others go on.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the images still to do are shared out over the ranks, each rank
loading its own model on its own device; rank 0 writes the summary and the page once every rank is done.
"""
from __future__ import annotations

import datetime
import html
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Sequence
from urllib.parse import quote

from .defaults import DEFAULT_ANCHORS, DEFAULT_GUIDANCE, DEFAULT_LR, DEFAULT_SAMPLE_STEPS, DEFAULT_STEPS

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
LIST_COMMENT = "#"
RECORD_NAME = "record.json"
SOURCE_NAME = "source.png"
CONCEPT_SET_NAME = "concepts.safetensors"
OVERLAY_NAME = "overlay.png"
MASK_PATTERN = "mask_{}.png"
EMBEDDINGS_FOLDER = "embeddings"
LORA_NAME = "lora.safetensors"
IDENTITY_FOLDER = "identity"
IDENTITY_PATTERN = "{name}_{k}.png"  # in IDENTITY_FOLDER: sample k of concept name
COMPOSITION_FOLDER = "composition"
COMPOSITION_PATTERN = "{k}.png"
SUMMARY_NAME = "summary.jsonl"
INDEX_NAME = "index.html"
PARTIAL_PREFIX, PARTIAL_SUFFIX = ".", ".partial"  # an unfinished image's folder: hidden, never read as a result
DONE, SKIPPED, FAILED = "done", "skipped", "failed"
UNSAFE_NAME_CHARACTERS = re.compile(r"[^A-Za-z0-9_-]+")  # what concept-set exports accept in a prefix
FALLBACK_ITEM_NAME = "image"
INDEX_SAMPLES = 4  # generations per concept shown on the page (all are on disk)
# How long a rank waits at the end for the others: a shard can take hours on a slow GPU.
DISTRIBUTED_TIMEOUT = datetime.timedelta(days=2)
SCORE_DECIMALS = 4
SECONDS_DECIMALS = 2


@dataclass(frozen=True)
class BatchSettings:
    """What the batch does to every image (the same for all of them)."""

    localize: dict = field(default_factory=dict)  # keyword arguments of ice_ops.localization.localize
    object_steps: int = DEFAULT_STEPS
    intrinsic_steps: int = DEFAULT_STEPS
    anchors: tuple[str, ...] = DEFAULT_ANCHORS
    refine_steps: int = 0
    lr: float = DEFAULT_LR
    seed: int = 0
    samples: int | None = None  # generations per concept (default: the UCE benchmark's number)
    composition_samples: int | None = None  # generations of all concepts together (default: the benchmark's)
    sample_steps: int = DEFAULT_SAMPLE_STEPS
    guidance: float = DEFAULT_GUIDANCE

    def checked(self) -> "BatchSettings":
        """These settings with the benchmark's sample counts filled in; ``ValueError`` for impossible values."""
        from .benchmark import COMPOSITION_SAMPLES, SAMPLES_PER_CONCEPT
        from .learn import normalise_anchors

        check_stage_two_steps(self.object_steps, self.intrinsic_steps, self.refine_steps)
        for label, value in (("--samples", self.samples), ("--composition-samples", self.composition_samples)):
            if value is not None and value < 0:
                raise ValueError(f"{label} must be 0 (no generations) or more, got {value}.")
        if self.sample_steps < 1:
            raise ValueError(f"--sample-steps must be at least 1, got {self.sample_steps}.")
        anchors = normalise_anchors(self.anchors) if self.intrinsic_steps else tuple(self.anchors)
        return BatchSettings(**{
            **self.__dict__,
            "anchors": anchors,
            "samples": SAMPLES_PER_CONCEPT if self.samples is None else self.samples,
            "composition_samples": COMPOSITION_SAMPLES if self.composition_samples is None
            else self.composition_samples,
        })


def check_stage_two_steps(object_steps: int, intrinsic_steps: int, refine_steps: int) -> None:
    """``ValueError`` for step counts Stage Two cannot run (named as the `learn` and `batch` options)."""
    if object_steps < 1:
        raise ValueError(f"--object-steps must be at least 1, got {object_steps}.")
    if intrinsic_steps < 0:
        raise ValueError("--intrinsic-steps must be 0 (skip phase two) or more.")
    if refine_steps and not intrinsic_steps:
        raise ValueError("--refine-steps needs phase two: give --intrinsic-steps > 0.")


# ---------------------------------------------------------------------- what to do
def list_images(source: str) -> list[str]:
    """The images of ``source``: a folder's image files sorted by name (not its subfolders, not hidden files),
    or the paths listed in a text file, one per line (relative to the list file; blank lines and lines
    starting with ``#`` are skipped)."""
    if os.path.isdir(source):
        names = sorted(n for n in os.listdir(source)
                       if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS)
                       and os.path.isfile(os.path.join(source, n)))
        if not names:
            raise ValueError(f"{source} holds no image files ({', '.join(IMAGE_EXTENSIONS)}); "
                             "give a folder of images or a text file that lists them.")
        return [os.path.join(source, name) for name in names]
    if os.path.isfile(source):
        folder = os.path.dirname(os.path.abspath(source))
        try:
            with open(source, encoding="utf-8") as handle:
                lines = [line.strip() for line in handle]
        except UnicodeDecodeError:
            raise ValueError(f"{source} is not a text file; give a folder of images or a list with one image "
                             "path per line.") from None
        paths = [os.path.join(folder, line) for line in lines if line and not line.startswith(LIST_COMMENT)]
        if not paths:
            raise ValueError(f"{source} lists no images; write one image path per line.")
        return paths
    raise ValueError(f"{source} does not exist; give a folder of images or a text file listing them.")


def item_names(paths: Sequence[str]) -> list[str]:
    """One output folder name per image, also the prefix of its embedding files: its file name without
    extension, with runs of characters other than letters, digits, ``_`` and ``-`` replaced by ``_``; a name
    Windows reserves gets ``_image`` added, and a name already taken ``_2``, ``_3`` ..."""
    from .concepts import WINDOWS_RESERVED_NAMES

    names: list[str] = []
    taken: set[str] = set()
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        base = UNSAFE_NAME_CHARACTERS.sub("_", stem).strip("_") or FALLBACK_ITEM_NAME
        if base.lower() in WINDOWS_RESERVED_NAMES:
            base = f"{base}_{FALLBACK_ITEM_NAME}"
        name, number = base, 1
        while name.lower() in taken:  # case-insensitive file systems would merge "A" and "a"
            number += 1
            name = f"{base}_{number}"
        taken.add(name.lower())
        names.append(name)
    return names


def is_finished(out: str, item: str) -> bool:
    return os.path.isfile(os.path.join(out, item, RECORD_NAME))


def unfinished(out: str, items: Sequence[str]) -> list[int]:
    """Indices of the images whose folder is not complete yet."""
    return [index for index, item in enumerate(items) if not is_finished(out, item)]


def shard(indices: Sequence[int], rank: int, world: int) -> list[int]:
    """The share of ``indices`` that rank ``rank`` of ``world`` processes (every ``world``-th, from ``rank``)."""
    return list(indices[rank::world])


# ---------------------------------------------------------------------- one image
def process_image(bundle, retriever, image, settings: BatchSettings, item: str) -> tuple[dict[str, bytes], Any]:
    """Everything the batch writes for one image but its record, as ``({relative path: bytes}, learned concept
    set)``; nothing is written here. ``item`` prefixes the embedding files' names."""
    from .benchmark import composition_prompt, identity_prompt
    from .imaging import png_bytes, tensor_to_pil
    from .learn import learn_intrinsic_tokens, learn_object_tokens
    from .localization import localize

    concepts = localize(bundle, retriever, image, seed=settings.seed, **settings.localize)
    if len(concepts):
        concepts = learn_object_tokens(bundle, image, concepts, steps=settings.object_steps, lr=settings.lr,
                                       seed=settings.seed)
        if settings.intrinsic_steps:
            concepts = learn_intrinsic_tokens(bundle, image, concepts, anchors=settings.anchors,
                                              steps=settings.intrinsic_steps, refine_steps=settings.refine_steps,
                                              lr=settings.lr, seed=settings.seed)
    files = {SOURCE_NAME: png_bytes(tensor_to_pil(image)), **localization_files(image, concepts)}
    files.update({os.path.join(EMBEDDINGS_FOLDER, os.path.basename(path)): payload
                  for path, payload in concepts.embedding_files(EMBEDDINGS_FOLDER, item).items()})
    if concepts.lora:
        files[LORA_NAME] = concepts.lora_bytes()
    if len(concepts):
        prompts = {os.path.join(IDENTITY_FOLDER, IDENTITY_PATTERN.format(name=name, k=k)): (identity_prompt(name), k)
                   for name in concepts.names for k in range(settings.samples)}
        if len(concepts) > 1:
            together = composition_prompt(list(concepts.names))
            prompts.update({os.path.join(COMPOSITION_FOLDER, COMPOSITION_PATTERN.format(k=k)): (together, k)
                            for k in range(settings.composition_samples)})
        files.update(generate_samples(bundle, concepts, prompts, settings))
    return files, concepts


def localization_files(image, concepts) -> dict[str, bytes]:
    """``{file name: bytes}`` of what Stage One leaves for the user (also ``python -m ice_ops localize``): a PNG per
    mask, the labelled overlay and the concept set."""
    from .imaging import labelled_overlay, mask_to_pil, png_bytes, tensor_to_pil

    files = {MASK_PATTERN.format(c.name): png_bytes(mask_to_pil(c.mask)) for c in concepts.concepts}
    files[OVERLAY_NAME] = png_bytes(tensor_to_pil(labelled_overlay(image, concepts.masks(), concepts.names)))
    files[CONCEPT_SET_NAME] = concepts.to_bytes()
    return files


def generate_samples(bundle, concepts, prompts: dict[str, tuple[str, int]], settings: BatchSettings
                     ) -> dict[str, bytes]:
    """``{relative path: PNG}`` of one generation per ``(prompt, k)``; sample ``k`` uses seed ``seed + k``, so the
    same concept and sample number give the same image in every run."""
    from .composition import compose, generate
    from .imaging import png_bytes, tensor_to_pil
    from .lora import apply_lora

    encoded: dict[str, Any] = {}
    out = {}
    with apply_lora(bundle.unet, concepts.lora):
        for path, (prompt, k) in prompts.items():
            if prompt not in encoded:
                encoded[prompt] = compose(bundle, concepts, prompt)
            picture = generate(bundle, encoded[prompt], seed=settings.seed + k, steps=settings.sample_steps,
                               guidance=settings.guidance)
            out[path] = png_bytes(tensor_to_pil(picture[0]))
    return out


def concept_record(image_path: str, item: str, concepts, seconds: float) -> dict:
    """The summary row of a finished image."""
    from .imaging import MASK_THRESHOLD

    return {
        "image": image_path, "item": item, "status": DONE,
        "names": list(concepts.names),
        "words": [c.word for c in concepts.concepts],
        "scores": [round(float(c.score), SCORE_DECIMALS) for c in concepts.concepts],
        "areas": [round(float((c.mask > MASK_THRESHOLD).float().mean()), SCORE_DECIMALS) for c in concepts.concepts],
        "roles": {c.name: list(c.roles) for c in concepts.concepts},
        "seconds": round(seconds, SECONDS_DECIMALS),
        "error": None,
    }


def failure_record(image_path: str, item: str, error: BaseException, seconds: float) -> dict:
    message = str(error) if isinstance(error, (ValueError, OSError)) else f"{type(error).__name__}: {error}"
    return {"image": image_path, "item": item, "status": FAILED, "names": [], "words": [], "scores": [],
            "areas": [], "roles": {}, "seconds": round(seconds, SECONDS_DECIMALS), "error": message}


def write_item(out: str, item: str, files: dict[str, bytes]) -> str:
    """Write ``files`` into ``out/.<item>.partial`` and rename that folder to ``out/<item>`` (one step, so the
    folder appears complete or not at all). A leftover partial folder of an earlier run is replaced."""
    final = os.path.join(out, item)
    if os.path.exists(final):
        raise ValueError(f"{final} exists but is not a finished batch folder (it has no {RECORD_NAME}); move it "
                         "out of the way and run again.")
    partial = os.path.join(out, PARTIAL_PREFIX + item + PARTIAL_SUFFIX)
    shutil.rmtree(partial, ignore_errors=True)
    try:
        for relative, payload in files.items():
            path = os.path.join(partial, relative)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
        os.rename(partial, final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return final


def run_one(bundle, retriever, image_path: str, item: str, out: str, settings: BatchSettings) -> dict:
    """Process and write one image; returns its summary row (status ``failed`` with the error when the image
    could not be processed; Ctrl-C is not caught)."""
    from .imaging import read_image

    start = time.monotonic()
    try:
        image = read_image(image_path)
        files, concepts = process_image(bundle, retriever, image, settings, item)
        record = concept_record(image_path, item, concepts, time.monotonic() - start)
        files[RECORD_NAME] = json.dumps(record, indent=1).encode()
        write_item(out, item, files)
        return record
    except Exception as error:  # noqa: BLE001 - one bad image is reported and the batch goes on
        return failure_record(image_path, item, error, time.monotonic() - start)


# ---------------------------------------------------------------------- the whole batch
def run_batch(bundle, retriever, paths: Sequence[str], out: str, settings: BatchSettings, *,
              world: "World | None" = None, progress=None) -> list[dict] | None:
    """Process every unfinished image of ``paths`` into ``out``; on rank 0 (or without ranks) write the summary
    and the page and return the summary rows (one per image, in the order of ``paths``), elsewhere ``None``."""
    world = world or World()
    settings = settings.checked()
    items = item_names(paths)
    os.makedirs(out, exist_ok=True)
    todo = world.broadcast(unfinished(out, items))  # rank 0's view, so that no image falls between shards
    mine = shard(todo, world.rank, world.size)
    bar = progress.phase(world.label("images")) if progress is not None else None
    rows = []
    for done, index in enumerate(mine):
        if bar is not None:
            bar(done, len(mine), None)
        rows.append(run_one(bundle, retriever, paths[index], items[index], out, settings))
    if bar is not None:
        bar(len(mine), len(mine), None)
        progress.finish()
    gathered = world.gather(rows)
    if gathered is None:
        return None
    summary = summary_rows(out, paths, items, [row for part in gathered for row in part])
    write_summary(out, summary)
    return summary


def summary_rows(out: str, paths: Sequence[str], items: Sequence[str], this_run: Sequence[dict]) -> list[dict]:
    """One row per image: this run's row, or the record of a folder finished by an earlier run (``skipped``)."""
    by_item = {row["item"]: row for row in this_run}
    rows = []
    for path, item in zip(paths, items):
        if item in by_item:
            rows.append(by_item[item])
        elif is_finished(out, item):
            with open(os.path.join(out, item, RECORD_NAME), encoding="utf-8") as handle:
                rows.append({**json.load(handle), "status": SKIPPED})
        else:
            rows.append(failure_record(path, item, RuntimeError("no rank processed this image"), 0.0))
    return rows


def write_summary(out: str, rows: Sequence[dict]) -> None:
    """``summary.jsonl`` and ``index.html`` of the whole batch (rewritten by every run: they describe the folder)."""
    from .files import write_files_atomic

    summary = "".join(json.dumps(row) + "\n" for row in rows).encode()
    write_files_atomic({os.path.join(out, SUMMARY_NAME): summary,
                        os.path.join(out, INDEX_NAME): index_html(out, rows).encode()}, overwrite=True)


def count_statuses(rows: Sequence[dict]) -> dict[str, int]:
    counts = {DONE: 0, SKIPPED: 0, FAILED: 0}
    for row in rows:
        counts[row["status"]] += 1
    return counts


# ---------------------------------------------------------------------- the page
def index_html(out: str, rows: Sequence[dict]) -> str:
    """A page that shows, per image, the source and overlay, each mask with its word and the first
    :data:`INDEX_SAMPLES` generations of each concept; links are relative, so the folder can be moved."""
    counts = count_statuses(rows)
    parts = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8"><title>ICE batch</title>',
        "<style>body{font-family:sans-serif;margin:1em}section{border-top:1px solid #ccc;padding:.5em 0}"
        "figure{display:inline-block;margin:.2em;text-align:center;vertical-align:top}"
        "img{width:128px;height:128px;object-fit:contain;image-rendering:pixelated;background:#eee}"
        "figcaption{font-size:.8em;max-width:128px;overflow-wrap:anywhere}.failed{color:#a00}</style></head><body>",
        f"<h1>ICE batch: {len(rows)} images</h1>",
        f"<p>{counts[DONE]} done in this run, {counts[SKIPPED]} finished earlier, {counts[FAILED]} failed. "
        f"Every row is in <a href=\"{SUMMARY_NAME}\">{SUMMARY_NAME}</a>.</p>",
    ]
    for row in rows:
        parts.append(image_section(out, row))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def image_section(out: str, row: dict) -> str:
    from .benchmark import identity_prompt

    item, title = row["item"], html.escape(os.path.basename(row["image"]))
    if row["status"] == FAILED:
        return f'<section><h2>{title}</h2><p class="failed">failed: {html.escape(row["error"] or "")}</p></section>'
    parts = [f"<section><h2>{title}</h2><div>", figure(item, SOURCE_NAME, "source"), figure(item, OVERLAY_NAME, "found")]
    for name, word, score in zip(row["names"], row["words"], row["scores"]):
        parts.append(figure(item, MASK_PATTERN.format(name), f"{name} ({word}, {score:.2f})"))
    parts.append("</div>")
    if not row["names"]:
        parts.append("<p>No object was found in this image.</p>")
    for name in row["names"]:
        samples = [os.path.join(IDENTITY_FOLDER, IDENTITY_PATTERN.format(name=name, k=k)) for k in range(INDEX_SAMPLES)]
        shown = [figure(item, path, f"{identity_prompt(name)} #{k}") for k, path in enumerate(samples)
                 if os.path.isfile(os.path.join(out, item, path))]
        if shown:
            parts.append(f"<div><b>{html.escape(name)}</b><br>" + "".join(shown) + "</div>")
    together = [os.path.join(COMPOSITION_FOLDER, COMPOSITION_PATTERN.format(k=k)) for k in range(INDEX_SAMPLES)]
    shown = [figure(item, path, f"all together #{k}") for k, path in enumerate(together)
             if os.path.isfile(os.path.join(out, item, path))]
    if shown:
        parts.append("<div><b>together</b><br>" + "".join(shown) + "</div>")
    parts.append("</section>")
    return "".join(parts)


def figure(item: str, relative: str, caption: str) -> str:
    link = quote(f"{item}/{relative.replace(os.sep, '/')}")
    return f'<figure><img src="{link}" alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}</figcaption></figure>'


# ---------------------------------------------------------------------- ranks
class World:
    """The processes of this run: one (``rank`` 0 of ``size`` 1) without torchrun; under torchrun, the
    ``torch.distributed`` group it describes in ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (gloo on CPU, nccl on
    GPUs). ``broadcast`` and ``gather`` pass small Python objects between the ranks."""

    def __init__(self, rank: int = 0, size: int = 1, local_rank: int = 0) -> None:
        self.rank, self.size, self.local_rank = rank, size, local_rank

    @classmethod
    def from_environment(cls, use_cuda: bool) -> "World":
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return cls()
        import torch.distributed as dist

        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if use_cuda:
            import torch

            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo", timeout=DISTRIBUTED_TIMEOUT)
        return cls(dist.get_rank(), dist.get_world_size(), local_rank)

    def label(self, text: str) -> str:
        return text if self.size == 1 else f"rank {self.rank}/{self.size} {text}"

    def broadcast(self, value):
        if self.size == 1:
            return value
        import torch.distributed as dist

        box = [value if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value) -> list | None:
        """Every rank's ``value`` on rank 0 (in rank order); ``None`` on the others."""
        if self.size == 1:
            return [value]
        import torch.distributed as dist

        box = [None] * self.size if self.rank == 0 else None
        dist.gather_object(value, box, dst=0)
        return box

    def close(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
