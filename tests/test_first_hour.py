"""What a new user meets first, from the command line and Python: damaged and unusual files, interrupted and
failed writes, arguments checked before any work. Each test names the user-visible behaviour it guards."""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import stat

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save

import ice_ops.__main__ as cli
from ice_ops import files
from ice_ops.concepts import Concept, ConceptSet, sanitize_name, text_encoder_fingerprint
from ice_ops.learn import learn_object_tokens

SIZE = 64


# ---------------------------------------------------------------------- helpers
def _run(argv, capsys) -> tuple[int, str]:
    """The command line's exit status and its stderr (a user sees only these)."""
    with pytest.raises(SystemExit) as stopped:
        cli.main(argv)
    return stopped.value.code, capsys.readouterr().err


def _one_concept_set(vectors=None, fingerprint=None, mask=None) -> ConceptSet:
    if mask is None:
        mask = torch.zeros(SIZE, SIZE)
        mask[10:40, 10:40] = 1
    return ConceptSet([Concept("ball", "ball", 1.0, mask, dict(vectors or {}))], (SIZE, SIZE), fingerprint=fingerprint)


def _image_file(folder, size=SIZE) -> str:
    array = np.full((size, size, 3), 120, np.uint8)
    array[10:40, 10:40] = (230, 30, 30)
    path = os.path.join(folder, "scene.png")
    Image.fromarray(array).save(path)
    return path


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if the command line gets as far as loading a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(cli, "load_bundle", refuse)


# ---------------------------------------------------------------------- images
def test_a_16_bit_greyscale_png_keeps_its_tones(tmp_path):
    ramp = (np.arange(SIZE * SIZE).reshape(SIZE, SIZE) * 16).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    image = cli.load_image(str(path))
    assert image.shape == (3, SIZE, SIZE)
    expected = torch.from_numpy(ramp.astype(np.float32) / 65535)
    assert torch.allclose(image[0], expected, atol=1e-6) and torch.equal(image[0], image[2])


def test_a_too_small_image_is_refused_before_any_model_is_loaded(tmp_path, capsys, no_model_loading):
    path = _image_file(tmp_path, size=63)
    status, err = _run(["localize", path, "--model", "unused", "--clip-arch", "unused", "--out", str(tmp_path / "o")],
                       capsys)
    assert status == 2 and "63x63" in err and "at least 64" in err


# ---------------------------------------------------------------------- damaged model files
def test_a_garbage_or_renamed_checkpoint_is_one_line_naming_the_file(tmp_path, capsys):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 100)
    renamed = tmp_path / "renamed.safetensors"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, renamed)  # a .ckpt (pickle zip) with a new name
    for path in (garbage, renamed):
        status, err = _run(["localize", _image_file(tmp_path), "--model", str(path), "--device", "cpu",
                            "--clip-arch", "unused", "--out", str(tmp_path / "o")], capsys)
        assert status == 2 and str(path) in err and "Traceback" not in err
        assert err.count("\n") == 1


def test_a_truncated_unet_in_a_diffusers_folder_names_the_part(tmp_path, tiny_diffusers_folder, capsys):
    folder = tmp_path / "model"
    shutil.copytree(tiny_diffusers_folder, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    status, err = _run(["localize", _image_file(tmp_path), "--model", str(folder), "--device", "cpu",
                        "--clip-arch", "unused", "--out", str(tmp_path / "o")], capsys)
    assert status == 2 and str(folder / "unet") in err and "copy the model folder again" in err


def test_pickle_weights_in_a_diffusers_folder_are_refused_and_never_unpickled(tmp_path, tiny_diffusers_folder,
                                                                               monkeypatch):
    from ice_ops.bundle import DiffusionBundle

    folder = tmp_path / "model"
    shutil.copytree(tiny_diffusers_folder, folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({}, folder / "unet" / "diffusion_pytorch_model.bin")

    def unpickling(*args, **kwargs):
        raise AssertionError("a pickle file was loaded")

    monkeypatch.setattr(torch, "load", unpickling)
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model\.bin.*pickle file.*safe_serialization=True"):
        DiffusionBundle.from_pretrained(str(folder))


def test_loading_a_model_folder_leaves_the_console_quiet(tiny_diffusers_folder, capfd, caplog):
    from ice_ops.bundle import DiffusionBundle

    with caplog.at_level(logging.WARNING):
        DiffusionBundle.from_pretrained(tiny_diffusers_folder)
    captured = capfd.readouterr()
    assert "accelerate" not in captured.err + caplog.text
    assert "Loading weights" not in captured.err


# ---------------------------------------------------------------------- damaged concept sets
def _concept_set_file(path, metadata: dict, tensors=None) -> str:
    tensors = tensors if tensors is not None else {"mask.0": torch.ones(SIZE, SIZE)}
    path.write_bytes(save(tensors, metadata={"ice": json.dumps(metadata)}))
    return str(path)


@pytest.mark.parametrize("change, expected", [
    (lambda m: m.pop("concepts"), "missing entry 'concepts'"),
    (lambda m: m.update(version="two"), "version is 'two'"),
    (lambda m: m["concepts"][0].pop("roles"), "missing entry 'roles'"),
    (lambda m: m["concepts"][0].update(roles=["object"]), "missing entry 'vector.0.object'"),
    (lambda m: m.update(image_size=[32, 32]), "not the recorded image size"),
])
def test_a_damaged_concept_set_is_one_message_naming_the_file(tmp_path, change, expected):
    metadata = {"format": "ice-concept-set", "version": 1, "image_size": [SIZE, SIZE],
                "concepts": [{"name": "ball", "word": "ball", "score": 1.0, "roles": []}]}
    change(metadata)
    path = _concept_set_file(tmp_path / "damaged.safetensors", metadata)
    with pytest.raises(ValueError) as refused:
        ConceptSet.load(path)
    assert path in str(refused.value) and expected in str(refused.value)


def test_a_concept_set_with_a_bad_json_header_names_the_file(tmp_path):
    path = tmp_path / "bad_json.safetensors"
    path.write_bytes(save({"mask.0": torch.ones(2, 2)}, metadata={"ice": "{not json"}))
    with pytest.raises(ValueError, match="bad_json.safetensors.*damaged concept set"):
        ConceptSet.load(str(path))


# ---------------------------------------------------------------------- interrupted and failed runs
def test_ctrl_c_says_nothing_was_written_and_exits_130(tmp_path, capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_export", interrupted)
    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices["export"].set_defaults(handler=interrupted)
    status, err = _run(["export", "x.safetensors", "--embeddings-dir", str(tmp_path)], capsys)
    assert status == 130 and err == "interrupted; nothing was written\n"


def _full_disk_after(monkeypatch, good_writes: int):
    """The disk fills up after ``good_writes`` files."""
    real = files._write_bytes
    count = {"writes": 0}

    def write(path, payload):
        count["writes"] += 1
        if count["writes"] > good_writes:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        real(path, payload)

    monkeypatch.setattr(files, "_write_bytes", write)


def _learned_file(tmp_path) -> str:
    vectors = {role: torch.randn(32) for role in ("object", "instance", "material", "colour")}
    path = tmp_path / "learned.safetensors"
    _one_concept_set(vectors, fingerprint={"family": "sd1"}).save(str(path))
    return str(path)


def test_export_on_a_full_disk_leaves_nothing_and_a_rerun_succeeds(tmp_path, capsys, monkeypatch):
    learned = _learned_file(tmp_path)
    folder = tmp_path / "embeddings"
    _full_disk_after(monkeypatch, good_writes=2)
    status, err = _run(["export", learned, "--embeddings-dir", str(folder), "--prefix", "p"], capsys)
    assert status == 1 and "No space left on device" in err and "free some disk space" in err
    assert not folder.exists() or os.listdir(folder) == []
    monkeypatch.undo()
    assert cli.main(["--quiet", "export", learned, "--embeddings-dir", str(folder), "--prefix", "p"]) == 0
    assert len(os.listdir(folder)) == 4


def test_a_failed_overwrite_puts_the_previous_files_back(tmp_path, monkeypatch):
    first, second = str(tmp_path / "a.bin"), str(tmp_path / "b.bin")
    files.write_files_atomic({first: b"old a", second: b"old b"})
    _full_disk_after(monkeypatch, good_writes=1)
    with pytest.raises(OSError):
        files.write_files_atomic({first: b"new a", second: b"new b"}, overwrite=True)
    assert open(first, "rb").read() == b"old a" and open(second, "rb").read() == b"old b"
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "b.bin"]


def test_a_failed_rename_midway_removes_what_was_committed(tmp_path, monkeypatch):
    real_replace = os.replace
    calls = {"n": 0}

    def replace(source, target):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.EACCES, "Permission denied", target)
        real_replace(source, target)

    monkeypatch.setattr(files.os, "replace", replace)
    with pytest.raises(OSError):
        files.write_files_atomic({str(tmp_path / "x" / "a"): b"a", str(tmp_path / "x" / "b"): b"b"})
    assert os.listdir(tmp_path) == []  # the folder it made is gone too


def test_a_too_long_prefix_is_refused_with_the_fix(tmp_path, capsys):
    status, err = _run(["export", _learned_file(tmp_path), "--embeddings-dir", str(tmp_path / "e"),
                        "--prefix", "p" * 260], capsys)
    assert status == 2 and "choose a shorter prefix" in err


def test_localize_overwrite_replaces_the_previous_runs_masks(tmp_path, tiny_diffusers_folder, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mask_old_word.png").write_bytes(b"from an earlier run")
    (out / "notes.txt").write_text("the user's own file")
    mask = torch.zeros(SIZE, SIZE)
    mask[10:40, 10:40] = 1
    monkeypatch.setattr("ice_ops.localization.localize", lambda *a, **k: _one_concept_set(mask=mask))
    monkeypatch.setattr("ice_ops.retrieve.ClipRetriever.from_pretrained", lambda *a, **k: None)
    assert cli.main(["--quiet", "localize", _image_file(tmp_path), "--model", tiny_diffusers_folder,
                     "--device", "cpu", "--clip-arch", "unused", "--out", str(out), "--overwrite"]) == 0
    assert sorted(os.listdir(out)) == ["concepts.safetensors", "mask_ball.png", "notes.txt", "overlay.png"]


def test_localize_that_fails_while_writing_leaves_no_output(tmp_path, tiny_diffusers_folder, monkeypatch, capsys):
    monkeypatch.setattr("ice_ops.localization.localize", lambda *a, **k: _one_concept_set())
    monkeypatch.setattr("ice_ops.retrieve.ClipRetriever.from_pretrained", lambda *a, **k: None)
    _full_disk_after(monkeypatch, good_writes=2)
    out = tmp_path / "out"
    status, _ = _run(["--quiet", "localize", _image_file(tmp_path), "--model", tiny_diffusers_folder,
                      "--device", "cpu", "--clip-arch", "unused", "--out", str(out)], capsys)
    assert status == 1 and not out.exists()


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        single = files.write_bytes_atomic(str(tmp_path / "one.bin"), b"1")
        several = files.write_files_atomic({str(tmp_path / "two.bin"): b"2"})
    finally:
        os.umask(previous)
    for path in [single, *several]:
        assert stat.S_IMODE(os.stat(path).st_mode) == mode


# ---------------------------------------------------------------------- arguments checked first
@pytest.mark.parametrize("extra, message", [
    (["--anchors", " , "], "at least one anchor"),
    (["--anchors", "material,ball"], "also the word of concept 'ball'"),
    (["--anchors", "object"], "reserved role name"),
    (["--refine-steps", "-5"], "refine_steps must be 0"),
    (["--object-steps", "0"], "--object-steps must be at least 1"),
])
def test_learn_checks_every_argument_before_loading_a_model(tmp_path, capsys, no_model_loading, extra, message):
    concepts = tmp_path / "found.safetensors"
    _one_concept_set().save(str(concepts))
    status, err = _run(["learn", str(concepts), "--image", _image_file(tmp_path), "--model", "unused",
                        "--out", str(tmp_path / "learned.safetensors"), *extra], capsys)
    assert status == 2 and message in err


def test_learning_a_set_made_for_another_model_is_refused_unless_asked(tiny_bundle):
    image = torch.full((3, SIZE, SIZE), 0.5)
    other_model = {"width": 32, "vocab_size": 49408, "family": "custom", "embedding_sha256": "0123456789abcdef"}
    learned_elsewhere = _one_concept_set({"object": torch.zeros(32), "instance": torch.zeros(32),
                                          "colour": torch.zeros(32)}, fingerprint=other_model)
    with pytest.raises(ValueError, match="learned on a different model.*relearn=True"):
        learn_object_tokens(tiny_bundle, image, learned_elsewhere, steps=1)
    relearned = learn_object_tokens(tiny_bundle, image, learned_elsewhere, steps=1, relearn=True)
    assert relearned.fingerprint == text_encoder_fingerprint(tiny_bundle.text_encoder)
    assert set(relearned.concepts[0].vectors) == {"object", "instance"}  # the other model's colour token is gone


# ---------------------------------------------------------------------- masks and names
def test_a_nan_mask_is_named_not_reported_as_divergence(tiny_bundle):
    mask = torch.zeros(SIZE, SIZE)
    mask[10:40, 10:40] = float("nan")
    with pytest.raises(ValueError, match="mask of 'ball' contains NaN"):
        learn_object_tokens(tiny_bundle, torch.full((3, SIZE, SIZE), 0.5), _one_concept_set(mask=mask), steps=1)


def test_a_mask_with_nothing_above_the_threshold_is_refused(tiny_bundle):
    faint = torch.full((SIZE, SIZE), 1e-6)
    with pytest.raises(ValueError, match="mask of 'ball' has no pixel above 0.5"):
        learn_object_tokens(tiny_bundle, torch.full((3, SIZE, SIZE), 0.5), _one_concept_set(mask=faint), steps=1)


@pytest.mark.parametrize("name", ["con", "NUL", "Com1", "lpt9", "aux"])
def test_windows_reserved_names_are_refused(name):
    with pytest.raises(ValueError, match="Windows reserves"):
        sanitize_name(name, what="save name")
    assert sanitize_name(name + "_set") == name + "_set"
