"""ComfyUI V3 schemas built from ``nodes/_spec.py`` (the only place sockets, widgets and tooltips are written)."""
from __future__ import annotations

from typing import Callable

from comfy_api.latest import io

from . import _folders
from ._spec import CUSTOM_TYPES, NODE_BY_ID, InputSpec, NodeSpec, OutputSpec

CUSTOM = {name: io.Custom(name) for name in CUSTOM_TYPES}
_SOCKETS = {
    "MODEL": io.Model,
    "CLIP": io.Clip,
    "VAE": io.Vae,
    "IMAGE": io.Image,
    "MASK": io.Mask,
    "CONDITIONING": io.Conditioning,
    "STRING": io.String,
    **CUSTOM,
}
_OPTION_SOURCES: dict[str, Callable[[], list[str]]] = {
    "retriever_weights": _folders.retriever_weights,
    "retriever_architectures": _folders.retriever_architectures,
    "vocabularies": _folders.vocabularies,
    "concept_sets": _folders.concept_sets,
    "diffusers_folders": _folders.diffusers_folders,
}


def _input(spec: InputSpec):
    common = dict(tooltip=spec.tooltip, optional=spec.optional)
    if spec.type == "INT":
        return io.Int.Input(
            spec.name, default=spec.default, min=spec.min, max=spec.max, step=spec.step,
            control_after_generate=spec.control_after_generate or None, **common,
        )
    if spec.type == "FLOAT":
        return io.Float.Input(spec.name, default=spec.default, min=spec.min, max=spec.max, step=spec.step, **common)
    if spec.type == "BOOLEAN":
        return io.Boolean.Input(spec.name, default=spec.default, **common)
    if spec.type == "STRING":
        return io.String.Input(
            spec.name, default=spec.default, multiline=spec.multiline, placeholder=spec.placeholder, **common
        )
    if spec.type == "COMBO":
        options = list(spec.options) if spec.options else _OPTION_SOURCES[spec.options_from]()
        default = spec.default if spec.default in options else None
        return io.Combo.Input(spec.name, options=options, default=default, **common)
    return _SOCKETS[spec.type].Input(spec.name, **common)


def _output(spec: OutputSpec, input_names: set[str]):
    # V3 ids must differ between inputs and outputs; what users see is display_name.
    output_id = f"{spec.name}_out" if spec.name in input_names else spec.name
    return _SOCKETS[spec.type].Output(output_id, display_name=spec.name, tooltip=spec.tooltip or None)


def build_schema(spec: NodeSpec) -> io.Schema:
    return io.Schema(
        node_id=spec.node_id,
        display_name=spec.display_name,
        category=spec.category,
        description=spec.description,
        inputs=[_input(i) for i in spec.inputs],
        outputs=[_output(o, {i.name for i in spec.inputs}) for o in spec.outputs],
        is_experimental=spec.experimental,
        is_output_node=spec.output_node,
    )


def schema(node_id: str) -> io.Schema:
    """The V3 schema of the ICE node ``node_id``."""
    return build_schema(NODE_BY_ID[node_id])
