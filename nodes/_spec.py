"""What every ICE node looks like, without ComfyUI (nor torch): ids, names, categories, sockets, widgets, tooltips.

The V3 schemas (``nodes/_schema.py``), NODES.md (``python -m devtools.make_docs``) and the workflow tests all
read this module, so the documentation, the tooltips and the graphs cannot drift apart. ``STOCK_NODES``
describes the few ComfyUI core nodes our example workflows use (checked against a real ComfyUI in the
ComfyUI test tier).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._engine import engine

_defaults = engine("defaults")

PREFIX = "ICE_"
CATEGORY_LOCALIZE = "ICE/localize"
CATEGORY_LEARN = "ICE/learn"
CATEGORY_COMPOSE = "ICE/compose"
CATEGORY_IO = "ICE/io"
CATEGORIES = (CATEGORY_LOCALIZE, CATEGORY_LEARN, CATEGORY_COMPOSE, CATEGORY_IO)

ICE_MODEL = "ICE_MODEL"
ICE_RETRIEVER = "ICE_RETRIEVER"
ICE_CONCEPTS = "ICE_CONCEPTS"
CUSTOM_TYPES = (ICE_MODEL, ICE_RETRIEVER, ICE_CONCEPTS)
# Socket types whose value is typed into the node (a widget) rather than only linked.
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
MAX_SEED = 0xFFFFFFFFFFFFFFFF  # ComfyUI's seed widget range (nodes.py KSampler)

# Dynamic option lists, filled from the models folders when ComfyUI asks for the schema.
OPTIONS_RETRIEVER_WEIGHTS = "retriever_weights"
OPTIONS_RETRIEVER_ARCHITECTURES = "retriever_architectures"
OPTIONS_VOCABULARIES = "vocabularies"
OPTIONS_CONCEPT_SETS = "concept_sets"
OPTIONS_DIFFUSERS_FOLDERS = "diffusers_folders"
BUILTIN_VOCABULARY = "built-in nouns"
# The tiny model trained on Toy World scenes that ships inside the pack (ice_ops/toyworld/weights): listed
# first by Load Diffusers Model and Load CLIP Retriever so ICE can be tried with nothing downloaded.
TOYWORLD_MODEL = "Toy World (embedded)"

# The engine's defaults (ice_ops/defaults.py, which imports nothing): widgets start where the engine does.
DEFAULT_STOP_FRACTION = _defaults.DEFAULT_STOP_FRACTION
DEFAULT_MAX_CONCEPTS = _defaults.DEFAULT_MAX_CONCEPTS
DEFAULT_STEPS = _defaults.DEFAULT_STEPS
DEFAULT_LR = _defaults.DEFAULT_LR
DEFAULT_ANCHORS = ", ".join(_defaults.DEFAULT_ANCHORS)
DEFAULT_TOP_K = _defaults.DEFAULT_TOP_K
DEFAULT_SAMPLE_STEPS = _defaults.DEFAULT_SAMPLE_STEPS
DEFAULT_GUIDANCE = _defaults.DEFAULT_GUIDANCE
MAX_SAMPLE_STEPS = 1000
MAX_GUIDANCE = 30.0
SAMPLERS = _defaults.SCHEDULERS
SEGMENTATIONS = _defaults.SEGMENTATIONS  # the paper's first
# Toy World scene picker: held-out scene indices (ice_ops.toyworld.scenes.held_out_seed), never trained on.
MAX_TOYWORLD_SCENE = 99_999
# Working resolution widget: SD 1.x/2.x sizes are multiples of 64 (VAE /8 x UNet /8); 2048 is 4x SD 1.5's.
WORKING_RESOLUTION_STEP = 64
MAX_WORKING_RESOLUTION = 2048
MAX_MIN_CONTRAST = 100.0  # Localize Concepts' stop rule: real objects' attention contrasts stay far below this


@dataclass(frozen=True)
class InputSpec:
    """One input socket or widget."""

    name: str
    type: str
    tooltip: str
    optional: bool = False
    default: Any = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    multiline: bool = False
    placeholder: str | None = None
    options: tuple[str, ...] = ()
    options_from: str | None = None
    control_after_generate: bool = False

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES


@dataclass(frozen=True)
class OutputSpec:
    name: str
    type: str
    tooltip: str = ""


@dataclass(frozen=True)
class NodeSpec:
    node_id: str
    display_name: str
    category: str
    description: str
    inputs: tuple[InputSpec, ...]
    outputs: tuple[OutputSpec, ...]
    experimental: bool = False
    output_node: bool = False

    def input(self, name: str) -> InputSpec:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise KeyError(f"{self.node_id} has no input {name!r}")

    @property
    def widgets(self) -> tuple[InputSpec, ...]:
        return tuple(spec for spec in self.inputs if spec.is_widget)

    @property
    def sockets(self) -> tuple[InputSpec, ...]:
        return tuple(spec for spec in self.inputs if not spec.is_widget)


def _seed(tooltip: str) -> InputSpec:
    return InputSpec("seed", "INT", tooltip, default=0, min=0, max=MAX_SEED, control_after_generate=True)


def _segmentation() -> InputSpec:
    return InputSpec(
        "segmentation", "COMBO",
        "diffseg (the paper): group the pixels by self-attention, then name each group by cross-attention. "
        "cross-attention: keep the pixels that attend most to the word; for small models whose self-attention "
        "groups nothing, such as the embedded Toy World model.",
        default=SEGMENTATIONS[0], options=SEGMENTATIONS, optional=True,  # graphs saved before it keep running
    )


_IMAGE_ONE = "The image to work on. Give exactly one image (a batch of several stops the node)."
_ICE_MODEL_IN = "The Stable Diffusion model prepared by Load ICE Model."
_CONCEPTS_IN = "The concept set: words and masks from Localize Concepts, or one loaded with Load Concepts."

NODES: tuple[NodeSpec, ...] = (
    NodeSpec(
        node_id="ICE_LoadICEModel",
        display_name="Load ICE Model",
        category=CATEGORY_IO,
        description=(
            "Prepares the checkpoint's UNet, text encoder and VAE for ICE. Connect MODEL, CLIP and VAE of one "
            "Load Checkpoint node holding a Stable Diffusion 1.x or 2.x model. ICE computes with the weights "
            "ComfyUI has loaded (no second copy; ComfyUI loads and frees them as for KSampler) and never changes "
            "them."
        ),
        inputs=(
            InputSpec("model", "MODEL", "MODEL output of Load Checkpoint (SD 1.x or SD 2.x; LoRAs applied to it are used)."),
            InputSpec("clip", "CLIP", "CLIP output of the same Load Checkpoint node."),
            InputSpec("vae", "VAE", "VAE output of the same Load Checkpoint node."),
            InputSpec(
                "working_resolution", "INT",
                "Longest image side ICE works at, in pixels; 0 uses the model's native resolution (512 for SD 1.x "
                "and 2.x-base, 768 for 2.x-v). Lower is faster and coarser.",
                default=0, min=0, max=MAX_WORKING_RESOLUTION, step=WORKING_RESOLUTION_STEP,
            ),
        ),
        outputs=(OutputSpec("ice_model", ICE_MODEL, "The model in the form the ICE nodes use."),),
    ),
    NodeSpec(
        node_id="ICE_LoadCLIPRetriever",
        display_name="Load CLIP Retriever",
        category=CATEGORY_IO,
        description=(
            "Loads an open_clip image-text model that names the objects in an image by ranking a vocabulary of "
            "nouns. Put the .safetensors weights in models/ice or models/clip. Use ViT-L-14 (OpenAI) with SD 1.x "
            "and ViT-H-14 (laion2b) with SD 2.x."
        ),
        inputs=(
            InputSpec(
                "weights", "COMBO",
                "open_clip weights (.safetensors) found in models/ice and models/clip. 'Toy World (embedded)' is "
                "the tiny CLIP shipped with ICE; it brings its own architecture and, with the built-in vocabulary, "
                "the Toy World shape words.",
                options_from=OPTIONS_RETRIEVER_WEIGHTS,
            ),
            InputSpec(
                "architecture", "COMBO",
                "The open_clip architecture the weights belong to (ViT-L-14 for OpenAI CLIP-L, ViT-H-14 for "
                "OpenCLIP-H). A <name>.json open_clip config in models/ice adds an architecture. Not used with "
                "the embedded Toy World CLIP.",
                options_from=OPTIONS_RETRIEVER_ARCHITECTURES,
            ),
            InputSpec(
                "vocabulary", "COMBO",
                "Words the retriever may choose from: the built-in noun list, or a .txt file in models/ice with "
                "one word per line.",
                default=BUILTIN_VOCABULARY, options_from=OPTIONS_VOCABULARIES,
            ),
        ),
        outputs=(OutputSpec("retriever", ICE_RETRIEVER, "The loaded retriever."),),
    ),
    NodeSpec(
        node_id="ICE_LoadDiffusersModel",
        display_name="Load Diffusers Model",
        category=CATEGORY_IO,
        description=(
            "Loads a Stable Diffusion model saved as a diffusers folder (models/diffusers) for the ICE nodes. "
            "'Toy World (embedded)', listed first, is the tiny model shipped with ICE: try the whole pipeline on "
            "Toy World scenes with nothing downloaded. Sample from it with Generate Image (KSampler needs a "
            "checkpoint's MODEL)."
        ),
        inputs=(
            InputSpec(
                "folder", "COMBO",
                "A diffusers folder in models/diffusers (one with a model_index.json), or the embedded Toy World "
                "model.",
                default=TOYWORLD_MODEL, options_from=OPTIONS_DIFFUSERS_FOLDERS,
            ),
        ),
        outputs=(OutputSpec("ice_model", ICE_MODEL, "The model in the form the ICE nodes use."),),
    ),
    NodeSpec(
        node_id="ICE_ToyWorldScene",
        display_name="Toy World Scene",
        category=CATEGORY_IO,
        description=(
            "Draws a Toy World scene: one to three coloured, patterned shapes on a textured background, the kind "
            "of image the embedded Toy World model knows. Every scene index gives the same picture on every "
            "machine, and none was seen in training."
        ),
        inputs=(
            InputSpec(
                "scene", "INT", "Which held-out scene to draw (0, 1, 2, ...).", default=3, min=0,
                max=MAX_TOYWORLD_SCENE,
            ),
        ),
        outputs=(
            OutputSpec("image", "IMAGE", "The scene (64x64 pixels, the toy model's native size)."),
            OutputSpec("caption", "STRING", "What the scene shows, for example 'a blue striped square'."),
            OutputSpec("masks", "MASK", "The true mask of each object, in caption order."),
        ),
    ),
    NodeSpec(
        node_id="ICE_ConceptRetrieve",
        display_name="Retrieve Concept Words",
        category=CATEGORY_LOCALIZE,
        description="Names what is in the image: ranks the retriever's vocabulary against the image (or the part of it not yet masked).",
        inputs=(
            InputSpec("retriever", ICE_RETRIEVER, "The retriever from Load CLIP Retriever."),
            InputSpec("image", "IMAGE", _IMAGE_ONE),
            InputSpec("top_k", "INT", "How many words to return, best first.", default=DEFAULT_TOP_K, min=1, max=100),
            InputSpec(
                "exclude", "STRING",
                "Words never to return, separated by commas (for example words already found).",
                default="",
            ),
            InputSpec(
                "ignore_mask", "MASK",
                "Optional: regions already explained (white = ignore). Same size as the image.",
                optional=True,
            ),
        ),
        outputs=(
            OutputSpec("top_word", "STRING", "The best word."),
            OutputSpec("words", "STRING", "The top words, best first, separated by commas."),
        ),
    ),
    NodeSpec(
        node_id="ICE_AttentionSegment",
        display_name="Attention Segment",
        category=CATEGORY_LOCALIZE,
        description=(
            "Finds where one word is in the image from the diffusion model's attention (one UNet pass, no "
            "training): self-attention groups the pixels, cross-attention tells which group is the word."
        ),
        inputs=(
            InputSpec("ice_model", ICE_MODEL, _ICE_MODEL_IN),
            InputSpec("image", "IMAGE", _IMAGE_ONE),
            InputSpec("word", "STRING", "One word naming the object to segment, for example 'vase'.", default="object"),
            InputSpec(
                "ignore_mask", "MASK",
                "Optional: regions to leave out (white = ignore). Same size as the image.",
                optional=True,
            ),
            _segmentation(),
        ),
        outputs=(
            OutputSpec("mask", "MASK", "Where the word is (white), at image size."),
            OutputSpec("overlay", "IMAGE", "The mask drawn over the image."),
        ),
    ),
    NodeSpec(
        node_id="ICE_IterativeLocalize",
        display_name="Localize Concepts",
        category=CATEGORY_LOCALIZE,
        description=(
            "ICE stage one: repeatedly names the most prominent unexplained object and segments it, until "
            "little of the image is left or enough concepts are found. Shows the masks while it works."
        ),
        inputs=(
            InputSpec("ice_model", ICE_MODEL, _ICE_MODEL_IN),
            InputSpec("retriever", ICE_RETRIEVER, "The retriever from Load CLIP Retriever."),
            InputSpec("image", "IMAGE", _IMAGE_ONE),
            InputSpec(
                "stop_fraction", "FLOAT",
                "Stop when less than this fraction of the image is unexplained (the paper uses 0.05).",
                default=DEFAULT_STOP_FRACTION, min=0.0, max=0.99, step=0.01,
            ),
            InputSpec(
                "max_concepts", "INT", "The most concepts to find.", default=DEFAULT_MAX_CONCEPTS, min=1, max=32
            ),
            _seed("Seed recorded with the concepts (localization itself does not sample)."),
            _segmentation(),
            InputSpec(
                "min_contrast", "FLOAT",
                "Stop rule for segmentation = cross-attention (0 = off): stop when the next word attends less than "
                "this many times more to its own mask than to the rest of the unexplained image, i.e. the model "
                "finds nothing more of it. The Toy World workflow sets the value calibrated for its model.",
                default=0.0, min=0.0, max=MAX_MIN_CONTRAST, step=0.1, optional=True,  # graphs saved before it keep running
            ),
        ),
        outputs=(
            OutputSpec("concepts", ICE_CONCEPTS, "Words and masks of the objects found."),
            OutputSpec("masks", "MASK", "One mask per concept, in concept order."),
            OutputSpec("preview", "IMAGE", "The masks over the image with their words."),
        ),
    ),
    NodeSpec(
        node_id="ICE_LearnObjectTokens",
        display_name="Learn Object Tokens",
        category=CATEGORY_LEARN,
        description=(
            "ICE stage two, phase one: learns an object token (what kind of thing) and an instance token (what "
            "makes this one unique) for every concept. Slow: a few minutes per 100 steps on a GPU."
        ),
        inputs=(
            InputSpec("ice_model", ICE_MODEL, _ICE_MODEL_IN),
            InputSpec("image", "IMAGE", "The image the concepts were found in (one image)."),
            InputSpec("concepts", ICE_CONCEPTS, _CONCEPTS_IN),
            InputSpec("steps", "INT", "Training steps (the paper uses 400).", default=DEFAULT_STEPS, min=1, max=20000),
            InputSpec(
                "learning_rate", "FLOAT", "AdamW learning rate for the token vectors.",
                default=DEFAULT_LR, min=1e-6, max=1e-1, step=1e-5,
            ),
            _seed("Seed for noise, timesteps and flips; the same seed gives the same tokens."),
            InputSpec(
                "masks", "MASK",
                "Optional: replacement masks, one per concept in concept order (for hand-corrected masks).",
                optional=True,
            ),
        ),
        outputs=(OutputSpec("concepts", ICE_CONCEPTS, "The concepts with object and instance tokens."),),
        experimental=True,
    ),
    NodeSpec(
        node_id="ICE_LearnIntrinsicTokens",
        display_name="Learn Intrinsic Tokens",
        category=CATEGORY_LEARN,
        description=(
            "ICE stage two, phase two: learns one token per intrinsic attribute (material, colour, ...) of every "
            "concept, starting from its instance token. With refine steps it also trains a small LoRA and "
            "returns the model with it applied."
        ),
        inputs=(
            InputSpec("ice_model", ICE_MODEL, _ICE_MODEL_IN),
            InputSpec("image", "IMAGE", "The image the concepts were found in (one image)."),
            InputSpec("concepts", ICE_CONCEPTS, "Concepts with object tokens, from Learn Object Tokens."),
            InputSpec(
                "anchors", "STRING",
                "Attributes to learn, separated by commas: material, colour, texture.",
                default=DEFAULT_ANCHORS,
            ),
            InputSpec("steps", "INT", "Training steps (the paper uses 400).", default=DEFAULT_STEPS, min=1, max=20000),
            InputSpec(
                "refine_steps", "INT",
                "LoRA refinement steps on the UNet after the tokens; 0 turns refinement off.",
                default=0, min=0, max=20000,
            ),
            InputSpec(
                "learning_rate", "FLOAT", "AdamW learning rate for the token vectors.",
                default=DEFAULT_LR, min=1e-6, max=1e-1, step=1e-5,
            ),
            _seed("Seed for noise, timesteps and flips; the same seed gives the same tokens."),
        ),
        outputs=(
            OutputSpec("concepts", ICE_CONCEPTS, "The concepts with intrinsic tokens (and the LoRA when refined)."),
            OutputSpec(
                "model", "MODEL",
                "The checkpoint's MODEL with the refinement LoRA applied (a copy); unchanged when refine_steps is 0.",
            ),
        ),
        experimental=True,
    ),
    NodeSpec(
        node_id="ICE_ComposeConcepts",
        display_name="Compose Concepts",
        category=CATEGORY_COMPOSE,
        description=(
            "Encodes a prompt that mixes words with learned tokens, written [concept.role], for example "
            "'a cup made of [bust.material] in [bowl.colour]'. Connect the result to KSampler's positive input."
        ),
        inputs=(
            InputSpec("ice_model", ICE_MODEL, _ICE_MODEL_IN),
            InputSpec("concepts", ICE_CONCEPTS, "Concepts with learned tokens."),
            InputSpec(
                "prompt", "STRING",
                "The prompt. [name.role] inserts a learned token: name is the concept's name, role is object, "
                "instance or an anchor such as material or colour.",
                default="", multiline=True, placeholder="a cup made of [bust.material] in [bowl.colour]",
            ),
        ),
        outputs=(OutputSpec("conditioning", "CONDITIONING", "Conditioning for KSampler, like CLIP Text Encode's."),),
    ),
    NodeSpec(
        node_id="ICE_Generate",
        display_name="Generate Image",
        category=CATEGORY_COMPOSE,
        description=(
            "Samples an image from an ICE model with classifier-free guidance. Use it with models from Load "
            "Diffusers Model (such as the embedded Toy World model), which have no MODEL for KSampler; connect "
            "Compose Concepts to positive."
        ),
        inputs=(
            InputSpec("ice_model", ICE_MODEL, _ICE_MODEL_IN),
            InputSpec("positive", "CONDITIONING", "What to draw: the output of Compose Concepts."),
            InputSpec(
                "negative", "CONDITIONING",
                "Optional: what to avoid, from Compose Concepts with the same model. Without it the empty prompt "
                "is used, as in training.",
                optional=True,
            ),
            _seed("Seed of the starting noise; the same seed gives the same image."),
            InputSpec("steps", "INT", "Sampling steps.", default=DEFAULT_SAMPLE_STEPS, min=1, max=MAX_SAMPLE_STEPS),
            InputSpec(
                "cfg", "FLOAT", "Classifier-free guidance scale: higher follows the prompt more closely.",
                default=DEFAULT_GUIDANCE, min=1.0, max=MAX_GUIDANCE, step=0.1,
            ),
            InputSpec(
                "sampler", "COMBO", "The diffusers sampler: dpm++ (DPM-Solver++ multistep), ddim or euler.",
                default=SAMPLERS[0], options=SAMPLERS,
            ),
            InputSpec(
                "width", "INT", "Image width in pixels; 0 uses the model's native size.",
                default=0, min=0, max=MAX_WORKING_RESOLUTION, step=8,
            ),
            InputSpec(
                "height", "INT", "Image height in pixels; 0 uses the model's native size.",
                default=0, min=0, max=MAX_WORKING_RESOLUTION, step=8,
            ),
        ),
        outputs=(OutputSpec("image", "IMAGE", "The generated image."),),
    ),
    NodeSpec(
        node_id="ICE_SaveConcepts",
        display_name="Save Concepts",
        category=CATEGORY_IO,
        description=(
            "Saves the concept set to models/ice_concepts, one embedding per learned token to models/embeddings "
            "(use as embedding:NAME in CLIP Text Encode) and the refinement LoRA, if any, to models/loras."
        ),
        inputs=(
            InputSpec("concepts", ICE_CONCEPTS, "The concepts to save."),
            InputSpec(
                "name", "STRING",
                "File name without extension: letters, digits, '_' and '-'. Embeddings are called name_concept_role.",
                default="ice_concepts",
            ),
            InputSpec(
                "overwrite", "BOOLEAN", "Replace existing files of the same name instead of stopping.", default=False
            ),
        ),
        outputs=(
            OutputSpec(
                "embeddings", "STRING",
                "The saved tokens as 'embedding:NAME' words, ready to paste into CLIP Text Encode.",
            ),
        ),
        output_node=True,
    ),
    NodeSpec(
        node_id="ICE_LoadConcepts",
        display_name="Load Concepts",
        category=CATEGORY_IO,
        description="Loads a concept set saved by Save Concepts from models/ice_concepts.",
        inputs=(
            InputSpec(
                "concept_set", "COMBO", "A concept set file from models/ice_concepts.",
                options_from=OPTIONS_CONCEPT_SETS,
            ),
        ),
        outputs=(
            OutputSpec("concepts", ICE_CONCEPTS, "The loaded concepts."),
            OutputSpec("masks", "MASK", "One mask per concept, in concept order."),
        ),
    ),
    NodeSpec(
        node_id="ICE_PreviewConcepts",
        display_name="Preview Concepts",
        category=CATEGORY_IO,
        description="Draws every concept's mask over the image in its own colour, labelled with its name.",
        inputs=(
            InputSpec("image", "IMAGE", "The image the concepts were found in (one image)."),
            InputSpec("concepts", ICE_CONCEPTS, _CONCEPTS_IN),
        ),
        outputs=(OutputSpec("preview", "IMAGE", "The labelled masks over the image."),),
        output_node=True,
    ),
)

NODE_BY_ID: dict[str, NodeSpec] = {spec.node_id: spec for spec in NODES}

# ComfyUI core nodes used by workflows/ (their input order and socket types in ComfyUI 0.3.64).
_CKPT = "ckpt_name"
STOCK_NODES: dict[str, NodeSpec] = {
    spec.node_id: spec
    for spec in (
        NodeSpec(
            "CheckpointLoaderSimple", "Load Checkpoint", "loaders", "",
            (InputSpec(_CKPT, "COMBO", ""),),
            (OutputSpec("MODEL", "MODEL"), OutputSpec("CLIP", "CLIP"), OutputSpec("VAE", "VAE")),
        ),
        NodeSpec(
            "LoadImage", "Load Image", "image", "",
            (InputSpec("image", "COMBO", ""),),
            (OutputSpec("IMAGE", "IMAGE"), OutputSpec("MASK", "MASK")),
        ),
        NodeSpec(
            "CLIPTextEncode", "CLIP Text Encode (Prompt)", "conditioning", "",
            (InputSpec("text", "STRING", "", multiline=True), InputSpec("clip", "CLIP", "")),
            (OutputSpec("CONDITIONING", "CONDITIONING"),),
        ),
        NodeSpec(
            "EmptyLatentImage", "Empty Latent Image", "latent", "",
            (InputSpec("width", "INT", ""), InputSpec("height", "INT", ""), InputSpec("batch_size", "INT", "")),
            (OutputSpec("LATENT", "LATENT"),),
        ),
        NodeSpec(
            "KSampler", "KSampler", "sampling", "",
            (
                InputSpec("model", "MODEL", ""),
                InputSpec("seed", "INT", "", control_after_generate=True),
                InputSpec("steps", "INT", ""),
                InputSpec("cfg", "FLOAT", ""),
                InputSpec("sampler_name", "COMBO", ""),
                InputSpec("scheduler", "COMBO", ""),
                InputSpec("positive", "CONDITIONING", ""),
                InputSpec("negative", "CONDITIONING", ""),
                InputSpec("latent_image", "LATENT", ""),
                InputSpec("denoise", "FLOAT", ""),
            ),
            (OutputSpec("LATENT", "LATENT"),),
        ),
        NodeSpec(
            "VAEDecode", "VAE Decode", "latent", "",
            (InputSpec("samples", "LATENT", ""), InputSpec("vae", "VAE", "")),
            (OutputSpec("IMAGE", "IMAGE"),),
        ),
        NodeSpec(
            "SaveImage", "Save Image", "image", "",
            (InputSpec("images", "IMAGE", ""), InputSpec("filename_prefix", "STRING", "")),
            (), output_node=True,
        ),
        NodeSpec(
            "PreviewImage", "Preview Image", "image", "",
            (InputSpec("images", "IMAGE", ""),),
            (), output_node=True,
        ),
        NodeSpec(
            "LoraLoader", "Load LoRA", "loaders", "",
            (
                InputSpec("model", "MODEL", ""),
                InputSpec("clip", "CLIP", ""),
                InputSpec("lora_name", "COMBO", ""),
                InputSpec("strength_model", "FLOAT", ""),
                InputSpec("strength_clip", "FLOAT", ""),
            ),
            (OutputSpec("MODEL", "MODEL"), OutputSpec("CLIP", "CLIP")),
        ),
        NodeSpec(
            "ImageScaleBy", "Upscale Image By", "image/upscaling", "",
            (InputSpec("image", "IMAGE", ""), InputSpec("upscale_method", "COMBO", ""),
             InputSpec("scale_by", "FLOAT", "")),
            (OutputSpec("IMAGE", "IMAGE"),),
        ),
    )
}
# UI-format widgets that store one extra value after their own
# (docs/COMFYUI.md, Widget values in UI-format workflows).
IMAGE_UPLOAD_WIDGETS = {("LoadImage", "image")}


def node_spec(node_type: str) -> NodeSpec:
    """The spec of an ICE node or of a stock node our workflows use."""
    spec = NODE_BY_ID.get(node_type) or STOCK_NODES.get(node_type)
    if spec is None:
        raise KeyError(f"{node_type!r} is neither an ICE node nor a stock node known to nodes/_spec.py")
    return spec


def widget_value_count(node_type: str, widget: InputSpec) -> int:
    """How many entries one widget takes in a UI-format ``widgets_values`` list."""
    extra = widget.control_after_generate or (node_type, widget.name) in IMAGE_UPLOAD_WIDGETS
    return 2 if extra else 1
