"""Ask the pack's model check about every model class ComfyUI can detect (ComfyUI test tier).

    python tests/comfyui/check_model_classes.py --comfyui /path/to/ComfyUI

Each class of ``comfy.supported_models.models`` is built from its own ``unet_config``, wrapped the way a
loaded MODEL holds it and passed to ``model_family``; prints ``{class name: family or the refusal}`` as JSON.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from types import SimpleNamespace

from check_extension import ROOT, load_pack


def verdict(model_family, config_class) -> dict:
    try:
        config = config_class(dict(config_class.unet_config))
    except Exception as error:  # a class that needs more than its own unet_config: ComfyUI never detects it bare
        return {"built": False, "reason": repr(error)}
    model = SimpleNamespace(model=SimpleNamespace(model_config=config))
    try:
        family, _ = model_family(model)
    except ValueError as error:
        return {"built": True, "family": None, "refusal": str(error)}
    return {"built": True, "family": family, "context_dim": config.unet_config.get("context_dim")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--comfyui", required=True)
    args = parser.parse_args()
    sys.path.insert(0, os.path.abspath(args.comfyui))
    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = True
    import comfy.supported_models

    pack = load_pack(ROOT)
    adapters = importlib.import_module(pack.__name__ + ".nodes._adapters")
    report = {cls.__name__: verdict(adapters.model_family, cls) for cls in comfy.supported_models.models}
    sys.stdout.write(json.dumps(report) + "\n")


if __name__ == "__main__":
    main()
