"""`python -m ice_ops` end to end on a diffusers folder of tiny random weights."""
import os

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ice_ops.__main__ import build_parser, main
from ice_ops.concepts import Concept, ConceptSet
from devtools.random_models import TINY_OPEN_CLIP_CONFIG



@pytest.fixture(scope="module")
def scene_file(tmp_path_factory):
    generator = torch.Generator().manual_seed(0)
    array = (torch.rand(80, 96, 3, generator=generator) * 80 + 60).byte()
    array[10:40, 10:45] = torch.tensor([230, 30, 30], dtype=torch.uint8)
    array[45:75, 50:90] = torch.tensor([30, 60, 230], dtype=torch.uint8)
    path = tmp_path_factory.mktemp("scene") / "scene.png"
    Image.fromarray(array.numpy(), mode="RGB").convert("P").save(path)  # a palette image on purpose
    return str(path)


def test_help_explains_every_flag():
    parser = build_parser()
    subcommands = parser._subparsers._group_actions[0].choices
    assert set(subcommands) == {"demo", "localize", "learn", "compose", "export", "batch", "benchmark"}
    for name, sub in subcommands.items():
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings} has no help"


def test_localize_learn_compose_export(tmp_path, scene_file, tiny_diffusers_folder, capsys):
    vocabulary = tmp_path / "words.txt"
    vocabulary.write_text("ball\nbox\ntable\nwall\n")
    out = tmp_path / "out"
    assert main(["--quiet", "localize", scene_file, "--model", tiny_diffusers_folder, "--device", "cpu",
                 "--clip-arch", TINY_OPEN_CLIP_CONFIG, "--vocabulary", str(vocabulary),
                 "--max-concepts", "2", "--out", str(out)]) == 0
    concepts = ConceptSet.load(str(out / "concepts.safetensors"))
    assert concepts.image_size == (80, 96)
    masks = sorted(p for p in os.listdir(out) if p.startswith("mask_"))
    assert masks == sorted(f"mask_{name}.png" for name in concepts.names)
    assert Image.open(out / "overlay.png").size == (288, 240), "the labelled overlay is enlarged 3x to be legible"

    # A random model may find no object large enough, so learning starts from a known concept set.
    mask = torch.zeros(80, 96)
    mask[10:40, 10:45] = 1
    known = tmp_path / "known.safetensors"
    ConceptSet([Concept("ball", "ball", 1.0, mask)], (80, 96)).save(str(known))
    learned_path = tmp_path / "learned.safetensors"
    assert main(["--quiet", "learn", str(known), "--image", scene_file,
                 "--model", tiny_diffusers_folder, "--device", "cpu", "--object-steps", "2",
                 "--intrinsic-steps", "2", "--anchors", "material,colour", "--out", str(learned_path)]) == 0
    learned = ConceptSet.load(str(learned_path))
    name = learned.concepts[0].name
    assert set(learned.concepts[0].vectors) == {"object", "instance", "material", "colour"}

    image_path = tmp_path / "composed.png"
    assert main(["--quiet", "compose", str(learned_path), f"a photo of a cup made of [{name}.material]",
                 "--model", tiny_diffusers_folder, "--device", "cpu", "--steps", "2", "--height", "64",
                 "--width", "64", "--out", str(image_path)]) == 0
    assert Image.open(image_path).size == (64, 64)

    embeddings = tmp_path / "embeddings"
    assert main(["--quiet", "export", str(learned_path), "--embeddings-dir", str(embeddings), "--prefix", "scene"]) == 0
    data = load_file(str(embeddings / f"scene_{name}_material.safetensors"))
    assert next(iter(data.values())).shape == (1, 32)
    assert "embedding:scene_" in capsys.readouterr().out

    # nothing is overwritten silently
    with pytest.raises(SystemExit) as stop:
        main(["--quiet", "export", str(learned_path), "--embeddings-dir", str(embeddings), "--prefix", "scene"])
    assert stop.value.code == 2


def test_user_errors_exit_with_a_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["export", str(tmp_path / "missing.safetensors"), "--embeddings-dir", str(tmp_path)])
    assert stop.value.code == 2
    assert "does not exist" in capsys.readouterr().err


def test_demo_steps_must_be_positive(capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["demo", "--learn-steps", "0", "--out", "unused"])
    assert stopped.value.code == 2 and "--learn-steps must be at least 1" in capsys.readouterr().err
