"""Prompts that mix words with learned tokens, encoded for the stock KSampler, and sampling for models
that have no ComfyUI MODEL (diffusers folders such as the embedded Toy World model)."""
from __future__ import annotations

from comfy_api.latest import io

from ._adapters import (
    ProgressReporter,
    composed_from_conditioning,
    conditioning_from_composed,
    image_from_engine,
)
from ._engine import engine
from ._memory import TEXT_ONLY, engine_session
from ._schema import schema


class ComposeConcepts(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema("ICE_ComposeConcepts")

    @classmethod
    def execute(cls, ice_model, concepts, prompt: str) -> io.NodeOutput:
        with engine_session(ice_model, parts=TEXT_ONLY):
            composed = engine("composition").compose(ice_model.bundle, concepts, prompt)
        return io.NodeOutput(conditioning_from_composed(composed))


class Generate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema("ICE_Generate")

    @classmethod
    def execute(
        cls, ice_model, positive, seed: int, steps: int, cfg: float, sampler: str, width: int, height: int,
        negative=None,
    ) -> io.NodeOutput:
        bundle = ice_model.bundle
        compose = engine("composition")
        with engine_session(ice_model):
            empty = compose.compose(bundle, None, "")
            prompt = composed_from_conditioning(positive, negative, empty, width=empty.hidden_states.shape[-1])
            images = compose.generate(
                bundle, prompt, seed=seed, steps=steps, guidance=cfg, scheduler=sampler,
                width=width or None, height=height or None, callback=ProgressReporter(),
            )
        return io.NodeOutput(image_from_engine(images[0].cpu()))
