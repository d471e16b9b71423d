"""The UCE benchmark (ConceptExpress's metrics) over a batch output: ``python -m ice_ops benchmark DIR ...``.

Unsupervised concept extraction is scored on images generated from the learned tokens (docs/DECISIONS.md,
"UCE benchmark protocol", gives the sources and the choices made where they are silent):

- identity similarity SIM^I: each concept is generated alone (:func:`identity_prompt`,
  :data:`SAMPLES_PER_CONCEPT` images) and every generation is compared with the concept's region of the
  source image (the source multiplied by the binarised mask: black outside, full frame);
- compositional similarity SIM^C: all concepts of an image are generated together
  (:func:`composition_prompt`, :data:`COMPOSITION_SAMPLES` images, only for images with two or more
  concepts) and every generation is compared with the whole source image;
- classification accuracy ACC^1 / ACC^3: every single-concept generation is classified among the regions of
  *all* concepts of the benchmark (every image, not only its own) by cosine similarity; a hit is the right
  concept within the top 1 / top 3.

Similarities are cosines of image embeddings: a CLIP image encoder (open_clip, local weights) and, when given,
a DINO ViT (its CLS token, a local transformers folder). Nothing is downloaded.

The folder is what ``python -m ice_ops batch`` writes: ``DIR/<item>/record.json`` marks a finished image;
beside it ``source.png``, ``concepts.safetensors``, ``identity/<name>_<k>.png`` and ``composition/<k>.png``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from .batch import (
    COMPOSITION_FOLDER,
    COMPOSITION_PATTERN,
    CONCEPT_SET_NAME,
    IDENTITY_FOLDER,
    IDENTITY_PATTERN,
    PARTIAL_PREFIX,
    RECORD_NAME,
    SOURCE_NAME,
)
from .imaging import MASK_THRESHOLD, tensor_to_pil, to_image_tensor

# ---------------------------------------------------------------------- the protocol
SAMPLES_PER_CONCEPT = 8  # generations of each concept alone (identity prompt)
COMPOSITION_SAMPLES = 8  # generations of all the concepts of an image together (composition prompt)
PROMPT_TEMPLATE = "a photo of {}"
COMPOSITION_JOINER = " and "
MIN_COMPOSED_CONCEPTS = 2  # an image with one concept has no composition (its prompt would be the identity prompt)
TOP_K = (1, 3)  # ACC^1 and ACC^3
BENCH_NAME = "uce"

# ---------------------------------------------------------------------- the batch folder's layout
# (ice_ops.batch writes it and owns its names; unfinished items are hidden folders, PARTIAL_PREFIX)
RERUN_HINT = ("remove the item's folder {root} and rerun `python -m ice_ops batch` with the same images and --out "
              "(and the default --samples) to make it again")

# ---------------------------------------------------------------------- encoders and report
ENCODE_BATCH_SIZE = 16  # images per encoder forward pass
DINO_CLS_POSITION = 0  # DINO's image embedding is the CLS token, the first of the last hidden state
POOLER_MODEL_TYPES = ("vit",)  # transformers models that add a pooling layer unless told not to
METRICS = ("sim_i", "sim_c", *(f"acc{k}" for k in TOP_K))
TABLE_DECIMALS = 3
TABLE_GAP = "  "
MISSING = "-"


# ---------------------------------------------------------------------- prompts
def identity_prompt(concept_name: str) -> str:
    """The prompt that generates one concept alone: ``"a photo of [bust]"``.

    ``[name]`` is the concept's object token followed by its intrinsic tokens (ice_ops.composition), the
    tokens that reconstruct the whole concept after Stage Two (the reference's object-level prompt)."""
    return PROMPT_TEMPLATE.format(_reference(concept_name))


def composition_prompt(concept_names: list[str]) -> str:
    """The prompt that generates all concepts of an image together: ``"a photo of [bust] and [bowl]"``."""
    if isinstance(concept_names, str) or len(concept_names) < MIN_COMPOSED_CONCEPTS:
        raise ValueError(
            f"A composition needs at least {MIN_COMPOSED_CONCEPTS} concept names, got {concept_names!r}; an image "
            "with one concept is scored by its identity prompt only."
        )
    return PROMPT_TEMPLATE.format(COMPOSITION_JOINER.join(_reference(name) for name in concept_names))


def _reference(name: str) -> str:
    if not isinstance(name, str) or not name.strip() or any(char in name for char in "[]\\"):
        raise ValueError(f"{name!r} is not a concept name; use the names of a concept set (e.g. 'bust', 'bowl_2').")
    return f"[{name}]"


# ---------------------------------------------------------------------- metrics on embeddings (pure)
def paired_cosine(embeddings: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """``[N]`` cosines of row n of ``embeddings`` ``[N, D]`` with row n of ``references`` ``[N, D]`` (rows are
    L2-normalised here)."""
    if embeddings.ndim != 2 or embeddings.shape != references.shape:
        raise ValueError(
            f"Expected two [N, D] tensors of the same shape, got {tuple(embeddings.shape)} and "
            f"{tuple(references.shape)}."
        )
    return (F.normalize(embeddings.double(), dim=-1) * F.normalize(references.double(), dim=-1)).sum(-1)


def identity_similarity(generated: torch.Tensor, regions: torch.Tensor) -> float:
    """SIM^I = (1/N) sum_n cos(g_n, r_n): ``generated`` ``[N, D]`` are the embeddings of single-concept
    generations, ``regions`` ``[N, D]`` row n the embedding of the source region of the concept g_n shows."""
    return float(paired_cosine(generated, regions).mean())


def compositional_similarity(generated: torch.Tensor, sources: torch.Tensor) -> float:
    """SIM^C = (1/N) sum_n cos(g_n, s_n): ``generated`` ``[N, D]`` are the embeddings of generations of all
    concepts of an image together, ``sources`` ``[N, D]`` row n the embedding of that whole source image."""
    return float(paired_cosine(generated, sources).mean())


def top_k_hits(generated: torch.Tensor, prototypes: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """``[N]`` booleans: is concept ``labels[n]`` among the ``k`` prototypes most cosine-similar to g_n?

    ``generated`` ``[N, D]``, ``prototypes`` ``[C, D]`` (one region embedding per concept), ``labels`` ``[N]``
    indices into the prototypes. rank_n = #{c : cos(g_n, p_c) > cos(g_n, p_{labels[n]})}; a hit is rank_n < k, so a
    prototype that ties with the right one does not push it down.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a whole number >= 1, got {k!r}.")
    if generated.ndim != 2 or prototypes.ndim != 2 or generated.shape[1] != prototypes.shape[1]:
        raise ValueError(
            f"Expected generated [N, D] and prototypes [C, D] with the same D, got {tuple(generated.shape)} and "
            f"{tuple(prototypes.shape)}."
        )
    labels = torch.as_tensor(labels, dtype=torch.long)
    if labels.shape != (generated.shape[0],) or labels.min() < 0 or labels.max() >= prototypes.shape[0]:
        raise ValueError(f"labels must be [N] indices of prototypes (0..{prototypes.shape[0] - 1}), got {labels}.")
    cosines = F.normalize(generated.double(), dim=-1) @ F.normalize(prototypes.double(), dim=-1).T
    right = cosines.gather(1, labels[:, None])
    rank = (cosines > right).sum(dim=1)
    return rank < k


def top_k_accuracy(generated: torch.Tensor, prototypes: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """ACC^k = (1/N) sum_n [rank_n < k], rank_n as in :func:`top_k_hits`."""
    return float(top_k_hits(generated, prototypes, labels, k).double().mean())


# ---------------------------------------------------------------------- one encoder's scores over a benchmark
@dataclass
class ItemEmbeddings:
    """One encoder's embeddings of one finished item (one source image).

    ``regions`` ``[K, D]``: the source region of each concept; ``identity`` ``[K, S, D]``: the S generations of
    each concept alone; ``source`` ``[D]``: the whole source image; ``composition`` ``[C, D]`` or ``None``: the
    generations of all concepts together (``None`` for an image with one concept)."""

    item: str
    names: list[str]
    regions: torch.Tensor
    identity: torch.Tensor
    source: torch.Tensor
    composition: torch.Tensor | None = None


def benchmark_scores(items: Sequence[ItemEmbeddings]) -> tuple[dict[str, float | None], list[dict[str, Any]]]:
    """SIM^I, SIM^C, ACC^1 and ACC^3 of one encoder's embeddings, as ``({metric: value}, rows)``.

    Means run over every generation (all concepts have the same number of samples, so this is also the mean
    over concepts, and SIM^C the mean over images with a composition). Each generation is classified among the
    regions of all concepts of all items. ``sim_c`` is ``None`` when no item has two or more concepts. Rows:
    one per concept, ``{"item", "concept", "sim_i", "acc1", "acc3", "sim_c"}`` (``sim_c`` is its item's)."""
    items = [entry for entry in items if entry.names]
    if not items:
        raise ValueError("No concepts to score: every item has an empty concept set.")
    prototypes = torch.cat([entry.regions for entry in items])
    generated, regions, labels, owners = [], [], [], []
    for entry in items:
        concepts, samples = entry.identity.shape[:2]
        if concepts != len(entry.names) or entry.regions.shape[0] != concepts:
            raise ValueError(f"Item {entry.item!r}: {len(entry.names)} names, but embeddings for {concepts} concepts.")
        first = len(owners)
        generated.append(entry.identity.reshape(concepts * samples, -1))
        regions.append(entry.regions.repeat_interleave(samples, dim=0))
        labels.extend(first + index for index in range(concepts) for _ in range(samples))
        owners.extend((entry.item, name) for name in entry.names)
    generated_all, regions_all = torch.cat(generated), torch.cat(regions)
    label_tensor = torch.tensor(labels, dtype=torch.long)
    cosines = paired_cosine(generated_all, regions_all)
    hits = {k: top_k_hits(generated_all, prototypes, label_tensor, k).double() for k in TOP_K}

    composed = [entry for entry in items if entry.composition is not None]
    item_sim_c = {
        entry.item: compositional_similarity(entry.composition, entry.source.expand_as(entry.composition))
        for entry in composed
    }
    sim_c = None
    if composed:
        all_composed = torch.cat([entry.composition for entry in composed])
        all_sources = torch.cat([entry.source.expand_as(entry.composition) for entry in composed])
        sim_c = compositional_similarity(all_composed, all_sources)

    summary = {
        "sim_i": float(cosines.mean()),
        "sim_c": sim_c,
        **{f"acc{k}": float(hits[k].mean()) for k in TOP_K},
    }
    rows = []
    for index, (item, name) in enumerate(owners):
        mine = label_tensor == index
        rows.append({
            "item": item, "concept": name,
            "sim_i": float(cosines[mine].mean()),
            **{f"acc{k}": float(hits[k][mine].mean()) for k in TOP_K},
            "sim_c": item_sim_c.get(item),
        })
    return summary, rows


# ---------------------------------------------------------------------- reading a batch folder
@dataclass
class ItemImages:
    """The pictures of one finished item, each ``[3, H, W]`` in 0..1: ``regions`` one per concept (the source
    masked by the concept's binarised mask, black elsewhere), ``identity`` one list of samples per concept,
    ``composition`` ``None`` for an item with one concept."""

    item: str
    names: list[str]
    source: torch.Tensor
    regions: list[torch.Tensor]
    identity: list[list[torch.Tensor]]
    composition: list[torch.Tensor] | None


def finished_items(folder: str) -> list[str]:
    """Names of the finished items of a batch folder, sorted: sub-folders holding ``record.json`` whose names
    do not start with "." (those are unfinished)."""
    if not os.path.isdir(folder):
        raise ValueError(f"{folder!r} is not a folder; give the --out folder of `python -m ice_ops batch`.")
    return sorted(
        name for name in os.listdir(folder)
        if not name.startswith(PARTIAL_PREFIX) and os.path.isfile(os.path.join(folder, name, RECORD_NAME))
    )


def masked_region(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``image`` ``[3, H, W]`` where ``mask`` ``[H, W]`` exceeds 0.5, black elsewhere (full frame, no crop)."""
    if tuple(mask.shape) != tuple(image.shape[-2:]):
        raise ValueError(
            f"A mask of shape {tuple(mask.shape)} does not fit the source image {tuple(image.shape[-2:])}."
        )
    return image * (mask.to(image.device).float() > MASK_THRESHOLD)


def read_item(folder: str, item: str) -> ItemImages:
    """Read one finished item; ``ValueError`` naming the first missing or unreadable file."""
    from .concepts import ConceptSet

    root = os.path.join(folder, item)

    def picture(*parts: str) -> torch.Tensor:
        return _read_picture(_required(os.path.join(root, *parts), root), root)

    _read_record(os.path.join(root, RECORD_NAME), root)
    source = picture(SOURCE_NAME)
    concepts = ConceptSet.load(_required(os.path.join(root, CONCEPT_SET_NAME), root))
    names = list(concepts.names)
    masks = concepts.masks()
    if names and tuple(masks.shape[-2:]) != tuple(source.shape[-2:]):
        raise ValueError(
            f"{os.path.join(root, CONCEPT_SET_NAME)}: its masks are {tuple(masks.shape[-2:])} but {SOURCE_NAME} is "
            f"{tuple(source.shape[-2:])}; the two files are not of the same image; {rerun_hint(root)}."
        )
    regions = [masked_region(source, mask) for mask in masks]
    identity = [
        [picture(IDENTITY_FOLDER, IDENTITY_PATTERN.format(name=name, k=k)) for k in range(SAMPLES_PER_CONCEPT)]
        for name in names
    ]
    composition = None
    if len(names) >= MIN_COMPOSED_CONCEPTS:
        composition = [picture(COMPOSITION_FOLDER, COMPOSITION_PATTERN.format(k=k)) for k in range(COMPOSITION_SAMPLES)]
    return ItemImages(item, names, source, regions, identity, composition)


def rerun_hint(root: str) -> str:
    """How to make an incomplete or damaged item again (a rerun of the batch skips finished items)."""
    return RERUN_HINT.format(root=root)


def _required(path: str, root: str) -> str:
    if not os.path.isfile(path):
        raise ValueError(f"{path} is missing: the item is incomplete; {rerun_hint(root)}.")
    return path


def _read_record(path: str, root: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); {rerun_hint(root)}.") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path} does not hold a record (a JSON object); {rerun_hint(root)}.")
    return record


def _read_picture(path: str, root: str) -> torch.Tensor:
    from PIL import Image

    try:
        with Image.open(path) as handle:
            handle.load()
            return to_image_tensor(handle)
    except (OSError, Image.DecompressionBombError) as error:
        raise ValueError(f"{path} is not an image Pillow can read ({error}); {rerun_hint(root)}.") from None


# ---------------------------------------------------------------------- encoders (local weights only)
Encoder = Callable[[Sequence[torch.Tensor]], torch.Tensor]


class ClipImageEncoder:
    """open_clip image tower: pictures ``[3, H, W]`` in 0..1 -> L2-normalised ``[N, D]`` embeddings, with the
    model's own input size, mean and std (open_clip's resize-and-centre-crop transform)."""

    def __init__(self, model: torch.nn.Module, size, mean: Sequence[float], std: Sequence[float],
                 batch_size: int = ENCODE_BATCH_SIZE) -> None:
        self.model = model.eval()
        self.size, self.mean, self.std = size, tuple(mean), tuple(std)
        self.batch_size = batch_size

    @classmethod
    def from_files(cls, arch: str, weights: str | None, *, device: str | torch.device = "cpu") -> "ClipImageEncoder":
        """Load as the concept retriever does (:meth:`ice_ops.retrieve.ClipRetriever.from_pretrained`): ``arch``
        an open_clip name or model-config JSON, ``weights`` a local ``.safetensors`` (``None``: random, tests)."""
        from .retrieve import ClipRetriever

        retriever = ClipRetriever.from_pretrained(arch, weights, device=device)
        return cls(retriever.model, retriever.preprocess_size, retriever.mean, retriever.std)

    def __call__(self, pictures: Sequence[torch.Tensor]) -> torch.Tensor:
        from .retrieve import preprocess_image

        parameter = next(self.model.parameters())
        out = []
        for start in range(0, len(pictures), self.batch_size):
            pixels = torch.cat([preprocess_image(picture.to(parameter.device), self.size, self.mean, self.std)
                                for picture in pictures[start : start + self.batch_size]])
            with torch.inference_mode():
                out.append(self.model.encode_image(pixels.to(parameter.dtype)).float())
        return F.normalize(torch.cat(out), dim=-1).cpu()


class DinoImageEncoder:
    """A DINO ViT from a local transformers folder: pictures -> L2-normalised CLS tokens ``[N, D]`` of the last
    hidden state, preprocessed by the folder's own image processor (its size, mean and std)."""

    def __init__(self, model: torch.nn.Module, processor: Any, batch_size: int = ENCODE_BATCH_SIZE) -> None:
        self.model = model.eval()
        self.processor = processor
        self.batch_size = batch_size

    @classmethod
    def from_folder(cls, folder: str, *, device: str | torch.device = "cpu") -> "DinoImageEncoder":
        """``folder``: a model saved with ``save_pretrained`` (safetensors weights, ``config.json``) together
        with its image processor (``preprocessor_config.json``), e.g. facebook/dino-vits16; never downloads."""
        from transformers import AutoConfig, AutoImageProcessor, AutoModel

        if not os.path.isdir(folder):
            raise ValueError(f"DINO folder {folder!r} not found; give a local folder saved with save_pretrained.")
        files = os.listdir(folder)
        if "config.json" not in files or not any(name.endswith(".safetensors") for name in files):
            raise ValueError(
                f"{folder!r} needs config.json and .safetensors weights; save the model there with "
                "model.save_pretrained(folder, safe_serialization=True)."
            )
        if "preprocessor_config.json" not in files:
            raise ValueError(
                f"{folder!r} has no preprocessor_config.json; save the model's image processor beside it "
                "(AutoImageProcessor.from_pretrained(name).save_pretrained(folder)) so its size, mean and std are used."
            )
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        # DINO keeps no pooler (its embedding is the CLS token); ViTModel would otherwise add a random one.
        extra = {"add_pooling_layer": False} if config.model_type in POOLER_MODEL_TYPES else {}
        model = AutoModel.from_pretrained(folder, config=config, local_files_only=True, use_safetensors=True, **extra)
        processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        return cls(model.to(device), processor)

    def __call__(self, pictures: Sequence[torch.Tensor]) -> torch.Tensor:
        parameter = next(self.model.parameters())
        out = []
        for start in range(0, len(pictures), self.batch_size):
            batch = [tensor_to_pil(picture) for picture in pictures[start : start + self.batch_size]]
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"]
            with torch.inference_mode():
                hidden = self.model(pixel_values=pixels.to(parameter.device, parameter.dtype)).last_hidden_state
            out.append(hidden[:, DINO_CLS_POSITION].float())
        return F.normalize(torch.cat(out), dim=-1).cpu()


def embed_item(pictures: ItemImages, encoder: Encoder) -> ItemEmbeddings:
    """One encoder's :class:`ItemEmbeddings` of one item's pictures (one encoder call for all of them)."""
    flat_identity = [sample for samples in pictures.identity for sample in samples]
    composition = pictures.composition or []
    batch = [pictures.source, *pictures.regions, *flat_identity, *composition]
    embeddings = encoder(batch)
    concepts = len(pictures.names)
    regions_end = 1 + concepts
    identity_end = regions_end + len(flat_identity)
    dim = embeddings.shape[-1]
    samples = len(pictures.identity[0]) if pictures.identity else 0
    return ItemEmbeddings(
        item=pictures.item,
        names=list(pictures.names),
        regions=embeddings[1:regions_end],
        identity=embeddings[regions_end:identity_end].reshape(concepts, samples, dim),
        source=embeddings[0],
        composition=embeddings[identity_end:] if pictures.composition is not None else None,
    )


def run_benchmark(folder: str, clip_encoder: Encoder, dino_encoder: Encoder | None = None
                  ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Score a batch output folder: ``(summary, rows)``.

    ``summary`` = ``{"bench": "uce", "images", "concepts", "sim_i_clip", "sim_c_clip", "acc1_clip",
    "acc3_clip"}`` plus the ``_dino`` values when ``dino_encoder`` is given (``sim_c_*`` is ``None`` when no
    image has two concepts); ``rows`` one per concept with the same metrics (``sim_c`` is its image's).
    Encoders map a list of ``[3, H, W]`` pictures to ``[N, D]`` embeddings (:class:`ClipImageEncoder`,
    :class:`DinoImageEncoder`)."""
    items = finished_items(folder)
    if not items:
        raise ValueError(
            f"{folder!r} holds no finished item (a sub-folder with {RECORD_NAME}); run `python -m ice_ops batch` "
            "with --out pointing there first."
        )
    encoders = {"clip": clip_encoder}
    if dino_encoder is not None:
        encoders["dino"] = dino_encoder
    embedded: dict[str, list[ItemEmbeddings]] = {key: [] for key in encoders}
    for item in items:
        pictures = read_item(folder, item)
        for key, encoder in encoders.items():
            embedded[key].append(embed_item(pictures, encoder))
    summary: dict[str, Any] = {"bench": BENCH_NAME, "images": len(items),
                               "concepts": sum(len(entry.names) for entry in embedded["clip"])}
    rows: list[dict[str, Any]] = []
    for key in encoders:
        scores, per_concept = benchmark_scores(embedded[key])
        summary.update({f"{metric}_{key}": scores[metric] for metric in METRICS})
        if not rows:
            rows = [{"item": row["item"], "concept": row["concept"]} for row in per_concept]
        for row, scored in zip(rows, per_concept):
            row.update({f"{metric}_{key}": scored[metric] for metric in METRICS})
    return summary, rows


# ---------------------------------------------------------------------- report
def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The per-concept rows as aligned text: a header line, then one line per concept."""
    if not rows:
        return ""
    columns = list(rows[0])
    cells = [columns] + [[_cell(row[column]) for column in columns] for row in rows]
    widths = [max(len(line[index]) for line in cells) for index in range(len(columns))]
    lines = [TABLE_GAP.join(text.ljust(width) for text, width in zip(line, widths)).rstrip() for line in cells]
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return MISSING
    if isinstance(value, float):
        return f"{value:.{TABLE_DECIMALS}f}"
    return str(value)
