"""Placeholder tokens: copy-on-write over the base tokenizer/text encoder, exact encodings, EOS pooling."""
from __future__ import annotations

import pytest
import torch

from ice_ops.text import build_clip_tokenizer, word_pieces
from ice_ops.tokens import PlaceholderText, first_end_of_text, placeholder_string

SINGLE_PIECE_WORD = "cup"
MULTI_PIECE_WORD = "teapotsaurus"


@pytest.fixture
def text(tiny_bundle):
    return PlaceholderText(tiny_bundle.tokenizer, tiny_bundle.text_encoder)


def test_placeholder_string_is_unambiguous_and_checked():
    assert placeholder_string("bust", "material") == "<ice:bust:material>"
    assert placeholder_string("bust_2", "object") != placeholder_string("bust", "object")
    refused = ((("", "object"), "non-empty concept name; got ''"), (("a:b", "object"), "concept name 'a:b' contains :"),
               (("bust", "<x>"), "role '<x>' contains < >,"), (("bust", " "), "non-empty role; got ' '"))
    for (name, role), message in refused:
        with pytest.raises(ValueError, match=message):
            placeholder_string(name, role)


def test_add_returns_ids_above_the_vocabulary_and_validates(tiny_bundle, text):
    vocab = tiny_bundle.text_encoder.get_input_embeddings().weight.shape[0]
    first = text.add(placeholder_string("cup", "object"), text.word_init("cup"))
    second = text.add(placeholder_string("cup", "instance"), text.word_init("cup"))
    assert (first, second) == (vocab, vocab + 1)
    assert text.names == ["<ice:cup:object>", "<ice:cup:instance>"]
    with pytest.raises(ValueError, match="already added"):
        text.add("<ice:cup:object>", text.word_init("cup"))
    with pytest.raises(ValueError, match="not a placeholder string"):
        text.add("cup", text.word_init("cup"))
    with pytest.raises(ValueError, match="The vector for '<ice:cup:colour>' has shape \\(7,\\)"):
        text.add("<ice:cup:colour>", torch.zeros(7))
    with pytest.raises(ValueError, match="has shape list"):
        text.add("<ice:cup:colour>", [0.0] * text.width)
    with pytest.raises(ValueError, match="Unknown placeholder.*<ice:cup:object>"):
        text.vector("<ice:bowl:object>")


def test_training_changes_only_placeholder_vectors(fresh_tiny_bundle):
    bundle = fresh_tiny_bundle
    encoder_before = {k: v.clone() for k, v in bundle.text_encoder.state_dict().items()}
    vocab_before = len(bundle.tokenizer)
    text = PlaceholderText(bundle.tokenizer, bundle.text_encoder)
    trained, frozen = placeholder_string("cup", "object"), placeholder_string("cup", "instance")
    text.add(trained, text.word_init("cup"))
    text.add(frozen, text.word_init("cup"))
    frozen_before = text.vector(frozen)
    trained_before = text.vector(trained)
    # Bundles are frozen on construction; make the base trainable too, to show the base is never stepped.
    bundle.text_encoder.requires_grad_(True)
    optimizer = torch.optim.AdamW(text.trainable([trained]), lr=1e-2, weight_decay=1e-2)
    ids = text.tokenize([f"a photo of a {trained}{frozen} on a table"])
    for _ in range(3):
        hidden, pooled = text.encode(ids)
        loss = hidden.square().mean() + pooled.square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for key, value in bundle.text_encoder.state_dict().items():
        assert torch.equal(value, encoder_before[key]), key
    assert len(bundle.tokenizer) == vocab_before
    assert bundle.text_encoder.get_input_embeddings().weight.shape[0] == encoder_before[
        next(k for k in encoder_before if k.endswith("token_embedding.weight"))
    ].shape[0]
    assert torch.equal(text.vector(frozen), frozen_before)
    assert not torch.equal(text.vector(trained), trained_before)
    assert text.parameter(frozen).grad is None


def test_plain_prompt_encodes_exactly_like_the_base_encoder(tiny_bundle, text):
    text.add(placeholder_string("cup", "object"), text.word_init("cup"))
    prompts = ["a photo of a cup on a wooden table", ""]
    ids = text.tokenize(prompts)
    assert torch.equal(ids, tiny_bundle.tokenize(prompts))
    with torch.no_grad():
        hidden, pooled = text.encode(ids)
        base = tiny_bundle.text_encoder(ids)
    assert torch.equal(hidden, base[0])
    assert torch.equal(pooled, base[1])


@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"])
def test_tokenize_pads_like_the_base_tokenizer(tiny_bundle, pad):
    tokenizer = build_clip_tokenizer(pad_token=pad)
    text = PlaceholderText(tokenizer, tiny_bundle.text_encoder)
    prompts = ["a red, shiny cup!", "word " * 100]  # the second is cut like the base tokenizer cuts it
    expected = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(text.tokenize(prompts), expected)


def test_tokenize_maps_placeholders_and_rejects_unknown_or_cut_ones(text):
    name = placeholder_string("cup", "object")
    token = text.add(name, text.word_init("cup"))
    ids = text.tokenize([f"a {name} on a table"])[0].tolist()
    pieces = word_pieces(text.tokenizer, "a")
    assert ids[1 : 2 + len(pieces)] == pieces + [token]
    with pytest.raises(ValueError, match="Unknown placeholder"):
        text.tokenize(["a <ice:bowl:object>"])
    with pytest.raises(ValueError, match="would be cut off"):
        text.tokenize(["word " * 80 + name])
    room = text.max_length - 2  # between the start and end tokens
    assert text.tokenize(["word " * (room - 1) + name])[0, room].item() == token  # the last slot that fits
    with pytest.raises(ValueError, match=f"only {room} fit; {name} would be cut off"):
        text.tokenize(["word " * room + name])


def test_placeholder_with_a_words_embedding_encodes_like_the_word(text):
    assert len(word_pieces(text.tokenizer, SINGLE_PIECE_WORD)) == 1
    name = placeholder_string("thing", "object")
    text.add(name, text.word_init(SINGLE_PIECE_WORD))
    with torch.no_grad():
        hidden_word, pooled_word = text.encode(text.tokenize([f"a photo of a {SINGLE_PIECE_WORD} on a table"]))
        hidden_token, pooled_token = text.encode(text.tokenize([f"a photo of a {name} on a table"]))
    assert torch.equal(hidden_word, hidden_token)
    assert torch.equal(pooled_word, pooled_token)


def test_pooled_output_is_read_at_the_first_end_of_text(text):
    name = placeholder_string("thing", "object")
    token = text.add(name, torch.randn(text.width))
    ids = text.tokenize([f"a {name} cup", name])
    with torch.no_grad():
        hidden, pooled = text.encode(ids)
    eos = text.tokenizer.eos_token_id
    for row in range(ids.shape[0]):
        first_eos = ids[row].tolist().index(eos)
        assert torch.equal(pooled[row], hidden[row, first_eos])
        placeholder_position = ids[row].tolist().index(token)
        assert int(ids[row].argmax()) == placeholder_position  # where the legacy argmax pooling would read
        assert not torch.allclose(pooled[row], hidden[row, placeholder_position])


def test_pooled_output_of_sd2_padding_is_read_at_the_end_of_the_prompt(tiny_bundle):
    tokenizer = build_clip_tokenizer(pad_token="!")  # SD 2.x pads with id 0 after the end-of-text token
    text = PlaceholderText(tokenizer, tiny_bundle.text_encoder)
    name = placeholder_string("thing", "object")
    text.add(name, torch.randn(text.width, generator=torch.Generator().manual_seed(0)))
    ids = text.tokenize([name, f"a {name} cup"])
    with torch.no_grad():
        hidden, pooled = text.encode(ids)
    ends = [row.index(tokenizer.eos_token_id) for row in ids.tolist()]
    assert ends == [2, 4]  # start, (a,) placeholder, (cup,) end: nothing after the prompt is read
    assert torch.equal(pooled, hidden[torch.arange(2), torch.tensor(ends)])


def test_first_end_of_text_skips_padding_and_refuses_rows_without_one():
    eos = 7
    ids = torch.tensor([[1, 5, eos, eos, eos], [1, eos, 0, 0, 0], [1, 9, 9, 9, eos]])
    assert first_end_of_text(ids, eos).tolist() == [2, 1, 4]
    with pytest.raises(ValueError, match="Every row of token ids needs an end-of-text token"):
        first_end_of_text(torch.tensor([[1, 5, eos], [1, 5, 6]]), eos)


def test_ids_parameters_and_trainable_rows_follow_the_names_given(text):
    names = [placeholder_string(concept, "object") for concept in ("a", "b", "c")]
    with pytest.raises(ValueError, match="the placeholders are: none yet"):
        text.token_id(names[0])
    ids = [text.add(name, torch.full((text.width,), float(k))) for k, name in enumerate(names)]
    assert [text.token_id(name) for name in names] == ids == list(range(text.first_id, text.first_id + len(names)))
    assert all(p is text.parameter(name) for p, name in zip(text.parameters(), names))
    assert [float(p.detach()[0]) for p in text.parameters([names[2], names[0]])] == [2.0, 0.0]
    assert {name: float(vector[0]) for name, vector in text.vectors().items()} == {
        names[0]: 0.0, names[1]: 1.0, names[2]: 2.0}
    chosen = text.trainable([names[1]])
    assert len(chosen) == 1 and chosen[0] is text.parameter(names[1])
    assert [text.parameter(name).requires_grad for name in names] == [False, True, False]
    with pytest.raises(ValueError, match="the placeholders are: <ice:a:object>, <ice:b:object>, <ice:c:object>"):
        text.token_id("<ice:d:object>")


def test_gradients_reach_every_placeholder_in_the_prompt_whatever_its_rank(text):
    names = [placeholder_string(concept, "object") for concept in "abcde"]
    generator = torch.Generator().manual_seed(1)
    for name in names:
        text.add(name, torch.randn(text.width, generator=generator))
    hidden, _ = text.encode(text.tokenize([f"a {names[1]} next to a {names[4]}"]))
    hidden.sum().backward()
    assert [text.parameter(name).grad is not None for name in names] == [False, True, False, False, True]
    assert all(text.parameter(name).grad.abs().sum() > 0 for name in (names[1], names[4]))


def test_encode_refuses_ids_that_tokenize_did_not_make(text):
    text.add(placeholder_string("a", "object"), torch.zeros(text.width))
    good = text.tokenize([f"a {placeholder_string('a', 'object')} cup"])
    last = text.first_id + 1  # one past the only placeholder
    negative, beyond = good.clone(), good.clone()
    negative[0, 1] = -1
    beyond[0, 1] = last
    cases = ((good.int(), "LongTensor of token ids"), (good[0], "LongTensor of token ids"),
             (torch.cat([good, good], 1), f"Token ids are {2 * good.shape[1]} long; .* at most {text.max_length}"),
             (negative, f"must lie in 0\\.\\.{last - 1} "), (beyond, f"must lie in 0\\.\\.{last - 1} "))
    for ids, message in cases:
        with pytest.raises(ValueError, match=message):
            text.encode(ids)


def test_vectors_keep_the_chosen_precision(tiny_bundle):
    text = PlaceholderText(tiny_bundle.tokenizer, tiny_bundle.text_encoder, dtype=torch.float64)
    word = text.word_init(SINGLE_PIECE_WORD)
    name = placeholder_string("cup", "object")
    text.add(name, word.float())
    assert word.dtype == text.vector(name).dtype == torch.float64


def test_placeholder_ids_start_above_a_text_encoder_table_larger_than_the_tokenizer(fresh_tiny_bundle):
    rows = len(fresh_tiny_bundle.tokenizer) + 8  # an encoder whose embedding table has spare rows
    fresh_tiny_bundle.text_encoder.resize_token_embeddings(rows)
    text = PlaceholderText(fresh_tiny_bundle.tokenizer, fresh_tiny_bundle.text_encoder)
    assert text.add(placeholder_string("cup", "object"), text.word_init(SINGLE_PIECE_WORD)) == rows


def test_multi_piece_word_init_is_the_mean_of_its_pieces(text):
    pieces = word_pieces(text.tokenizer, MULTI_PIECE_WORD)
    assert len(pieces) > 1
    weight = text.text_encoder.get_input_embeddings().weight
    assert torch.allclose(text.word_init(MULTI_PIECE_WORD), weight[pieces].mean(dim=0), atol=1e-7)
    with pytest.raises(ValueError, match="tokenises to nothing"):
        text.word_init("   ")


def test_set_vector_keeps_the_parameter_and_gradients_reach_only_used_placeholders(text):
    used, unused = placeholder_string("a", "object"), placeholder_string("b", "object")
    text.add(used, torch.zeros(text.width))
    text.add(unused, torch.zeros(text.width))
    parameter = text.parameter(used)
    text.set_vector(used, torch.ones(text.width))
    assert text.parameter(used) is parameter and torch.equal(text.vector(used), torch.ones(text.width))
    hidden, _ = text.encode(text.tokenize([f"a photo of {used}"]))
    hidden.sum().backward()
    assert text.parameter(used).grad is not None and text.parameter(used).grad.abs().sum() > 0
    assert text.parameter(unused).grad is None
    with pytest.raises(ValueError, match="NaN"):
        text.set_vector(used, torch.full((text.width,), float("nan")))
