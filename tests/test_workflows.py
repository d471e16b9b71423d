"""Example workflows: valid UI-format JSON named by its template title, with a thumbnail, only node types we
register (or the stock ones we know), links between matching socket types, each file the same graph as its
API-format twin, and a layout whose node boxes do not overlap.

No ComfyUI needed: node ids and socket types come from nodes/_spec.py (tests/browser checks the layout in the
real frontend).
"""
from __future__ import annotations

import json
import os
import re

import pytest

from devtools import make_workflows
from nodes._spec import NODE_BY_ID, STOCK_NODES, widget_value_count
from devtools.make_workflows import MODEL_FILES, TEMPLATE_TITLES, spec_of, ui_file_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UI_FOLDER = os.path.join(ROOT, "workflows")
API_FOLDER = os.path.join(ROOT, "tests", "workflows")
REQUIRED = ("ice_extract_concepts", "ice_compose", "ice_full_pipeline", "ice_toyworld_demo")
FRONTEND_ONLY = ("Reroute", "Note", "MarkdownNote", "PrimitiveNode")
# A card title in the template browser shows two lines of about 24 characters; file names must be portable.
MAX_TITLE_LENGTH = 48
PORTABLE_TITLE = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ,.-]*")
MAX_THUMBNAIL_BYTES = 300_000


def ui_files() -> list[str]:
    return sorted(name[: -len(".json")] for name in os.listdir(UI_FOLDER) if name.endswith(".json"))


def load_ui(key: str) -> dict:
    with open(os.path.join(UI_FOLDER, ui_file_name(key) + ".json"), encoding="utf-8") as handle:
        return json.load(handle)


def load_api(key: str) -> dict:
    with open(os.path.join(API_FOLDER, key + "_api.json"), encoding="utf-8") as handle:
        return json.load(handle)


def ui_to_api(workflow: dict) -> dict:
    """Convert a UI-format workflow the way the frontend's graphToPrompt does for plain graphs (no muted,
    bypassed or frontend-only nodes, which these examples do not use)."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        spec = spec_of(node["type"])
        linked = {slot["name"]: links[slot["link"]] for slot in node.get("inputs", []) if slot.get("link") is not None}
        values = list(node.get("widgets_values", []))
        inputs = {}
        for item in spec.inputs:
            if item.is_widget:
                value, values = values[0], values[widget_value_count(node["type"], item):]
                if item.name not in linked:
                    inputs[item.name] = value
            if item.name in linked:
                _, source, slot, _, _, _ = linked[item.name]
                inputs[item.name] = [str(source), slot]
        assert not values, f"node {node['id']} ({node['type']}) has unused widget values {values}"
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def test_the_example_workflows_exist_named_by_their_titles_with_thumbnails_and_twins():
    assert set(ui_files()) == {ui_file_name(key) for key in REQUIRED}, "one UI file per workflow, nothing stale"
    for key in REQUIRED:
        assert os.path.isfile(os.path.join(UI_FOLDER, ui_file_name(key) + ".jpg")), f"{key}: thumbnail missing"
        assert os.path.isfile(os.path.join(API_FOLDER, key + "_api.json")), f"API twin of {key} missing"
    jpgs = {name[: -len(".jpg")] for name in os.listdir(UI_FOLDER) if name.endswith(".jpg")}
    assert jpgs == set(ui_files()), "a thumbnail for every workflow and none left over"


def test_titles_read_well_in_the_template_browser_and_are_portable_file_names():
    for key, title in TEMPLATE_TITLES.items():
        assert len(title) <= MAX_TITLE_LENGTH, f"{title!r} is cut off on its card"
        assert PORTABLE_TITLE.fullmatch(title), f"{title!r}: keep to letters, digits, spaces and , . -"
    assert len(set(TEMPLATE_TITLES.values())) == len(TEMPLATE_TITLES)


def test_thumbnails_are_small_jpeg_images():
    from PIL import Image

    for name in ui_files():
        path = os.path.join(UI_FOLDER, name + ".jpg")
        with Image.open(path) as picture:
            assert picture.format == "JPEG"
            assert min(picture.size) > 0
        assert os.path.getsize(path) < MAX_THUMBNAIL_BYTES, f"{name}.jpg is too large for the template browser"


def test_only_one_example_folder_so_comfyui_serves_the_workflows():
    # docs/COMFYUI.md, Example workflows: with both example_workflows/ and workflows/, the second answers 404.
    for other in ("example_workflows", "example", "examples", "workflow"):
        assert not os.path.isdir(os.path.join(ROOT, other))


@pytest.mark.parametrize("name", REQUIRED)
def test_node_types_are_registered_ice_nodes_or_known_stock_nodes(name):
    for node in load_ui(name)["nodes"]:
        assert node["type"] not in FRONTEND_ONLY, "API twins cannot express frontend-only nodes"
        if node["type"].startswith("ICE_"):
            assert node["type"] in NODE_BY_ID, f"{node['type']} is not a node this pack registers"
        else:
            known = node["type"] in STOCK_NODES
            assert known, f"{node['type']} is not described in nodes/_spec.py STOCK_NODES"
        assert node.get("mode", 0) == 0, "example workflows should not ship muted or bypassed nodes"


@pytest.mark.parametrize("name", REQUIRED)
def test_links_connect_matching_socket_types(name):
    workflow = load_ui(name)
    nodes = {node["id"]: node for node in workflow["nodes"]}
    for link_id, source, source_slot, target, target_slot, link_type in workflow["links"]:
        produced = spec_of(nodes[source]["type"]).outputs[source_slot].type
        slot_name = nodes[target]["inputs"][target_slot]["name"]
        expected = spec_of(nodes[target]["type"]).input(slot_name).type
        assert produced == expected == link_type, f"link {link_id}: {produced} -> {slot_name} ({expected})"
        assert nodes[target]["inputs"][target_slot]["link"] == link_id
        assert link_id in nodes[source]["outputs"][source_slot]["links"]


@pytest.mark.parametrize("name", REQUIRED)
def test_every_required_socket_is_connected(name):
    workflow = load_ui(name)
    for node in workflow["nodes"]:
        connected = {slot["name"] for slot in node.get("inputs", []) if slot.get("link") is not None}
        for item in spec_of(node["type"]).sockets:
            if not item.optional:
                assert item.name in connected, f"{node['type']} #{node['id']}: {item.name} is not connected"


@pytest.mark.parametrize("name", REQUIRED)
def test_ui_workflow_matches_its_api_twin(name):
    twin = {key: {"class_type": v["class_type"], "inputs": v["inputs"]} for key, v in load_api(name).items()}
    assert ui_to_api(load_ui(name)) == twin


@pytest.mark.parametrize("name", REQUIRED)
def test_widget_values_are_within_the_node_limits(name):
    workflow = load_ui(name)
    prompt = ui_to_api(workflow)
    for node in workflow["nodes"]:
        if node["type"] not in NODE_BY_ID:
            continue
        inputs = prompt[str(node["id"])]["inputs"]
        for item in spec_of(node["type"]).widgets:
            value = inputs[item.name]
            if item.min is not None:
                assert value >= item.min, f"{node['type']}.{item.name} = {value} below {item.min}"
            if item.max is not None:
                assert value <= item.max, f"{node['type']}.{item.name} = {value} above {item.max}"
            if item.options:
                assert value in item.options


def test_converter_drops_the_extra_seed_control_value():
    node = {
        "id": 7, "type": "KSampler", "inputs": [],
        "widgets_values": [42, "randomize", 20, 7.5, "euler", "normal", 1.0],
    }
    inputs = ui_to_api({"nodes": [node], "links": []})["7"]["inputs"]
    assert inputs == {"seed": 42, "steps": 20, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}


def test_generated_files_are_up_to_date():
    from devtools import make_workflows

    assert make_workflows.main(["--check"]) == 0, "run python -m devtools.make_workflows"


def test_toyworld_demo_workflow_uses_the_toy_models_settings_and_the_demo_scene():
    from ice_ops import toyworld
    from ice_ops.toyworld import demo, scenes
    from devtools import make_workflows

    assert make_workflows.TOYWORLD_MAX_OBJECTS == scenes.MAX_OBJECTS
    assert make_workflows.TOYWORLD_SEGMENTATION == toyworld.SEGMENTATION
    assert make_workflows.TOYWORLD_MIN_CONTRAST == toyworld.MIN_CONTRAST
    assert scenes.held_out_seed(make_workflows.TOYWORLD_SCENE) == demo.DEMO_SCENE_SEED
    prompt = load_api("ice_toyworld_demo")
    assert {node["class_type"] for node in prompt.values()} >= {
        "ICE_LoadDiffusersModel", "ICE_ToyWorldScene", "ICE_Generate"}
    assert "CheckpointLoaderSimple" not in {node["class_type"] for node in prompt.values()}


def _drawn_boxes(workflow: dict) -> list[tuple[int, float, float, float, float]]:
    """(id, left, top, right, bottom) of every node as the frontend draws it: title bar and badge included."""
    above = make_workflows.TITLE_HEIGHT + make_workflows.BADGE_HEIGHT
    return [(node["id"], node["pos"][0], node["pos"][1] - above, node["pos"][0] + node["size"][0],
             node["pos"][1] + node["size"][1]) for node in workflow["nodes"]]


@pytest.mark.parametrize("name", REQUIRED)
def test_node_boxes_do_not_overlap_and_the_graph_fits_the_window_it_opens_in(name):
    workflow = load_ui(name)
    boxes = _drawn_boxes(workflow)
    for index, (first, left, top, right, bottom) in enumerate(boxes):
        for second, other_left, other_top, other_right, other_bottom in boxes[index + 1:]:
            apart = right <= other_left or other_right <= left or bottom <= other_top or other_bottom <= top
            assert apart, f"{name}: nodes {first} and {second} overlap"
    view = workflow["extra"]["ds"]
    assert view["offset"] == [0, 0] and min(left for _, left, _, _, _ in boxes) >= 0
    assert max(right for *_, right, _ in boxes) * view["scale"] <= make_workflows.VIEW_WIDTH
    assert max(bottom for *_, bottom in boxes) * view["scale"] <= make_workflows.VIEW_HEIGHT


@pytest.mark.parametrize("name", REQUIRED)
def test_nodes_that_show_a_picture_have_room_for_it(name):
    steps = {step.id: step for step in make_workflows.workflows()[name]}
    for node in load_ui(name)["nodes"]:
        without_picture = make_workflows.node_height(steps[node["id"]])
        if node["type"] in make_workflows.PICTURE_NODES:
            without_picture -= make_workflows.PREVIEW_HEIGHT
            assert node["size"][1] - without_picture >= make_workflows.PREVIEW_MIN_HEIGHT, node["type"]
        assert node["size"][1] >= without_picture


def test_toyworld_demo_enlarges_the_generated_image_without_smoothing_before_saving_it():
    prompt = load_api("ice_toyworld_demo")
    (save,) = [node for node in prompt.values() if node["class_type"] == "SaveImage"]
    source = prompt[save["inputs"]["images"][0]]
    assert source["class_type"] == "ImageScaleBy"
    assert source["inputs"]["upscale_method"] == "nearest-exact"
    assert source["inputs"]["scale_by"] == make_workflows.TOYWORLD_VIEW_SCALE
    assert prompt[source["inputs"]["image"][0]]["class_type"] == "ICE_Generate"


def test_readme_pictures_exist_and_are_small():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", handle.read())
    assert pictures, "the README shows what a user gets"
    for picture in pictures:
        path = os.path.join(ROOT, picture)
        assert os.path.isfile(path), f"README shows {picture}, which does not exist"
        assert os.path.getsize(path) < MAX_THUMBNAIL_BYTES, f"{picture} is too large for a README"


@pytest.mark.parametrize("name", REQUIRED)
def test_every_model_file_a_user_must_fetch_is_named_with_its_folder_when_the_workflow_opens(name):
    """The frontend's missing-models dialog lists a node's ``properties.models`` entries whose name is one of
    the node's widget values, when they carry a url and the file is not in that folder."""
    fetched = {(m["node"], m["name"]) for m in MODEL_FILES}
    for node in load_ui(name)["nodes"]:
        values = [v for v in node["widgets_values"] if isinstance(v, str)]
        needed = [value for value in values if (node["type"], value) in fetched]
        listed = node["properties"].get("models", [])
        assert [m["name"] for m in listed] == needed, node["type"]
        for model in listed:
            assert model["url"].startswith("https://huggingface.co/") and model["url"].endswith(".safetensors")
            assert model["directory"] in ("checkpoints", "ice")
