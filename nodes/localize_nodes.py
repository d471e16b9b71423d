"""ICE stage one: name what is in the image and find where it is."""
from __future__ import annotations

from comfy_api.latest import io, ui

from ._adapters import (
    ProgressReporter,
    image_from_engine,
    image_to_engine,
    labelled_overlay,
    mask_to_engine,
    masks_from_engine,
    split_words,
)
from ._engine import engine
from ._memory import engine_session
from ._schema import schema


class ConceptRetrieve(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema("ICE_ConceptRetrieve")

    @classmethod
    def execute(cls, retriever, image, top_k: int, exclude: str, ignore_mask=None) -> io.NodeOutput:
        picture = image_to_engine(image)
        explained = mask_to_engine(ignore_mask, tuple(picture.shape[-2:]), "ignore_mask")
        with engine_session(retriever=retriever):
            ranked = retriever.rank(picture, explained=explained, exclude=tuple(split_words(exclude)), top_k=top_k)
        if not ranked:
            raise ValueError("The retriever returned no word; remove words from 'exclude' or use a larger vocabulary.")
        words = [word for word, _ in ranked]
        report = "\n".join(f"{word}: {score:.3f}" for word, score in ranked)
        return io.NodeOutput(words[0], ", ".join(words), ui=ui.PreviewText(report))


class AttentionSegment(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema("ICE_AttentionSegment")

    @classmethod
    def execute(cls, ice_model, image, word: str, segmentation: str = "diffseg", ignore_mask=None) -> io.NodeOutput:
        picture = image_to_engine(image)
        ignore = mask_to_engine(ignore_mask, tuple(picture.shape[-2:]), "ignore_mask")
        with engine_session(ice_model):
            result = engine("localization").segment_word(
                ice_model.bundle, picture, word.strip(), ignore=ignore, segmentation=segmentation
            )
        mask = result.mask.float().cpu()[None]
        overlay = labelled_overlay(picture, mask, [result.word])
        return io.NodeOutput(masks_from_engine(mask, tuple(picture.shape[-2:])), image_from_engine(overlay))


class IterativeLocalize(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema("ICE_IterativeLocalize")

    @classmethod
    def execute(
        cls, ice_model, retriever, image, stop_fraction: float, max_concepts: int, seed: int,
        segmentation: str = "diffseg", min_contrast: float = 0.0,
    ) -> io.NodeOutput:
        picture = image_to_engine(image)
        with engine_session(ice_model, retriever=retriever):
            concepts = engine("localization").localize(
                ice_model.bundle, retriever, picture, stop_fraction=stop_fraction, max_concepts=max_concepts,
                seed=seed, callback=ProgressReporter(), segmentation=segmentation, min_contrast=min_contrast or None,
            )
        masks = concepts.masks()
        preview = labelled_overlay(picture, masks, concepts.names)
        return io.NodeOutput(
            concepts, masks_from_engine(masks, tuple(picture.shape[-2:])), image_from_engine(preview)
        )
