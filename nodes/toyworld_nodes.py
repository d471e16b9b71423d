"""Toy World scenes: test images the embedded Toy World model knows, drawn on demand (nothing to download)."""
from __future__ import annotations

from comfy_api.latest import io

from ._adapters import image_from_engine
from ._engine import engine
from ._schema import schema


class ToyWorldScene(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema("ICE_ToyWorldScene")

    @classmethod
    def execute(cls, scene: int) -> io.NodeOutput:
        scenes = engine("toyworld.scenes")
        drawn = scenes.make_scene(scenes.held_out_seed(scene))
        return io.NodeOutput(image_from_engine(drawn.image), drawn.caption, drawn.masks.float())
