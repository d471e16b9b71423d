"""ComfyUI-ICE: Intrinsic Concept Extraction (CVPR 2025) as ComfyUI nodes.

ComfyUI calls :func:`comfy_entrypoint`; nothing from ComfyUI (or torch) is imported before that.
"""


async def comfy_entrypoint():
    """Return the pack's ComfyExtension (ComfyUI V3 API)."""
    from .nodes.extension import IceExtension

    return IceExtension()
