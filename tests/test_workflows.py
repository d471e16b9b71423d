"""Example workflows: valid UI-format JSON with a thumbnail, only node types we register (or the stock ones
we know), links between matching socket types, and each file the same graph as its API-format twin.

No ComfyUI needed: node ids and socket types come from nodes/_spec.py.
"""
from __future__ import annotations

import json
import os

import pytest

from nodes._spec import NODE_BY_ID, STOCK_NODES, node_spec, widget_value_count

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UI_FOLDER = os.path.join(ROOT, "workflows")
API_FOLDER = os.path.join(ROOT, "tests", "workflows")
REQUIRED = ("ice_extract_concepts", "ice_compose", "ice_full_pipeline")
FRONTEND_ONLY = ("Reroute", "Note", "MarkdownNote", "PrimitiveNode")


def ui_files() -> list[str]:
    return sorted(name[: -len(".json")] for name in os.listdir(UI_FOLDER) if name.endswith(".json"))


def load_ui(name: str) -> dict:
    with open(os.path.join(UI_FOLDER, name + ".json"), encoding="utf-8") as handle:
        return json.load(handle)


def load_api(name: str) -> dict:
    with open(os.path.join(API_FOLDER, name + "_api.json"), encoding="utf-8") as handle:
        return json.load(handle)


def ui_to_api(workflow: dict) -> dict:
    """Convert a UI-format workflow the way the frontend's graphToPrompt does for plain graphs (no muted,
    bypassed or frontend-only nodes, which these examples do not use)."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        spec = node_spec(node["type"])
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


def test_the_three_example_workflows_exist_with_thumbnails_and_twins():
    assert set(REQUIRED) <= set(ui_files())
    for name in ui_files():
        assert os.path.isfile(os.path.join(UI_FOLDER, name + ".jpg")), f"{name}.jpg thumbnail missing"
        assert os.path.isfile(os.path.join(API_FOLDER, name + "_api.json")), f"API twin of {name} missing"


def test_thumbnails_are_jpeg_images():
    from PIL import Image

    for name in ui_files():
        with Image.open(os.path.join(UI_FOLDER, name + ".jpg")) as picture:
            assert picture.format == "JPEG"
            assert min(picture.size) > 0


def test_only_one_example_folder_so_comfyui_serves_the_workflows():
    # comfyui_notes §2: with both example_workflows/ and workflows/, the second is listed but answers 404.
    for other in ("example_workflows", "example", "examples", "workflow"):
        assert not os.path.isdir(os.path.join(ROOT, other))


@pytest.mark.parametrize("name", REQUIRED)
def test_node_types_are_registered_ice_nodes_or_known_stock_nodes(name):
    for node in load_ui(name)["nodes"]:
        assert node["type"] not in FRONTEND_ONLY, "API twins cannot express frontend-only nodes"
        if node["type"].startswith("ICE_"):
            assert node["type"] in NODE_BY_ID, f"{node['type']} is not a node this pack registers"
        else:
            assert node["type"] in STOCK_NODES, f"{node['type']} is not described in nodes/_spec.py STOCK_NODES"
        assert node.get("mode", 0) == 0, "example workflows should not ship muted or bypassed nodes"


@pytest.mark.parametrize("name", REQUIRED)
def test_links_connect_matching_socket_types(name):
    workflow = load_ui(name)
    nodes = {node["id"]: node for node in workflow["nodes"]}
    for link_id, source, source_slot, target, target_slot, link_type in workflow["links"]:
        produced = node_spec(nodes[source]["type"]).outputs[source_slot].type
        slot_name = nodes[target]["inputs"][target_slot]["name"]
        expected = node_spec(nodes[target]["type"]).input(slot_name).type
        assert produced == expected == link_type, f"link {link_id}: {produced} -> {slot_name} ({expected})"
        assert nodes[target]["inputs"][target_slot]["link"] == link_id
        assert link_id in nodes[source]["outputs"][source_slot]["links"]


@pytest.mark.parametrize("name", REQUIRED)
def test_every_required_socket_is_connected(name):
    workflow = load_ui(name)
    for node in workflow["nodes"]:
        connected = {slot["name"] for slot in node.get("inputs", []) if slot.get("link") is not None}
        for item in node_spec(node["type"]).sockets:
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
        for item in node_spec(node["type"]).widgets:
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
    from nodes import make_workflows

    assert make_workflows.main(["--check"]) == 0, "run python -m nodes.make_workflows"


def test_toyworld_demo_workflow_uses_the_toy_models_settings_and_the_demo_scene():
    from ice_ops import toyworld
    from ice_ops.toyworld import demo, scenes
    from nodes import make_workflows

    assert make_workflows.TOYWORLD_MAX_OBJECTS == scenes.MAX_OBJECTS
    assert make_workflows.TOYWORLD_SEGMENTATION == toyworld.SEGMENTATION
    assert make_workflows.TOYWORLD_MIN_CONTRAST == toyworld.MIN_CONTRAST
    assert scenes.held_out_seed(make_workflows.TOYWORLD_SCENE) == demo.DEMO_SCENE_SEED
    prompt = load_api("ice_toyworld_demo")
    assert {node["class_type"] for node in prompt.values()} >= {
        "ICE_LoadDiffusersModel", "ICE_ToyWorldScene", "ICE_Generate"}
    assert "CheckpointLoaderSimple" not in {node["class_type"] for node in prompt.values()}
