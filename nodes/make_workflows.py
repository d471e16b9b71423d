"""Write the example workflows: UI format in ``workflows/`` with a ``.jpg`` diagram of the same name, and
their API-format twins in ``tests/workflows/`` (what the ComfyUI test tier queues through /prompt).

    python -m nodes.make_workflows           # rewrite all files
    python -m nodes.make_workflows --check   # exit 1 if a file differs from what would be written

Each graph is written once below; socket order, widget order and types come from ``nodes/_spec.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from dataclasses import dataclass, field
from typing import Any

from ._spec import BUILTIN_VOCABULARY, NODE_BY_ID, TOYWORLD_MODEL, NodeSpec, node_spec, widget_value_count

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

# Layout of the UI graph (canvas pixels) and of the thumbnail.
COLUMN_WIDTH, ROW_HEIGHT, MARGIN = 400, 260, 40
NODE_WIDTH, TITLE_HEIGHT, SLOT_HEIGHT, MULTILINE_EXTRA = 340, 30, 24, 90
THUMB_WIDTH, THUMB_HEIGHT, THUMB_QUALITY = 768, 432, 88
ICE_COLOUR, STOCK_COLOUR, LINK_COLOUR, BACKGROUND = (54, 94, 150), (70, 70, 78), (230, 190, 90), (30, 30, 34)


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
        return node_spec(self.type)


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
    return [
        Step(2, "LoadImage", {"image": IMAGE}, column=0, row=1),
        _retriever_step(4, RETRIEVER_WEIGHTS, column=0, row=2),
        _localize_step(5, model=3, retriever=4, image=2, column=1, row=1),
        Step(6, "ICE_PreviewConcepts", {}, {"image": (2, 0), "concepts": (5, 0)}, 1, 2),
        Step(7, "ICE_LearnObjectTokens", {"steps": 400, "learning_rate": 5e-4, "seed": 0},
             {"ice_model": (3, 0), "image": (2, 0), "concepts": (5, 0)}, 2, 0),
        Step(8, "ICE_LearnIntrinsicTokens",
             {"anchors": "material, colour", "steps": 400, "refine_steps": 0, "learning_rate": 5e-4, "seed": 0},
             {"ice_model": (3, 0), "image": (2, 0), "concepts": (7, 0)}, 2, 1),
        Step(9, "ICE_SaveConcepts", {"name": CONCEPT_SET_NAME, "overwrite": False}, {"concepts": (8, 0)}, 2, 2),
    ]


def _sampling_steps(first: int, model: tuple[int, int], concepts: tuple[int, int], column: int) -> list[Step]:
    compose, negative, latent, sampler, decode, save = range(first, first + 6)
    return [
        Step(compose, "ICE_ComposeConcepts", {"prompt": COMPOSE_PROMPT}, {"ice_model": (3, 0), "concepts": concepts},
             column, 0),
        Step(negative, "CLIPTextEncode", {"text": NEGATIVE_PROMPT}, {"clip": (1, 1)}, column, 1),
        Step(latent, "EmptyLatentImage", {"width": 512, "height": 512, "batch_size": 1}, column=column, row=2),
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
        Step(8, "ICE_ComposeConcepts", {"prompt": TOYWORLD_PROMPT}, {"ice_model": (1, 0), "concepts": (7, 0)}, 3, 0),
        Step(9, "ICE_Generate",
             {"seed": 0, "steps": 25, "cfg": 7.5, "sampler": "dpm++", "width": 0, "height": 0},
             {"ice_model": (1, 0), "positive": (8, 0)}, 3, 1),
        Step(10, "SaveImage", {"filename_prefix": "ice_toyworld"}, {"images": (9, 0)}, 3, 2),
    ]


def workflows() -> dict[str, list[Step]]:
    compose = _loader_steps() + [Step(2, "ICE_LoadConcepts", {"concept_set": CONCEPT_SET_NAME + ".safetensors"},
                                      column=0, row=1)]
    compose += _sampling_steps(10, model=(1, 0), concepts=(2, 0), column=2)
    full = _loader_steps() + _extract_steps() + _sampling_steps(10, model=(8, 1), concepts=(8, 0), column=3)
    return {
        "ice_extract_concepts": _loader_steps() + _extract_steps(),
        "ice_compose": compose,
        "ice_full_pipeline": full,
        "ice_toyworld_demo": _toyworld_steps(),
    }


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


def _node_size(spec: NodeSpec) -> list[int]:
    rows = max(len(spec.sockets), len(spec.outputs)) + len(spec.widgets)
    extra = MULTILINE_EXTRA if any(w.multiline for w in spec.widgets) else 0
    return [NODE_WIDTH, TITLE_HEIGHT + SLOT_HEIGHT * rows + extra]


def _position(step: Step) -> list[int]:
    return [MARGIN + step.column * COLUMN_WIDTH, MARGIN + step.row * ROW_HEIGHT]


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
    nodes = []
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
            "id": step.id, "type": step.type, "pos": _position(step), "size": _node_size(step.spec),
            "flags": {}, "order": order, "mode": 0, "inputs": incoming[step.id], "outputs": outputs,
            "properties": {"Node name for S&R": step.type}, "widgets_values": values,
        })
    nodes.sort(key=lambda n: n["id"])
    return {
        "id": str(uuid.uuid5(WORKFLOW_NAMESPACE, name)), "revision": 0,
        "last_node_id": max(s.id for s in steps), "last_link_id": len(links),
        "nodes": nodes, "links": links, "groups": [], "config": {},
        "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4,
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


def thumbnail(steps: list[Step]):
    """A PIL diagram of the graph: one box per node (ICE nodes blue), one line per link."""
    from PIL import Image, ImageDraw, ImageFont

    columns = max(s.column for s in steps) + 1
    rows = max(s.row for s in steps) + 1
    scale_x = THUMB_WIDTH / (MARGIN + columns * COLUMN_WIDTH)
    scale_y = THUMB_HEIGHT / (MARGIN + rows * ROW_HEIGHT)
    scale = min(scale_x, scale_y)
    picture = Image.new("RGB", (THUMB_WIDTH, THUMB_HEIGHT), BACKGROUND)
    draw = ImageDraw.Draw(picture)
    try:
        font = ImageFont.load_default(size=max(9, int(22 * scale)))
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    boxes = {}
    for step in steps:
        x, y = _position(step)
        width, height = _node_size(step.spec)
        x, y, width = x * scale_x, y * scale_y, width * scale_x
        height = min(height, ROW_HEIGHT - MARGIN) * scale_y
        boxes[step.id] = (x, y, x + width, y + height)
    by_id = {s.id: s for s in steps}
    for step in steps:
        for name, (source, slot) in step.links.items():
            sx0, sy0, sx1, sy1 = boxes[source]
            tx0, ty0, _, ty1 = boxes[step.id]
            start = (sx1, sy0 + (slot + 1) * (sy1 - sy0) / (len(by_id[source].spec.outputs) + 1))
            draw.line([start, (tx0, (ty0 + ty1) / 2)], fill=LINK_COLOUR, width=2)
    for step in steps:
        colour = ICE_COLOUR if step.type in NODE_BY_ID else STOCK_COLOUR
        draw.rounded_rectangle(boxes[step.id], radius=6, fill=colour, outline=(200, 200, 210))
        x0, y0, x1, _ = boxes[step.id]
        draw.text(((x0 + x1) / 2, y0 + 14 * scale + 6), step.spec.display_name, fill=(245, 245, 245), font=font, anchor="mm")
    return picture


# ---------------------------------------------------------------------- files
def rendered_files() -> dict[str, bytes]:
    """Every file this tool writes, by path."""
    import io

    files = {}
    for name, steps in workflows().items():
        files[os.path.join(UI_FOLDER, name + ".json")] = (json.dumps(ui_workflow(name, steps), indent=1) + "\n").encode()
        files[os.path.join(API_FOLDER, name + API_SUFFIX)] = (json.dumps(api_workflow(steps), indent=1) + "\n").encode()
        buffer = io.BytesIO()
        thumbnail(steps).save(buffer, format="JPEG", quality=THUMB_QUALITY)
        files[os.path.join(UI_FOLDER, name + ".jpg")] = buffer.getvalue()
    return files


def _write_atomic(path: str, payload: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = path + ".tmp"
    with open(temporary, "wb") as handle:
        handle.write(payload)
    os.replace(temporary, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the example workflows, thumbnails and API twins.")
    parser.add_argument("--check", action="store_true", help="only report files that are out of date")
    args = parser.parse_args(argv)
    stale = []
    for path, payload in rendered_files().items():
        current = open(path, "rb").read() if os.path.exists(path) else None
        if path.endswith(".jpg") and current is not None and args.check:
            continue  # JPEG bytes depend on the Pillow version; the JSON files carry the graph
        if current != payload:
            stale.append(os.path.relpath(path, ROOT))
            if not args.check:
                _write_atomic(path, payload)
    if args.check and stale:
        sys.stderr.write("out of date: " + ", ".join(stale) + "\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
