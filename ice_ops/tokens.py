"""Placeholder tokens on top of a frozen CLIP tokenizer and text encoder (copy-on-write).

The base tokenizer and text encoder are never modified: no ``add_tokens``, no
``resize_token_embeddings``, no weight writes (ComfyUI shares one CLIP object between nodes).
Each placeholder is its own ``nn.Parameter`` of shape ``[D]``; :meth:`PlaceholderText.encode` feeds the
base encoder a harmless in-vocabulary id at placeholder positions and, through a forward hook on the
input-embedding module that exists only for the duration of the call, replaces those rows with the
placeholder vectors. Gradients therefore reach the placeholder parameters and nothing else.

Placeholder strings look like ``<ice:bust:material>`` (see :func:`placeholder_string`): CLIP's tokenizer
would split them into ``<``, ``ice``, ``:`` ... pieces, so they cannot collide with a real word, and
:meth:`PlaceholderText.tokenize` recognises them in prompt text before the rest is tokenised.
"""
from __future__ import annotations

import contextlib
import re
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

from .text import word_pieces

PLACEHOLDER_PREFIX = "ice"
# A well-formed placeholder string, and anything shaped like one (a typo is reported, not tokenised).
PLACEHOLDER = re.compile(r"<ice:[^<>:]+:[^<>:]+>")
PLACEHOLDER_LIKE = re.compile(r"<ice:[^<>]*>")
# Characters a concept name or role cannot contain (they delimit placeholder strings).
FORBIDDEN_NAME_CHARACTERS = frozenset("<>:")
# The id fed to the base embedding at placeholder positions; any in-vocabulary id works because the
# hook overwrites its row before the transformer sees it.
HIDDEN_ROW_ID = 0


def placeholder_string(concept_name: str, role: str) -> str:
    """The prompt string of one learned token, e.g. ``placeholder_string("bust", "material")`` ->
    ``"<ice:bust:material>"``."""
    for label, value in (("concept name", concept_name), ("role", role)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"A placeholder needs a non-empty {label}; got {value!r}.")
        bad = sorted(FORBIDDEN_NAME_CHARACTERS.intersection(value))
        if bad:
            raise ValueError(
                f"The {label} {value!r} contains {' '.join(bad)}, which delimit placeholder strings; rename it."
            )
    return f"<{PLACEHOLDER_PREFIX}:{concept_name}:{role}>"


class PlaceholderText:
    """Trainable placeholder vectors on top of a frozen tokenizer + ``CLIPTextModel``.

    Trainable state: one ``nn.Parameter`` ``[D]`` per placeholder (dtype ``dtype``, on the text encoder's
    device). Give an optimizer exactly the rows it should move with :meth:`parameters` (``names``
    selects), or use :meth:`trainable` to also switch ``requires_grad`` off for the others so that
    no gradient is even computed for them.
    """

    def __init__(self, tokenizer, text_encoder, *, dtype: torch.dtype = torch.float32):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.dtype = dtype
        embedding = text_encoder.get_input_embeddings()
        self.width = int(embedding.weight.shape[1])
        # First placeholder id: above every id the tokenizer or the embedding table knows.
        self.first_id = max(int(embedding.weight.shape[0]), len(tokenizer))
        self.max_length = int(min(tokenizer.model_max_length, text_encoder.config.max_position_embeddings))
        self._vectors: dict[str, nn.Parameter] = {}

    # ------------------------------------------------------------------ registry
    @property
    def names(self) -> list[str]:
        """Placeholder strings in the order they were added."""
        return list(self._vectors)

    @property
    def device(self) -> torch.device:
        return self.text_encoder.get_input_embeddings().weight.device

    def add(self, name: str, init: torch.Tensor) -> int:
        """Register placeholder ``name`` (a :func:`placeholder_string`) initialised to ``init`` ``[D]``;
        returns its token id."""
        if not isinstance(name, str) or PLACEHOLDER.fullmatch(name) is None:
            raise ValueError(
                f"{name!r} is not a placeholder string; make one with placeholder_string(concept_name, role)."
            )
        if name in self._vectors:
            raise ValueError(f"Placeholder {name!r} was already added; use set_vector to change its value.")
        value = self._checked_vector(name, init)
        self._vectors[name] = nn.Parameter(value.detach().clone().to(self.device, self.dtype))
        return self.first_id + len(self._vectors) - 1

    def token_id(self, name: str) -> int:
        return self.first_id + self._index(name)

    def parameter(self, name: str) -> nn.Parameter:
        self._index(name)
        return self._vectors[name]

    def parameters(self, names: Iterable[str] | None = None) -> list[nn.Parameter]:
        """The parameters of ``names`` (all placeholders when ``None``), for an optimizer."""
        return [self.parameter(n) for n in (self.names if names is None else names)]

    def trainable(self, names: Iterable[str]) -> list[nn.Parameter]:
        """Let exactly ``names`` require gradients (the others are frozen); returns their parameters."""
        chosen = list(names)
        for name in chosen:
            self._index(name)
        for name, parameter in self._vectors.items():
            parameter.requires_grad_(name in chosen)
        return self.parameters(chosen)

    def vector(self, name: str) -> torch.Tensor:
        """A detached copy of the current vector ``[D]``."""
        return self.parameter(name).detach().clone()

    def vectors(self) -> dict[str, torch.Tensor]:
        return {name: self.vector(name) for name in self._vectors}

    @torch.no_grad()
    def set_vector(self, name: str, value: torch.Tensor) -> None:
        """Overwrite a placeholder in place (the Parameter object, and so any optimizer holding it, stays)."""
        self.parameter(name).copy_(self._checked_vector(name, value))

    def word_init(self, word: str) -> torch.Tensor:
        """Mean of the base input embeddings of all BPE pieces of ``word`` ``[D]``."""
        pieces = word_pieces(self.tokenizer, word)
        weight = self.text_encoder.get_input_embeddings().weight
        return weight.detach()[torch.tensor(pieces, device=weight.device)].float().mean(dim=0).to(self.dtype)

    # ------------------------------------------------------------------ text -> ids -> states
    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """Ids ``[B, max_length]``: start token, the prompt's BPE pieces with placeholder strings mapped to
        their ids, end token, then padding exactly as the base tokenizer pads. Text past the length limit
        is cut like the base tokenizer cuts it; ``ValueError`` if a placeholder would be cut."""
        if isinstance(prompts, str):
            raise ValueError("tokenize takes a list of prompts; wrap a single prompt in a list.")
        rows = [self._prompt_ids(prompt) for prompt in prompts]
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def encode(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(last hidden states ``[B, L, D]``, pooled ``[B, D]``) of the base text encoder with placeholder
        rows substituted. ``pooled`` is the final-LN state at the first end-of-text token of each row
        (not at ``argmax(ids)``, which would point at a placeholder)."""
        ids = self._checked_ids(ids)
        is_placeholder = ids >= self.first_id
        base_ids = ids.masked_fill(is_placeholder, HIDDEN_ROW_ID)
        if bool(is_placeholder.any()):
            rows = self._placeholder_rows(ids, is_placeholder)
            with self._substituted_rows(is_placeholder, rows):
                hidden = self.text_encoder(base_ids)[0]
        else:
            hidden = self.text_encoder(base_ids)[0]
        eos = first_end_of_text(ids, self.tokenizer.eos_token_id)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), eos.to(hidden.device)]
        return hidden, pooled

    # ------------------------------------------------------------------ helpers
    def _index(self, name: str) -> int:
        if name not in self._vectors:
            known = ", ".join(self._vectors) or "none yet"
            raise ValueError(f"Unknown placeholder {name!r}; the placeholders are: {known}.")
        return list(self._vectors).index(name)

    def _checked_vector(self, name: str, value: torch.Tensor) -> torch.Tensor:
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != (self.width,):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(
                f"The vector for {name!r} has shape {shape}, but this text encoder needs ({self.width},); "
                "the concept was probably learned with a different model."
            )
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"The vector for {name!r} contains NaN or infinity; learn the concept again.")
        return value.to(self.device, self.dtype)

    def _prompt_ids(self, prompt: str) -> list[int]:
        content: list[int] = []
        placeholder_at: dict[int, str] = {}
        cursor = 0
        for match in PLACEHOLDER_LIKE.finditer(prompt):
            content += self._text_ids(prompt[cursor : match.start()])
            placeholder_at[len(content)] = match.group(0)
            content.append(self.token_id(match.group(0)))
            cursor = match.end()
        content += self._text_ids(prompt[cursor:])
        room = self.max_length - 2  # start and end tokens
        cut = [name for position, name in placeholder_at.items() if position >= room]
        if cut:
            raise ValueError(
                f"The prompt is {len(content)} tokens long but only {room} fit; {', '.join(cut)} would be cut off. "
                "Shorten the prompt or move the placeholders nearer the start."
            )
        tokenizer = self.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        ids = [tokenizer.bos_token_id] + content[:room] + [tokenizer.eos_token_id]
        return ids + [pad] * (self.max_length - len(ids))

    def _text_ids(self, text: str) -> list[int]:
        if not text.strip():
            return []
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _checked_ids(self, ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype != torch.long:
            raise ValueError("encode takes a LongTensor of token ids [batch, length]; make it with tokenize().")
        if ids.shape[1] > self.max_length:
            raise ValueError(f"Token ids are {ids.shape[1]} long; this text encoder reads at most {self.max_length}.")
        last = self.first_id + len(self._vectors)
        if bool((ids < 0).any()) or bool((ids >= last).any()):
            raise ValueError(
                f"Token ids must lie in 0..{last - 1} (base vocabulary plus {len(self._vectors)} placeholders); "
                "make them with this object's tokenize()."
            )
        return ids.to(self.device)

    def _placeholder_rows(self, ids: torch.Tensor, is_placeholder: torch.Tensor) -> torch.Tensor:
        """``[B, L, D]`` holding each placeholder's vector at its positions (rows elsewhere are unused).
        Placeholders absent from ``ids`` are detached, so they get no gradient at all (``grad`` stays None)."""
        used = set(ids[is_placeholder].unique().tolist())
        table = torch.stack(
            [p if self.first_id + i in used else p.detach() for i, p in enumerate(self._vectors.values())]
        )
        return table[(ids - self.first_id).clamp(min=0)]

    @contextlib.contextmanager
    def _substituted_rows(self, where: torch.Tensor, rows: torch.Tensor) -> Iterator[None]:
        """Replace the input-embedding output at ``where`` ``[B, L]`` by ``rows`` ``[B, L, D]`` while inside."""

        def substitute(_module, _inputs, output):
            return torch.where(where.unsqueeze(-1), rows.to(output.dtype), output)

        handle = self.text_encoder.get_input_embeddings().register_forward_hook(substitute)
        try:
            yield
        finally:
            handle.remove()


def first_end_of_text(ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Index of the first end-of-text token in each row ``[B]``; ``ValueError`` for a row without one."""
    is_eos = ids == eos_token_id
    if not bool(is_eos.any(dim=1).all()):
        raise ValueError("Every row of token ids needs an end-of-text token; make the ids with tokenize().")
    return is_eos.int().argmax(dim=1)
