"""Loaders: the checkpoint's models for ICE, and the CLIP retriever."""
from __future__ import annotations

import comfy.model_management
import torch
from comfy_api.latest import io

from . import _folders
from ._adapters import bundle_from_comfy
from ._engine import engine
from ._schema import schema


class LoadICEModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema("ICE_LoadICEModel")

    @classmethod
    def execute(cls, model, clip, vae, working_resolution: int) -> io.NodeOutput:
        return io.NodeOutput(bundle_from_comfy(model, clip, vae, working_resolution))


class LoadCLIPRetriever(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema("ICE_LoadCLIPRetriever")

    @classmethod
    def execute(cls, weights: str, architecture: str, vocabulary: str) -> io.NodeOutput:
        vocabulary_file = _folders.vocabulary_path(vocabulary)
        with torch.inference_mode(False):  # the word table is computed later, inside an engine session
            retriever = engine("retrieve").ClipRetriever.from_pretrained(
                _folders.architecture_argument(architecture),
                _folders.weights_path(weights),
                vocabulary=vocabulary_file,
                device=comfy.model_management.unet_offload_device(),
                cache_dir=_folders.cache_folder(),
            )
        return io.NodeOutput(retriever)
