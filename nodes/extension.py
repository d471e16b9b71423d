"""The ComfyExtension of ComfyUI-ICE: every node class, registered through the V3 API. Imports ComfyUI."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from ._folders import register_folders
from .compose_nodes import ComposeConcepts, Generate
from .io_nodes import LoadConcepts, PreviewConcepts, SaveConcepts
from .learn_nodes import LearnIntrinsicTokens, LearnObjectTokens
from .localize_nodes import AttentionSegment, ConceptRetrieve, IterativeLocalize
from .model_nodes import LoadCLIPRetriever, LoadDiffusersModel, LoadICEModel
from .toyworld_nodes import ToyWorldScene

NODE_CLASSES: tuple[type[io.ComfyNode], ...] = (
    LoadICEModel,
    LoadDiffusersModel,
    LoadCLIPRetriever,
    ToyWorldScene,
    ConceptRetrieve,
    AttentionSegment,
    IterativeLocalize,
    LearnObjectTokens,
    LearnIntrinsicTokens,
    ComposeConcepts,
    Generate,
    SaveConcepts,
    LoadConcepts,
    PreviewConcepts,
)

register_folders()


class IceExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODE_CLASSES)
