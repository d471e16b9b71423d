"""ICE engine: Intrinsic Concept Extraction (CVPR 2025) on torch, diffusers, transformers and open_clip.

This package never imports ComfyUI. Public names are imported lazily so that ``import ice_ops`` stays light.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "DiffusionBundle": "bundle",
    "ClipRetriever": "retrieve",
    "localize": "localization",
    "Concept": "concepts",
    "ConceptSet": "concepts",
    "learn_object_tokens": "learn",
    "learn_intrinsic_tokens": "learn",
    "compose": "composition",
    "generate": "composition",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ice_ops' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
