"""ClipRetriever: ranking, exclusion, blanking, loading open_clip weights, the embedding cache, the vocabulary."""
from __future__ import annotations

import json
import math
import os
import re
import socket

import open_clip
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ice_ops.retrieve import (
    DEFAULT_VOCABULARY_PATH,
    SUPPORTED_ARCHS,
    ClipRetriever,
    _build_tokenizer,
    _check_supported,
    load_vocabulary,
    preprocess_image,
)
from devtools.random_models import TINY_OPEN_CLIP_CONFIG

TINY_CONFIG = TINY_OPEN_CLIP_CONFIG
WORDS = ["cat", "kitten", "lion", "car", "vase", "bust"]


@pytest.fixture(scope="module")
def tiny():
    """Tiny random open_clip retriever (32-d, 32 px) over WORDS; read-only."""
    return ClipRetriever.from_pretrained(TINY_CONFIG, None, vocabulary=WORDS)


def unit(*coordinates: float, dim: int = 32) -> torch.Tensor:
    vector = torch.zeros(dim)
    vector[: len(coordinates)] = torch.tensor(coordinates)
    return vector / vector.norm()


def controlled(tiny: ClipRetriever, words: list[str], table: torch.Tensor, image_vector: torch.Tensor, seen=None):
    """A retriever on the tiny model whose word table and image embedding the test chooses."""
    retriever = ClipRetriever(
        tiny.model, tiny.preprocess_size, tiny.mean, tiny.std, tiny.tokenizer, words, word_embeddings=table
    )

    def fake_embed(image: torch.Tensor) -> torch.Tensor:
        if seen is not None:
            seen.append(image.clone())
        return image_vector

    retriever._embed_image = fake_embed
    return retriever


def with_cosine(cosine: float, axis: int) -> torch.Tensor:
    """Unit vector whose cosine with unit(1) (the first axis) is exactly ``cosine``."""
    return unit(cosine, *([0.0] * (axis - 1)), math.sqrt(1 - cosine**2))


def random_image(height: int = 40, width: int = 56, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return 0.1 + 0.9 * torch.rand(3, height, width, generator=generator)


# ------------------------------------------------------------------------------------------------ ranking
def test_rank_orders_by_cosine_and_scores_are_softmax_probabilities(tiny):
    words = ["a", "b", "c", "d"]
    cosines = [0.2, 0.9, -0.3, 0.5]
    table = torch.stack([with_cosine(value, axis=index + 1) for index, value in enumerate(cosines)])
    retriever = controlled(tiny, words, table, unit(1.0))

    ranked = retriever.rank(random_image(), top_k=4)

    assert [word for word, _ in ranked] == ["b", "d", "a", "c"]
    expected = torch.softmax(retriever.logit_scale * torch.tensor(cosines), dim=0)
    scores = dict(ranked)
    for index, word in enumerate(words):
        assert scores[word] == pytest.approx(float(expected[index]), rel=1e-5)
    assert sum(scores.values()) == pytest.approx(1.0, abs=1e-5)
    top_two = retriever.rank(random_image(), top_k=2)
    assert [word for word, _ in top_two] == ["b", "d"]
    assert top_two[0][1] == pytest.approx(scores["b"], rel=1e-5)


def test_logit_scale_comes_from_the_model(tiny):
    assert tiny.logit_scale == pytest.approx(float(tiny.model.logit_scale.detach().exp()))
    assert tiny.logit_scale == pytest.approx(1 / 0.07, rel=1e-5)  # open_clip's initial temperature


def test_top_k_larger_than_candidates_returns_all_remaining(tiny):
    table = torch.stack([unit(1.0), unit(0.0, 1.0)])
    ranked = controlled(tiny, ["a", "b"], table, unit(1.0)).rank(random_image(), top_k=5)
    assert [word for word, _ in ranked] == ["a", "b"]


@pytest.mark.parametrize("top_k", [0, -1, 1.5])
def test_bad_top_k_is_refused(tiny, top_k):
    with pytest.raises(ValueError, match="top_k"):
        tiny.rank(random_image(), top_k=top_k)


# ------------------------------------------------------------------------------------------------ exclusion
def synonym_table() -> tuple[list[str], torch.Tensor]:
    words = ["cat", "kitten", "lion", "car"]
    table = torch.stack([unit(1.0), with_cosine(0.90, axis=1), with_cosine(0.84, axis=2), unit(0.0, 0.0, 0.0, 1.0)])
    return words, table


def test_excluded_word_and_near_synonyms_are_removed(tiny):
    words, table = synonym_table()
    retriever = controlled(tiny, words, table, unit(1.0, 0.0, 0.0, 0.2))

    kept = [word for word, _ in retriever.rank(random_image(), exclude=["cat"], top_k=10)]
    assert kept == ["lion", "car"]  # kitten (cos 0.90 >= 0.85) goes, lion (0.84) stays

    stricter = [word for word, _ in retriever.rank(random_image(), exclude=["cat"], top_k=10, synonym_threshold=0.8)]
    assert stricter == ["car"]

    only_exact = [word for word, _ in retriever.rank(random_image(), exclude=["Cat "], top_k=10, synonym_threshold=1.0)]
    assert only_exact == ["kitten", "lion", "car"]


def test_probabilities_are_over_the_remaining_candidates(tiny):
    words, table = synonym_table()
    retriever = controlled(tiny, words, table, unit(1.0, 0.0, 0.0, 0.2))
    ranked = retriever.rank(random_image(), exclude=["cat"], top_k=10)
    assert sum(score for _, score in ranked) == pytest.approx(1.0, abs=1e-5)


def test_every_excluded_word_counts_not_only_the_last(tiny):
    words, table = synonym_table()
    retriever = controlled(tiny, words, table, unit(1.0))
    kept = [word for word, _ in retriever.rank(random_image(), exclude=["cat", "car"], top_k=10)]
    assert kept == ["lion"]  # kitten is a near-synonym of "cat", which was not the last word excluded


def test_excluded_word_outside_the_vocabulary_is_encoded_with_the_template(tiny, monkeypatch):
    words, table = synonym_table()
    retriever = controlled(tiny, words, table, unit(1.0))
    prompts_seen = []

    def fake_texts(prompts):
        prompts_seen.extend(prompts)
        return torch.stack([unit(1.0)] * len(prompts))  # "feline" embeds like "cat"

    monkeypatch.setattr(retriever, "_encode_texts", fake_texts)
    kept = [word for word, _ in retriever.rank(random_image(), exclude=["feline"], top_k=10)]
    assert prompts_seen == ["a photo of a feline."]
    assert kept == ["lion", "car"]


def test_everything_excluded_is_an_error(tiny):
    words, table = synonym_table()
    retriever = controlled(tiny, words, table, unit(1.0))
    with pytest.raises(ValueError, match="excluded"):
        retriever.rank(random_image(), exclude=words)


def test_bad_synonym_threshold_is_refused(tiny):
    with pytest.raises(ValueError, match="synonym_threshold"):
        tiny.rank(random_image(), synonym_threshold=1.5)
    with pytest.raises(ValueError, match="synonym_threshold"):
        ClipRetriever.from_pretrained(TINY_CONFIG, None, vocabulary=WORDS, synonym_threshold=0.0)


def test_a_retriever_built_with_its_own_synonym_threshold_uses_it_unless_told_otherwise(tiny):
    words, table = synonym_table()
    retriever = ClipRetriever(
        tiny.model, tiny.preprocess_size, tiny.mean, tiny.std, tiny.tokenizer, words, word_embeddings=table,
        synonym_threshold=1.0,
    )
    retriever._embed_image = lambda image: unit(1.0, 0.0, 0.0, 0.2)
    assert [w for w, _ in retriever.rank(random_image(), exclude=["cat"], top_k=10)] == ["kitten", "lion", "car"]
    assert retriever.remaining_words(["cat"]) == 3
    assert [w for w, _ in retriever.rank(random_image(), exclude=["cat"], top_k=10, synonym_threshold=0.85)] == [
        "lion", "car"]
    assert retriever.remaining_words(["cat"], synonym_threshold=0.85) == 2


# ------------------------------------------------------------------------------------------------ blanking
def test_explained_pixels_are_blanked_before_encoding(tiny):
    seen = []
    table = torch.stack([unit(1.0), unit(0.0, 1.0)])
    retriever = controlled(tiny, ["a", "b"], table, unit(1.0), seen)
    image = random_image()
    explained = torch.zeros(image.shape[-2:])
    explained[:, :20] = 1.0
    explained[5, 30] = 0.5  # not more than half explained: stays
    explained[6, 30] = 0.6

    retriever.rank(image, explained=explained)

    (encoded,) = seen
    blanked = explained > 0.5
    assert torch.all(encoded[:, blanked] == 0)
    assert torch.equal(encoded[:, ~blanked], image[:, ~blanked])


def test_fully_explained_or_black_image_is_an_error(tiny):
    image = random_image()
    with pytest.raises(ValueError, match="Nothing left to explain"):
        tiny.rank(image, explained=torch.ones(image.shape[-2:]))
    with pytest.raises(ValueError, match="Nothing left to explain"):
        tiny.rank(torch.zeros(3, 16, 16))


def test_explained_mask_of_another_size_is_refused(tiny):
    with pytest.raises(ValueError, match="resize the mask"):
        tiny.rank(random_image(40, 56), explained=torch.zeros(20, 28))


# ------------------------------------------------------------------------------------------------ preprocessing
def test_preprocess_normalises_with_mean_and_std():
    mean, std = (0.5, 0.4, 0.3), (0.25, 0.5, 0.125)
    pixels = preprocess_image(torch.full((3, 50, 70), 0.75), 32, mean, std)
    assert pixels.shape == (1, 3, 32, 32)
    for channel in range(3):
        assert torch.allclose(pixels[0, channel], torch.tensor((0.75 - mean[channel]) / std[channel]), atol=1e-5)


def test_preprocess_resizes_the_shorter_side_and_crops_the_centre():
    image = torch.zeros(3, 40, 160)
    image[0, :, :50] = 1.0  # red on the left
    image[2, :, 110:] = 1.0  # blue on the right; columns 50..110 are black
    pixels = preprocess_image(image, 32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))[0]
    assert pixels.shape == (3, 32, 32)
    # 40x160 -> 32x128, centre crop keeps columns 48..80 of the resized image = 60..100 of the original
    assert float(pixels.abs().max()) < 0.05


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_image_is_moved_to_the_retrievers_device():
    retriever = ClipRetriever.from_pretrained(TINY_CONFIG, None, vocabulary=WORDS)
    image = random_image()
    on_cpu = retriever.rank(image, top_k=3)
    retriever.to("cuda")
    on_gpu = retriever.rank(image, explained=torch.zeros(image.shape[-2:]), top_k=3)
    assert [word for word, _ in on_gpu] == [word for word, _ in on_cpu]


# ------------------------------------------------------------------------------------------------ loading
def test_random_init_builds_and_ranks_the_vocabulary(tiny):
    ranked = tiny.rank(random_image(), top_k=3)
    assert len(ranked) == 3
    assert all(word in WORDS for word, _ in ranked)
    scores = [score for _, score in ranked]
    assert scores == sorted(scores, reverse=True)
    assert all(0.0 < score < 1.0 for score in scores)
    assert tiny.word_embeddings().shape == (len(WORDS), 32)
    assert torch.allclose(tiny.word_embeddings().norm(dim=-1), torch.ones(len(WORDS)), atol=1e-5)
    assert tiny.preprocess_size == (32, 32)


def trained_weights(tiny: ClipRetriever, path: str) -> dict[str, torch.Tensor]:
    """Save the tiny model's weights, perturbed so they differ from the seeded random initialisation."""
    generator = torch.Generator().manual_seed(1)
    state = {
        key: (value + 0.05 * torch.randn(value.shape, generator=generator)).contiguous()
        for key, value in tiny.model.state_dict().items()
    }
    save_file(state, path)
    return state


def test_safetensors_weights_load_and_give_the_same_embeddings(tiny, tmp_path):
    path = str(tmp_path / "tiny.safetensors")
    state = trained_weights(tiny, path)
    loaded = ClipRetriever.from_pretrained(TINY_CONFIG, path, vocabulary=WORDS)
    reference_model = open_clip.CLIP(**_tiny_kwargs())
    reference_model.load_state_dict(state)
    reference = ClipRetriever(reference_model, tiny.preprocess_size, tiny.mean, tiny.std, tiny.tokenizer, WORDS)

    assert torch.allclose(loaded.word_embeddings(), reference.word_embeddings(), atol=1e-6)
    image = random_image()
    ranked, expected = loaded.rank(image, top_k=len(WORDS)), reference.rank(image, top_k=len(WORDS))
    assert [word for word, _ in ranked] == [word for word, _ in expected]
    assert [score for _, score in ranked] == pytest.approx([score for _, score in expected], abs=1e-6)
    assert not torch.allclose(loaded.word_embeddings(), tiny.word_embeddings(), atol=1e-3)


def _tiny_kwargs() -> dict:
    with open(TINY_CONFIG) as handle:
        return json.load(handle)


def test_pickle_weights_are_refused(tmp_path):
    path = tmp_path / "tiny.bin"
    path.write_bytes(b"not really a checkpoint")
    with pytest.raises(ValueError, match="convert"):
        ClipRetriever.from_pretrained(TINY_CONFIG, str(path), vocabulary=WORDS)


def test_weights_of_another_architecture_are_refused(tiny, tmp_path):
    path = str(tmp_path / "tiny.safetensors")
    trained_weights(tiny, path)
    with pytest.raises(ValueError, match="ViT-B-32"):
        ClipRetriever.from_pretrained("ViT-B-32", path, vocabulary=WORDS)

    wider = tmp_path / "wider.json"
    wider.write_text(open(TINY_CONFIG).read().replace('"embed_dim": 32', '"embed_dim": 48'))
    with pytest.raises(ValueError, match="'wider'"):
        ClipRetriever.from_pretrained(str(wider), path, vocabulary=WORDS)


def test_unknown_architecture_and_missing_weights_are_refused(tmp_path):
    with pytest.raises(ValueError, match="Unknown open_clip architecture"):
        ClipRetriever.from_pretrained("ViT-Q-99", None, vocabulary=WORDS)
    with pytest.raises(ValueError, match="not found"):
        ClipRetriever.from_pretrained(TINY_CONFIG, str(tmp_path / "absent.safetensors"), vocabulary=WORDS)


def test_hub_tokenizer_architectures_are_refused(tmp_path):
    config = tmp_path / "hf_text.json"
    hub_text = '"context_length": 77, "hf_tokenizer_name": "x/y",'
    config.write_text(open(TINY_CONFIG).read().replace('"context_length": 77,', hub_text))
    with pytest.raises(ValueError, match="Hugging Face hub"):
        ClipRetriever.from_pretrained(str(config), None, vocabulary=WORDS)
    with pytest.raises(ValueError, match="not supported"):
        ClipRetriever.from_pretrained("ViT-B-16-SigLIP", None, vocabulary=WORDS)


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_supported_architectures_use_the_bundled_bpe_tokenizer(arch):
    config = open_clip.get_model_config(arch)
    _check_supported(arch, config)
    tokenizer = _build_tokenizer(arch, config, builtin=True)
    assert isinstance(tokenizer, open_clip.SimpleTokenizer)
    assert tokenizer(["a photo of a vase."]).shape == (1, config["text_cfg"]["context_length"])


def test_loading_never_opens_a_network_connection(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    retriever = ClipRetriever.from_pretrained(TINY_CONFIG, None, vocabulary=WORDS, cache_dir=str(tmp_path))
    assert len(retriever.rank(random_image(), top_k=2)) == 2
    for arch in SUPPORTED_ARCHS:
        _build_tokenizer(arch, open_clip.get_model_config(arch), builtin=True)


# ------------------------------------------------------------------------------------------------ cache
@pytest.fixture
def count_encoded(monkeypatch):
    """Counts prompts sent through the text encoder by any retriever."""
    counter = {"prompts": 0}
    original = ClipRetriever._encode_texts

    def counting(self, prompts):
        counter["prompts"] += len(prompts)
        return original(self, prompts)

    monkeypatch.setattr(ClipRetriever, "_encode_texts", counting)
    return counter


def test_word_embeddings_are_cached_reused_and_invalidated(tiny, tmp_path, count_encoded):
    weights = str(tmp_path / "tiny.safetensors")
    trained_weights(tiny, weights)
    cache = str(tmp_path / "cache")

    first = ClipRetriever.from_pretrained(TINY_CONFIG, weights, vocabulary=WORDS, cache_dir=cache)
    table = first.word_embeddings()
    assert count_encoded["prompts"] == len(WORDS)
    assert os.path.isfile(first.cache_path())
    assert [name for name in os.listdir(cache) if name.endswith(".tmp")] == []

    count_encoded["prompts"] = 0
    second = ClipRetriever.from_pretrained(TINY_CONFIG, weights, vocabulary=WORDS, cache_dir=cache)
    assert torch.equal(second.word_embeddings(), table)
    assert count_encoded["prompts"] == 1  # one probe word, not the vocabulary

    count_encoded["prompts"] = 0
    grown = ClipRetriever.from_pretrained(TINY_CONFIG, weights, vocabulary=WORDS + ["zebra"], cache_dir=cache)
    assert grown.cache_path() != first.cache_path()
    assert grown.word_embeddings().shape[0] == len(WORDS) + 1
    assert count_encoded["prompts"] == len(WORDS) + 1


def test_cache_of_the_wrong_shape_is_recomputed(tiny, tmp_path, count_encoded):
    weights = str(tmp_path / "tiny.safetensors")
    trained_weights(tiny, weights)
    cache = str(tmp_path / "cache")
    first = ClipRetriever.from_pretrained(TINY_CONFIG, weights, vocabulary=WORDS, cache_dir=cache)
    good = first.word_embeddings()
    path = first.cache_path()
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
    save_file({"word_embeddings": torch.zeros(len(WORDS) - 1, 32)}, path, metadata=metadata)

    count_encoded["prompts"] = 0
    again = ClipRetriever.from_pretrained(TINY_CONFIG, weights, vocabulary=WORDS, cache_dir=cache)
    assert torch.allclose(again.word_embeddings(), good, atol=1e-6)
    assert count_encoded["prompts"] >= len(WORDS)
    assert load_file(path)["word_embeddings"].shape == (len(WORDS), 32)


def test_cache_from_other_weights_with_the_same_key_is_not_trusted(tiny, tmp_path, count_encoded):
    weights = str(tmp_path / "tiny.safetensors")
    trained_weights(tiny, weights)
    cache = str(tmp_path / "cache")
    first = ClipRetriever.from_pretrained(TINY_CONFIG, weights, vocabulary=WORDS, cache_dir=cache)
    good = first.word_embeddings()
    stale = load_file(first.cache_path())
    with safe_open(first.cache_path(), framework="pt") as handle:
        metadata = handle.metadata()
    save_file({"word_embeddings": stale["word_embeddings"].roll(1, dims=0)}, first.cache_path(), metadata=metadata)

    again = ClipRetriever.from_pretrained(TINY_CONFIG, weights, vocabulary=WORDS, cache_dir=cache)
    assert torch.allclose(again.word_embeddings(), good, atol=1e-6)


def test_cache_dir_needs_a_model_key(tiny, tmp_path):
    with pytest.raises(ValueError, match="model_key"):
        ClipRetriever(tiny.model, 32, tiny.mean, tiny.std, tiny.tokenizer, WORDS, cache_dir=str(tmp_path))


def test_template_must_have_one_placeholder(tiny):
    with pytest.raises(ValueError, match="template"):
        ClipRetriever(tiny.model, 32, tiny.mean, tiny.std, tiny.tokenizer, WORDS, template="a photo")


# ------------------------------------------------------------------------------------------------ vocabulary
def test_shipped_vocabulary_is_large_clean_and_the_default():
    words = load_vocabulary(DEFAULT_VOCABULARY_PATH)
    assert len(words) > 2000
    assert len(set(words)) == len(words)
    assert all(re.fullmatch(r"[a-z]+", word) for word in words)
    assert load_vocabulary(None) == words
    for everyday in ("vase", "bust", "statue", "marble", "wood", "grass", "sky", "wall", "floor", "cup", "dog"):
        assert everyday in words


def test_comments_and_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("# my words\n\nCat  # a pet\n  dog\n")
    assert load_vocabulary(str(path)) == ["cat", "dog"]
    assert load_vocabulary(["# header", "", "vase"]) == ["vase"]


@pytest.mark.parametrize(
    "words, message",
    [
        ([], "empty"),
        (["# only a comment", "   "], "empty"),
        (["cat", "tea pot"], "single words"),
        (["cat", "r2d2"], "single words"),
        (["cat", "dog", "cat"], "more than once"),
    ],
)
def test_bad_vocabularies_are_refused(words, message):
    with pytest.raises(ValueError, match=message):
        load_vocabulary(words)


def test_missing_or_empty_vocabulary_file_is_refused(tmp_path, tiny):
    with pytest.raises(ValueError, match="not found"):
        load_vocabulary(str(tmp_path / "absent.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing here\n")
    with pytest.raises(ValueError, match="empty"):
        ClipRetriever(tiny.model, 32, tiny.mean, tiny.std, tiny.tokenizer, str(empty))
