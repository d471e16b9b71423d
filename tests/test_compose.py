"""Prompt syntax, composition into encoder states, and the sampling helper."""
from __future__ import annotations

import pytest
import torch

from ice_ops.concepts import Concept, ConceptSet
from ice_ops.composition import SCHEDULERS, ComposedPrompt, compose, expand_prompt, generate, parse_prompt
from ice_ops.tokens import PlaceholderText

ANCHORS = ("material", "colour")


MASK_SIDE = 4  # composing reads no mask; the concept set needs one


def _concept(name: str, word: str, vectors=None) -> Concept:
    return Concept(name, word, 1.0, torch.ones(MASK_SIDE, MASK_SIDE), dict(vectors or {}))


def _concept_set(concepts, anchors=()) -> ConceptSet:
    return ConceptSet(list(concepts), (MASK_SIDE, MASK_SIDE), anchors=tuple(anchors))


def _vectors(width: int, roles, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {role: torch.randn(width, generator=generator) * 0.02 for role in roles}


@pytest.fixture
def concepts(tiny_bundle):
    width = tiny_bundle.text_width
    roles = ("object", "instance", *ANCHORS)
    return _concept_set(
        [
            _concept("bust", "bust", _vectors(width, roles, 1)),
            _concept("bowl", "bowl", _vectors(width, roles, 2)),
        ],
        ANCHORS,
    )


# ---------------------------------------------------------------------- parsing
def test_parse_prompt_splits_text_and_references():
    assert parse_prompt("a cup made of [bust.material] in [bowl.colour]") == [
        "a cup made of ",
        ("bust", "material"),
        " in ",
        ("bowl", "colour"),
    ]
    assert parse_prompt("[bust]") == [("bust", None)]
    assert parse_prompt("[ bust . material ]") == [("bust", "material")]
    assert parse_prompt("a photo of a cup") == ["a photo of a cup"]
    assert parse_prompt("") == []


def test_parse_prompt_escapes_brackets():
    assert parse_prompt(r"a \[bust\] and a back\\slash [bowl]") == ["a [bust] and a back\\slash ", ("bowl", None)]
    assert parse_prompt(r"a\b") == [r"a\b"]  # a backslash before anything else is kept


@pytest.mark.parametrize(
    "prompt, message",
    [
        ("a [bust.material cup", "Unbalanced '\\['"),
        ("a bust] cup", "Unbalanced '\\]'"),
        ("[[bust]]", "Unbalanced '\\['"),
        ("a [] cup", "not a concept reference"),
        ("[bust.]", "not a concept reference"),
        ("[.material]", "not a concept reference"),
    ],
)
def test_parse_prompt_rejects_malformed_references(prompt, message):
    with pytest.raises(ValueError, match=message):
        parse_prompt(prompt)


# ---------------------------------------------------------------------- expanding
def test_expand_prompt_to_placeholder_strings(concepts):
    assert expand_prompt("a cup made of [bust.material] in [bowl.colour]", concepts) == (
        "a cup made of <ice:bust:material> in <ice:bowl:colour>"
    )
    assert expand_prompt("[bust]", concepts) == "<ice:bust:object><ice:bust:material><ice:bust:colour>"
    assert expand_prompt("a photo of a [bowl.instance]", concepts) == "a photo of a <ice:bowl:instance>"
    assert expand_prompt("no references here", concepts) == "no references here"


def test_colour_and_color_are_aliases_only_when_unambiguous(tiny_bundle, concepts):
    assert expand_prompt("[bust.color]", concepts) == "<ice:bust:colour>"
    width = tiny_bundle.text_width
    american = _concept_set([_concept("cup", "cup", _vectors(width, ("object", "color"), 3))], ("color",))
    assert expand_prompt("[cup.colour]", american) == "<ice:cup:color>"
    both = _concept_set(
        [_concept("cup", "cup", _vectors(width, ("object", "color", "colour"), 4))], ("color", "colour")
    )
    assert expand_prompt("[cup.colour] [cup.color]", both) == "<ice:cup:colour> <ice:cup:color>"


def test_unknown_names_and_roles_list_what_exists(concepts):
    with pytest.raises(ValueError, match="Unknown concept 'vase'.*bust, bowl"):
        expand_prompt("a [vase.material]", concepts)
    with pytest.raises(ValueError, match="no role 'shine'.*object, instance, material, colour"):
        expand_prompt("a [bust.shine]", concepts)
    with pytest.raises(ValueError, match="empty.*localize"):
        expand_prompt("a [bust]", _concept_set([]))


def test_roles_not_learned_yet_say_which_step_to_run(tiny_bundle):
    phase_one = _concept_set(
        [_concept("bust", "bust", _vectors(tiny_bundle.text_width, ("object", "instance"), 5))], ANCHORS
    )
    not_learned = "'material' token of concept 'bust' has not been learned.*learn_intrinsic_tokens"
    with pytest.raises(ValueError, match=not_learned):
        expand_prompt("[bust.material]", phase_one)
    with pytest.raises(ValueError, match="learn_intrinsic_tokens"):
        expand_prompt("[bust]", phase_one)
    nothing = _concept_set([_concept("bust", "bust")], ())
    with pytest.raises(ValueError, match="learn_object_tokens"):
        expand_prompt("[bust]", nothing)
    assert expand_prompt("[bust]", _concept_set(phase_one.concepts, ())) == "<ice:bust:object>"


# ---------------------------------------------------------------------- composing
def test_compose_shapes_and_plain_prompts_match_the_base_encoder(tiny_bundle, concepts):
    cond = compose(tiny_bundle, concepts, "a photo of a cup", negative="blurry")
    length, width = tiny_bundle.max_length, tiny_bundle.text_width
    assert isinstance(cond, ComposedPrompt)
    assert cond.hidden_states.shape == (1, length, width) and cond.negative_hidden_states.shape == (1, length, width)
    assert cond.pooled.shape == (1, width) and cond.negative_pooled.shape == (1, width)
    assert torch.equal(cond.hidden_states, tiny_bundle.encode_prompt(["a photo of a cup"]))
    assert torch.equal(cond.negative_hidden_states, tiny_bundle.encode_prompt(["blurry"]))
    unconditional = compose(tiny_bundle, concepts, "")
    assert torch.equal(unconditional.hidden_states, tiny_bundle.encode_prompt([""]))


def test_compose_uses_the_learned_vectors(tiny_bundle, concepts):
    cond = compose(tiny_bundle, concepts, "a cup made of [bust.material] in [bowl.colour]")
    assert cond.text == "a cup made of <ice:bust:material> in <ice:bowl:colour>"
    swapped = compose(tiny_bundle, concepts, "a cup made of [bowl.material] in [bust.colour]")
    assert not torch.allclose(cond.hidden_states, swapped.hidden_states)


def test_a_vector_equal_to_a_words_embedding_composes_like_the_word(tiny_bundle):
    word_vector = PlaceholderText(tiny_bundle.tokenizer, tiny_bundle.text_encoder).word_init("cup")
    concepts = _concept_set([_concept("thing", "cup", {"object": word_vector})])
    learned = compose(tiny_bundle, concepts, "a photo of a [thing.object] on a table")
    plain = compose(tiny_bundle, concepts, "a photo of a cup on a table")
    assert torch.equal(learned.hidden_states, plain.hidden_states)
    assert torch.equal(learned.pooled, plain.pooled)


def test_compose_rejects_vectors_of_another_text_encoder(tiny_bundle):
    concepts = _concept_set([_concept("thing", "cup", {"object": torch.zeros(768)})])
    with pytest.raises(ValueError, match="different model"):
        compose(tiny_bundle, concepts, "a [thing]")


def test_compose_accepts_the_real_concept_set(tiny_bundle):
    concepts_module = pytest.importorskip("ice_ops.concepts")
    vector = PlaceholderText(tiny_bundle.tokenizer, tiny_bundle.text_encoder).word_init("cup")
    concept = concepts_module.Concept("cup", "cup", 1.0, torch.ones(4, 4), {"object": vector, "instance": vector})
    concept_set = concepts_module.ConceptSet([concept], (4, 4))
    assert compose(tiny_bundle, concept_set, "a [cup]").text == "a <ice:cup:object>"


def test_compose_refuses_a_set_learned_on_another_model_of_the_same_width(tiny_bundle):
    from ice_ops.concepts import Concept, ConceptSet, text_encoder_fingerprint

    vector = PlaceholderText(tiny_bundle.tokenizer, tiny_bundle.text_encoder).word_init("cup")
    other = dict(text_encoder_fingerprint(tiny_bundle.text_encoder), embedding_sha256="0123456789abcdef")
    concept_set = ConceptSet([Concept("cup", "cup", 1.0, torch.ones(4, 4), {"object": vector})], (4, 4),
                             fingerprint=other)
    with pytest.raises(ValueError, match="learned on a different model"):
        compose(tiny_bundle, concept_set, "a [cup]")
    assert compose(tiny_bundle, concept_set, "a plain cup").text == "a plain cup"


# ---------------------------------------------------------------------- generating
def test_generate_defaults_to_the_native_resolution(tiny_bundle, concepts):
    cond = compose(tiny_bundle, concepts, "a cup made of [bust.material]")
    size = tiny_bundle.native_resolution
    image = generate(tiny_bundle, cond, steps=1)
    assert image.shape == (1, 3, size, size)
    assert float(image.min()) >= 0 and float(image.max()) <= 1


def test_generate_is_deterministic_for_a_seed(tiny_bundle, concepts):
    cond = compose(tiny_bundle, concepts, "a cup made of [bust.material]")
    side = tiny_bundle.size_multiple * 2  # small, to keep the test fast
    first = generate(tiny_bundle, cond, seed=3, steps=2, height=side, width=side)
    again = generate(tiny_bundle, cond, seed=3, steps=2, height=side, width=side)
    other = generate(tiny_bundle, cond, seed=4, steps=2, height=side, width=side)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_generate_runs_every_scheduler_at_a_custom_size(tiny_bundle, concepts):
    cond = compose(tiny_bundle, concepts, "a photo")
    multiple = tiny_bundle.size_multiple
    for name in SCHEDULERS:
        image = generate(tiny_bundle, cond, steps=2, height=multiple * 2, width=multiple * 3, scheduler=name)
        assert image.shape == (1, 3, multiple * 2, multiple * 3)
    with pytest.raises(ValueError, match="Unknown scheduler.*dpm\\+\\+"):
        generate(tiny_bundle, cond, steps=2, scheduler="heun")


def test_generate_rejects_sizes_that_are_not_multiples(tiny_bundle, concepts):
    cond = compose(tiny_bundle, concepts, "a photo")
    multiple = tiny_bundle.size_multiple
    with pytest.raises(ValueError, match=f"height {multiple * 8 + 1} .* use {multiple * 8} or {multiple * 9}"):
        generate(tiny_bundle, cond, steps=1, height=multiple * 8 + 1)
    with pytest.raises(ValueError, match="width"):
        generate(tiny_bundle, cond, steps=1, width=0)
    with pytest.raises(ValueError, match="steps"):
        generate(tiny_bundle, cond, steps=0)


def test_a_raising_callback_stops_generation(tiny_bundle, concepts):
    cond = compose(tiny_bundle, concepts, "a photo")
    calls = []

    class Cancelled(Exception):
        pass

    def cancel(step, total, preview):
        calls.append((step, total, preview))
        raise Cancelled

    with pytest.raises(Cancelled):
        side = tiny_bundle.size_multiple * 2
        generate(tiny_bundle, cond, steps=3, height=side, width=side, callback=cancel)
    assert calls == [(1, 3, None)]
