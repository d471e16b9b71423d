"""Load this pack exactly as ComfyUI does and print every node's schema as JSON (ComfyUI test tier).

    python tests/comfyui/check_extension.py --comfyui /path/to/ComfyUI --base /tmp/base

``comfy_entrypoint`` is awaited, each class's V3 schema is built and validated (``GET_SCHEMA``) and its V1
info (what /object_info serves) is printed: ``{"nodes": {node_id: info}, "modules": [...]}``.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_pack(path: str):
    """Import the pack folder as ComfyUI's nodes.load_custom_node does (module name from the path)."""
    name = path.replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(name, os.path.join(path, "__init__.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def checkpoint_check_arguments(description: str) -> argparse.ArgumentParser:
    """The arguments every in-process check of a checkpoint takes: the ComfyUI checkout and the checkpoint."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--comfyui", required=True, help="ComfyUI checkout (its folder goes on sys.path)")
    parser.add_argument("--checkpoint", required=True, help="an SD 1.x/2.x .safetensors checkpoint")
    return parser


def pack_modules_in_comfyui(comfyui: str):
    """Put ComfyUI first on ``sys.path`` in CPU mode (before any ``comfy`` module reads its options) and import
    the pack as ComfyUI does; returns a function importing one of the pack's modules, e.g. ``"nodes._memory"``."""
    sys.path.insert(0, os.path.abspath(comfyui))
    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = True
    pack = load_pack(ROOT)
    return lambda name: importlib.import_module(f"{pack.__name__}.{name}")


async def node_infos(pack) -> dict:
    extension = await pack.comfy_entrypoint()
    infos = {}
    for node_class in await extension.get_node_list():
        schema = node_class.GET_SCHEMA()
        # V1 info is what /object_info serves (GET_NODE_INFO_V3 itself fails inside ComfyUI 0.3.64).
        infos[schema.node_id] = {"v1": node_class.GET_NODE_INFO_V1()}
    return infos


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--comfyui", required=True)
    parser.add_argument("--base", required=True, help="ComfyUI base directory (models/ etc.)")
    args = parser.parse_args()
    sys.path.insert(0, os.path.abspath(args.comfyui))
    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = True
    comfy_args.base_directory = args.base
    pack = load_pack(ROOT)
    heavy_before_entrypoint = [m for m in ("comfy_api.latest", "folder_paths") if m in sys.modules]
    infos = asyncio.run(node_infos(pack))
    report = {"nodes": infos, "imported_before_entrypoint": heavy_before_entrypoint}
    sys.stdout.write(json.dumps(report, default=str) + "\n")


if __name__ == "__main__":
    main()
