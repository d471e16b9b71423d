"""Shared fixtures: tiny random models built from configs (no downloads, CPU, seconds)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_bundle():
    """A tiny SD-architecture DiffusionBundle (3 UNet levels, 32-d text encoder, real CLIP tokenizer).
    Treat it as read-only: tests that modify models build their own."""
    from devtools.random_models import build_random_bundle

    return build_random_bundle("tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_diffusers_folder(tmp_path_factory, tiny_bundle):
    from devtools.random_models import save_diffusers_folder

    return save_diffusers_folder(tiny_bundle, str(tmp_path_factory.mktemp("tiny_sd")))


@pytest.fixture
def fresh_tiny_bundle():
    """A tiny bundle of its own, for tests that train or patch models."""
    from devtools.random_models import build_random_bundle

    return build_random_bundle("tiny", seed=0)


@pytest.fixture(scope="session")
def toyworld_model():
    """(bundle, retriever) of the embedded Toy World model: a trained tiny SD and CLIP whose scenes have known
    objects, masks and words. Read-only. Skips where the weights are not shipped."""
    from ice_ops.toyworld import embedded_bundle, embedded_retriever, embedded_weights_present

    if not embedded_weights_present():
        pytest.skip("the Toy World weights are not shipped")
    return embedded_bundle(), embedded_retriever()
