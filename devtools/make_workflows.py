"""Write the example workflows: UI format in ``workflows/`` (what ComfyUI's template browser lists) and their
API-format twins in ``tests/workflows/`` (what the ComfyUI test tier queues through /prompt).

    python -m devtools.make_workflows           # rewrite all files
    python -m devtools.make_workflows --check   # exit 1 if a file differs from what would be written

Each graph is written once below; socket order, widget order and types come from ``nodes/_spec.py``. Nodes are
stacked in columns using the frontend's own node geometry, with room for the pictures that appear after a run,
so no two boxes overlap; tests/browser checks that in a real ComfyUI frontend.

Template browser: ComfyUI frontend 1.27 lists a pack's templates by file name only (it shows the name as the
card's title and, with ``-`` and ``_`` turned into spaces, as its description), so each UI file is named with
its title (:data:`TEMPLATE_TITLES`). The ``.jpg`` thumbnails next to them are screenshots of the graph after
a run, taken by the browser tier (``ICE_WRITE_SCREENSHOTS=1``), not drawn here.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from dataclasses import dataclass, field
from typing import Any

from ice_ops.files import write_bytes_atomic
from nodes._spec import (
    BUILTIN_VOCABULARY, TOYWORLD_MODEL, NodeSpec, node_spec, widget_value_count,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UI_FOLDER = os.path.join(ROOT, "workflows")
API_FOLDER = os.path.join(ROOT, "tests", "workflows")
API_SUFFIX = "_api.json"
WORKFLOW_NAMESPACE = uuid.UUID("6f1d5e2a-2f43-4c1e-9a53-0c1ce0000000")  # fixed: stable workflow ids

# Defaults a user edits: the usual SD 1.5 file name, ComfyUI's bundled example image, and the retriever file
# names the README tells users to save the open_clip weights under.
CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
IMAGE = "example.png"
RETRIEVER_WEIGHTS = "clip_vit_l14_openai.safetensors"
# Where the files above come from (README, Models) and the ComfyUI model folder each belongs in: the frontend
# shows them in its missing-models dialog when a workflow opens without them. The pack itself downloads nothing.
MODEL_FILES = (
    {"node": "CheckpointLoaderSimple", "widget": "ckpt_name", "name": CHECKPOINT, "directory": "checkpoints",
     "url": "https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5/resolve/main/" + CHECKPOINT},
    {"node": "ICE_LoadCLIPRetriever", "widget": "weights", "name": RETRIEVER_WEIGHTS, "directory": "ice",
     "url": "https://huggingface.co/timm/vit_large_patch14_clip_224.openai/resolve/main/open_clip_model.safetensors"},
)
RETRIEVER_ARCHITECTURE = "ViT-L-14-quickgelu"
CONCEPT_SET_NAME = "my_concepts"
COMPOSE_PROMPT = "a photo of a [vase.object] made of [vase.material]"
NEGATIVE_PROMPT = "blurry, low quality"
# The Toy World demo: a held-out scene (a blue striped square, a pink checked cross and an orange striped
# triangle; ice_ops.toyworld.demo.DEMO_SCENE_SEED), short Stage Two runs, and a colour swap onto another shape.
TOYWORLD_SCENE = 3
TOYWORLD_LEARN_STEPS = 100
TOYWORLD_PROMPT = "a circle in [square.colour]"
TOYWORLD_MAX_OBJECTS = 3  # ice_ops.toyworld.scenes.MAX_OBJECTS
TOYWORLD_SEGMENTATION = "cross-attention"  # ice_ops.toyworld.SEGMENTATION (see its note)
TOYWORLD_MIN_CONTRAST = 4.0  # ice_ops.toyworld.MIN_CONTRAST: the stop rule calibrated for the toy model
SEED_CONTROL = "fixed"  # value stored after a seed widget in UI format
IMAGE_UPLOAD_VALUE = "image"  # value stored after LoadImage's image widget

# The Toy World pictures are 64 px, which the canvas shows at their natural size: the generated image is enlarged
# this many times, repeating pixels, before Save Image (labelled previews enlarge themselves, see
# ice_ops.imaging.LEGIBLE_SIDE).
TOYWORLD_VIEW_SCALE = 4
VIEW_UPSCALE_METHOD = "nearest-exact"

# Card titles in ComfyUI's template browser: the UI file names (see the module docstring). Numbered in the
# order to try them; only characters that are safe in file names and URLs on every system.
TEMPLATE_TITLES = {
    "ice_toyworld_demo": "ICE 1 - Toy World demo, nothing to download",
    "ice_extract_concepts": "ICE 2 - Extract concepts from your image",
    "ice_compose": "ICE 3 - Compose images from saved concepts",
    "ice_full_pipeline": "ICE 4 - Extract and compose in one graph",
}

# Node geometry of the ComfyUI frontend (LiteGraph, frontend 1.27), in canvas units: the title bar sits above a
# node's ``pos``; the body has one row per input/output slot, then one row per widget (plus padding); a node
# that shows a picture gets an image area of at least PREVIEW_MIN_HEIGHT when the picture arrives.
TITLE_HEIGHT = 30
SLOT_HEIGHT = 20
WIDGET_HEIGHT = 24
WIDGETS_PADDING = 14
BARE_PADDING = 6  # below the slots of a node without widgets
PREVIEW_MIN_HEIGHT = 220
BADGE_HEIGHT = 20  # the pack badge ("ICE") drawn above an ICE node's title bar
# Our layout: node width, the text box of a multiline widget, the image area reserved on nodes that show a
# picture (a labelled 256 px Toy World preview with its size caption fits), and the gaps between boxes.
NODE_WIDTH = 300
MULTILINE_HEIGHT = 100
PREVIEW_HEIGHT = 280
COLUMN_GAP = 70
ROW_GAP = 50
MARGIN = 40
# The view a workflow opens with: the whole graph fits the canvas of a 1600 x 900 browser window (the canvas
# is that less the 64 px side bar and the 80 px of tabs and menu), at most at 100 %.
VIEW_WIDTH, VIEW_HEIGHT = 1600 - 64, 900 - 80
MAX_VIEW_SCALE = 1.0
VIEW_SCALE_DECIMALS = 2
# Nodes that show a picture on the canvas once the graph has run: image outputs, Load Image's picture, and
# Localize Concepts' live preview of the masks found so far.
PICTURE_NODES = ("SaveImage", "PreviewImage", "LoadImage", "ICE_PreviewConcepts", "ICE_IterativeLocalize")

def spec_of(node_type: str) -> NodeSpec:
    """The description of a node in nodes/_spec.py (ICE nodes and the stock nodes the workflows use)."""
    return node_spec(node_type)


@dataclass
class Step:
    """One node of a graph: ``links`` maps an input name to (source node id, source output index)."""

    id: int
    type: str
    widgets: dict[str, Any] = field(default_factory=dict)
    links: dict[str, tuple[int, int]] = field(default_factory=dict)
    column: int = 0
    row: int = 0

    @property
    def spec(self) -> NodeSpec:
        return spec_of(self.type)


def _loader_steps() -> list[Step]:
    return [
        Step(1, "CheckpointLoaderSimple", {"ckpt_name": CHECKPOINT}, column=0, row=0),
        Step(3, "ICE_LoadICEModel", {"working_resolution": 0}, {"model": (1, 0), "clip": (1, 1), "vae": (1, 2)}, 1, 0),
    ]


def _retriever_step(step_id: int, weights: str, column: int, row: int) -> Step:
    widgets = {"weights": weights, "architecture": RETRIEVER_ARCHITECTURE, "vocabulary": BUILTIN_VOCABULARY}
    return Step(step_id, "ICE_LoadCLIPRetriever", widgets, column=column, row=row)


def _localize_step(step_id: int, model: int, retriever: int, image: int, column: int, row: int, **widgets) -> Step:
    defaults = {"stop_fraction": 0.05, "max_concepts": 6, "seed": 0, "segmentation": "diffseg", "min_contrast": 0.0}
    return Step(step_id, "ICE_IterativeLocalize", {**defaults, **widgets},
                {"ice_model": (model, 0), "retriever": (retriever, 0), "image": (image, 0)}, column, row)


def _extract_steps() -> list[Step]:
    """Loaders, then Localize Concepts, its preview and the two learners, then Save Concepts (column 3)."""
    return [
        Step(2, "LoadImage", {"image": IMAGE}, column=0, row=1),
        _retriever_step(4, RETRIEVER_WEIGHTS, column=0, row=2),
        _localize_step(5, model=3, retriever=4, image=2, column=1, row=1),
        Step(6, "ICE_PreviewConcepts", {}, {"image": (2, 0), "concepts": (5, 0)}, 2, 0),
        Step(7, "ICE_LearnObjectTokens", {"steps": 400, "learning_rate": 5e-4, "seed": 0},
             {"ice_model": (3, 0), "image": (2, 0), "concepts": (5, 0)}, 2, 1),
        Step(8, "ICE_LearnIntrinsicTokens",
             {"anchors": "material, colour", "steps": 400, "refine_steps": 0, "learning_rate": 5e-4, "seed": 0},
             {"ice_model": (3, 0), "image": (2, 0), "concepts": (7, 0)}, 2, 2),
        Step(9, "ICE_SaveConcepts", {"name": CONCEPT_SET_NAME, "overwrite": False}, {"concepts": (8, 0)}, 3, 0),
    ]


def _sampling_steps(
    first: int, model: tuple[int, int], concepts: tuple[int, int], column: int, row: int = 0
) -> list[Step]:
    """Compose Concepts, the negative prompt and the latent in ``column`` from ``row`` on; the sampler, the
    decoder and Save Image in the next column."""
    compose, negative, latent, sampler, decode, save = range(first, first + 6)
    return [
        Step(compose, "ICE_ComposeConcepts", {"prompt": COMPOSE_PROMPT}, {"ice_model": (3, 0), "concepts": concepts},
             column, row),
        Step(negative, "CLIPTextEncode", {"text": NEGATIVE_PROMPT}, {"clip": (1, 1)}, column, row + 1),
        Step(latent, "EmptyLatentImage", {"width": 512, "height": 512, "batch_size": 1}, column=column, row=row + 2),
        Step(sampler, "KSampler",
             {"seed": 0, "steps": 25, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0},
             {"model": model, "positive": (compose, 0), "negative": (negative, 0), "latent_image": (latent, 0)},
             column + 1, 0),
        Step(decode, "VAEDecode", {}, {"samples": (sampler, 0), "vae": (1, 2)}, column + 1, 1),
        Step(save, "SaveImage", {"filename_prefix": "ice"}, {"images": (decode, 0)}, column + 1, 2),
    ]


def _toyworld_steps() -> list[Step]:
    """The whole pipeline on the embedded Toy World model: nothing to download, minutes on a CPU."""
    learn = {"steps": TOYWORLD_LEARN_STEPS, "learning_rate": 5e-4, "seed": 0}
    return [
        Step(1, "ICE_LoadDiffusersModel", {"folder": TOYWORLD_MODEL}, column=0, row=0),
        Step(2, "ICE_ToyWorldScene", {"scene": TOYWORLD_SCENE}, column=0, row=1),
        _retriever_step(3, TOYWORLD_MODEL, column=0, row=2),
        _localize_step(4, model=1, retriever=3, image=2, column=1, row=0, max_concepts=TOYWORLD_MAX_OBJECTS,
                       segmentation=TOYWORLD_SEGMENTATION, min_contrast=TOYWORLD_MIN_CONTRAST),
        Step(5, "ICE_PreviewConcepts", {}, {"image": (2, 0), "concepts": (4, 0)}, 1, 1),
        Step(6, "ICE_LearnObjectTokens", learn, {"ice_model": (1, 0), "image": (2, 0), "concepts": (4, 0)}, 2, 0),
        Step(7, "ICE_LearnIntrinsicTokens", {"anchors": "material, colour", "refine_steps": 0, **learn},
             {"ice_model": (1, 0), "image": (2, 0), "concepts": (6, 0)}, 2, 1),
        Step(8, "ICE_ComposeConcepts", {"prompt": TOYWORLD_PROMPT}, {"ice_model": (1, 0), "concepts": (7, 0)}, 2, 2),
        Step(9, "ICE_Generate",
             {"seed": 0, "steps": 25, "cfg": 7.5, "sampler": "dpm++", "width": 0, "height": 0},
             {"ice_model": (1, 0), "positive": (8, 0)}, 3, 0),
        Step(11, "ImageScaleBy", {"upscale_method": VIEW_UPSCALE_METHOD, "scale_by": float(TOYWORLD_VIEW_SCALE)},
             {"image": (9, 0)}, 3, 1),
        Step(10, "SaveImage", {"filename_prefix": "ice_toyworld"}, {"images": (11, 0)}, 3, 2),
    ]


def workflows() -> dict[str, list[Step]]:
    """Every example graph by its key (the API twin is ``<key>_api.json``; the UI file is named by its title)."""
    compose = [
        Step(1, "CheckpointLoaderSimple", {"ckpt_name": CHECKPOINT}, column=0, row=0),
        Step(2, "ICE_LoadConcepts", {"concept_set": CONCEPT_SET_NAME + ".safetensors"}, column=0, row=1),
        Step(3, "ICE_LoadICEModel", {"working_resolution": 0}, {"model": (1, 0), "clip": (1, 1), "vae": (1, 2)}, 1, 0),
    ]
    compose += _sampling_steps(10, model=(1, 0), concepts=(2, 0), column=1, row=1)
    full = _loader_steps() + _extract_steps() + _sampling_steps(10, model=(8, 1), concepts=(8, 0), column=3, row=1)
    return {
        "ice_toyworld_demo": _toyworld_steps(),
        "ice_extract_concepts": _loader_steps() + _extract_steps(),
        "ice_compose": compose,
        "ice_full_pipeline": full,
    }


def ui_file_name(key: str) -> str:
    """The UI file of workflow ``key`` (without ``.json``): its title in the template browser."""
    return TEMPLATE_TITLES[key]


# ---------------------------------------------------------------------- formats
def api_workflow(steps: list[Step]) -> dict:
    """API format: ``{id: {class_type, inputs, _meta}}`` as ComfyUI's "Export (API)" writes it."""
    prompt = {}
    for step in sorted(steps, key=lambda s: s.id):
        inputs: dict[str, Any] = {}
        for spec in step.spec.inputs:
            if spec.name in step.links:
                source, slot = step.links[spec.name]
                inputs[spec.name] = [str(source), slot]
            elif spec.name in step.widgets:
                inputs[spec.name] = step.widgets[spec.name]
        prompt[str(step.id)] = {"class_type": step.type, "inputs": inputs, "_meta": {"title": step.spec.display_name}}
    return prompt


def node_height(step: Step) -> int:
    """Body height (below the title bar) that fits the node's slots and widgets as the frontend lays them out,
    plus the picture area of a node that shows one."""
    spec = step.spec
    height = SLOT_HEIGHT * max(len(spec.sockets), len(spec.outputs), 1)
    if spec.widgets:
        height += WIDGETS_PADDING + sum(
            MULTILINE_HEIGHT if widget.multiline else WIDGET_HEIGHT * widget_value_count(step.type, widget)
            for widget in spec.widgets
        )
    else:
        height += BARE_PADDING
    return height + (PREVIEW_HEIGHT if step.type in PICTURE_NODES else 0)


def layout(steps: list[Step]) -> dict[int, tuple[list[int], list[int]]]:
    """``{node id: (pos, size)}``: columns side by side, each column's nodes stacked by row, with room for the
    title bar and the badge above every node."""
    placed = {}
    for column in sorted({step.column for step in steps}):
        top = MARGIN + BADGE_HEIGHT
        for step in sorted((s for s in steps if s.column == column), key=lambda s: s.row):
            height = node_height(step)
            placed[step.id] = ([MARGIN + column * (NODE_WIDTH + COLUMN_GAP), top + TITLE_HEIGHT], [NODE_WIDTH, height])
            top += TITLE_HEIGHT + height + ROW_GAP
    return placed


def initial_view(placed: dict[int, tuple[list[int], list[int]]]) -> dict:
    """The canvas view a workflow opens with: the whole graph in a 1600 x 900 window (see VIEW_WIDTH)."""
    right = max(pos[0] + size[0] for pos, size in placed.values()) + MARGIN
    bottom = max(pos[1] + size[1] for pos, size in placed.values()) + MARGIN
    scale = min(MAX_VIEW_SCALE, VIEW_WIDTH / right, VIEW_HEIGHT / bottom)
    step = 10 ** VIEW_SCALE_DECIMALS
    return {"scale": int(scale * step) / step, "offset": [0, 0]}


def node_properties(step: "Step") -> dict:
    """A UI node's properties; a loader of a model file the user must fetch also lists that file, so that the
    frontend's missing-models dialog names it and its folder when the workflow opens without it."""
    properties: dict[str, Any] = {"Node name for S&R": step.type}
    models = [dict(model) for model in MODEL_FILES if step.widgets.get(model["widget"]) == model["name"]
              and step.type == model["node"]]
    if models:
        properties["models"] = [{key: m[key] for key in ("name", "url", "directory")} for m in models]
    return properties


def ui_workflow(name: str, steps: list[Step]) -> dict:
    """UI format (what the ComfyUI frontend saves): nodes with slots and widgets_values, and a links table."""
    links, by_id = [], {step.id: step for step in steps}
    incoming: dict[int, list[dict]] = {}
    outgoing: dict[tuple[int, int], list[int]] = {}
    for step in sorted(steps, key=lambda s: s.id):
        slots = []
        for spec in step.spec.inputs:
            if spec.is_widget and spec.name not in step.links:
                continue
            slot = {"name": spec.name, "type": spec.type, "link": None}
            if spec.is_widget:
                slot["widget"] = {"name": spec.name}
            if spec.name in step.links:
                source, source_slot = step.links[spec.name]
                link_id = len(links) + 1
                link_type = by_id[source].spec.outputs[source_slot].type
                links.append([link_id, source, source_slot, step.id, len(slots), link_type])
                outgoing.setdefault((source, source_slot), []).append(link_id)
                slot["link"] = link_id
            slots.append(slot)
        incoming[step.id] = slots
    nodes, placed = [], layout(steps)
    for order, step in enumerate(_execution_order(steps)):
        values: list[Any] = []
        for widget in step.spec.widgets:
            values.append(step.widgets.get(widget.name, widget.default))
            if widget_value_count(step.type, widget) == 2:
                values.append(SEED_CONTROL if widget.control_after_generate else IMAGE_UPLOAD_VALUE)
        outputs = [
            {"name": out.name, "type": out.type, "links": outgoing.get((step.id, index), []), "slot_index": index}
            for index, out in enumerate(step.spec.outputs)
        ]
        nodes.append({
            "id": step.id, "type": step.type, "pos": placed[step.id][0], "size": placed[step.id][1],
            "flags": {}, "order": order, "mode": 0, "inputs": incoming[step.id], "outputs": outputs,
            "properties": node_properties(step), "widgets_values": values,
        })
    nodes.sort(key=lambda n: n["id"])
    return {
        "id": str(uuid.uuid5(WORKFLOW_NAMESPACE, name)), "revision": 0,
        "last_node_id": max(s.id for s in steps), "last_link_id": len(links),
        "nodes": nodes, "links": links, "groups": [], "config": {},
        "extra": {"ds": initial_view(placed)}, "version": 0.4,
    }


def _execution_order(steps: list[Step]) -> list[Step]:
    done: list[Step] = []
    remaining = sorted(steps, key=lambda s: s.id)
    while remaining:
        ready = [s for s in remaining if all(src in {d.id for d in done} for src, _ in s.links.values())]
        if not ready:
            raise ValueError("The workflow graph has a cycle.")
        done.extend(ready)
        remaining = [s for s in remaining if s not in ready]
    return done


# ---------------------------------------------------------------------- files
def rendered_files() -> dict[str, bytes]:
    """Every file this tool writes, by path (the thumbnails are screenshots: see the module docstring)."""
    files = {}
    for key, steps in workflows().items():
        ui = ui_workflow(key, steps)
        files[os.path.join(UI_FOLDER, ui_file_name(key) + ".json")] = (json.dumps(ui, indent=1) + "\n").encode()
        files[os.path.join(API_FOLDER, key + API_SUFFIX)] = (json.dumps(api_workflow(steps), indent=1) + "\n").encode()
    return files


def stale_files(rendered: dict[str, bytes]) -> list[str]:
    """Workflow files in our two folders that this tool no longer writes (a renamed or removed workflow)."""
    found = [os.path.join(UI_FOLDER, name) for name in os.listdir(UI_FOLDER) if name.endswith(".json")]
    found += [os.path.join(API_FOLDER, name) for name in os.listdir(API_FOLDER) if name.endswith(API_SUFFIX)]
    return sorted(path for path in found if path not in rendered)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the example workflows (UI format) and their API twins.")
    parser.add_argument("--check", action="store_true", help="only report files that are out of date")
    args = parser.parse_args(argv)
    rendered = rendered_files()
    stale = []
    for path, payload in rendered.items():
        current = open(path, "rb").read() if os.path.exists(path) else None
        if current != payload:
            stale.append(os.path.relpath(path, ROOT))
            if not args.check:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                write_bytes_atomic(path, payload, overwrite=True)
    for path in stale_files(rendered):
        stale.append(os.path.relpath(path, ROOT) + " (no longer written)")
        if not args.check:
            os.remove(path)
    if args.check and stale:
        sys.stderr.write("out of date: " + ", ".join(stale) + "\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
