"""ComfyUI tier: the pack inside a real ComfyUI (COMFYUI_PATH), on CPU, next to the stock nodes.

A random-weight SD1.5-architecture checkpoint (two UNet levels, full CLIP-L and VAE) and a tiny open_clip
retriever are built once into pytest's cache; a ComfyUI server runs on loopback with a temporary base folder
and this repository linked into its custom_nodes. Every workflow's API twin is queued through /prompt with
a 64 px image (ICE working at 128 px) and one or two steps.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from comfyui_harness import (  # noqa: E402
    PACK_DIR_NAME,
    ROOT,
    ComfyServer,
    PromptFailed,
    PromptRejected,
    comfyui_path,
    ensure_models,
    execution_error,
    make_base,
    output_files,
    queue_and_wait_for_progress,
)

from ice_ops.toyworld import embedded_weights_present  # noqa: E402
from ice_ops.toyworld.scenes import DEFAULT_SIZE as TOYWORLD_SIDE  # noqa: E402
from nodes._spec import BUILTIN_VOCABULARY, NODE_BY_ID, NODES, STOCK_NODES, TOYWORLD_MODEL  # noqa: E402

COMFYUI = comfyui_path()
_MISSING = [m for m in ("aiohttp", "yaml", "requests") if importlib.util.find_spec(m) is None]
pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(COMFYUI is None, reason="set COMFYUI_PATH to a ComfyUI checkout to run the ComfyUI tier"),
    pytest.mark.skipif(bool(_MISSING), reason=f"ComfyUI's requirements are not installed ({_MISSING})"),
]

CHECKPOINT = "ice_tiny_sd15.safetensors"
DIFFUSERS_MODEL = "ice_tiny_diffusers"  # a random tiny diffusers folder in models/diffusers
RETRIEVER = "tiny_open_clip"
IMAGE = "ice_test.png"
SIDE = 64  # side of the test image and of sampled images
# ICE's working resolution in the end-to-end runs: at 64 px (an 8x8 latent) the random test model's attention
# gives the whole image to the filler words "things"/"background" for every candidate word.
WORKING_RESOLUTION = 128
RUN_TIMEOUT_S = 900
CANDIDATE_WORDS = (
    "vase", "cup", "apple", "chair", "lamp", "bottle", "table", "clock", "book", "bowl", "car", "tree",
    "house", "dog", "cat", "flower", "shoe", "hat", "ball", "boat", "bird", "horse", "phone", "window",
)
SMALL = {
    "CheckpointLoaderSimple": {"ckpt_name": CHECKPOINT},
    "LoadImage": {"image": IMAGE},
    "ICE_LoadICEModel": {"working_resolution": WORKING_RESOLUTION},
    "ICE_LoadCLIPRetriever": {"weights": RETRIEVER + ".safetensors", "architecture": RETRIEVER},
    "ICE_IterativeLocalize": {"max_concepts": 2},
    "ICE_LearnObjectTokens": {"steps": 2},
    "ICE_LearnIntrinsicTokens": {"steps": 2},
    "EmptyLatentImage": {"width": SIDE, "height": SIDE},
    "KSampler": {"steps": 1},
}


def load_twin(name: str) -> dict:
    with open(os.path.join(ROOT, "tests", "workflows", name + "_api.json"), encoding="utf-8") as handle:
        return json.load(handle)


def with_inputs(prompt: dict, changes: dict[str, dict]) -> dict:
    """A copy of ``prompt`` with the inputs of every node of the given class types replaced."""
    out = copy.deepcopy(prompt)
    for node in out.values():
        node["inputs"].update(changes.get(node["class_type"], {}))
    return out


def node_id(prompt: dict, class_type: str) -> str:
    (found,) = [key for key, node in prompt.items() if node["class_type"] == class_type]
    return found


def write_test_image(path: str) -> None:
    """Three flat regions (a red disc on a blue and green background), SIDE x SIDE."""
    from PIL import Image, ImageDraw

    picture = Image.new("RGB", (SIDE, SIDE), (40, 80, 200))
    draw = ImageDraw.Draw(picture)
    draw.rectangle([0, SIDE * 2 // 3, SIDE, SIDE], fill=(40, 160, 60))
    draw.ellipse([SIDE // 4, SIDE // 6, SIDE * 3 // 4, SIDE * 2 // 3], fill=(210, 40, 40))
    picture.save(path)


def write_tiny_diffusers_folder(folder: str) -> None:
    from devtools.random_models import build_random_bundle, save_diffusers_folder

    save_diffusers_folder(build_random_bundle("tiny"), folder)


@pytest.fixture(scope="module")
def models(request) -> str:
    folder = str(request.config.cache.mkdir("comfyui_ice_models"))
    return ensure_models(folder, COMFYUI)


@pytest.fixture(scope="module")
def server(tmp_path_factory, models):
    base = make_base(str(tmp_path_factory.mktemp("comfyui_base")), models)
    write_test_image(os.path.join(base, "input", IMAGE))
    write_tiny_diffusers_folder(os.path.join(base, "models", "diffusers", DIFFUSERS_MODEL))
    running = ComfyServer(COMFYUI, base).start()
    yield running
    running.stop()


def models_path(server: ComfyServer, *parts: str) -> str:
    return os.path.join(server.base, "models", *parts)


def files_starting(server: ComfyServer, folder: str, prefix: str) -> list[str]:
    path = models_path(server, folder)
    return [n for n in os.listdir(path) if n.startswith(prefix)] if os.path.isdir(path) else []


# ---------------------------------------------------------------------- loading and schemas
def test_extension_loads_as_comfyui_loads_it_and_every_schema_validates(tmp_path):
    script = os.path.join(HERE, "check_extension.py")
    result = subprocess.run(
        [sys.executable, script, "--comfyui", COMFYUI, "--base", str(tmp_path)],
        capture_output=True, text=True, cwd=COMFYUI, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["imported_before_entrypoint"] == [], "the pack root must not import ComfyUI"
    assert set(report["nodes"]) == set(NODE_BY_ID)
    for node_id_, info in report["nodes"].items():
        assert_matches_spec(info["v1"], NODE_BY_ID[node_id_])


def test_of_every_model_class_comfyui_detects_only_sd1_and_sd2_are_taken():
    """model_family on ComfyUI's own classes (not stand-ins named like them): SD 1.x and 2.x text-to-image UNets
    are taken with their text encoder's width, and every other class (SDXL, SD3, Flux, the SD2-derived unCLIP,
    upscaler and Lotus models, instruct-pix2pix) is refused with a message naming what it is."""
    script = os.path.join(HERE, "check_model_classes.py")
    result = subprocess.run([sys.executable, script, "--comfyui", COMFYUI], capture_output=True, text=True,
                            cwd=COMFYUI, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    taken = {name: verdict["family"] for name, verdict in report.items() if verdict.get("family")}
    assert taken == {"SD15": "sd1", "SD20": "sd2"}
    from ice_ops.bundle import read_config

    for name, family in taken.items():
        assert report[name]["context_dim"] == read_config(family, "text_encoder")["hidden_size"]
    refused = [name for name, verdict in report.items() if verdict.get("built") and not verdict.get("family")]
    assert {"SDXL", "SD3", "Flux", "SD21UnclipH", "SD_X4Upscaler", "LotusD", "SD15_instructpix2pix"} <= set(refused)
    assert all(f"detected it as {name}" in report[name]["refusal"] for name in refused)


def assert_matches_spec(info: dict, spec) -> None:
    """/object_info's V1 description of a node against nodes/_spec.py."""
    assert info["display_name"] == spec.display_name
    assert info["category"] == spec.category
    assert info["description"] == spec.description
    assert info["experimental"] == spec.experimental
    assert info["output_node"] == spec.output_node
    order = info["input_order"].get("required", []) + info["input_order"].get("optional", [])
    assert order == [i.name for i in spec.inputs if not i.optional] + [i.name for i in spec.inputs if i.optional]
    for item in spec.inputs:
        section = "optional" if item.optional else "required"
        kind, options = info["input"][section][item.name]
        expected = item.type if item.type != "COMBO" else "COMBO"
        assert (kind if isinstance(kind, str) else "COMBO") == expected, item.name
        assert options.get("tooltip") == item.tooltip
        if item.default is not None and item.type != "COMBO":
            assert options.get("default") == item.default
    assert info["output"] == [o.type for o in spec.outputs]
    assert info["output_name"] == [o.name for o in spec.outputs]
    assert info["output_tooltips"] == [o.tooltip for o in spec.outputs]


def test_server_serves_every_ice_node_and_the_stock_nodes_our_workflows_use(server):
    assert "IMPORT FAILED" not in server.log()
    info = server.object_info()
    for spec in NODES:
        assert_matches_spec(info[spec.node_id], spec)
    for name, spec in STOCK_NODES.items():
        order = info[name]["input_order"]["required"]
        assert order == [i.name for i in spec.inputs], name
        assert info[name]["output"] == [o.type for o in spec.outputs], name
        for item in spec.inputs:
            kind = info[name]["input"]["required"][item.name][0]
            assert (kind if isinstance(kind, str) else "COMBO") == item.type, f"{name}.{item.name}"


def test_example_workflows_are_served_as_templates_of_the_pack(server):
    from urllib.parse import quote

    import requests

    from devtools.make_workflows import TEMPLATE_TITLES

    templates = requests.get(server.url + "/workflow_templates", timeout=30).json()
    assert set(templates[PACK_DIR_NAME]) == set(TEMPLATE_TITLES.values())
    folder = f"{server.url}/api/workflow_templates/{PACK_DIR_NAME}/"
    for title in TEMPLATE_TITLES.values():  # files named by their titles: spaces and commas in the URL
        for suffix in (".json", ".jpg"):
            assert requests.get(folder + quote(title) + suffix, timeout=30).status_code == 200, title + suffix
    assert requests.get(folder + quote(TEMPLATE_TITLES["ice_compose"]) + ".json", timeout=30).json()["nodes"]


def test_model_folders_list_the_test_files(server):
    info = server.object_info()
    weights = info["ICE_LoadCLIPRetriever"]["input"]["required"]["weights"][1]["options"]
    architectures = info["ICE_LoadCLIPRetriever"]["input"]["required"]["architecture"][1]["options"]
    assert RETRIEVER + ".safetensors" in weights
    assert RETRIEVER in architectures and architectures[0] == "ViT-L-14-quickgelu"
    folders = info["ICE_LoadDiffusersModel"]["input"]["required"]["folder"][1]["options"]
    embedded = [TOYWORLD_MODEL] if embedded_weights_present() else []
    assert folders == embedded + [DIFFUSERS_MODEL]
    assert weights[: len(embedded)] == embedded


def test_generate_refuses_conditioning_of_another_text_encoder(server):
    # A stock CLIP Text Encode of the SD1.5 checkpoint (768 wide) cannot drive the tiny diffusers model.
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["1", 1]}},
        "3": {"class_type": "ICE_LoadDiffusersModel", "inputs": {"folder": DIFFUSERS_MODEL}},
        "4": {"class_type": "ICE_Generate", "inputs": {
            "ice_model": ["3", 0], "positive": ["2", 0], "seed": 0, "steps": 1, "cfg": 7.5, "sampler": "dpm++",
            "width": 0, "height": 0}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}},
    }
    error = _error_of(server, prompt)
    assert error["node_type"] == "ICE_Generate"
    assert "Compose Concepts using the same ICE model" in error["exception_message"]


@pytest.mark.skipif(not embedded_weights_present(), reason="the Toy World weights are not installed")
def test_toyworld_demo_runs_inside_comfyui_with_no_downloaded_weights(server):
    from PIL import Image

    from devtools.make_workflows import TOYWORLD_VIEW_SCALE

    prompt = load_twin("ice_toyworld_demo")
    entry = server.run(prompt, RUN_TIMEOUT_S)
    (saved,) = output_files(entry, node_id(prompt, "SaveImage"))
    side = TOYWORLD_SIDE * TOYWORLD_VIEW_SCALE  # the workflow enlarges the 64 px image to be seen on the canvas
    with Image.open(os.path.join(server.base, "output", saved["filename"])) as picture:
        assert picture.size == (side, side)
    assert output_files(entry, node_id(prompt, "ICE_PreviewConcepts")), "Preview Concepts shows the masks"


# ---------------------------------------------------------------------- the loaded model is ComfyUI's model
@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_ice_model_gives_the_same_conditioning_unet_and_vae_as_comfyui(request, family):
    folder = str(request.config.cache.mkdir("comfyui_ice_models" if family == "sd1" else "comfyui_ice_models_sd2"))
    ensure_models(folder, COMFYUI, family=family, with_retriever=family == "sd1")
    name = {"sd1": CHECKPOINT, "sd2": "ice_tiny_sd21.safetensors"}[family]
    result = subprocess.run(
        [sys.executable, os.path.join(HERE, "check_equivalence.py"), "--comfyui", COMFYUI,
         "--checkpoint", os.path.join(folder, "checkpoints", name)],
        capture_output=True, text=True, cwd=COMFYUI, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["family"] == family
    tolerance = 1e-4 * max(1.0, report["text_scale"])
    assert report["text_max_abs_diff"] < tolerance
    assert report["compose_max_abs_diff"] < tolerance and report["compose_layout_matches"]
    assert report["unet_max_abs_diff"] < 1e-4
    assert report["vae_max_abs_diff"] < 1e-4
    assert report["comfy_model_unchanged"]
    # The engine's UNet and VAE compute in ComfyUI's own weight memory while a node runs, and it holds no weights
    # afterwards. (On the CPU the text encoder is an fp32 copy for the run: ComfyUI stores it in fp16 and computes
    # in fp32, and so does ICE.)
    shared = report["shared_fraction"]
    assert shared["unet"] == 1.0 and shared["vae"] == 1.0
    assert report["released_after_session"]


def test_comfyui_manages_the_memory_of_ice_parts_and_compose_loads_only_the_text_encoder(request):
    folder = str(request.config.cache.mkdir("comfyui_ice_models"))
    ensure_models(folder, COMFYUI, family="sd1", with_retriever=True)
    from ice_ops.toyworld import DIFFUSERS_FOLDER, embedded_weights_present

    command = [sys.executable, os.path.join(HERE, "check_memory.py"), "--comfyui", COMFYUI,
               "--checkpoint", os.path.join(folder, "checkpoints", CHECKPOINT)]
    if embedded_weights_present():
        command += ["--diffusers", DIFFUSERS_FOLDER]
    result = subprocess.run(command, capture_output=True, text=True, cwd=COMFYUI, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    # Learn computed with ComfyUI's own loaded MODEL, CLIP and VAE, which stay in ComfyUI's list for KSampler
    assert report["ice_parts_loaded_after_learn"]
    assert set(report["loaded_after_learn"]) == {"BaseModel", "SD1ClipModel", "AutoencoderKL"}
    assert report["shared_during_learn"]["unet"] == 1.0 and report["shared_during_learn"]["vae"] == 1.0
    assert report["released_after_learn"]
    assert report["loaded_after_compose"] == ["SD1ClipModel"], "Compose Concepts needs the text encoder only"
    assert report["ksampler_after_learn"] == [1, 4, 8, 8]
    assert report["ice_sees_model_patches"] and report["plain_model_restored"], "ICE computes with the user's LoRAs"
    if embedded_weights_present():
        assert report["owned_loaded_after_text_session"] == ["CLIPTextModel"]


# ---------------------------------------------------------------------- workflows end to end
def segment_graph(word: str) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "2": {"class_type": "LoadImage", "inputs": {"image": IMAGE}},
        "3": {"class_type": "ICE_LoadICEModel", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "working_resolution": WORKING_RESOLUTION}},
        "4": {"class_type": "ICE_AttentionSegment", "inputs": {"ice_model": ["3", 0], "image": ["2", 0], "word": word}},
        "5": {"class_type": "MaskToImage", "inputs": {"mask": ["4", 0]}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": f"e2e_segment_{word}"}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["4", 1]}},
    }


@pytest.fixture(scope="module")
def vocabulary(server) -> str:
    """A one-word vocabulary whose word Attention Segment finds in the test image.

    The test model has random weights, so which word its attention assigns to the image is arbitrary
    (but deterministic); Attention Segment is run through the server until a candidate gets a mask, and
    Localize Concepts then finds that word too.
    """
    import numpy as np
    from PIL import Image

    for word in CANDIDATE_WORDS:
        entry = server.run(segment_graph(word), RUN_TIMEOUT_S)
        (saved,) = output_files(entry, "6")
        assert output_files(entry, "7"), "Attention Segment's overlay"
        with Image.open(os.path.join(server.base, "output", saved["filename"])) as picture:
            coverage = float(np.asarray(picture.convert("L"), dtype=np.float32).mean() / 255)
        if coverage > 0:
            name = "e2e_words.txt"
            with open(models_path(server, "ice", name), "w", encoding="utf-8") as handle:
                handle.write(word + "\n")
            return name
    pytest.fail(f"none of {CANDIDATE_WORDS} was segmented in the test image by the random test model")


@pytest.fixture(scope="module")
def small(vocabulary) -> dict:
    return {**SMALL, "ICE_LoadCLIPRetriever": {**SMALL["ICE_LoadCLIPRetriever"], "vocabulary": vocabulary}}


@pytest.fixture(scope="module")
def extracted(server, small) -> dict:
    """Run ice_extract_concepts once; later tests use what it saved."""
    prompt = with_inputs(load_twin("ice_extract_concepts"), {**small, "ICE_SaveConcepts": {"name": "e2e"}})
    entry = server.run(prompt, RUN_TIMEOUT_S)
    return {"prompt": prompt, "entry": entry}


def test_localize_finds_the_word_and_save_concepts_writes_words_and_masks(server, small, vocabulary):
    prompt = with_inputs(load_twin("ice_extract_concepts"), {**small, "ICE_SaveConcepts": {"name": "e2e_localized"}})
    for learner in ("ICE_LearnObjectTokens", "ICE_LearnIntrinsicTokens"):
        del prompt[node_id(prompt, learner)]
    localize = node_id(prompt, "ICE_IterativeLocalize")
    prompt[node_id(prompt, "ICE_SaveConcepts")]["inputs"]["concepts"] = [localize, 0]
    prompt["90"] = {"class_type": "SaveImage", "inputs": {"images": [localize, 2], "filename_prefix": "e2e_localize"}}
    entry = server.run(prompt, RUN_TIMEOUT_S)
    with open(models_path(server, "ice", vocabulary), encoding="utf-8") as handle:
        word = handle.read().strip()
    concepts = saved_concepts(server, "e2e_localized")
    assert [c.word for c in concepts.concepts] == [word]
    assert concepts.concepts[0].mask.shape == (SIDE, SIDE) and concepts.concepts[0].mask.max() > 0
    assert output_files(entry, "90"), "the localization preview image"
    assert not files_starting(server, "embeddings", "e2e_localized")


def saved_concepts(server: ComfyServer, name: str):
    from ice_ops.concepts import ConceptSet

    return ConceptSet.load(models_path(server, "ice_concepts", name + ".safetensors"))


def test_extract_workflow_saves_a_concept_set_and_one_embedding_per_token(server, extracted):
    concepts = saved_concepts(server, "e2e")
    assert 1 <= len(concepts) <= 2
    for concept in concepts.concepts:
        assert set(concept.vectors) == {"object", "instance", "material", "colour"}
        for role in concept.vectors:
            assert os.path.isfile(models_path(server, "embeddings", f"e2e_{concept.name}_{role}.safetensors"))
    save_id = node_id(extracted["prompt"], "ICE_SaveConcepts")
    assert "e2e" in json.dumps(extracted["entry"]["outputs"][save_id])
    preview_id = node_id(extracted["prompt"], "ICE_PreviewConcepts")
    assert output_files(extracted["entry"], preview_id), "Preview Concepts shows an image"


def test_compose_workflow_samples_an_image_from_saved_concepts(server, extracted, small):
    name = saved_concepts(server, "e2e").concepts[0].name
    prompt = with_inputs(load_twin("ice_compose"), {
        **small,
        "ICE_LoadConcepts": {"concept_set": "e2e.safetensors"},
        "ICE_ComposeConcepts": {"prompt": f"a photo of a [{name}.object] made of [{name}.material]"},
        "SaveImage": {"filename_prefix": "e2e_compose"},
    })
    entry = server.run(prompt, RUN_TIMEOUT_S)
    images = output_files(entry, node_id(prompt, "SaveImage"))
    assert images and os.path.isfile(os.path.join(server.base, "output", images[0]["filename"]))


@pytest.fixture(scope="module")
def full_run(server, extracted, small) -> dict:
    """Run ice_full_pipeline once with LoRA refinement on."""
    # Same image, model, vocabulary and seed as the extract run, so localization finds the same concepts.
    name = saved_concepts(server, "e2e").concepts[0].name
    prompt = with_inputs(load_twin("ice_full_pipeline"), {
        **small,
        "ICE_LearnIntrinsicTokens": {"steps": 1, "refine_steps": 1},
        "ICE_SaveConcepts": {"name": "e2e_full"},
        "ICE_ComposeConcepts": {"prompt": f"a photo of a [{name}.object] in [{name}.colour]"},
        "SaveImage": {"filename_prefix": "e2e_full"},
    })
    return {"prompt": prompt, "entry": server.run(prompt, RUN_TIMEOUT_S)}


def test_full_pipeline_with_refinement_saves_a_lora_and_samples_with_it(server, full_run):
    assert os.path.isfile(models_path(server, "loras", "e2e_full_ice_lora.safetensors"))
    assert saved_concepts(server, "e2e_full").lora
    assert output_files(full_run["entry"], node_id(full_run["prompt"], "SaveImage"))


def _stock_graph(clip_text: str, lora: str | None = None) -> dict:
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": clip_text, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": SIDE, "height": SIDE, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": 0, "steps": 1, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "e2e_stock"}},
    }
    if lora:
        graph["8"] = {"class_type": "LoraLoader", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "lora_name": lora, "strength_model": 1.0, "strength_clip": 1.0}}
        graph["5"]["inputs"]["model"] = ["8", 0]
        graph["2"]["inputs"]["clip"] = ["8", 1]
    return graph


def test_saved_embedding_works_in_stock_clip_text_encode(server, extracted):
    name = saved_concepts(server, "e2e").concepts[0].name
    embedding = f"e2e_{name}_material"
    entry = server.run(_stock_graph(f"a photo of embedding:{embedding}, on a table"), RUN_TIMEOUT_S)
    assert output_files(entry, "7")
    log = server.log()
    assert f"embedding:{embedding} does not exist" not in log
    assert "shape mismatch when trying to apply embedding" not in log


def test_saved_lora_loads_in_stock_lora_loader(server, full_run):
    lora = "e2e_full_ice_lora.safetensors"
    entry = server.run(_stock_graph("a photo", lora=lora), RUN_TIMEOUT_S)
    assert output_files(entry, "7")
    log = server.log()
    assert "lora key not loaded" not in log and "NOT LOADED" not in log


# ---------------------------------------------------------------------- bad input and cancel
def _error_of(server: ComfyServer, prompt: dict) -> dict:
    with pytest.raises(PromptFailed) as failure:
        server.run(prompt, RUN_TIMEOUT_S)
    return failure.value.error


def test_a_batch_of_images_stops_localization_with_a_way_out(server, small):
    prompt = with_inputs(load_twin("ice_extract_concepts"), {**small, "ICE_SaveConcepts": {"name": "e2e_batch"}})
    image_id = node_id(prompt, "LoadImage")
    prompt["90"] = {"class_type": "RepeatImageBatch", "inputs": {"image": [image_id, 0], "amount": 2}}
    prompt[node_id(prompt, "ICE_IterativeLocalize")]["inputs"]["image"] = ["90", 0]
    error = _error_of(server, prompt)
    assert error["node_type"] == "ICE_IterativeLocalize"
    assert "batch of 2 images" in error["exception_message"] and "ImageFromBatch" in error["exception_message"]


@pytest.mark.parametrize("node, inputs, folder", [
    ("ICE_LoadCLIPRetriever", {"weights": "clip_missing.safetensors", "architecture": "ViT-L-14-quickgelu",
                               "vocabulary": BUILTIN_VOCABULARY}, "ice"),
    ("ICE_LoadConcepts", {"concept_set": "missing_set.safetensors"}, "ice_concepts"),
    ("ICE_LoadDiffusersModel", {"folder": "missing_model"}, "diffusers"),
])
def test_a_missing_model_file_is_named_with_its_folder_when_queued(server, node, inputs, folder):
    with pytest.raises(PromptRejected) as rejected:
        server.queue({"1": {"class_type": node, "inputs": inputs}, "2": {"class_type": "PreviewAny",
                                                                          "inputs": {"source": ["1", 0]}}})
    details = json.dumps(rejected.value.body)
    missing = next(iter(inputs.values()))
    assert missing in details and os.path.join("models", folder) in details and "press R" in details


@pytest.mark.parametrize("name, expected", [("", "empty"), ("../escape", "path separator"), ("a/b", "path separator")])
def test_bad_save_names_stop_save_concepts(server, extracted, name, expected):
    prompt = {
        "1": {"class_type": "ICE_LoadConcepts", "inputs": {"concept_set": "e2e.safetensors"}},
        "2": {"class_type": "ICE_SaveConcepts", "inputs": {"concepts": ["1", 0], "name": name, "overwrite": False}},
    }
    error = _error_of(server, prompt)
    assert error["node_type"] == "ICE_SaveConcepts" and expected in error["exception_message"]


def test_masks_that_do_not_match_the_concepts_stop_learning(server, extracted, small):
    prompt = with_inputs(load_twin("ice_extract_concepts"), small)
    learn = node_id(prompt, "ICE_LearnObjectTokens")
    prompt["90"] = {"class_type": "ICE_LoadConcepts", "inputs": {"concept_set": "e2e.safetensors"}}
    prompt["91"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": SIDE // 2, "height": SIDE // 2}}
    prompt[learn]["inputs"].update(concepts=["90", 0], masks=["91", 0])
    prompt[node_id(prompt, "ICE_SaveConcepts")]["inputs"]["name"] = "e2e_bad_masks"
    error = _error_of(server, prompt)
    assert error["node_type"] == "ICE_LearnObjectTokens"
    assert f"{SIDE // 2}x{SIDE // 2}" in error["exception_message"] and "same image" in error["exception_message"]


def test_a_prompt_naming_an_unknown_concept_stops_compose(server, extracted, small):
    prompt = with_inputs(load_twin("ice_compose"), {
        **small,
        "ICE_LoadConcepts": {"concept_set": "e2e.safetensors"},
        "ICE_ComposeConcepts": {"prompt": "a photo of [no_such_thing.object]"},
    })
    error = _error_of(server, prompt)
    assert error["node_type"] == "ICE_ComposeConcepts" and "no_such_thing" in error["exception_message"]


def test_cancel_stops_training_within_a_step_and_writes_nothing(server, small):
    prompt = with_inputs(load_twin("ice_extract_concepts"), {
        **small,
        "ICE_LearnObjectTokens": {"steps": 20000},
        "ICE_SaveConcepts": {"name": "e2e_cancelled"},
    })
    learn_id = node_id(prompt, "ICE_LearnObjectTokens")
    prompt_id = queue_and_wait_for_progress(server, prompt, learn_id, timeout_s=RUN_TIMEOUT_S)
    server.interrupt()
    # 20000 steps would run for hours on CPU: finishing here means Cancel stopped the training loop.
    entry = server.wait(prompt_id, timeout_s=RUN_TIMEOUT_S / 3)
    assert entry["status"]["status_str"] == "error"
    assert execution_error(entry).get("kind") == "execution_interrupted"
    assert not os.path.exists(models_path(server, "ice_concepts", "e2e_cancelled.safetensors"))
    assert not files_starting(server, "embeddings", "e2e_cancelled")
