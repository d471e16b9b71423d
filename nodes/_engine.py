"""Access to the ICE engine (``ice_ops``) from ``nodes/``.

ComfyUI imports this pack as a package from its folder, so the engine is the sibling package
``<pack>.ice_ops``; tests and tools import ``nodes`` as a top-level package with the repository root on
``sys.path``, where the engine is plain ``ice_ops``. Always import submodules through :func:`engine`
(relative imports differ between the two ways the pack is loaded).
"""
from __future__ import annotations

import importlib
from types import ModuleType

try:
    from .. import ice_ops as _package  # loaded by ComfyUI as part of the pack
except ImportError:  # nodes/ imported as a top-level package (tests, docs tools)
    import ice_ops as _package


def engine(module: str) -> ModuleType:
    """The engine submodule ``module`` (e.g. ``engine("localization").segment_word``)."""
    return importlib.import_module(f"{_package.__name__}.{module}")
