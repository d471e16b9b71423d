"""Render NODES.md from ``nodes/_spec.py`` (the same data the ComfyUI schemas and tooltips are built from).

    python -m devtools.make_docs           # rewrite NODES.md
    python -m devtools.make_docs --check   # exit 1 if NODES.md is out of date
"""
from __future__ import annotations

import argparse
import os
import sys

from ice_ops.files import write_bytes_atomic
from nodes._spec import (
    CATEGORY_COMPOSE,
    CATEGORY_IO,
    CATEGORY_LEARN,
    CATEGORY_LOCALIZE,
    NODES,
    OPTIONS_CONCEPT_SETS,
    OPTIONS_RETRIEVER_ARCHITECTURES,
    OPTIONS_DIFFUSERS_FOLDERS,
    OPTIONS_RETRIEVER_WEIGHTS,
    OPTIONS_VOCABULARIES,
    InputSpec,
    NodeSpec,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NODES_MD = os.path.join(ROOT, "NODES.md")
DOC_ORDER = (CATEGORY_IO, CATEGORY_LOCALIZE, CATEGORY_LEARN, CATEGORY_COMPOSE)  # the order a user meets them
OPTION_SOURCES = {
    OPTIONS_RETRIEVER_WEIGHTS: "the embedded Toy World CLIP, then .safetensors files in models/ice and models/clip",
    OPTIONS_DIFFUSERS_FOLDERS: "the embedded Toy World model, then diffusers folders in models/diffusers",
    OPTIONS_RETRIEVER_ARCHITECTURES: "supported open_clip architectures and models/ice/*.json configs",
    OPTIONS_VOCABULARIES: "built-in nouns, or .txt files in models/ice",
    OPTIONS_CONCEPT_SETS: ".safetensors files in models/ice_concepts",
}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _kind(spec: InputSpec) -> str:
    if spec.type == "COMBO":
        return "choice"
    return spec.type


def _default(spec: InputSpec) -> str:
    if spec.options_from:
        source = OPTION_SOURCES[spec.options_from]
        return f"{source}" + (f"; default `{spec.default}`" if spec.default is not None else "")
    parts = []
    if spec.default is not None:
        parts.append(f"default `{spec.default!r}`" if isinstance(spec.default, str) else f"default `{spec.default}`")
    if spec.min is not None or spec.max is not None:
        parts.append(f"{spec.min} to {spec.max}")
    if spec.optional:
        parts.append("optional")
    return ", ".join(parts)


def render_node(spec: NodeSpec) -> str:
    flags = []
    if spec.experimental:
        flags.append("experimental")
    if spec.output_node:
        flags.append("output node")
    lines = [
        f"### {spec.display_name}",
        "",
        f"`{spec.node_id}` · {spec.category}" + (f" · {', '.join(flags)}" if flags else ""),
        "",
        spec.description,
        "",
        "| input | type | values | description |",
        "|---|---|---|---|",
    ]
    lines += [f"| `{i.name}` | {_kind(i)} | {_cell(_default(i))} | {_cell(i.tooltip)} |" for i in spec.inputs]
    lines += ["", "| output | type | description |", "|---|---|---|"]
    lines += [f"| `{o.name}` | {o.type} | {_cell(o.tooltip)} |" for o in spec.outputs]
    return "\n".join(lines) + "\n"


def render() -> str:
    """The full text of NODES.md."""
    parts = [
        "# ComfyUI-ICE nodes",
        "",
        "Generated from `nodes/_spec.py` by `python -m devtools.make_docs`; do not edit by hand. The same text is",
        "shown as tooltips in ComfyUI.",
        "",
    ]
    for category in DOC_ORDER:
        members = [spec for spec in NODES if spec.category == category]
        if not members:
            continue
        parts += [f"## {category}", ""]
        parts += [render_node(spec) for spec in members]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Render NODES.md from the node specs.")
    parser.add_argument("--check", action="store_true", help="exit 1 if NODES.md is out of date")
    args = parser.parse_args(argv)
    text = render()
    current = open(NODES_MD, encoding="utf-8").read() if os.path.exists(NODES_MD) else None
    if args.check:
        if current != text:
            sys.stderr.write("NODES.md is out of date; run python -m devtools.make_docs\n")
            return 1
        return 0
    if current != text:
        write_bytes_atomic(NODES_MD, text.encode("utf-8"), overwrite=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
