"""Save, load and preview concept sets."""
from __future__ import annotations

import os

import torch
from comfy_api.latest import io, ui

from . import _folders
from ._adapters import image_from_engine, image_to_engine, labelled_overlay, masks_from_engine
from ._engine import engine
from ._schema import schema

FILE_EXTENSION = engine("concepts").FILE_EXTENSION
LORA_SUFFIX = "_ice_lora"


def checked_save_name(name: str) -> str:
    """``name`` if it is a plain file name (letters, digits, '_', '-'); ``ValueError`` otherwise."""
    cleaned = engine("concepts").sanitize_name(name, what="save name")
    if cleaned != name.strip():
        raise ValueError(
            f"The save name {name!r} may only contain letters, digits, '_' and '-'; for example {cleaned!r}."
        )
    return cleaned


class SaveConcepts(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema("ICE_SaveConcepts")

    @classmethod
    def execute(cls, concepts, name: str, overwrite: bool) -> io.NodeOutput:
        name = checked_save_name(name)
        folders = _folders.output_folders()
        saved = concepts.save_with_exports(
            os.path.join(folders["concepts"], name + FILE_EXTENSION),
            embeddings_folder=folders["embeddings"],
            lora_path=os.path.join(folders["loras"], name + LORA_SUFFIX + FILE_EXTENSION),
            overwrite=overwrite,
        )
        lines = [f"concept set: {saved.concept_set}", *(f"embedding: {p}" for p in saved.embeddings)]
        if saved.lora:
            lines.append(f"LoRA: {saved.lora}")
        return io.NodeOutput(" ".join(saved.embedding_names), ui=ui.PreviewText("\n".join(lines)))


class LoadConcepts(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema("ICE_LoadConcepts")

    @classmethod
    def validate_inputs(cls, concept_set: str) -> bool | str:
        return _folders.problem_with(_folders.concept_set_path, concept_set)

    @classmethod
    def execute(cls, concept_set: str) -> io.NodeOutput:
        with torch.inference_mode(False):  # tensors usable for training later
            concepts = engine("concepts").ConceptSet.load(_folders.concept_set_path(concept_set))
        return io.NodeOutput(concepts, masks_from_engine(concepts.masks(), tuple(concepts.image_size)))

    @classmethod
    def fingerprint_inputs(cls, concept_set: str):
        """Reload when the file changes (Save Concepts with overwrite)."""
        return os.path.getmtime(_folders.concept_set_path(concept_set))


class PreviewConcepts(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema("ICE_PreviewConcepts")

    @classmethod
    def execute(cls, image, concepts) -> io.NodeOutput:
        picture = image_to_engine(image)
        size = tuple(picture.shape[-2:])
        if tuple(concepts.image_size) != size:
            height, width = concepts.image_size
            raise ValueError(
                f"The concepts were found in a {width}x{height} image but this image is {size[1]}x{size[0]}; "
                "connect the image the concepts come from."
            )
        preview = image_from_engine(labelled_overlay(picture, concepts.masks(), concepts.names))
        return io.NodeOutput(preview, ui=ui.PreviewImage(preview, cls=cls))
