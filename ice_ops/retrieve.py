"""Concept retriever for Stage One: rank a shipped noun vocabulary against the unexplained part of an image.

The reference chains SpLiCE on OpenCLIP ViT-B-32 (sparse decomposition over 15000 LAION words,
downloaded at run time), an OpenCLIP ViT-H-14 re-ranking of the SpLiCE support and an nltk part-of-speech
filter. We replace the chain by one CLIP ranking of a vocabulary that contains only nouns
(``ice_ops/data/nouns.txt``): one model, no sklearn, no nltk, no download. Deliberate differences:

- Candidates are the whole noun vocabulary rather than the SpLiCE support, so no noun filter is needed and
  there is no "fewer than 5 candidates" crash (the reference has one).
- Words are encoded inside the prompt template :data:`DEFAULT_TEMPLATE` ("a photo of a {}.") instead of as
  raw words: prompt templates improve CLIP zero-shot ranking.
- The near-synonym filter compares each candidate with *every* excluded word (all words found so far), not only
  with the previous one; the 0.85 cosine threshold is the reference's and stays configurable.

Weights are never downloaded: ``from_pretrained`` takes an open_clip architecture (a built-in name or the
path of a model-config JSON) and a local ``.safetensors`` file.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .defaults import DEFAULT_TOP_K
from .files import read_safetensors, write_atomic
from .imaging import MASK_THRESHOLD, to_image_tensor

logger = logging.getLogger(__name__)

DEFAULT_VOCABULARY_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "nouns.txt")

# CLIP zero-shot prompt (Radford et al. 2021); the reference encodes raw words (main_stage_one.py:179).
DEFAULT_TEMPLATE = "a photo of a {}."
# Cosine at or above which a word counts as a near-synonym of an excluded word (main_stage_one.py:133-145).
DEFAULT_SYNONYM_THRESHOLD = 0.85

# Architectures whose tokenizer is open_clip's bundled BPE and whose weights the README names; they are also
# the candidates suggested when a weights file does not fit the chosen architecture.
SUPPORTED_ARCHS = ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-H-14")
# Prompts per text-encoder forward pass: bounds activation memory for ViT-H text towers on small GPUs.
TEXT_BATCH_SIZE = 256
# Weights fingerprint for the embedding cache: file size plus a hash of this many bytes at each end.
FINGERPRINT_CHUNK_BYTES = 1 << 20
# Seed of the random initialisation used when no weights file is given (tests only).
RANDOM_INIT_SEED = 0
# A cached word table is trusted only if its first row re-encodes to (almost) the same vector.
CACHE_PROBE_MIN_COSINE = 0.999
CACHE_FORMAT = "ice-word-embeddings-v1"
CACHE_TENSOR_NAME = "word_embeddings"
_WORD_PATTERN = re.compile(r"^[^\W\d_]+$")
_STATE_DICT_PREFIX = "module."


# ----------------------------------------------------------------------------------------------- vocabulary
def load_vocabulary(path_or_words: str | os.PathLike | Sequence[str] | None = None) -> list[str]:
    """Read a vocabulary: a file path (one word per line) or a sequence of words; ``None`` = the shipped nouns.

    Blank lines and ``#`` comments (whole-line or trailing) are skipped; words are lower-cased. Every entry must
    be one word of letters only, and no word may appear twice.
    """
    if path_or_words is None:
        path_or_words = DEFAULT_VOCABULARY_PATH
    if isinstance(path_or_words, (str, os.PathLike)):
        path = os.fspath(path_or_words)
        if not os.path.isfile(path):
            raise ValueError(
                f"Vocabulary file {path!r} not found; pass the path of a text file with one noun per line, "
                "or a list of words, or None for the shipped noun list."
            )
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
        source = path
    else:
        lines = list(path_or_words)
        source = "the word list"
    words = [_strip_comment(line) for line in lines]
    words = [word for word in words if word]
    if not words:
        raise ValueError(
            f"The vocabulary in {source} is empty (only blank lines or comments); add one noun per line."
        )
    bad = [word for word in words if not _WORD_PATTERN.match(word)]
    if bad:
        raise ValueError(
            f"Vocabulary entries must be single words of letters only; {source} has {len(bad)} that are not, "
            f"e.g. {bad[:5]}. Remove spaces, digits and punctuation (write 'teapot', not 'tea pot')."
        )
    duplicates = sorted(word for word, count in Counter(words).items() if count > 1)
    if duplicates:
        raise ValueError(f"The vocabulary in {source} lists these words more than once: {duplicates[:10]}; keep one.")
    return words


def _strip_comment(line: str) -> str:
    if not isinstance(line, str):
        raise ValueError(f"Vocabulary entries must be strings, got {type(line).__name__}.")
    return line.split("#", 1)[0].strip().lower()


def vocabulary_digest(words: Sequence[str]) -> str:
    """sha256 of the vocabulary text (one word per line)."""
    return hashlib.sha256("\n".join(words).encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------------------------- images
def preprocess_image(
    image: torch.Tensor, size: int | Sequence[int], mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """CLIP preprocessing in torch: ``[3, H, W]`` in 0..1 -> normalised ``[1, 3, h, w]``.

    Scale so the image covers ``size`` (the shorter side for a square size; bicubic, antialiased), crop the
    centre, subtract ``mean`` and divide by ``std`` per channel, as open_clip's default transform does.
    """
    target_h, target_w = _pair(size)
    height, width = image.shape[-2:]
    scale = max(target_h / height, target_w / width)
    resized_h = max(target_h, int(height * scale))
    resized_w = max(target_w, int(width * scale))
    pixels = image[None].float()
    if (resized_h, resized_w) != (height, width):
        pixels = F.interpolate(pixels, size=(resized_h, resized_w), mode="bicubic", antialias=True, align_corners=False)
        # Bicubic overshoots at edges; PIL (which the reference uses) stores 8-bit values, which clips likewise.
        pixels = pixels.clamp(0.0, 1.0)
    top = int(round((resized_h - target_h) / 2.0))
    left = int(round((resized_w - target_w) / 2.0))
    pixels = pixels[..., top : top + target_h, left : left + target_w]
    mean_t = torch.tensor(list(mean), dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
    std_t = torch.tensor(list(std), dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
    return (pixels - mean_t) / std_t


def blank_explained(image: torch.Tensor, explained: torch.Tensor | None) -> torch.Tensor:
    """Set pixels whose ``explained`` value exceeds 0.5 to black (the reference multiplies by the indicator)."""
    if explained is None:
        return image
    if explained.ndim == 3 and explained.shape[0] == 1:
        explained = explained[0]
    if explained.ndim != 2 or tuple(explained.shape) != tuple(image.shape[-2:]):
        raise ValueError(
            f"The explained mask has shape {tuple(explained.shape)} but the image is {tuple(image.shape[-2:])} "
            "(H, W); resize the mask to the image first (ice_ops.imaging.resize_mask)."
        )
    keep = explained.to(image.device).float() <= MASK_THRESHOLD
    return image * keep


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


# ----------------------------------------------------------------------------------------------- retriever
def _check_synonym_threshold(value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ValueError(
            f"synonym_threshold is a cosine in (0, 1], got {value!r}; use 1.0 to drop only the "
            f"excluded words themselves, {DEFAULT_SYNONYM_THRESHOLD} (the reference) to also drop near-synonyms."
        )


class ClipRetriever:
    """Rank a noun vocabulary against an image with one open_clip model.

    ``model`` is an open_clip ``CLIP``/``CustomTextCLIP`` (anything with ``encode_image``, ``encode_text`` and
    ``logit_scale``); ``tokenizer`` maps a list of prompts to token ids. ``word_embeddings`` (``[V, D]``) may
    be given to skip text encoding; it is normalised and never cached. ``cache_dir`` enables an on-disk cache
    of the word table keyed by ``model_key`` (which must then identify the weights), the template and the
    vocabulary. Images are moved to the retriever's device, so callers may pass CPU tensors.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        preprocess_size: int | Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        tokenizer: Any,
        vocabulary: Sequence[str],
        *,
        cache_dir: str | None = None,
        model_key: str = "",
        template: str = DEFAULT_TEMPLATE,
        word_embeddings: torch.Tensor | None = None,
        synonym_threshold: float = DEFAULT_SYNONYM_THRESHOLD,
    ) -> None:
        _check_synonym_threshold(synonym_threshold)
        if not isinstance(template, str) or template.count("{}") != 1:
            raise ValueError(
                f"The prompt template must contain '{{}}' exactly once (e.g. {DEFAULT_TEMPLATE!r}), got {template!r}."
            )
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need three values each, std positive; got mean={mean}, std={std}.")
        if cache_dir is not None and not model_key:
            raise ValueError(
                "cache_dir needs a model_key that identifies the model weights; pass one or cache_dir=None."
            )
        self.model = model.eval()
        self.preprocess_size = _pair(preprocess_size)
        self.mean = tuple(float(value) for value in mean)
        self.std = tuple(float(value) for value in std)
        self.tokenizer = tokenizer
        self.vocabulary = load_vocabulary(vocabulary)
        self.cache_dir = cache_dir
        self.model_key = model_key
        self.template = template
        # This model's near-synonym cut, used when a caller gives none: a small CLIP trained on few words may
        # place all of them close together (the Toy World CLIP ships with 1.0, excluding only found words).
        self.synonym_threshold = float(synonym_threshold)
        self._index = {word: position for position, word in enumerate(self.vocabulary)}
        self._word_embeddings: torch.Tensor | None = None
        if word_embeddings is not None:
            if word_embeddings.ndim != 2 or word_embeddings.shape[0] != len(self.vocabulary):
                raise ValueError(
                    f"word_embeddings must be [{len(self.vocabulary)}, D] (one row per vocabulary word), "
                    f"got {tuple(word_embeddings.shape)}."
                )
            self._word_embeddings = F.normalize(word_embeddings.detach().float(), dim=-1).to(self.device)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        arch: str,
        weights: str | os.PathLike | None,
        *,
        vocabulary: str | Sequence[str] | None = None,
        device: str | torch.device = "cpu",
        cache_dir: str | None = None,
        synonym_threshold: float = DEFAULT_SYNONYM_THRESHOLD,
    ) -> "ClipRetriever":
        """Build from an open_clip architecture and a local ``.safetensors`` weights file; never downloads.

        ``arch``: a built-in open_clip name (``ViT-B-32``, ``ViT-B-16``, ``ViT-L-14``, ``ViT-H-14``, their
        ``-quickgelu`` variants, ...) or the path of an open_clip model-config JSON (a bare model config, or an
        ``open_clip_config.json`` with ``model_cfg`` and ``preprocess_cfg``). OpenAI weights (ViT-L/14, the
        SD 1.x text family) need the ``-quickgelu`` variant; OpenCLIP ViT-H-14 laion2b (SD 2.x) uses ``ViT-H-14``.
        Built-in names use open_clip's default (OpenAI) mean/std; weights trained with others need a JSON with
        a ``preprocess_cfg``. ``weights=None`` gives a seeded random initialisation: for tests only.
        """
        import open_clip  # imported here: it takes seconds and only model construction needs it
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        name, model_cfg, preprocess_cfg, config_text = _resolve_arch(arch)
        _check_supported(name, model_cfg)
        model_class, model_kwargs = _model_class_and_kwargs(model_cfg)
        if weights is None:
            logger.warning("ClipRetriever %s: no weights file given, using random weights (tests only).", name)
            state = None
            weights_key = f"random-init-seed{RANDOM_INIT_SEED}"
        else:
            weights = os.fspath(weights)
            state = _load_matching_state(weights, name, model_class, model_kwargs)
            weights_key = weights_fingerprint(weights)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = model_class(**model_kwargs)
        if state is not None:
            model.load_state_dict(state, strict=True)
        model.requires_grad_(False)
        tokenizer = _build_tokenizer(name, model_cfg, builtin=config_text is None)
        vision_cfg = model_cfg["vision_cfg"]
        mean = preprocess_cfg.get("mean", OPENAI_DATASET_MEAN)
        std = preprocess_cfg.get("std", OPENAI_DATASET_STD)
        config_digest = hashlib.sha256((config_text or json.dumps(model_cfg, sort_keys=True)).encode()).hexdigest()
        model_key = f"{name}:{config_digest[:16]}:{weights_key}"
        retriever = cls(
            model,
            vision_cfg.get("image_size", open_clip.model.CLIPVisionCfg.image_size),
            mean,
            std,
            tokenizer,
            load_vocabulary(vocabulary),
            cache_dir=cache_dir,
            model_key=model_key,
            synonym_threshold=synonym_threshold,
        )
        return retriever.to(device)

    # ------------------------------------------------------------------ device
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def logit_scale(self) -> float:
        """CLIP's learned temperature ``exp(logit_scale)`` (100 for trained OpenCLIP/OpenAI models)."""
        return float(self.model.logit_scale.detach().exp().reshape(-1)[0])

    def to(self, device: str | torch.device) -> "ClipRetriever":
        """Move the model (and the word table) to ``device``; returns ``self``."""
        self.model.to(device)
        if self._word_embeddings is not None:
            self._word_embeddings = self._word_embeddings.to(self.device)
        return self

    # ------------------------------------------------------------------ embeddings
    def word_embeddings(self) -> torch.Tensor:
        """L2-normalised ``[V, D]`` text embeddings of the vocabulary (template applied), cached."""
        if self._word_embeddings is None:
            table = self._load_cached_table()
            if table is None:
                table = self._encode_words(self.vocabulary)
                self._save_cached_table(table)
            self._word_embeddings = table.to(self.device)
        return self._word_embeddings

    def _embed_image(self, image: torch.Tensor) -> torch.Tensor:
        """Seam: embed an image that is already validated, blanked and on the right device."""
        pixels = preprocess_image(image, self.preprocess_size, self.mean, self.std)
        dtype = next(self.model.parameters()).dtype
        with torch.inference_mode():
            features = self.model.encode_image(pixels.to(dtype))
        return F.normalize(features.float(), dim=-1)[0]

    def _encode_words(self, words: Sequence[str]) -> torch.Tensor:
        prompts = [self.template.format(word) for word in words]
        batches = [
            self._encode_texts(prompts[start : start + TEXT_BATCH_SIZE])
            for start in range(0, len(prompts), TEXT_BATCH_SIZE)
        ]
        return torch.cat(batches)

    def _encode_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Seam: L2-normalised text embeddings ``[len(prompts), D]``."""
        tokens = self.tokenizer(list(prompts)).to(self.device)
        with torch.inference_mode():
            features = self.model.encode_text(tokens)
        return F.normalize(features.float(), dim=-1)

    # ------------------------------------------------------------------ ranking
    def rank(
        self,
        image: torch.Tensor,
        *,
        explained: torch.Tensor | None = None,
        exclude: Sequence[str] = (),
        top_k: int = DEFAULT_TOP_K,
        synonym_threshold: float | None = None,
    ) -> list[tuple[str, float]]:
        """Return up to ``top_k`` ``(word, probability)`` pairs for the still-unexplained part of ``image``.

        Pixels where ``explained`` (``[H, W]``, 0..1) exceeds 0.5 are blanked before encoding. Words in
        ``exclude`` (matched ignoring case; blank entries ignored; words outside the vocabulary are encoded with
        the template), and every vocabulary word whose embedding has cosine >= ``synonym_threshold`` with one of
        them, are removed (``None``: the retriever's own ``synonym_threshold``). Probabilities are a softmax of ``logit_scale * cosine`` over the remaining words,
        so the returned scores sum to at most 1; fewer than ``top_k`` pairs come back only when fewer words remain.
        ``image`` is ``[3, H, W]`` in 0..1 (or anything :func:`ice_ops.imaging.to_image_tensor` accepts); it and
        ``explained`` are moved to the retriever's device, so CPU tensors are fine for a GPU retriever.
        """
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a whole number >= 1, got {top_k!r}.")
        if isinstance(exclude, str):
            exclude = [exclude]
        synonym_threshold = self._threshold(synonym_threshold)
        pixels = blank_explained(to_image_tensor(image).to(self.device), explained)
        if not bool((pixels > 0).any()):
            raise ValueError(
                "Nothing left to explain: the image is black everywhere once the explained regions are removed. "
                "Stop the search here, or pass a smaller explained mask."
            )
        table = self.word_embeddings()
        candidates = ~self._excluded_rows(exclude, synonym_threshold)
        if not bool(candidates.any()):
            raise ValueError(
                f"Every vocabulary word is excluded ({len(list(exclude))} excluded words, synonym threshold "
                f"{synonym_threshold}); raise synonym_threshold, exclude fewer words or use a larger vocabulary."
            )
        image_vector = self._embed_image(pixels).to(table.device)
        positions = torch.nonzero(candidates).flatten()
        logits = self.logit_scale * (table[positions] @ image_vector)
        probabilities = torch.softmax(logits, dim=0)
        best = torch.topk(probabilities, k=min(top_k, len(positions)))
        return [
            (self.vocabulary[int(positions[index])], float(score))
            for score, index in zip(best.values.tolist(), best.indices.tolist())
        ]

    def remaining_words(self, exclude: Sequence[str] = (), synonym_threshold: float | None = None) -> int:
        """How many vocabulary words :meth:`rank` could still return with these exclusions."""
        if isinstance(exclude, str):
            exclude = [exclude]
        return int((~self._excluded_rows(exclude, self._threshold(synonym_threshold))).sum())

    def _threshold(self, given: float | None) -> float:
        if given is None:
            return self.synonym_threshold
        _check_synonym_threshold(given)
        return float(given)

    def _excluded_rows(self, exclude: Sequence[str], threshold: float) -> torch.Tensor:
        """Boolean ``[V]``: excluded words and their near-synonyms (cosine >= threshold with any of them)."""
        table = self.word_embeddings()
        removed = torch.zeros(len(self.vocabulary), dtype=torch.bool, device=table.device)
        if any(not isinstance(word, str) for word in exclude):
            raise ValueError(f"exclude must be a list of words (strings), got {list(exclude)!r}.")
        words = list(dict.fromkeys(word.strip().lower() for word in exclude if word.strip()))
        if not words:
            return removed
        known = [word for word in words if word in self._index]
        unknown = [word for word in words if word not in self._index]
        vectors = []
        if known:
            rows = torch.tensor([self._index[word] for word in known], device=table.device)
            removed[rows] = True
            vectors.append(table[rows])
        if unknown:
            vectors.append(self._encode_words(unknown).to(table.device))
        similarity = table @ torch.cat(vectors).T
        return removed | (similarity.max(dim=1).values >= threshold)

    # ------------------------------------------------------------------ cache
    def cache_path(self) -> str | None:
        """File holding this retriever's word table, or ``None`` when caching is off."""
        if self.cache_dir is None:
            return None
        key = "\n".join((self.model_key, self.template, "\n".join(self.vocabulary)))
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]
        return os.path.join(self.cache_dir, f"ice_words_{digest}.safetensors")

    def _cache_metadata(self) -> dict[str, str]:
        return {
            "format": CACHE_FORMAT,
            "model_key": self.model_key,
            "template": self.template,
            "vocabulary_sha256": vocabulary_digest(self.vocabulary),
        }

    def _load_cached_table(self) -> torch.Tensor | None:
        path = self.cache_path()
        if path is None or not os.path.isfile(path):
            return None
        try:
            with safe_open(path, framework="pt") as handle:
                metadata = handle.metadata() or {}
                table = handle.get_tensor(CACHE_TENSOR_NAME).float()
        except (OSError, SafetensorError, KeyError) as error:
            logger.warning("Ignoring unreadable word-embedding cache %s (%s); recomputing.", path, error)
            return None
        if metadata != self._cache_metadata() or not self._table_is_current(table):
            logger.warning("Word-embedding cache %s does not match this model and vocabulary; recomputing.", path)
            return None
        return table

    def _table_is_current(self, table: torch.Tensor) -> bool:
        """Shape, finiteness, and a re-encoded first word that agrees with the cached row."""
        probe = self._encode_words(self.vocabulary[:1])[0].cpu()
        if table.ndim != 2 or tuple(table.shape) != (len(self.vocabulary), probe.shape[0]):
            return False
        if not bool(torch.isfinite(table).all()):
            return False
        return float(F.cosine_similarity(table[0], probe, dim=0)) >= CACHE_PROBE_MIN_COSINE

    def _save_cached_table(self, table: torch.Tensor) -> None:
        path = self.cache_path()
        if path is None:
            return
        tensors = {CACHE_TENSOR_NAME: table.detach().float().cpu().contiguous()}
        try:
            write_atomic(path, lambda temporary: save_file(tensors, temporary, metadata=self._cache_metadata()),
                         overwrite=True)
        except OSError as error:
            logger.warning("Cannot write the word-embedding cache in %s (%s); going on without it.",
                           self.cache_dir, error)


# ----------------------------------------------------------------------------------------------- loading helpers
def weights_fingerprint(path: str) -> str:
    """Cheap identity of a weights file: size plus sha256 of its first and last MiB."""
    size = os.path.getsize(path)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        digest.update(handle.read(FINGERPRINT_CHUNK_BYTES))
        handle.seek(max(0, size - FINGERPRINT_CHUNK_BYTES))
        digest.update(handle.read(FINGERPRINT_CHUNK_BYTES))
    return f"{size}:{digest.hexdigest()[:32]}"


def _resolve_arch(arch: str) -> tuple[str, dict, dict, str | None]:
    """-> (name, model config, preprocess config, JSON text or None for a built-in name)."""
    import open_clip

    if not isinstance(arch, str) or not arch:
        raise ValueError(f"arch must be an open_clip model name such as {SUPPORTED_ARCHS} or a config JSON path.")
    if arch.lower().endswith(".json") or os.path.isfile(arch):
        if not os.path.isfile(arch):
            raise ValueError(f"open_clip model config {arch!r} not found; check the path.")
        with open(arch, encoding="utf-8") as handle:
            text = handle.read()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{arch!r} is not valid JSON ({error}); give an open_clip model config.") from error
        model_cfg = data.get("model_cfg", data) if isinstance(data, dict) else None
        required = ("embed_dim", "vision_cfg", "text_cfg")
        if not isinstance(model_cfg, dict) or not all(key in model_cfg for key in required):
            raise ValueError(
                f"{arch!r} is not an open_clip model config: it needs 'embed_dim', 'vision_cfg' and 'text_cfg' "
                "(like the files in open_clip/model_configs, or an open_clip_config.json)."
            )
        preprocess_cfg = data.get("preprocess_cfg", model_cfg.get("preprocess_cfg", {}))
        model_cfg = {key: value for key, value in model_cfg.items() if key != "preprocess_cfg"}
        return os.path.splitext(os.path.basename(arch))[0], model_cfg, dict(preprocess_cfg), text
    if arch.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(
            f"{arch!r}: hub or folder schemas are not supported; give a built-in name or a config JSON path."
        )
    model_cfg = open_clip.get_model_config(arch)
    if model_cfg is None:
        raise ValueError(
            f"Unknown open_clip architecture {arch!r}; use one of {SUPPORTED_ARCHS} (or another name from "
            "open_clip.list_models()), or the path of an open_clip model-config JSON."
        )
    return arch, model_cfg, {}, None


def _check_supported(name: str, model_cfg: dict) -> None:
    text_cfg = model_cfg.get("text_cfg", {})
    vision_cfg = model_cfg.get("vision_cfg", {})
    reason = None
    if text_cfg.get("hf_tokenizer_name") or text_cfg.get("hf_model_name") or "siglip" in name.lower():
        reason = "its tokenizer or text tower comes from the Hugging Face hub"
    elif "timm_model_name" in vision_cfg:
        reason = "its image tower is a timm model"
    elif "multimodal_cfg" in model_cfg:
        reason = "it is a captioning (CoCa) model"
    elif model_cfg.get("init_logit_bias") is not None:
        reason = "it is trained with a sigmoid loss (SigLIP), not a softmax over words"
    if reason:
        raise ValueError(
            f"open_clip architecture {name!r} is not supported because {reason}; use one of {SUPPORTED_ARCHS} "
            "or a config JSON with open_clip's own ViT/ResNet towers and BPE tokenizer."
        )


def _model_class_and_kwargs(model_cfg: dict) -> tuple[type, dict]:
    import open_clip

    kwargs = json.loads(json.dumps(model_cfg))
    custom_text = kwargs.pop("custom_text", False)
    return (open_clip.CustomTextCLIP if custom_text else open_clip.CLIP), kwargs


def _build_tokenizer(name: str, model_cfg: dict, *, builtin: bool):
    """open_clip's BPE tokenizer (bundled vocabulary file, no hub access)."""
    import open_clip

    if builtin:
        return open_clip.get_tokenizer(name)
    text_cfg = model_cfg["text_cfg"]
    return open_clip.SimpleTokenizer(
        context_length=text_cfg.get("context_length", open_clip.tokenizer.DEFAULT_CONTEXT_LENGTH),
        **text_cfg.get("tokenizer_kwargs", {}),
    )


def _load_matching_state(path: str, name: str, model_class: type, model_kwargs: dict) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` state dict after checking its keys and shapes against the architecture."""
    if not os.path.isfile(path):
        raise ValueError(f"Weights file {path!r} not found; put the open_clip .safetensors file there or fix the path.")
    if not path.lower().endswith(".safetensors"):
        raise ValueError(
            f"Only .safetensors weights are loaded ({path!r} is not); convert it once, e.g. "
            "safetensors.torch.save_file(torch.load(path, weights_only=True), 'model.safetensors') on a file you trust."
        )
    try:
        with safe_open(path, framework="pt") as handle:
            file_shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except SafetensorError as error:
        raise ValueError(
            f"Cannot read {path!r} as safetensors ({error}); the file is damaged or not a safetensors file."
        ) from error
    prefix = _common_prefix(file_shapes)
    file_shapes = {key[len(prefix) :]: shape for key, shape in file_shapes.items()}
    problems = _state_mismatch(file_shapes, _expected_shapes(model_class, model_kwargs))
    if problems:
        raise ValueError(
            f"The weights in {path!r} do not fit the open_clip architecture {name!r}: {problems}. "
            f"Pick the architecture these weights were trained with{_suggest_archs(file_shapes)}."
        )
    return {key[len(prefix) :]: tensor for key, tensor in read_safetensors(path, "retriever's weights file").items()}


def _common_prefix(shapes: dict[str, tuple]) -> str:
    if shapes and all(key.startswith(_STATE_DICT_PREFIX) for key in shapes):
        return _STATE_DICT_PREFIX
    return ""


def _expected_shapes(model_class: type, model_kwargs: dict) -> dict[str, tuple]:
    with torch.device("meta"):
        model = model_class(**model_kwargs)
    return {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}


def _state_mismatch(found: dict[str, tuple], expected: dict[str, tuple]) -> str:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    reshaped = sorted(key for key in set(found) & set(expected) if found[key] != expected[key])
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing tensors (e.g. {missing[:3]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[:3]})")
    if reshaped:
        key = reshaped[0]
        parts.append(
            f"{len(reshaped)} tensors of another shape (e.g. {key}: file {list(found[key])}, "
            f"model {list(expected[key])})"
        )
    return "; ".join(parts)


def _suggest_archs(file_shapes: dict[str, tuple]) -> str:
    import open_clip

    fitting = []
    for arch in SUPPORTED_ARCHS:
        model_class, kwargs = _model_class_and_kwargs(open_clip.get_model_config(arch))
        if not _state_mismatch(file_shapes, _expected_shapes(model_class, kwargs)):
            fitting.append(arch)
    if fitting:
        return f"; they fit {' or '.join(fitting)}"
    return f" (they fit none of {', '.join(SUPPORTED_ARCHS)}; for a custom model give its open_clip config JSON)"
