"""`python -m ice_ops batch`: every image of a folder, one folder each written whole or not at all, resumable,
a bad image reported without stopping the rest, and the same command sharded over two gloo ranks."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys

import pytest

from ice_ops import batch
from ice_ops.__main__ import main
from ice_ops.concepts import sanitize_name
from ice_ops.imaging import tensor_to_pil
from ice_ops.toyworld import embedded_weights_present
from ice_ops.toyworld.scenes import held_out_seed, make_scene

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_toyworld = pytest.mark.skipif(not embedded_weights_present(), reason="the embedded Toy World weights are missing")
# Few steps everywhere: these tests check what is written, not how well it is learned.
FAST = ["--object-steps", "2", "--intrinsic-steps", "2", "--samples", "1", "--composition-samples", "1",
        "--sample-steps", "2"]
DISTRIBUTED_TIMEOUT_S = 240


def write_scenes(folder, count: int, first: int = 0) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    paths = []
    for index in range(first, first + count):
        path = os.path.join(folder, f"scene_{index}.png")
        tensor_to_pil(make_scene(held_out_seed(index)).image).save(path)
        paths.append(path)
    return paths


def run_cli(*args: str, env: dict | None = None, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    command = (launcher or [sys.executable]) + ["-m", "ice_ops", "--quiet", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=DISTRIBUTED_TIMEOUT_S)


def run_in_process(*args: str) -> subprocess.CompletedProcess:
    """The command through ``ice_ops.__main__.main`` in this process (no second import of the model libraries)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(["--quiet", *args])
        except SystemExit as stop:  # argparse and user errors exit through parser.exit
            status = stop.code
    return subprocess.CompletedProcess(list(args), status, out.getvalue(), err.getvalue())


def read_summary(out) -> list[dict]:
    with open(os.path.join(out, batch.SUMMARY_NAME), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


# ---------------------------------------------------------------------- what to do
def test_a_folder_lists_its_images_by_name_and_a_list_file_its_lines(tmp_path):
    for name in ("b.png", "a.JPG", ".hidden.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub.png").mkdir()
    assert batch.list_images(str(tmp_path)) == [str(tmp_path / "a.JPG"), str(tmp_path / "b.png")]
    listing = tmp_path / "list.txt"
    listing.write_text("# catalogue\nb.png\n\n/elsewhere/c.png\n", encoding="utf-8")
    assert batch.list_images(str(listing)) == [str(tmp_path / "b.png"), "/elsewhere/c.png"]


@pytest.mark.parametrize("content, message", [(None, "does not exist"), ("", "lists no images"),
                                              (b"\xff\xfe\x00", "not a text file")])
def test_sources_without_images_are_refused_with_what_to_give(tmp_path, content, message):
    source = tmp_path / "source.txt"
    if isinstance(content, bytes):
        source.write_bytes(content)
    elif content is not None:
        source.write_text(content)
    with pytest.raises(ValueError, match=message):
        batch.list_images(str(source))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no image files"):
        batch.list_images(str(empty))


def test_every_image_gets_its_own_folder_name():
    paths = ["/a/cat.png", "/b/cat.jpg", "/c/Cat.png", "/d/my photo (1).png", "/e/...", "/f/a..b.png", "/g/CON.png"]
    names = batch.item_names(paths)
    assert names == ["cat", "cat_2", "Cat_3", "my_photo_1", batch.FALLBACK_ITEM_NAME, "a_b", "CON_image"]
    for name in names:  # every name is also a valid prefix of the image's embedding files
        assert sanitize_name(name) == name


def test_shards_cover_every_image_once():
    todo = [0, 2, 3, 5, 7, 8, 9]
    shares = [batch.shard(todo, rank, 3) for rank in range(3)]
    assert sorted(i for share in shares for i in share) == todo
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_impossible_settings_are_refused_before_anything_runs():
    with pytest.raises(ValueError, match="--refine-steps needs phase two"):
        batch.BatchSettings(intrinsic_steps=0, refine_steps=5).checked()
    with pytest.raises(ValueError, match="--samples must be 0"):
        batch.BatchSettings(samples=-1).checked()
    with pytest.raises(ValueError, match="anchor"):
        batch.BatchSettings(anchors="material,material").checked()


# ---------------------------------------------------------------------- one folder per image, whole or nothing
def test_a_failed_write_leaves_neither_the_folder_nor_its_partial_copy(tmp_path, monkeypatch):
    real_rename = os.rename

    def no_room(source, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "rename", no_room)
    with pytest.raises(OSError):
        batch.write_item(str(tmp_path), "cat", {"a.png": b"1", "sub/b.png": b"2"})
    monkeypatch.setattr(os, "rename", real_rename)
    assert os.listdir(tmp_path) == []
    batch.write_item(str(tmp_path), "cat", {"a.png": b"1", "sub/b.png": b"2"})
    assert (tmp_path / "cat" / "sub" / "b.png").read_bytes() == b"2"


def test_a_folder_that_the_batch_did_not_finish_is_not_overwritten(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match="not a finished batch folder"):
        batch.write_item(str(tmp_path), "cat", {"a.png": b"1"})
    assert (tmp_path / "cat" / "mine.txt").read_text() == "keep"


def test_ctrl_c_inside_an_image_stops_the_batch_and_leaves_no_folder(tmp_path, monkeypatch):
    paths = write_scenes(tmp_path / "in", 1)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(batch, "process_image", interrupted)
    with pytest.raises(KeyboardInterrupt):  # the models are never reached: process_image stops first
        batch.run_batch(None, None, paths, str(tmp_path / "out"), batch.BatchSettings())
    assert os.listdir(tmp_path / "out") == []


# ---------------------------------------------------------------------- the command on Toy World scenes
@pytest.fixture(scope="module")
def toyworld_run(tmp_path_factory):
    """Three scenes and one damaged file through the command, then a rerun after a simulated kill."""
    if not embedded_weights_present():
        pytest.skip("the embedded Toy World weights are missing")
    base = tmp_path_factory.mktemp("batch")
    source, out = base / "in", base / "out"
    write_scenes(source, 3)
    (source / "scene_9_damaged.png").write_bytes(b"not a png")
    first = run_in_process("batch", str(source), "--model", "toyworld", "--out", str(out), *FAST)
    return source, out, first


@needs_toyworld
def test_each_image_gets_a_complete_folder_and_a_damaged_one_is_reported(toyworld_run):
    source, out, result = toyworld_run
    assert result.returncode == 1, result.stderr  # one image failed
    assert "scene_9_damaged.png" in result.stderr and "not an image Pillow can read" in result.stderr
    rows = read_summary(out)
    assert [os.path.basename(row["image"]) for row in rows] == sorted(os.listdir(source))
    assert [row["status"] for row in rows] == ["done", "done", "done", "failed"]
    for row in rows[:3]:
        folder = out / row["item"]
        assert row["names"] and len(row["names"]) == len(row["words"]) == len(row["scores"]) == len(row["areas"])
        assert all(0 < area < 1 for area in row["areas"]) and row["seconds"] > 0 and row["error"] is None
        assert json.loads((folder / batch.RECORD_NAME).read_text()) == row
        expected = {batch.SOURCE_NAME, batch.OVERLAY_NAME, batch.CONCEPT_SET_NAME, batch.RECORD_NAME}
        expected |= {batch.MASK_PATTERN.format(name) for name in row["names"]}
        expected |= {f"{batch.IDENTITY_FOLDER}/{name}_0.png" for name in row["names"]}
        expected |= {f"{batch.EMBEDDINGS_FOLDER}/{row['item']}_{name}_{role}.safetensors"
                     for name, roles in row["roles"].items() for role in roles}
        if len(row["names"]) > 1:
            expected.add(f"{batch.COMPOSITION_FOLDER}/0.png")
        written = {os.path.relpath(os.path.join(top, name), folder).replace(os.sep, "/")
                   for top, _, names in os.walk(folder) for name in names}
        assert written == expected
    assert not [name for name in os.listdir(out) if name.startswith(".")]
    assert "damaged" not in " ".join(os.listdir(out))


@needs_toyworld
def test_the_page_shows_every_image_and_links_only_files_that_exist(toyworld_run):
    _, out, _ = toyworld_run
    page = (out / batch.INDEX_NAME).read_text(encoding="utf-8")
    rows = read_summary(out)
    for row in rows:
        assert os.path.basename(row["image"]) in page
        for name in row["names"]:
            assert f"{batch.MASK_PATTERN.format(name)}" in page
    assert "failed: " in page
    links = re.findall(r'src="([^"]+)"', page)
    assert links and all(os.path.isfile(os.path.join(out, link)) for link in links)


@needs_toyworld
def test_a_rerun_skips_finished_images_and_finishes_one_cut_off_by_a_kill(toyworld_run):
    source, out, _ = toyworld_run
    rows = read_summary(out)
    records = {row["item"]: (out / row["item"] / batch.RECORD_NAME).stat().st_mtime_ns for row in rows[1:3]}
    # A kill while scene_0 was being written: its folder is still under its partial name.
    cut_off = out / (batch.PARTIAL_PREFIX + rows[0]["item"] + batch.PARTIAL_SUFFIX)
    os.rename(out / rows[0]["item"], cut_off)
    (cut_off / batch.RECORD_NAME).unlink()
    again = run_in_process("batch", str(source), "--model", "toyworld", "--out", str(out), *FAST)
    assert again.returncode == 1
    assert [row["status"] for row in read_summary(out)] == ["done", "skipped", "skipped", "failed"]
    assert (out / rows[0]["item"] / batch.RECORD_NAME).is_file() and not cut_off.exists()
    assert {item: (out / item / batch.RECORD_NAME).stat().st_mtime_ns for item in records} == records
    assert "3 finished earlier" not in again.stdout and "2 finished earlier" in again.stdout


# ---------------------------------------------------------------------- two ranks
@needs_toyworld
def test_two_gloo_ranks_share_the_images_and_rank_zero_writes_the_summary(tmp_path, toyworld_run):
    source, out = tmp_path / "in", tmp_path / "out"
    write_scenes(source, 3)  # the scenes of the one-process run above, without the damaged file
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = run_cli("batch", str(source), "--model", "toyworld", "--device", "cpu", "--out", str(out), *FAST,
                     env=env, launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_summary(out)
    assert [row["status"] for row in rows] == ["done"] * 3
    assert result.stdout.count("3 images: 3 done") == 1  # only rank 0 reports
    one_process = {row["item"]: row for row in read_summary(toyworld_run[1])}
    for row in rows:  # the same seeds on every rank: the same concepts as in one process
        alone = one_process[row["item"]]
        assert row["names"] == alone["names"]
        assert row["scores"] == pytest.approx(alone["scores"], abs=1e-3)


# ---------------------------------------------------------------------- the benchmark on what the batch wrote
@needs_toyworld
def test_the_uce_benchmark_scores_a_toyworld_batch_with_the_embedded_clip(tmp_path):
    from ice_ops.benchmark import COMPOSITION_SAMPLES, SAMPLES_PER_CONCEPT, ClipImageEncoder, run_benchmark
    from ice_ops.toyworld import CLIP_CONFIG_PATH, CLIP_WEIGHTS_PATH, embedded_bundle, embedded_retriever
    from ice_ops.toyworld import localize_settings

    paths = write_scenes(tmp_path / "in", 1)
    settings = batch.BatchSettings(localize=localize_settings(), object_steps=2, intrinsic_steps=2, sample_steps=1)
    rows = batch.run_batch(embedded_bundle(), embedded_retriever(), paths, str(tmp_path / "out"), settings)
    names = rows[0]["names"]
    assert len(names) > 1  # so that the composition metric is computed too
    folder = tmp_path / "out" / rows[0]["item"]
    assert len(os.listdir(folder / batch.IDENTITY_FOLDER)) == SAMPLES_PER_CONCEPT * len(names)
    assert len(os.listdir(folder / batch.COMPOSITION_FOLDER)) == COMPOSITION_SAMPLES

    summary, per_concept = run_benchmark(str(tmp_path / "out"), ClipImageEncoder.from_files(CLIP_CONFIG_PATH,
                                                                                           CLIP_WEIGHTS_PATH))
    assert (summary["images"], summary["concepts"]) == (1, len(names))
    assert [row["concept"] for row in per_concept] == names
    for key in ("sim_i_clip", "sim_c_clip"):
        assert -1 <= summary[key] <= 1
    assert 0 <= summary["acc1_clip"] <= summary["acc3_clip"] <= 1
    assert summary["acc3_clip"] == 1.0  # three concepts or fewer: the right one is always among the top 3
