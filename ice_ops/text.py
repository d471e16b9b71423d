"""Text helpers: a CLIP BPE tokenizer built from files that ship with open_clip, and word-to-token maps.

Nothing here downloads. The CLIP byte-pair vocabulary is reconstructed from open_clip's
``bpe_simple_vocab_16e6.txt.gz`` exactly as OpenAI's CLIP builds it, so single-file checkpoints (which
carry no tokenizer) get the same 49408-token vocabulary their text encoders were trained with.
"""
from __future__ import annotations

import functools
import gzip
import os
from typing import Sequence

# CLIP's BPE file holds 48894 merges after its header line; with 512 byte symbols and 2 specials that
# makes the 49408-token vocabulary of every SD 1.x / 2.x text encoder.
CLIP_MERGE_COUNT = 49152 - 256 - 2
START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def open_clip_bpe_path() -> str:
    import open_clip

    path = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    if not os.path.isfile(path):
        raise ValueError(
            f"open_clip's BPE vocabulary file is missing at {path}; reinstall open_clip_torch "
            "(pip install --force-reinstall open_clip_torch)."
        )
    return path


@functools.lru_cache(maxsize=1)
def clip_vocabulary() -> tuple[dict[str, int], tuple[str, ...]]:
    """(token -> id, merges) of the CLIP BPE tokenizer, built from open_clip's shipped file."""
    with gzip.open(open_clip_bpe_path(), "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = tuple(lines[1 : CLIP_MERGE_COUNT + 1])
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += [START_OF_TEXT, END_OF_TEXT]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def build_clip_tokenizer(pad_token: str = END_OF_TEXT, model_max_length: int = 77):
    """A transformers ``CLIPTokenizer`` equal to the one shipped with SD 1.x (pad ``<|endoftext|>``)
    or SD 2.x (pad ``!``), made without any download."""
    from transformers import CLIPTokenizer

    vocab_file, merges_file = _clip_vocabulary_files()
    # Positional file paths: the one form transformers 4.x and 5.x both accept.
    return CLIPTokenizer(vocab_file, merges_file, pad_token=pad_token, model_max_length=model_max_length)


@functools.lru_cache(maxsize=1)
def _clip_vocabulary_files() -> tuple[str, str]:
    """vocab.json and merges.txt in a private temporary folder (removed at interpreter exit)."""
    import atexit
    import json
    import shutil
    import tempfile

    vocab, merges = clip_vocabulary()
    folder = tempfile.mkdtemp(prefix="ice_clip_vocab_")
    atexit.register(shutil.rmtree, folder, True)
    vocab_file = os.path.join(folder, "vocab.json")
    merges_file = os.path.join(folder, "merges.txt")
    with open(vocab_file, "w", encoding="utf-8") as handle:
        json.dump(vocab, handle, ensure_ascii=False)
    with open(merges_file, "w", encoding="utf-8") as handle:
        handle.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab_file, merges_file


def word_pieces(tokenizer, word: str) -> list[int]:
    """BPE ids of one word, without start/end tokens; ``ValueError`` if it tokenises to nothing."""
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(
            f"The word {word!r} tokenises to nothing; use a word made of letters, such as 'cup' or 'vase'."
        )
    return list(ids)


def word_token_positions(tokenizer, words: Sequence[str]) -> list[list[int]]:
    """Token positions of each word in the prompt ``" ".join(words)`` as the tokenizer encodes it
    (position 0 is the start token). A word of several BPE pieces gets all of its positions."""
    positions: list[list[int]] = []
    cursor = 1
    for word in words:
        count = len(word_pieces(tokenizer, word))
        positions.append(list(range(cursor, cursor + count)))
        cursor += count
    full = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]
    if len(full) != cursor - 1:
        raise ValueError(
            f"The words {list(words)!r} tokenise differently together than apart; "
            "use single plain words separated by spaces."
        )
    return positions
