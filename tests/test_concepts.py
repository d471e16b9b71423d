"""ConceptSet files: exact round trip, atomic no-overwrite writes, fingerprints, ComfyUI embedding export."""
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from ice_ops.files import write_bytes_atomic
from ice_ops.concepts import (
    Concept,
    ConceptSet,
    sanitize_name,
    text_encoder_fingerprint,
    unique_name,
)


def _learned_set(width=8, fingerprint=None):
    torch.manual_seed(0)
    mask_a = torch.zeros(16, 20)
    mask_a[2:8, 3:9] = 1
    mask_b = torch.zeros(16, 20)
    mask_b[9:15, 10:18] = 1
    concepts = [
        Concept("bust", "bust", 0.7, mask_a, {r: torch.randn(width) for r in ("object", "instance", "material")}),
        Concept("bowl", "bowl", 0.2, mask_b, {r: torch.randn(width) for r in ("object", "instance", "material")}),
    ]
    return ConceptSet(concepts, (16, 20), anchors=("material",), fingerprint=fingerprint,
                      settings={"seed": 3, "kl_thresholds": [1.1, 1.1]})


def test_save_load_round_trip_is_exact(tmp_path):
    original = _learned_set(fingerprint={"width": 8, "vocab_size": 10, "family": "custom", "embedding_sha256": "ab"})
    original.lora = {"lora_unet_x.lora_down.weight": torch.randn(2, 8)}
    path = original.save(str(tmp_path / "set.safetensors"))
    loaded = ConceptSet.load(path)
    assert loaded.names == ["bust", "bowl"]
    assert loaded.image_size == (16, 20)
    assert loaded.anchors == ("material",)
    assert loaded.fingerprint == original.fingerprint
    assert loaded.settings == original.settings
    assert torch.equal(loaded.lora["lora_unet_x.lora_down.weight"], original.lora["lora_unet_x.lora_down.weight"])
    for a, b in zip(original.concepts, loaded.concepts):
        assert (a.word, a.score) == (b.word, b.score)
        assert torch.equal(a.mask, b.mask)
        assert a.vectors.keys() == b.vectors.keys()
        for role in a.vectors:
            assert torch.equal(a.vectors[role], b.vectors[role])


def test_save_never_overwrites_silently(tmp_path):
    path = str(tmp_path / "set.safetensors")
    _learned_set().save(path)
    before = open(path, "rb").read()
    with pytest.raises(ValueError, match="already exists"):
        _learned_set(width=4).save(path)
    assert open(path, "rb").read() == before
    _learned_set(width=4).save(path, overwrite=True)
    assert ConceptSet.load(path).concepts[0].vectors["object"].shape == (4,)


def test_failed_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(TypeError):
        write_bytes_atomic(str(target), object())  # not bytes: the write fails midway
    assert not target.exists()
    assert [p for p in os.listdir(tmp_path)] == []


def test_loading_a_foreign_file_explains_itself(tmp_path):
    foreign = tmp_path / "lora.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="not an ICE concept set"):
        ConceptSet.load(str(foreign))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"definitely not safetensors")
    with pytest.raises(ValueError, match="not a concept-set file"):
        ConceptSet.load(str(junk))
    with pytest.raises(ValueError, match="does not exist"):
        ConceptSet.load(str(tmp_path / "missing.safetensors"))


def test_validate_rejects_unusable_sets():
    empty = ConceptSet([], (16, 20))
    with pytest.raises(ValueError, match="empty"):
        empty.validate()
    wrong = _learned_set()
    with pytest.raises(ValueError, match="image is"):
        wrong.validate((32, 32))
    blank = _learned_set()
    blank.concepts[1].mask = torch.zeros(16, 20)
    with pytest.raises(ValueError, match="mask of 'bowl' is empty"):
        blank.validate()
    twins = _learned_set()
    twins.concepts[1].name = "bust"
    with pytest.raises(ValueError, match="Two concepts are named 'bust'; names must be unique in a set."):
        twins.validate()


def test_fingerprint_mismatch_names_the_original_model(tiny_bundle):
    learned = _learned_set(fingerprint={"width": 1024, "vocab_size": 49408, "family": "sd2", "embedding_sha256": "x"})
    with pytest.raises(ValueError, match="SD 2.x model") as plain:
        learned.check_text_encoder(tiny_bundle.text_encoder)
    with pytest.raises(ValueError, match="Load the checkpoint the concepts were learned with, or learn new tokens"):
        learned.check_text_encoder(tiny_bundle.text_encoder, relearn_hint=True)
    assert "Load the checkpoint the concepts were learned with" in str(plain.value)
    assert "relearn" not in str(plain.value)  # only learning can start again from the words
    same = _learned_set(fingerprint=text_encoder_fingerprint(tiny_bundle.text_encoder))
    same.check_text_encoder(tiny_bundle.text_encoder)


def test_fingerprint_agrees_between_fp32_and_fp16_copies(fresh_tiny_bundle):
    encoder = fresh_tiny_bundle.text_encoder
    full = text_encoder_fingerprint(encoder)
    assert text_encoder_fingerprint(encoder.to(torch.float16)) == full


def test_export_embeddings_in_comfyui_format(tmp_path):
    learned = _learned_set(width=768, fingerprint={"width": 768, "vocab_size": 49408, "family": "sd1",
                                                   "embedding_sha256": "x"})
    written = learned.export_embeddings(str(tmp_path), "photo1")
    names = sorted(os.path.basename(p) for p in written)
    assert names == sorted(f"photo1_{c}_{r}.safetensors" for c in ("bust", "bowl")
                           for r in ("object", "instance", "material"))
    data = load_file(str(tmp_path / "photo1_bust_material.safetensors"))
    assert list(data) == ["clip_l"]  # the key ComfyUI's SD1 loader looks for
    assert data["clip_l"].shape == (1, 768) and data["clip_l"].dtype == torch.float32
    assert torch.equal(data["clip_l"][0], learned.concepts[0].vectors["material"])
    with pytest.raises(ValueError, match="already exists"):
        learned.export_embeddings(str(tmp_path), "photo1")


def test_sd2_embeddings_use_the_clip_h_key(tmp_path):
    learned = _learned_set(width=1024, fingerprint={"width": 1024, "family": "sd2"})
    path = learned.export_embeddings(str(tmp_path), "p")[0]
    assert list(load_file(path)) == ["clip_h"]


@pytest.mark.parametrize("bad", ["", "   ", "../evil", "a/b", "c\\d", "!!!"])
def test_names_with_path_parts_or_nothing_usable_are_refused(bad):
    with pytest.raises(ValueError):
        sanitize_name(bad)


def test_names_are_cleaned_and_made_unique():
    assert sanitize_name("teddy bear") == "teddy_bear"
    assert unique_name("cup", []) == "cup"
    assert unique_name("cup", ["cup"]) == "cup_2"
    assert unique_name("cup", ["cup", "cup_2"]) == "cup_3"


def test_export_lora_requires_a_lora(tmp_path):
    with pytest.raises(ValueError, match="no LoRA"):
        _learned_set().export_lora(str(tmp_path / "x.safetensors"))


def test_get_masks_and_replace_give_the_concepts_without_sharing_what_learning_changes():
    concepts = _learned_set()
    assert concepts.get("bowl") is concepts.concepts[1]
    with pytest.raises(ValueError, match="Unknown concept 'cup'; the concepts are: bust, bowl."):
        concepts.get("cup")
    with pytest.raises(ValueError, match="There is no concept 'cup': the concept set is empty"):
        ConceptSet([], (16, 20)).get("cup")
    masks = concepts.masks()
    assert masks.shape == (2, 16, 20) and masks.dtype == torch.float32
    assert torch.equal(masks[1], concepts.concepts[1].mask)
    assert ConceptSet([], (16, 20)).masks().shape == (0, 16, 20)

    copy = concepts.replace(anchors=("colour",))
    assert (copy.anchors, concepts.anchors) == (("colour",), ("material",))
    assert (copy.image_size, copy.fingerprint, copy.lora) == (concepts.image_size, concepts.fingerprint, concepts.lora)
    assert copy.names == concepts.names and [c.word for c in copy.concepts] == [c.word for c in concepts.concepts]
    assert [c.score for c in copy.concepts] == [0.7, 0.2]
    assert all(torch.equal(a.mask, b.mask) for a, b in zip(copy.concepts, concepts.concepts))
    copy.concepts[0].vectors["colour"] = torch.zeros(8)  # learning adds tokens to the copy ...
    copy.settings["seed"] = 4
    assert "colour" not in concepts.concepts[0].vectors and concepts.settings["seed"] == 3  # ... not to the original
    assert torch.equal(copy.concepts[0].vectors["object"], concepts.concepts[0].vectors["object"])
    assert concepts.replace(concepts=[]).names == [] and len(concepts) == 2
