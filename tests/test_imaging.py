"""Image conversion and the working-size rule users rely on."""
import numpy as np
import pytest
import torch
from PIL import Image

from ice_ops.imaging import resize_mask, to_image_tensor, working_size


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "RGB", "I;16"])
def test_pil_modes_become_rgb(mode):
    picture = Image.new("RGB", (70, 50), (200, 100, 50)).convert(mode)
    tensor = to_image_tensor(picture)
    assert tensor.shape == (3, 50, 70)
    assert 0 <= float(tensor.min()) and float(tensor.max()) <= 1


def test_arrays_and_batches_of_one_are_accepted():
    array = (np.random.default_rng(0).random((40, 64, 3)) * 255).astype(np.uint8)
    tensor = to_image_tensor(array)
    assert tensor.shape == (3, 40, 64)
    assert torch.allclose(tensor, torch.from_numpy(array).permute(2, 0, 1).float() / 255)
    assert to_image_tensor(tensor[None]).shape == (3, 40, 64)


def test_a_batch_of_several_images_is_refused():
    with pytest.raises(ValueError, match="batch of 2"):
        to_image_tensor(torch.rand(2, 3, 64, 64))


def test_out_of_range_values_are_refused_not_clamped():
    with pytest.raises(ValueError, match="0..1"):
        to_image_tensor(torch.rand(3, 64, 64) * 255)


def test_working_size_rule():
    # longer side to the native resolution, each side to the nearest multiple
    assert working_size(512, 512, 512, 64) == (512, 512)
    assert working_size(1024, 768, 512, 64) == (512, 384)
    assert working_size(300, 1000, 512, 64) == (128, 512)
    assert working_size(64, 2000, 512, 64) == (64, 512)  # never below one multiple


def test_images_under_64_pixels_are_refused():
    with pytest.raises(ValueError, match="at least 64"):
        working_size(63, 500, 512, 64)


def test_resized_disjoint_masks_stay_disjoint():
    a = torch.zeros(32, 32)
    a[:, :13] = 1
    b = 1 - a
    ra, rb = resize_mask(a, (77, 91)), resize_mask(b, (77, 91))
    assert ra.shape == (77, 91)
    assert float((ra * rb).sum()) == 0
    assert set(ra.unique().tolist()) <= {0.0, 1.0}
