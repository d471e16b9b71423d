"""GPU tier (``python -m pytest -m gpu``): full-size SD architectures with random weights on CUDA.

Never part of CI; skipped without a CUDA device. Speed and memory are measured by bench/, not here.
"""

import pytest
import torch
from devtools.random_models import TINY_OPEN_CLIP_CONFIG

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module", params=["sd15", "sd21"])
def full_bundle(request):
    from devtools.random_models import build_random_bundle
    from ice_ops.bundle import frozen_dtypes

    # what users run: the frozen parts in half precision (bf16/fp16), the learned vectors in fp32
    return build_random_bundle(request.param, device="cuda", dtype=frozen_dtypes(torch.device("cuda")))


def _scene(size):
    image = torch.full((3, size, size), 0.4)
    mask = torch.zeros(size, size)
    mask[size // 8 : size // 2, size // 8 : size // 2] = 1
    image[:, mask > 0] = torch.tensor([0.9, 0.2, 0.1])[:, None]
    return image, mask


def test_full_size_localize_and_learn_on_the_gpu(full_bundle):
    from ice_ops.concepts import Concept, ConceptSet
    from ice_ops.learn import learn_intrinsic_tokens, learn_object_tokens
    from ice_ops.localization import localize
    from ice_ops.retrieve import ClipRetriever

    size = full_bundle.native_resolution
    image, mask = _scene(size)
    retriever = ClipRetriever.from_pretrained(TINY_OPEN_CLIP_CONFIG, None,
                                              vocabulary=["ball", "box", "wall"], device="cuda")
    found = localize(full_bundle, retriever, image, max_concepts=2, synonym_threshold=1.0)
    assert found.masks().shape[1:] == (size, size)

    concepts = ConceptSet([Concept("ball", "ball", 1.0, mask)], (size, size))
    learned = learn_object_tokens(full_bundle, image, concepts, steps=4)
    learned = learn_intrinsic_tokens(full_bundle, image, learned, steps=4, refine_steps=2)
    vectors = learned.concepts[0].vectors
    assert set(vectors) == {"object", "instance", "material", "colour"}
    assert all(torch.isfinite(v).all() for v in vectors.values())
    assert learned.lora
