"""Loaders: the checkpoint's or a diffusers folder's models for ICE, and the CLIP retriever."""
from __future__ import annotations

import comfy.model_management
import torch
from comfy_api.latest import io

from . import _folders
from ._memory import bundle_from_comfy, bundle_from_diffusers
from ._engine import engine
from ._schema import schema
from ._spec import TOYWORLD_MODEL


class LoadICEModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema("ICE_LoadICEModel")

    @classmethod
    def execute(cls, model, clip, vae, working_resolution: int) -> io.NodeOutput:
        return io.NodeOutput(bundle_from_comfy(model, clip, vae, working_resolution))


class LoadDiffusersModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema("ICE_LoadDiffusersModel")

    @classmethod
    def validate_inputs(cls, folder: str) -> bool | str:
        return _folders.problem_with(_folders.diffusers_folder_path, folder)

    @classmethod
    def execute(cls, folder: str) -> io.NodeOutput:
        return io.NodeOutput(bundle_from_diffusers(_folders.diffusers_folder_path(folder)))


class LoadCLIPRetriever(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema("ICE_LoadCLIPRetriever")

    @classmethod
    def validate_inputs(cls, weights: str, vocabulary: str) -> bool | str:
        if weights != TOYWORLD_MODEL:
            found = _folders.problem_with(_folders.weights_path, weights)
            if found is not True:
                return found
        return _folders.problem_with(_folders.vocabulary_path, vocabulary)

    @classmethod
    def execute(cls, weights: str, architecture: str, vocabulary: str) -> io.NodeOutput:
        vocabulary_file = _folders.vocabulary_path(vocabulary)
        device = comfy.model_management.unet_offload_device()
        with torch.inference_mode(False):  # the word table is computed later, inside an engine session
            if weights == TOYWORLD_MODEL:
                return io.NodeOutput(engine("toyworld").embedded_retriever(device, vocabulary=vocabulary_file))
            retriever = engine("retrieve").ClipRetriever.from_pretrained(
                _folders.architecture_argument(architecture),
                _folders.weights_path(weights),
                vocabulary=vocabulary_file,
                device=device,
                cache_dir=_folders.cache_folder(),
            )
        return io.NodeOutput(retriever)
