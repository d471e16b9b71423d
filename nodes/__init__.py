"""ComfyUI nodes of ComfyUI-ICE (V3 schema).

Importing this package imports nothing from ComfyUI: ``_spec``, ``_adapters`` and ``_engine`` are usable
without it (tests, docs). The nodes themselves live in the ``*_nodes`` modules and are collected by
``nodes.extension``, which the pack's ``comfy_entrypoint`` imports.
"""
