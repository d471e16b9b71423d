"""Concept sets: what ICE found in one image (words, masks) and what it learned (token vectors, LoRA).

One concept set is one ``.safetensors`` file: masks, vectors and LoRA tensors as tensors; words, anchors,
settings, the base text encoder's fingerprint and the format version as JSON metadata. Files are written
atomically and never overwrite an existing file unless asked.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

from .files import write_bytes_atomic, write_files_atomic
from .imaging import MASK_THRESHOLD

FORMAT_NAME = "ice-concept-set"
FORMAT_VERSION = 1
METADATA_KEY = "ice"
# ComfyUI's `embedding:` loader picks the tensor stored under the text encoder's key (comfy/sd1_clip.py):
EMBEDDING_KEYS = {"sd1": "clip_l", "sd2": "clip_h"}
GENERIC_EMBEDDING_KEY = "emb_params"
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9_\-]+")
# Names Windows refuses as file names, with any extension (users share ComfyUI folders across systems).
WINDOWS_RESERVED_NAMES = frozenset(
    ["con", "prn", "aux", "nul"] + [f"{port}{number}" for port in ("com", "lpt") for number in range(1, 10)]
)
FILE_EXTENSION = ".safetensors"
MAX_FILE_NAME_BYTES = 255  # the longest file name common file systems (ext4, NTFS, APFS) accept
EMBEDDING_PREFIX = "embedding:"  # how ComfyUI's CLIPTextEncode names an embedding file in a prompt


@dataclass(frozen=True)
class SavedFiles:
    """What :meth:`ConceptSet.save_with_exports` wrote."""

    concept_set: str
    embeddings: tuple[str, ...] = ()
    lora: str | None = None

    @property
    def embedding_names(self) -> list[str]:
        """``embedding:<file stem>`` for each embedding, as ComfyUI's CLIPTextEncode reads them."""
        return [embedding_name(path) for path in self.embeddings]


def embedding_name(path: str) -> str:
    """How a prompt in ComfyUI's CLIPTextEncode names the embedding file ``path``: ``embedding:<file stem>``."""
    return EMBEDDING_PREFIX + os.path.splitext(os.path.basename(path))[0]


@dataclass
class Concept:
    """One object of the image: ``name`` (unique in the set, used in prompts), its ``word``, retrieval
    ``score``, ``mask`` [H, W] in 0..1 at image size and learned ``vectors`` by role."""

    name: str
    word: str
    score: float
    mask: torch.Tensor
    vectors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def roles(self) -> list[str]:
        return list(self.vectors)


@dataclass
class ConceptSet:
    concepts: list[Concept]
    image_size: tuple[int, int]
    anchors: tuple[str, ...] = ()
    fingerprint: dict[str, Any] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    lora: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.concepts)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.concepts]

    def get(self, name: str) -> Concept:
        for concept in self.concepts:
            if concept.name == name:
                return concept
        if not self.concepts:
            raise ValueError(f"There is no concept {name!r}: the concept set is empty; localize an image first (Localize Concepts).")
        raise ValueError(f"Unknown concept {name!r}; the concepts are: {', '.join(self.names)}.")

    def masks(self) -> torch.Tensor:
        """All masks as ``[K, H, W]`` (``[0, H, W]`` for an empty set)."""
        height, width = self.image_size
        if not self.concepts:
            return torch.zeros(0, height, width)
        return torch.stack([c.mask.float().cpu() for c in self.concepts])

    def replace(self, **changes) -> "ConceptSet":
        """A shallow copy with some fields replaced (concept objects are copied too)."""
        concepts = changes.pop(
            "concepts",
            [Concept(c.name, c.word, c.score, c.mask, dict(c.vectors)) for c in self.concepts],
        )
        values = dict(
            concepts=concepts,
            image_size=self.image_size,
            anchors=self.anchors,
            fingerprint=self.fingerprint,
            settings=dict(self.settings),
            lora=self.lora,
        )
        values.update(changes)
        return ConceptSet(**values)

    # ------------------------------------------------------------------ validation
    def validate(self, image_size: tuple[int, int] | None = None) -> None:
        """Raise ``ValueError`` if this set cannot be learned from (no concepts, bad masks, duplicate names)."""
        if not self.concepts:
            raise ValueError(
                "The concept set is empty; run Stage One (Localize Concepts, or ice_ops.localize) on an image first."
            )
        expected = tuple(image_size) if image_size is not None else tuple(self.image_size)
        seen = set()
        for concept in self.concepts:
            if concept.name in seen:
                raise ValueError(f"Two concepts are named {concept.name!r}; names must be unique in a set.")
            seen.add(concept.name)
            if tuple(concept.mask.shape) != expected:
                raise ValueError(
                    f"The mask of {concept.name!r} is {tuple(concept.mask.shape)} but the image is {expected}; "
                    "use masks made for this image (run localization on the same image)."
                )
            check_mask(concept.mask, concept.name)

    def check_text_encoder(self, text_encoder, *, relearn_hint: bool = False) -> None:
        """``ValueError`` if vectors were learned on a different text encoder than ``text_encoder``
        (``relearn_hint``: the message also says how to learn the tokens again on this model)."""
        if self.fingerprint is None:
            return
        current = text_encoder_fingerprint(text_encoder)
        if current != self.fingerprint:
            fix = "Load the checkpoint the concepts were learned with"
            if relearn_hint:
                fix += (", or learn new tokens on this model from the words (their old tokens are dropped): "
                        "pass relearn=True (--relearn on the command line), or start from Localize Concepts' output")
            raise ValueError(
                "These concepts were learned on a different model: "
                f"{describe_fingerprint(self.fingerprint)}; the loaded model has {describe_fingerprint(current)}. "
                f"{fix}."
            )

    # ------------------------------------------------------------------ files
    def save(self, path: str, *, overwrite: bool = False) -> str:
        """Write the set to ``path`` (``.safetensors``) atomically."""
        return write_bytes_atomic(path, self.to_bytes(), overwrite=overwrite)

    def to_bytes(self) -> bytes:
        """The set as the bytes of a ``.safetensors`` file."""
        tensors: dict[str, torch.Tensor] = {}
        entries = []
        for index, concept in enumerate(self.concepts):
            tensors[f"mask.{index}"] = concept.mask.detach().float().cpu().contiguous()
            for role, vector in concept.vectors.items():
                tensors[f"vector.{index}.{role}"] = vector.detach().float().cpu().reshape(-1).contiguous()
            entries.append(
                {"name": concept.name, "word": concept.word, "score": float(concept.score), "roles": concept.roles}
            )
        for key, value in (self.lora or {}).items():
            tensors[f"lora.{key}"] = value.detach().cpu().contiguous()
        metadata = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "image_size": list(self.image_size),
            "anchors": list(self.anchors),
            "fingerprint": self.fingerprint,
            "settings": self.settings,
            "concepts": entries,
            "has_lora": self.lora is not None,
        }
        from safetensors.torch import save

        return save(tensors, metadata={METADATA_KEY: json.dumps(metadata)})

    @classmethod
    def load(cls, path: str) -> "ConceptSet":
        """Read a set written by :meth:`save`; ``ValueError`` naming the file for anything else."""
        from safetensors import safe_open

        if not os.path.isfile(path):
            raise ValueError(f"Concept-set file {path!r} does not exist.")
        try:
            with safe_open(path, framework="pt") as handle:
                raw = (handle.metadata() or {}).get(METADATA_KEY)
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except Exception as error:  # safetensors raises its own error types for foreign files
            raise ValueError(f"{path!r} is not a concept-set file (not readable as safetensors: {error}).") from None
        if raw is None:
            raise ValueError(
                f"{path!r} is a safetensors file but not an ICE concept set; choose a file saved by SaveConcepts "
                "or ConceptSet.save."
            )
        try:
            return cls._from_metadata(path, json.loads(raw), tensors)
        except (KeyError, IndexError, TypeError, AttributeError, ValueError) as error:
            detail = f"missing entry {error}" if isinstance(error, KeyError) else str(error)
            raise ValueError(
                f"{path!r} is a damaged concept set ({detail}); save it again from ICE, or use another file."
            ) from None

    @classmethod
    def _from_metadata(cls, path: str, metadata: dict, tensors: dict[str, torch.Tensor]) -> "ConceptSet":
        if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_NAME:
            found = metadata.get("format") if isinstance(metadata, dict) else None
            raise ValueError(f"{path!r} is not an ICE concept set (format {found!r}).")
        version = metadata.get("version", 0)
        if not isinstance(version, int):
            raise ValueError(f"its format version is {version!r}, not a whole number")
        if version > FORMAT_VERSION:
            raise ValueError(f"{path!r} was written by a newer ComfyUI-ICE (format {version}); update the pack.")
        height, width = (int(side) for side in metadata["image_size"])
        concepts = []
        for index, entry in enumerate(metadata["concepts"]):
            mask = tensors[f"mask.{index}"]
            if tuple(mask.shape) != (height, width):
                raise ValueError(f"mask {index} is {tuple(mask.shape)}, not the recorded image size {(height, width)}")
            vectors = {role: tensors[f"vector.{index}.{role}"] for role in entry["roles"]}
            concepts.append(Concept(str(entry["name"]), str(entry["word"]), float(entry["score"]), mask, vectors))
        lora = None
        if metadata.get("has_lora"):
            lora = {key[len("lora.") :]: value for key, value in tensors.items() if key.startswith("lora.")}
        return cls(
            concepts=concepts,
            image_size=(height, width),
            anchors=tuple(metadata.get("anchors", ())),
            fingerprint=metadata.get("fingerprint"),
            settings=metadata.get("settings", {}),
            lora=lora,
        )

    def export_embeddings(self, folder: str, prefix: str, *, overwrite: bool = False) -> list[str]:
        """One ComfyUI embedding file per learned token, ``<prefix>_<concept>_<role>.safetensors``, written as
        one (all or none).

        Use them in a stock CLIPTextEncode as ``embedding:<prefix>_<concept>_<role>``.
        """
        payloads = self.embedding_files(folder, prefix)
        if not payloads:
            raise ValueError("No learned vectors to export; run LearnObjectTokens / learn_object_tokens first.")
        return write_files_atomic(payloads, overwrite=overwrite)

    def embedding_files(self, folder: str, prefix: str) -> dict[str, bytes]:
        """``{path: bytes}`` of the embedding files :meth:`export_embeddings` writes (empty without vectors)."""
        from safetensors.torch import save

        prefix = sanitize_name(prefix, what="prefix")
        family = (self.fingerprint or {}).get("family", "")
        key = EMBEDDING_KEYS.get(family, GENERIC_EMBEDDING_KEY)
        files = {}
        for concept in self.concepts:
            for role, vector in concept.vectors.items():
                stem = f"{prefix}_{sanitize_name(concept.name, what='concept name')}_{sanitize_name(role, what='role')}"
                if len((stem + FILE_EXTENSION).encode()) > MAX_FILE_NAME_BYTES:
                    raise ValueError(
                        f"The embedding file name {stem + FILE_EXTENSION!r} is longer than the "
                        f"{MAX_FILE_NAME_BYTES} bytes file systems allow; choose a shorter prefix."
                    )
                files[os.path.join(folder, stem + FILE_EXTENSION)] = save(
                    {key: vector.detach().float().cpu().reshape(1, -1).contiguous()}
                )
        return files

    def lora_bytes(self) -> bytes:
        """The refinement LoRA as a ``.safetensors`` file (kohya key layout, which ComfyUI's LoraLoader reads)."""
        if not self.lora:
            raise ValueError("This concept set has no LoRA; learn intrinsic tokens with refine_steps > 0 first.")
        from safetensors.torch import save

        return save({key: value.detach().cpu().contiguous() for key, value in self.lora.items()})

    def export_lora(self, path: str, *, overwrite: bool = False) -> str:
        """Write the refinement LoRA (kohya key layout, which ComfyUI's LoraLoader reads)."""
        return write_bytes_atomic(path, self.lora_bytes(), overwrite=overwrite)

    def save_with_exports(self, set_path: str, *, embeddings_folder: str | None = None, prefix: str | None = None,
                          lora_path: str | None = None, overwrite: bool = False) -> SavedFiles:
        """Save the set and, when given folders, its embeddings (``prefix`` defaults to the set's file name)
        and its LoRA (if it has one), all as one: every file is written or none is."""
        payloads = {set_path: self.to_bytes()}
        embeddings: list[str] = []
        if embeddings_folder is not None:
            stem = prefix if prefix is not None else os.path.splitext(os.path.basename(set_path))[0]
            exported = self.embedding_files(embeddings_folder, stem)
            embeddings = list(exported)
            payloads.update(exported)
        lora = lora_path if (lora_path is not None and self.lora) else None
        if lora is not None:
            payloads[lora] = self.lora_bytes()
        write_files_atomic(payloads, overwrite=overwrite)
        return SavedFiles(set_path, tuple(embeddings), lora)


# ---------------------------------------------------------------------- helpers
def unique_name(word: str, taken: Iterable[str]) -> str:
    """``word``, or ``word_2``, ``word_3``... if already taken."""
    taken = set(taken)
    base = sanitize_name(word, what="concept word")
    if base not in taken:
        return base
    suffix = 2
    while f"{base}_{suffix}" in taken:
        suffix += 1
    return f"{base}_{suffix}"


def sanitize_name(name: str, *, what: str = "name") -> str:
    """Letters, digits, ``_`` and ``-`` only; ``ValueError`` for an empty name or one with path parts."""
    text = str(name).strip()
    if not text:
        raise ValueError(f"The {what} is empty; type a short name such as 'my_photo'.")
    if "/" in text or "\\" in text or ".." in text:
        raise ValueError(f"The {what} {text!r} contains a path separator or '..'; use a plain name like 'my_photo'.")
    cleaned = _UNSAFE_NAME.sub("_", text).strip("_")
    if not cleaned:
        raise ValueError(f"The {what} {text!r} has no letters or digits; use a plain name like 'my_photo'.")
    if cleaned.lower() in WINDOWS_RESERVED_NAMES:
        raise ValueError(
            f"The {what} {text!r} is a name Windows reserves for devices (files named so cannot be opened there); "
            f"use another, e.g. '{cleaned}_set'."
        )
    return cleaned


def check_mask(mask: torch.Tensor, name: str) -> None:
    """``ValueError`` naming the concept when its mask holds NaN or infinite values or has no pixel above
    the mask threshold (nothing to learn from)."""
    if not bool(torch.isfinite(mask).all()):
        raise ValueError(
            f"The mask of {name!r} contains NaN or infinite values; redraw it or run localization again."
        )
    largest = float(mask.max())
    if largest <= MASK_THRESHOLD:
        state = "is empty" if largest <= 0 else f"has no pixel above {MASK_THRESHOLD} (its largest value is {largest:.3g})"
        raise ValueError(f"The mask of {name!r} {state}, so it marks no object; remove that concept or redraw its mask.")


def text_encoder_fingerprint(text_encoder) -> dict[str, Any]:
    """Width, vocabulary size, family and a hash of the token-embedding matrix (rounded to fp16 first, so
    fp16 and fp32 copies of one model agree)."""
    from .bundle import FAMILY_BY_TEXT_WIDTH

    weight = text_encoder.get_input_embeddings().weight.detach()
    digest = hashlib.sha256(weight.to(torch.float16).cpu().contiguous().numpy().tobytes()).hexdigest()
    width = int(weight.shape[1])
    return {
        "width": width,
        "vocab_size": int(weight.shape[0]),
        "family": FAMILY_BY_TEXT_WIDTH.get(width, "custom"),
        "embedding_sha256": digest[:16],
    }


def describe_fingerprint(fingerprint: dict[str, Any]) -> str:
    names = {"sd1": "an SD 1.x model", "sd2": "an SD 2.x model"}
    family = names.get(fingerprint.get("family"), "a custom model")
    return (
        f"{family} ({fingerprint.get('width')}-d text encoder, {fingerprint.get('vocab_size')} tokens, "
        f"embedding hash {fingerprint.get('embedding_sha256')})"
    )

