"""ICE stage two: learn token vectors for the concepts (experimental, slow)."""
from __future__ import annotations

from comfy_api.latest import io

from ._adapters import ProgressReporter, image_to_engine, lora_patched_model, replace_masks, split_words
from ._engine import engine
from ._memory import engine_session
from ._schema import schema


class LearnObjectTokens(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema("ICE_LearnObjectTokens")

    @classmethod
    def execute(cls, ice_model, image, concepts, steps: int, learning_rate: float, seed: int, masks=None) -> io.NodeOutput:
        picture = image_to_engine(image)
        concepts = replace_masks(concepts, masks)
        with engine_session(ice_model):
            learned = engine("learn").learn_object_tokens(
                ice_model.bundle, picture, concepts, steps=steps, lr=learning_rate, seed=seed,
                callback=ProgressReporter(),
            )
        return io.NodeOutput(learned)


class LearnIntrinsicTokens(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema("ICE_LearnIntrinsicTokens")

    @classmethod
    def execute(
        cls, ice_model, image, concepts, anchors: str, steps: int, refine_steps: int, learning_rate: float, seed: int
    ) -> io.NodeOutput:
        picture = image_to_engine(image)
        if refine_steps > 0 and ice_model.model is None:
            raise ValueError(
                "LoRA refinement needs a checkpoint's MODEL to apply the LoRA to, and this ICE model was loaded from "
                "a diffusers folder; set refine_steps to 0, or load the model with Load Checkpoint + Load ICE Model."
            )
        with engine_session(ice_model):
            learned = engine("learn").learn_intrinsic_tokens(
                ice_model.bundle, picture, concepts, anchors=split_words(anchors), steps=steps, refine_steps=refine_steps,
                seed=seed, callback=ProgressReporter(), lr=learning_rate,
            )
        model = ice_model.model
        if refine_steps > 0:
            if not learned.lora:
                raise ValueError("Refinement ran but produced no LoRA; set refine_steps to 0 or update ComfyUI-ICE.")
            model = lora_patched_model(ice_model.model, learned.lora)
        return io.NodeOutput(learned, model)
