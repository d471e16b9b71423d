"""Prompts that mix words with learned tokens, encoded for the stock KSampler."""
from __future__ import annotations

from comfy_api.latest import io

from ._adapters import conditioning_from_composed, engine_session
from ._engine import engine
from ._schema import schema


class ComposeConcepts(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema("ICE_ComposeConcepts")

    @classmethod
    def execute(cls, ice_model, concepts, prompt: str) -> io.NodeOutput:
        with engine_session(ice_model.bundle):
            composed = engine("compose").compose(ice_model.bundle, concepts, prompt)
        return io.NodeOutput(conditioning_from_composed(composed))
