"""The node catalogue (nodes/_spec.py) a ComfyUI user sees: ids, names, categories, tooltips, defaults,
and the pack's import behaviour, all without ComfyUI."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from nodes import _spec
from nodes._spec import CATEGORIES, CUSTOM_TYPES, NODES, WIDGET_TYPES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MISSION_NODES = {
    "LoadICEModel", "LoadCLIPRetriever", "ConceptRetrieve", "AttentionSegment", "IterativeLocalize",
    "LearnObjectTokens", "LearnIntrinsicTokens", "ComposeConcepts", "SaveConcepts", "LoadConcepts",
    "PreviewConcepts", "LoadDiffusersModel", "Generate", "ToyWorldScene",
}
TRAINING_NODES = {"ICE_LearnObjectTokens", "ICE_LearnIntrinsicTokens"}
KNOWN_SOCKETS = {"MODEL", "CLIP", "VAE", "IMAGE", "MASK", "CONDITIONING", *WIDGET_TYPES, *CUSTOM_TYPES}


def test_every_node_of_the_issue_is_registered_under_an_ice_id():
    assert {spec.node_id for spec in NODES} == {f"ICE_{name}" for name in MISSION_NODES}
    assert len({spec.node_id for spec in NODES}) == len(NODES)


@pytest.mark.parametrize("spec", NODES, ids=lambda s: s.node_id)
def test_display_name_category_and_description(spec):
    assert spec.display_name and "_" not in spec.display_name and not spec.display_name.startswith("ICE")
    assert spec.category in CATEGORIES
    assert len(spec.description) > 40


def test_display_names_are_unique():
    names = [spec.display_name for spec in NODES]
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("spec", NODES, ids=lambda s: s.node_id)
def test_every_input_has_a_tooltip_and_a_known_type(spec):
    for item in spec.inputs:
        assert len(item.tooltip) > 10, f"{spec.node_id}.{item.name} needs a tooltip"
        assert item.type in KNOWN_SOCKETS
    for item in spec.outputs:
        assert item.tooltip, f"{spec.node_id} output {item.name} needs a tooltip"
        assert item.type in KNOWN_SOCKETS


@pytest.mark.parametrize("spec", NODES, ids=lambda s: s.node_id)
def test_socket_names_are_unique_per_node(spec):
    assert len({i.name for i in spec.inputs}) == len(spec.inputs)
    assert len({o.name for o in spec.outputs}) == len(spec.outputs)


def test_only_the_training_nodes_are_experimental():
    assert {spec.node_id for spec in NODES if spec.experimental} == TRAINING_NODES


def test_custom_types_are_the_three_ice_types():
    assert set(CUSTOM_TYPES) == {"ICE_MODEL", "ICE_RETRIEVER", "ICE_CONCEPTS"}
    used = {s.type for spec in NODES for s in (*spec.inputs, *spec.outputs)}
    assert set(CUSTOM_TYPES) <= used


@pytest.mark.parametrize("spec", NODES, ids=lambda s: s.node_id)
def test_widget_defaults_lie_within_their_limits(spec):
    for item in spec.widgets:
        if item.type == "COMBO":
            assert item.options or item.options_from, f"{spec.node_id}.{item.name} has no options"
            continue
        assert item.default is not None, f"{spec.node_id}.{item.name} needs a default"
        if item.min is not None:
            assert item.default >= item.min
        if item.max is not None:
            assert item.default <= item.max


def test_design_table_sockets():
    node = _spec.NODE_BY_ID
    assert [o.type for o in node["ICE_LoadICEModel"].outputs] == ["ICE_MODEL"]
    assert [i.type for i in node["ICE_LoadICEModel"].sockets] == ["MODEL", "CLIP", "VAE"]
    assert [o.type for o in node["ICE_IterativeLocalize"].outputs] == ["ICE_CONCEPTS", "MASK", "IMAGE"]
    assert [o.type for o in node["ICE_LearnIntrinsicTokens"].outputs] == ["ICE_CONCEPTS", "MODEL"]
    assert [o.type for o in node["ICE_ComposeConcepts"].outputs] == ["CONDITIONING"]
    assert [o.type for o in node["ICE_AttentionSegment"].outputs] == ["MASK", "IMAGE"]
    assert node["ICE_SaveConcepts"].output_node and node["ICE_PreviewConcepts"].output_node
    assert [o.type for o in node["ICE_LoadDiffusersModel"].outputs] == ["ICE_MODEL"]
    assert [i.type for i in node["ICE_Generate"].sockets] == ["ICE_MODEL", "CONDITIONING", "CONDITIONING"]
    assert node["ICE_Generate"].input("negative").optional
    assert [o.type for o in node["ICE_Generate"].outputs] == ["IMAGE"]
    assert [o.type for o in node["ICE_ToyWorldScene"].outputs] == ["IMAGE", "STRING", "MASK"]


@pytest.mark.parametrize("node_id, widget, module, function, parameter", [
    ("ICE_IterativeLocalize", "stop_fraction", "localization", "localize", "stop_fraction"),
    ("ICE_IterativeLocalize", "max_concepts", "localization", "localize", "max_concepts"),
    ("ICE_IterativeLocalize", "segmentation", "localization", "localize", "segmentation"),
    ("ICE_AttentionSegment", "segmentation", "localization", "segment_word", "segmentation"),
    ("ICE_ConceptRetrieve", "top_k", "retrieve", "ClipRetriever.rank", "top_k"),
    ("ICE_LearnObjectTokens", "steps", "learn", "learn_object_tokens", "steps"),
    ("ICE_LearnObjectTokens", "learning_rate", "learn", "learn_object_tokens", "lr"),
    ("ICE_LearnIntrinsicTokens", "steps", "learn", "learn_intrinsic_tokens", "steps"),
    ("ICE_LearnIntrinsicTokens", "learning_rate", "learn", "learn_intrinsic_tokens", "lr"),
    ("ICE_LearnIntrinsicTokens", "anchors", "learn", "learn_intrinsic_tokens", "anchors"),
    ("ICE_Generate", "steps", "composition", "generate", "steps"),
    ("ICE_Generate", "cfg", "composition", "generate", "guidance"),
    ("ICE_Generate", "sampler", "composition", "generate", "scheduler"),
])
def test_an_untouched_widget_runs_the_engine_as_its_own_default_does(node_id, widget, module, function, parameter):
    """A user who leaves a widget alone gets what the engine does when the argument is not given."""
    import importlib
    import inspect

    target = importlib.import_module(f"ice_ops.{module}")
    for part in function.split("."):
        target = getattr(target, part)
    engine_default = inspect.signature(target).parameters[parameter].default
    widget_default = _spec.NODE_BY_ID[node_id].input(widget).default
    if parameter == "anchors":
        from ice_ops.learn import normalise_anchors

        widget_default = normalise_anchors(widget_default)
    assert widget_default == engine_default


def test_the_segmentation_widgets_offer_every_engine_choice_with_the_paper_first():
    from ice_ops import localization

    for node_id in ("ICE_AttentionSegment", "ICE_IterativeLocalize"):
        spec_input = _spec.NODE_BY_ID[node_id].input("segmentation")
        assert tuple(spec_input.options) == localization.SEGMENTATIONS and spec_input.options[0] == localization.DIFFSEG


def test_toyworld_scene_range_stays_in_the_held_out_seeds():
    from ice_ops.toyworld import scenes

    spec = _spec.NODE_BY_ID["ICE_ToyWorldScene"].input("scene")
    assert scenes.held_out_seed(0) >= scenes.HELD_OUT_SEED_OFFSET
    # the next evaluation seed's first scene lies beyond the widget's range: the picker never repeats one
    assert scenes.held_out_seed(int(spec.max)) < scenes.held_out_seed(0, seed=1)


def _run(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_pack_root_imports_nothing_from_comfyui_or_torch():
    # Load the pack the way ComfyUI does (docs/COMFYUI.md, Loading the pack): a package from its __init__.py,
    # by file path.
    code = (
        "import importlib.util, inspect, sys\n"
        f"spec = importlib.util.spec_from_file_location('pack_under_test', {os.path.join(ROOT, '__init__.py')!r})\n"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        "heavy = [m for m in ('comfy', 'comfy_api', 'folder_paths', 'torch') if m in sys.modules]\n"
        "print(inspect.iscoroutinefunction(module.comfy_entrypoint), heavy)\n"
    )
    assert _run(code) == "True []"


def test_default_tier_modules_do_not_import_comfyui():
    code = (
        "import sys\n"
        "import nodes, nodes._spec, nodes._adapters, devtools.make_docs, devtools.make_workflows\n"
        "print([m for m in ('comfy', 'comfy_api', 'folder_paths', 'server', 'execution') if m in sys.modules])\n"
    )
    assert _run(code) == "[]"


def test_nodes_md_is_generated_from_the_specs():
    from devtools import make_docs

    text = make_docs.render()
    for spec in NODES:
        assert spec.display_name in text and spec.node_id in text
        for item in spec.inputs:
            assert item.tooltip.replace("|", "\\|") in text
    with open(os.path.join(ROOT, "NODES.md"), encoding="utf-8") as handle:
        assert handle.read() == text, "NODES.md is out of date: run python -m devtools.make_docs"
