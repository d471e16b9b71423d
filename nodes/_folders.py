"""The models folders ICE reads and writes, registered with ComfyUI's ``folder_paths``.

- ``models/ice``: retriever weights (.safetensors), extra open_clip architectures (<name>.json) and
  vocabularies (.txt);
- ``models/ice_concepts``: concept sets written by Save Concepts;
- retriever weights are also listed from ``models/clip`` (ComfyUI's ``text_encoders`` folder list);
- diffusers folders are listed from ComfyUI's ``models/diffusers``;
- the embedded Toy World model and CLIP (shipped in the pack) come first in their lists.
More folders can be added with ComfyUI's extra_model_paths.yaml under the keys ``ice`` and ``ice_concepts``.
"""
from __future__ import annotations

import os

import folder_paths

from ._engine import engine
from ._spec import BUILTIN_VOCABULARY, TOYWORLD_MODEL

ICE_FOLDER = "ice"
CONCEPTS_FOLDER = "ice_concepts"
CLIP_FOLDER = "clip"  # ComfyUI maps it to text_encoders: models/text_encoders and models/clip
DIFFUSERS_FOLDER = "diffusers"  # ComfyUI's models/diffusers
DIFFUSERS_INDEX = "model_index.json"  # what marks a folder as a diffusers pipeline
WEIGHTS_EXTENSION = ".safetensors"  # only safetensors are read from user files (no pickles)
CONFIG_EXTENSION = ".json"
VOCABULARY_EXTENSION = ".txt"
# Architectures to offer first: the CLIP family of each supported SD text encoder (README, Models):
# OpenAI ViT-L/14 weights need open_clip's QuickGELU variant (SD 1.x), OpenCLIP ViT-H-14 laion2b (SD 2.x).
RECOMMENDED_ARCHITECTURES = ("ViT-L-14-quickgelu", "ViT-H-14")
QUICKGELU_SUFFIX = "-quickgelu"


def register_folders() -> None:
    """Add ``ice`` and ``ice_concepts`` to ComfyUI's model folders, keeping paths from extra_model_paths.yaml."""
    extensions = {WEIGHTS_EXTENSION, CONFIG_EXTENSION, VOCABULARY_EXTENSION}
    for name, exts in ((ICE_FOLDER, extensions), (CONCEPTS_FOLDER, {WEIGHTS_EXTENSION})):
        default = os.path.join(folder_paths.models_dir, name)
        paths = list(folder_paths.folder_names_and_paths.get(name, ([], set()))[0])
        if default not in paths:
            paths.append(default)
        folder_paths.folder_names_and_paths[name] = (paths, set(exts))


def _files(folder: str, extension: str) -> list[str]:
    return [name for name in folder_paths.get_filename_list(folder) if name.lower().endswith(extension)]


def toyworld_present() -> bool:
    return engine("toyworld").embedded_weights_present()


def retriever_weights() -> list[str]:
    names = [TOYWORLD_MODEL] if toyworld_present() else []
    names += _files(ICE_FOLDER, WEIGHTS_EXTENSION)
    names += [n for n in _files(CLIP_FOLDER, WEIGHTS_EXTENSION) if n not in names]
    return names


def folder_list(*kinds: str) -> str:
    """The folders ComfyUI searches for ``kinds`` (e.g. ``/ComfyUI/models/ice``), for messages that say where
    a missing file belongs."""
    paths = [path for kind in kinds for path in folder_paths.get_folder_paths(kind)]
    return " or ".join(dict.fromkeys(paths)) or ", ".join(f"models/{kind}" for kind in kinds)


def missing_file_message(what: str, name: str, kinds: tuple[str, ...], how: str) -> str:
    return (f"{what} {name!r} is not in {folder_list(*kinds)}. {how} Then press R in ComfyUI (or reload the page) "
            "so that the lists are read again.")


def weights_path(name: str) -> str:
    for folder in (ICE_FOLDER, CLIP_FOLDER):
        path = folder_paths.get_full_path(folder, name)
        if path is not None:
            return path
    raise ValueError(missing_file_message(
        "The retriever weights file", name, (ICE_FOLDER, CLIP_FOLDER),
        "Save the open_clip .safetensors file there under that name (the README's Models table names the file "
        "for each Stable Diffusion version), or pick the embedded Toy World CLIP.",
    ))


def diffusers_folders() -> list[str]:
    """The embedded Toy World model, then every folder under models/diffusers holding a model_index.json."""
    names = [TOYWORLD_MODEL] if toyworld_present() else []
    for root in folder_paths.get_folder_paths(DIFFUSERS_FOLDER):
        if not os.path.isdir(root):
            continue
        for entry in sorted(os.listdir(root)):
            if os.path.isfile(os.path.join(root, entry, DIFFUSERS_INDEX)) and entry not in names:
                names.append(entry)
    return names


def diffusers_folder_path(name: str) -> str:
    """The folder of a listed diffusers model (the embedded one included)."""
    if name == TOYWORLD_MODEL:
        return engine("toyworld").DIFFUSERS_FOLDER
    for root in folder_paths.get_folder_paths(DIFFUSERS_FOLDER):
        path = os.path.join(root, name)
        if os.path.isfile(os.path.join(path, DIFFUSERS_INDEX)):
            return path
    raise ValueError(missing_file_message(
        "The diffusers model", name, (DIFFUSERS_FOLDER,),
        f"Copy the whole model folder (the one holding {DIFFUSERS_INDEX}) there.",
    ))


def architecture_configs() -> dict[str, str]:
    """Extra open_clip architectures: ``{name: path}`` of the <name>.json configs in models/ice."""
    found = {}
    for name in _files(ICE_FOLDER, CONFIG_EXTENSION):
        path = folder_paths.get_full_path(ICE_FOLDER, name)
        if path is not None:
            found[os.path.splitext(os.path.basename(name))[0]] = path
    return found


def retriever_architectures() -> list[str]:
    """Recommended architectures first, then the engine's other supported ones and models/ice configs."""
    import open_clip

    known = set(open_clip.list_models())
    builtin = [n for arch in engine("retrieve").SUPPORTED_ARCHS for n in (arch + QUICKGELU_SUFFIX, arch) if n in known]
    first = [name for name in RECOMMENDED_ARCHITECTURES if name in builtin]
    rest = [name for name in builtin if name not in first]
    return first + rest + sorted(set(architecture_configs()) - set(builtin))


def architecture_argument(name: str) -> str:
    """What ClipRetriever.from_pretrained takes for ``name``: a models/ice config path, or the built-in name."""
    return architecture_configs().get(name, name)


def vocabularies() -> list[str]:
    return [BUILTIN_VOCABULARY] + _files(ICE_FOLDER, VOCABULARY_EXTENSION)


def vocabulary_path(name: str) -> str | None:
    """None for the built-in vocabulary, else the .txt file's path."""
    if name == BUILTIN_VOCABULARY:
        return None
    path = folder_paths.get_full_path(ICE_FOLDER, name)
    if path is None:
        raise ValueError(missing_file_message(
            "The vocabulary", name, (ICE_FOLDER,), "Save the .txt file (one noun per line) there, or pick the built-in one."
        ))
    return path


def concept_sets() -> list[str]:
    return _files(CONCEPTS_FOLDER, WEIGHTS_EXTENSION)


def concept_set_path(name: str) -> str:
    path = folder_paths.get_full_path(CONCEPTS_FOLDER, name)
    if path is None:
        raise ValueError(missing_file_message(
            "The concept set", name, (CONCEPTS_FOLDER,), "Save one with Save Concepts, or copy the .safetensors file there."
        ))
    return path


def output_folders() -> dict[str, str]:
    """Where Save Concepts writes: the first folder of each kind."""
    return {
        "concepts": folder_paths.get_folder_paths(CONCEPTS_FOLDER)[0],
        "embeddings": folder_paths.get_folder_paths("embeddings")[0],
        "loras": folder_paths.get_folder_paths("loras")[0],
    }


def cache_folder() -> str:
    """Where the retriever may cache vocabulary text features (ComfyUI's user folder, not a models folder)."""
    return os.path.join(folder_paths.get_user_directory(), "ice_cache")



def problem_with(check, *args) -> str | bool:
    """For a node's ``validate_inputs``: True when ``check(*args)`` finds the file, else its message (ComfyUI
    shows it when the workflow is queued, before anything runs)."""
    try:
        check(*args)
    except ValueError as error:
        return str(error)
    return True
