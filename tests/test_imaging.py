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


# ---------------------------------------------------------------------- labelled overlays
def _changed(a, b, tolerance=0.02):
    return (a - b).abs().amax(0) > tolerance


def test_labelled_overlay_writes_each_word_beside_its_mask_legibly():
    from ice_ops.imaging import labelled_overlay, overlay_masks

    image = torch.full((3, 256, 256), 0.5)
    masks = torch.zeros(3, 256, 256)
    masks[0, 40:90, 30:80] = 1
    masks[1, 150:200, 40:100] = 1
    masks[2, 100:160, 170:220] = 1
    out = labelled_overlay(image, masks, ["cup", "table", "lamp"], text_px=22)
    plain = overlay_masks(image, masks)
    assert out.shape == (3, 256, 256) and out.dtype == torch.float32
    changed = _changed(out, plain)
    assert not (changed & (masks.amax(0) > 0.5)).any(), "with room around them, no label hides an object"
    for mask in masks:
        ys, xs = torch.nonzero(mask > 0.5, as_tuple=True)
        near = torch.zeros_like(changed)
        near[max(0, int(ys.min()) - 40):int(ys.max()) + 40, max(0, int(xs.min()) - 60):int(xs.max()) + 60] = True
        assert (changed & near).sum() > 50, "each word is written next to its mask"
    text = out[:, changed]
    assert (text.amin(0) > 0.9).any() and (text.amax(0) < 0.1).any(), "light letters with a dark outline"


def test_labelled_overlay_enlarges_a_small_picture_sharply_before_writing():
    from ice_ops.imaging import LEGIBLE_SIDE, labelled_overlay, legible_factor, overlay_masks, upscale_nearest

    image = torch.rand(3, 64, 48)
    mask = torch.zeros(1, 64, 48)
    mask[0, 20:36, 10:30] = 1
    assert legible_factor(64, 48) == 4 and legible_factor(LEGIBLE_SIDE, 8) == 1 and legible_factor(64, 48, 0) == 1
    out = labelled_overlay(image, mask, ["ball"])
    assert out.shape == (3, 256, 192)
    plain = overlay_masks(upscale_nearest(image, 4), upscale_nearest(mask, 4))
    changed = _changed(out, plain)
    assert changed.any() and changed.float().mean() < 0.2, "a word is written, the rest is the enlarged overlay"
    assert not changed[80:144, 40:120].any(), "the word does not hide the object"
    assert torch.equal(labelled_overlay(image, mask[:0], []), upscale_nearest(image, 4)), "same size without labels"
    assert labelled_overlay(image, mask, ["ball"], min_side=0).shape == (3, 64, 48)


def test_labelled_overlay_writes_on_a_mask_that_fills_the_picture():
    from ice_ops.imaging import labelled_overlay, overlay_masks

    image = torch.full((3, 256, 256), 0.5)
    masks = torch.ones(1, 256, 256)
    changed = _changed(labelled_overlay(image, masks, ["wall"], text_px=22), overlay_masks(image, masks))
    assert changed.sum() > 50, "with no clear place outside the mask, the word is written on it"


def test_labelled_overlay_keeps_a_label_inside_the_picture_and_on_a_ring():
    from PIL import Image

    from ice_ops.imaging import draw_label, label_anchor

    picture = Image.new("RGB", (128, 128), (128, 128, 128))
    left, top, right, bottom = draw_label(picture, "triangle", (126, 2), 20)
    assert left >= 0 and top >= 0 and right <= 128 and bottom <= 128, "a label at the edge is moved inwards"
    ring = torch.zeros(64, 64)
    ring[10:54, 10:54] = 1
    ring[20:44, 20:44] = 0
    x, y = label_anchor(ring)
    assert ring[y, x] == 1, "a label goes on the mask even when its centre of mass is a hole"
    assert label_anchor(torch.zeros(8, 8)) is None


def test_labelled_overlay_colours_follow_the_given_indices_and_refuse_missing_labels():
    from ice_ops.imaging import labelled_overlay, palette_colour

    image = torch.zeros(3, 96, 96)
    mask = torch.zeros(1, 96, 96)
    mask[0, :8, :8] = 1
    first = labelled_overlay(image, mask, [""], colour_indices=[2])
    expected = torch.tensor(palette_colour(2)) * 0.5
    assert torch.allclose(first[:, 0, 0], expected, atol=1 / 255 + 1e-6), "mask k takes palette colour k"
    with pytest.raises(ValueError, match="one label per mask"):
        labelled_overlay(image, mask, [])
    assert torch.equal(labelled_overlay(image, mask[:0], [], min_side=0), image)


def test_upscale_nearest_keeps_pixels_sharp():
    from ice_ops.imaging import upscale_nearest

    small = torch.rand(3, 64, 64)
    big = upscale_nearest(small, 4)
    assert big.shape == (3, 256, 256)
    assert torch.equal(big[:, ::4, ::4], small) and torch.equal(big[:, 3::4, 3::4], small)
    assert upscale_nearest(torch.ones(2, 4, 4, dtype=torch.bool), 2).dtype == torch.bool
    with pytest.raises(ValueError, match="whole number"):
        upscale_nearest(small, 0)
