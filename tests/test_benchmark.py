"""UCE benchmark: prompts, the metrics on embeddings with hand-computed answers, a batch folder read end to end
with tiny random CLIP and DINO encoders, and the command's output."""
from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from devtools.random_models import TINY_OPEN_CLIP_CONFIG
from ice_ops.benchmark import (
    COMPOSITION_SAMPLES,
    SAMPLES_PER_CONCEPT,
    ClipImageEncoder,
    DinoImageEncoder,
    ItemEmbeddings,
    benchmark_scores,
    composition_prompt,
    compositional_similarity,
    identity_prompt,
    identity_similarity,
    run_benchmark,
    top_k_accuracy,
)
from ice_ops.__main__ import build_parser
from ice_ops.__main__ import run_benchmark as run_command
from ice_ops.composition import expand_prompt
from ice_ops.concepts import Concept, ConceptSet
from ice_ops.tokens import placeholder_string

SIDE = 64  # the smallest image side the pack reads


# ---------------------------------------------------------------------- prompts
def test_prompts_name_each_concept_in_the_composition_syntax():
    assert identity_prompt("bust") == "a photo of [bust]"
    assert composition_prompt(["bust", "bowl", "cup_2"]) == "a photo of [bust] and [bowl] and [cup_2]"
    mask = torch.ones(SIDE, SIDE)
    vectors = {role: torch.zeros(4) for role in ("object", "instance", "material")}
    concepts = ConceptSet([Concept("bust", "bust", 1.0, mask, dict(vectors)),
                           Concept("bowl", "bowl", 1.0, mask, dict(vectors))], (SIDE, SIDE), anchors=("material",))
    # [name] is the concept's object token followed by its intrinsic tokens: the whole learned concept.
    whole = placeholder_string("bust", "object") + placeholder_string("bust", "material")
    assert expand_prompt(identity_prompt("bust"), concepts) == f"a photo of {whole}"
    assert placeholder_string("bowl", "material") in expand_prompt(composition_prompt(["bust", "bowl"]), concepts)


def test_a_composition_needs_two_concepts():
    with pytest.raises(ValueError, match="at least 2"):
        composition_prompt(["bust"])
    with pytest.raises(ValueError, match="at least 2"):
        composition_prompt("bust")
    with pytest.raises(ValueError, match="not a concept name"):
        identity_prompt("a[b]")


# ---------------------------------------------------------------------- metrics on constructed embeddings
def test_similarities_are_mean_cosines_of_paired_rows():
    # cos([1,0],[2,0]) = 1, cos([0,2],[1,0]) = 0, cos([3,4],[0,1]) = 4/5: mean (1 + 0 + 0.8) / 3 = 0.6
    generated = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    regions = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert identity_similarity(generated, regions) == pytest.approx(0.6, abs=1e-12)
    # cos([3,4],[1,0]) = 3/5, cos([4,3],[1,0]) = 4/5: mean 0.7
    composed = torch.tensor([[3.0, 4.0], [4.0, 3.0]])
    sources = torch.tensor([[1.0, 0.0], [5.0, 0.0]])
    assert compositional_similarity(composed, sources) == pytest.approx(0.7, abs=1e-12)
    with pytest.raises(ValueError, match="same shape"):
        identity_similarity(generated, regions[:2])


def test_top_k_accuracy_counts_the_prototypes_ranked_above_the_right_one():
    prototypes = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
    generated = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    labels = torch.tensor([0, 1, 3, 2])
    # cosines (rows: samples, columns: prototypes) and the rank of the right prototype (how many score higher):
    #   [ 1,  0.8,  0, -1]  label 0: right  1   -> rank 0
    #   [ 1,  0.8,  0, -1]  label 1: right  0.8 -> rank 1 (prototype 0)
    #   [ 0,  0.6,  1,  0]  label 3: right  0   -> rank 2 (prototypes 1, 2)
    #   [ 0, -0.6, -1,  0]  label 2: right -1   -> rank 3 (prototypes 0, 1, 3)
    assert top_k_accuracy(generated, prototypes, labels, 1) == pytest.approx(1 / 4)
    assert top_k_accuracy(generated, prototypes, labels, 2) == pytest.approx(2 / 4)
    assert top_k_accuracy(generated, prototypes, labels, 3) == pytest.approx(3 / 4)
    assert top_k_accuracy(generated, prototypes, labels, 4) == pytest.approx(4 / 4)


def test_a_prototype_that_ties_with_the_right_one_does_not_push_it_down():
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    generated = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    assert top_k_accuracy(generated, prototypes, torch.tensor([0, 1]), 1) == 1.0


def unit(index: int, dim: int = 4) -> torch.Tensor:
    vector = torch.zeros(dim)
    vector[index] = 1.0
    return vector


def test_benchmark_scores_classify_among_every_concept_of_the_benchmark():
    e1, e2, e3, e4 = (unit(i) for i in range(4))
    items = [
        ItemEmbeddings("a", ["bust", "bowl"], regions=torch.stack([e1, e2]),
                       identity=torch.stack([torch.stack([e1, e1]), torch.stack([e2, e3])]),
                       source=e1 + e2, composition=torch.stack([e1 + e2, e1])),
        ItemEmbeddings("b", ["cup"], regions=e3[None], identity=torch.stack([e3, -e3])[None], source=e3),
        ItemEmbeddings("c", ["vase"], regions=e4[None], identity=torch.stack([e4, e1 + e2])[None], source=e4),
    ]
    summary, rows = benchmark_scores(items)
    # Cosine of each generation with its own region, and its rank among all four regions (bust e1, bowl e2,
    # cup e3, vase e4):
    #   bust: e1 -> 1 (rank 0), e1 -> 1 (rank 0)
    #   bowl: e2 -> 1 (rank 0), e3 -> 0 (rank 1: cup's region scores 1). Among image a's regions alone it would be
    #         rank 0: classifying within the whole benchmark is what makes it a miss at top 1.
    #   cup:  e3 -> 1 (rank 0), -e3 -> -1 (rank 3: the three others score 0)
    #   vase: e4 -> 1 (rank 0), e1+e2 -> 0 (rank 2: bust and bowl score 0.707)
    assert summary["sim_i"] == pytest.approx((1 + 1 + 1 + 0 + 1 - 1 + 1 + 0) / 8)
    assert summary["acc1"] == pytest.approx(5 / 8)
    assert summary["acc3"] == pytest.approx(7 / 8)
    # Only image a has a composition: cos(e1+e2, e1+e2) = 1, cos(e1, e1+e2) = 1/sqrt(2).
    assert summary["sim_c"] == pytest.approx((1 + 1 / math.sqrt(2)) / 2)
    by_concept = {row["concept"]: row for row in rows}
    assert [row["concept"] for row in rows] == ["bust", "bowl", "cup", "vase"]
    assert by_concept["bowl"] == pytest.approx(
        {"item": "a", "concept": "bowl", "sim_i": 0.5, "acc1": 0.5, "acc3": 1.0, "sim_c": summary["sim_c"]})
    assert by_concept["cup"] == {"item": "b", "concept": "cup", "sim_i": 0.0, "acc1": 0.5, "acc3": 0.5, "sim_c": None}
    assert by_concept["vase"]["acc1"] == 0.5 and by_concept["vase"]["acc3"] == 1.0


def test_sim_c_is_none_when_no_image_has_two_concepts():
    e1, e2 = unit(0), unit(1)
    items = [ItemEmbeddings("b", ["cup"], regions=e1[None], identity=e1[None, None], source=e1),
             ItemEmbeddings("c", ["vase"], regions=e2[None], identity=e2[None, None], source=e2)]
    summary, _ = benchmark_scores(items)
    assert summary == {"sim_i": 1.0, "sim_c": None, "acc1": 1.0, "acc3": 1.0}


# ---------------------------------------------------------------------- a batch folder, end to end
@pytest.fixture(scope="module")
def clip_encoder():
    return ClipImageEncoder.from_files(TINY_OPEN_CLIP_CONFIG, None)


@pytest.fixture(scope="module")
def dino_folder(tmp_path_factory):
    """A tiny random ViT and its image processor, saved as a local DINO folder."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    folder = str(tmp_path_factory.mktemp("dino"))
    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64)
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder, safe_serialization=True)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.485, 0.456, 0.406],
                      image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dino_encoder(dino_folder):
    return DinoImageEncoder.from_folder(dino_folder)


def box(top: int, left: int, size: int) -> torch.Tensor:
    mask = torch.zeros(SIDE, SIDE)
    mask[top : top + size, left : left + size] = 1.0
    return mask


def eight_bit_image(seed: int, high: int = 256) -> torch.Tensor:
    """A random image whose values survive a PNG round trip exactly."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, (3, SIDE, SIDE), generator=generator).float() / 255.0


def scene(seed: int, objects: dict[str, tuple[torch.Tensor, tuple[int, int, int]]]) -> torch.Tensor:
    """Flat-coloured squares (8-bit RGB) on a dim noisy background: regions a tiny random encoder tells apart."""
    picture = eight_bit_image(seed, high=128)
    for mask, colour in objects.values():
        picture = torch.where(mask.bool(), torch.tensor(colour)[:, None, None] / 255.0, picture)
    return picture


BATCH = {
    "a": (1, {"bust": (box(4, 4, 24), (255, 51, 51)), "bowl": (box(36, 36, 24), (51, 51, 255))}),
    "b": (2, {"cup": (box(16, 16, 32), (51, 255, 51))}),
}


def save_png(picture: torch.Tensor, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    array = (picture.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    Image.fromarray(array).save(path)


def write_scene(folder: str, item: str, shows: dict[str, str] | None = None) -> None:
    seed, objects = BATCH[item]
    write_item(folder, item, scene(seed, objects), {name: mask for name, (mask, _) in objects.items()}, shows)


def write_item(folder: str, item: str, source: torch.Tensor, masks: dict[str, torch.Tensor],
               shows: dict[str, str] | None = None) -> None:
    """A finished batch item whose generations of each concept are exactly its source region (or the region of
    the concept ``shows[name]`` names) and whose compositions are the source image."""
    root = os.path.join(folder, item)
    os.makedirs(root)
    with open(os.path.join(root, "record.json"), "w") as handle:
        json.dump({"image": f"{item}.png", "concepts": list(masks)}, handle)
    save_png(source, os.path.join(root, "source.png"))
    ConceptSet([Concept(name, name, 1.0, mask) for name, mask in masks.items()], (SIDE, SIDE)).save(
        os.path.join(root, "concepts.safetensors"))
    for name in masks:
        region = source * masks[(shows or {}).get(name, name)]
        for k in range(SAMPLES_PER_CONCEPT):
            save_png(region, os.path.join(root, "identity", f"{name}_{k}.png"))
    if len(masks) > 1:
        for k in range(COMPOSITION_SAMPLES):
            save_png(source, os.path.join(root, "composition", f"{k}.png"))


def write_batch(folder: str, shows: dict[str, str] | None = None) -> str:
    for item in BATCH:
        write_scene(folder, item, shows)
    # Neither an unfinished folder (hidden name) nor a folder without a record is an item; files are not either.
    os.makedirs(os.path.join(folder, ".c.partial"))
    open(os.path.join(folder, ".c.partial", "record.json"), "w").write("{}")
    os.makedirs(os.path.join(folder, "d"))
    open(os.path.join(folder, "summary.jsonl"), "w").write("{}\n")
    return folder


def test_generations_identical_to_their_regions_score_one(tmp_path, clip_encoder, dino_encoder):
    folder = write_batch(str(tmp_path))
    summary, rows = run_benchmark(folder, clip_encoder, dino_encoder)
    assert (summary["bench"], summary["images"], summary["concepts"]) == ("uce", 2, 3)
    for encoder in ("clip", "dino"):
        assert summary[f"sim_i_{encoder}"] == pytest.approx(1.0, abs=1e-6)
        assert summary[f"sim_c_{encoder}"] == pytest.approx(1.0, abs=1e-6)
        assert summary[f"acc1_{encoder}"] == 1.0
        assert summary[f"acc3_{encoder}"] == 1.0
    assert [(row["item"], row["concept"]) for row in rows] == [("a", "bust"), ("a", "bowl"), ("b", "cup")]
    assert rows[2]["sim_c_clip"] is None and rows[0]["sim_c_dino"] == pytest.approx(1.0, abs=1e-6)


def test_generations_of_the_wrong_concept_are_misclassified(tmp_path, clip_encoder):
    folder = write_batch(str(tmp_path), shows={"bust": "bowl", "bowl": "bust"})
    summary, rows = run_benchmark(folder, clip_encoder)
    assert summary["acc1_clip"] == pytest.approx(1 / 3)
    assert summary["sim_i_clip"] < 1.0 - 1e-4
    assert [row["acc1_clip"] for row in rows] == [0.0, 0.0, 1.0]
    assert "sim_i_dino" not in summary


def test_missing_generations_are_refused_with_how_to_fix(tmp_path, clip_encoder):
    folder = write_batch(str(tmp_path))
    os.remove(os.path.join(folder, "a", "identity", f"bowl_{SAMPLES_PER_CONCEPT - 1}.png"))
    with pytest.raises(ValueError, match=rf"bowl_{SAMPLES_PER_CONCEPT - 1}\.png is missing.*python -m ice_ops batch"):
        run_benchmark(folder, clip_encoder)
    shutil.rmtree(os.path.join(folder, "a"))
    write_scene(folder, "a")
    os.remove(os.path.join(folder, "a", "composition", "0.png"))
    with pytest.raises(ValueError, match=r"composition.0\.png is missing.*python -m ice_ops batch"):
        run_benchmark(folder, clip_encoder)
    with pytest.raises(ValueError, match="no finished item"):
        run_benchmark(str(tmp_path / "d"), clip_encoder)


def test_dino_embedding_is_the_normalised_cls_token(dino_folder, dino_encoder):
    from transformers import AutoImageProcessor, AutoModel

    picture = eight_bit_image(3)
    model = AutoModel.from_pretrained(dino_folder, local_files_only=True, use_safetensors=True).eval()
    pixels = AutoImageProcessor.from_pretrained(dino_folder)(images=[Image.fromarray(
        (picture.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8))], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        cls = model(pixel_values=pixels).last_hidden_state[:, 0]
    assert torch.allclose(dino_encoder([picture]), torch.nn.functional.normalize(cls, dim=-1), atol=1e-5)


def test_a_dino_folder_without_its_image_processor_is_refused(tmp_path, dino_folder):
    folder = tmp_path / "dino"
    shutil.copytree(dino_folder, folder)
    os.remove(folder / "preprocessor_config.json")
    with pytest.raises(ValueError, match="preprocessor_config.json"):
        DinoImageEncoder.from_folder(str(folder))


# ---------------------------------------------------------------------- the command
def test_the_command_prints_one_json_line_and_a_table(tmp_path, clip_encoder, dino_folder, capsys):
    folder = write_batch(str(tmp_path / "out"))
    weights = str(tmp_path / "clip.safetensors")
    save_file({key: value.contiguous() for key, value in clip_encoder.model.state_dict().items()}, weights)
    parser = build_parser()
    base = ["benchmark", folder, "--clip-arch", TINY_OPEN_CLIP_CONFIG, "--clip-weights", weights, "--device", "cpu"]

    assert run_command(parser.parse_args(base + ["--dino", dino_folder])) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 1
    summary = json.loads(lines[0])
    assert set(summary) == {"bench", "images", "concepts"} | {
        f"{metric}_{encoder}" for metric in ("sim_i", "sim_c", "acc1", "acc3") for encoder in ("clip", "dino")}
    assert summary["acc1_clip"] == 1.0
    lines = err.splitlines()
    header, *table = lines[[line.split()[:1] for line in lines].index(["item"]):]
    assert header.split() == ["item", "concept", "sim_i_clip", "sim_c_clip", "acc1_clip", "acc3_clip",
                              "sim_i_dino", "sim_c_dino", "acc1_dino", "acc3_dino"]
    assert [line.split()[:2] for line in table] == [["a", "bust"], ["a", "bowl"], ["b", "cup"]]
    assert table[2].split()[3] == "-"  # cup's image has no composition

    path = str(tmp_path / "table.txt")
    assert run_command(parser.parse_args(base + ["--table", path])) == 0
    out, err = capsys.readouterr()
    assert err == "" and json.loads(out)["images"] == 2
    assert open(path).read().splitlines()[0].split()[:3] == ["item", "concept", "sim_i_clip"]
    # An existing table is refused before any work (here the folder does not even exist).
    with pytest.raises(ValueError, match="already exists"):
        run_command(parser.parse_args(["benchmark", str(tmp_path / "absent")] + base[2:] + ["--table", path]))
