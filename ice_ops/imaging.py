"""Image and mask conversions shared by both stages.

Images are float tensors ``[3, H, W]`` in 0..1 on the engine side. Anything else a user can hand over
(PIL images of any mode, ``[H, W, 3]`` arrays, batches of one) is converted by :func:`to_image_tensor`.

Working size (the one documented rule for sizes that are not multiples of 64): the image is scaled so its
longer side equals the model's native resolution (512 for SD 1.x and SD 2.x-base, 768 for SD 2.x-v), then
each side is rounded to the nearest multiple of the model's size multiple (the VAE factor times the UNet's
total downsampling, 64 for Stable Diffusion) and never below one multiple. Masks are computed at that
working size and resized back to the input size, so callers always get masks at the size they gave.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

MIN_SIDE = 64
MASK_THRESHOLD = 0.5
OVERLAY_ALPHA = 0.5  # how strongly a mask's colour covers the image in overlays
# Labels written beside masks: white text with a dark outline, so they read on any colour. Unless told, the text is
# a fraction of the image's height, with a floor; the outline is a fraction of the text's size, with a floor.
# Smaller pictures are first enlarged by a whole factor (no smoothing) so their longer side reaches LEGIBLE_SIDE:
# a 64 px Toy World scene becomes 256 px, where a label can sit next to an object without hiding it.
LEGIBLE_SIDE = 256
LABEL_HEIGHT_FRACTION = 1 / 16
MIN_LABEL_PX = 10
LABEL_GAP_FRACTION = 1 / 4  # space between a mask's bounding box and its label, as a fraction of the text size
LABEL_OUTLINE_FRACTION = 1 / 8
MIN_LABEL_OUTLINE_PX = 2
LABEL_FILL = (255, 255, 255)
LABEL_OUTLINE = (0, 0, 0)
# Greyscale PIL modes that 8-bit conversion would clip: 16-bit integers (16-bit PNG, TIFF; "I" is what older
# Pillow and some TIFFs give for them) are scaled from 0..65535, 32-bit floats are taken as 0..1.
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
SIXTEEN_BIT_MAX = 65535.0
FLOAT_MODE = "F"


def to_image_tensor(image) -> torch.Tensor:
    """Return a float ``[3, H, W]`` tensor in 0..1 (on the input's device for tensors, CPU otherwise).

    PIL greyscale, palette and alpha images are converted to RGB; alpha is composited over black,
    matching how Stage One blanks regions it has already explained.
    """
    if isinstance(image, torch.Tensor):
        tensor = image.detach()
    elif isinstance(image, np.ndarray):
        tensor = torch.from_numpy(np.ascontiguousarray(image))
        if tensor.ndim == 3 and tensor.shape[-1] in (1, 3, 4) and tensor.shape[0] not in (1, 3, 4):
            tensor = tensor.permute(2, 0, 1)
        if tensor.dtype == torch.uint8:
            tensor = tensor.float() / 255.0
    else:
        tensor = _pil_to_tensor(image)
    if tensor.ndim == 4:
        if tensor.shape[0] != 1:
            raise ValueError(
                f"Expected one image, got a batch of {tensor.shape[0]}; pick one image (e.g. with an image-batch "
                "selector) before this step."
            )
        tensor = tensor[0]
    if tensor.ndim == 2:
        tensor = tensor[None]
    if tensor.ndim != 3 or tensor.shape[0] not in (1, 3, 4):
        raise ValueError(
            f"Expected an image shaped [3, H, W] (channels first, values 0..1), got shape {tuple(tensor.shape)}."
        )
    tensor = tensor.float()
    if tensor.shape[0] == 4:
        tensor = tensor[:3] * tensor[3:4]
    elif tensor.shape[0] == 1:
        tensor = tensor.expand(3, -1, -1)
    if not torch.isfinite(tensor).all():
        raise ValueError("The image contains NaN or infinite values; load it again from a regular image file.")
    if tensor.min() < -1e-3 or tensor.max() > 1 + 1e-3:
        raise ValueError(
            f"Image values must lie in 0..1, got {float(tensor.min()):.3g}..{float(tensor.max()):.3g}; "
            "divide 8-bit images by 255."
        )
    return tensor.clamp(0, 1).contiguous()


def _pil_to_tensor(image) -> torch.Tensor:
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise ValueError(f"Expected a PIL image, a numpy array or a torch tensor, got {type(image).__name__}.")
    if image.mode in SIXTEEN_BIT_MODES:
        return _grey_to_tensor(np.asarray(image).astype(np.float32) / SIXTEEN_BIT_MAX)
    if image.mode == FLOAT_MODE:
        return _grey_to_tensor(np.asarray(image, dtype=np.float32))
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "La", "RGBa"):
        image = image.convert("RGBA")
        rgba = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        return rgba
    image = image.convert("RGB")
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0


def _grey_to_tensor(values: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(values, dtype=np.float32))[None].expand(3, -1, -1).contiguous()


def read_image(path: str) -> torch.Tensor:
    """The image file at ``path`` as a ``[3, H, W]`` tensor in 0..1; ``ValueError`` naming the file when it is
    missing, not an image Pillow can read, or smaller than :data:`MIN_SIDE`."""
    from PIL import Image

    if not os.path.isfile(path):
        raise ValueError(f"Image {path!r} does not exist.")
    try:
        with Image.open(path) as handle:
            handle.load()
            image = to_image_tensor(handle)
    except (OSError, Image.DecompressionBombError) as error:
        raise ValueError(f"{path!r} is not an image Pillow can read ({error}).") from None
    except ValueError as error:
        raise ValueError(f"{path!r}: {error}") from None
    check_min_size(*image.shape[-2:])
    return image


def check_min_size(height: int, width: int) -> None:
    if min(height, width) < MIN_SIDE:
        raise ValueError(
            f"The image is {width}x{height} pixels; ICE needs at least {MIN_SIDE} pixels on each side. "
            "Use a larger image (512 px or more works best)."
        )


def working_size(height: int, width: int, native: int, multiple: int) -> tuple[int, int]:
    """Size the model works at for an input of ``height`` x ``width`` (see the module docstring)."""
    check_min_size(height, width)
    scale = native / max(height, width)

    def snap(side: int) -> int:
        return max(multiple, int(round(side * scale / multiple)) * multiple)

    return snap(height), snap(width)


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``[3, H, W]`` (antialiased when shrinking)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    shrinking = size[0] < image.shape[-2] or size[1] < image.shape[-1]
    out = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False, antialias=shrinking)
    return out[0].clamp(0, 1)


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a ``[H, W]`` mask in 0..1 and re-binarise it (> 0.5), which keeps disjoint masks disjoint."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask.float()
    out = F.interpolate(mask[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]
    return (out > MASK_THRESHOLD).float()


def resize_soft_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Area-averaged resize of ``[..., H, W]`` masks, keeping fractional coverage (for losses)."""
    lead = mask.shape[:-2]
    flat = mask.reshape(-1, 1, *mask.shape[-2:]).float()
    if tuple(flat.shape[-2:]) == tuple(size):
        out = flat
    elif size[0] <= flat.shape[-2] and size[1] <= flat.shape[-1]:
        out = F.adaptive_avg_pool2d(flat, size)
    else:
        out = F.interpolate(flat, size=size, mode="bilinear", align_corners=False)
    return out.reshape(*lead, *size)


def overlay_masks(
    image: torch.Tensor, masks: torch.Tensor, alpha: float = OVERLAY_ALPHA, colour_indices: Sequence[int] | None = None
) -> torch.Tensor:
    """Colour each mask of ``[K, H, W]`` over ``[3, H, W]``; returns ``[3, H, W]`` in 0..1.

    Mask ``k`` gets :func:`palette_colour` of ``colour_indices[k]`` (default ``k``), so one object can keep
    its colour across several overlays."""
    out = image.clone().float()
    indices = range(len(masks)) if colour_indices is None else colour_indices
    for index, mask in zip(indices, masks):
        colour = torch.tensor(palette_colour(index), dtype=out.dtype, device=out.device)[:, None, None]
        weight = alpha * mask.to(out.device, out.dtype)[None]
        out = out * (1 - weight) + colour * weight
    return out.clamp(0, 1)


def labelled_overlay(
    image: torch.Tensor,
    masks: torch.Tensor,
    labels: Sequence[str],
    *,
    text_px: int | None = None,
    colour_indices: Sequence[int] | None = None,
    min_side: int = LEGIBLE_SIDE,
) -> torch.Tensor:
    """Masks ``[K, H, W]`` coloured over ``[3, H, W]`` (see :func:`overlay_masks`), each with its label written
    next to it; returns a float ``[3, H', W']`` tensor in 0..1 on the CPU.

    A picture whose longer side is below ``min_side`` is first enlarged, image and masks alike, by the smallest
    whole factor that reaches it, repeating pixels (:func:`upscale_nearest`): the result is then that factor
    times the input's size (``[3, 256, 256]`` for a 64 px image). ``min_side=0`` keeps the input's size.

    Each label goes where it hides the least of the objects (:func:`label_position`): just above, below, left
    or right of its mask, or on the mask when no place outside is clearer (a mask filling the picture).
    ``text_px`` is the text's size in pixels on the returned picture (default: a fraction of its height)."""
    if masks.shape[0] != len(labels):
        raise ValueError(f"{masks.shape[0]} masks but {len(labels)} labels; give one label per mask.")
    image = image.detach().float().cpu()
    factor = legible_factor(image.shape[-2], image.shape[-1], min_side)
    image = upscale_nearest(image, factor)
    if not labels:
        return image.clone()
    masks = upscale_nearest(masks.detach().float().cpu(), factor)
    picture = tensor_to_pil(overlay_masks(image, masks, colour_indices=colour_indices))
    size = text_px if text_px is not None else max(MIN_LABEL_PX, int(image.shape[-2] * LABEL_HEIGHT_FRACTION))
    cost = coverage_cost(masks)
    taken: list[tuple[int, int, int, int]] = []
    for mask, label in zip(masks, labels):
        centre = label_position(picture, label, mask, size, cost, taken)
        if centre is not None:
            taken.append(draw_label(picture, label, centre, size))
    return torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1).float() / 255.0


def legible_factor(height: int, width: int, min_side: int = LEGIBLE_SIDE) -> int:
    """The smallest whole factor that brings a ``height`` x ``width`` picture's longer side to ``min_side``
    (1 when it is already that large, or when ``min_side`` is 0)."""
    longer = max(int(height), int(width))
    if min_side <= 0 or longer >= min_side:
        return 1
    return -(-int(min_side) // longer)


def coverage_cost(masks: torch.Tensor) -> torch.Tensor:
    """``[H, W]``: how much of the objects a label hides at each pixel, as the fraction of each mask that pixel
    is (summed over masks), so hiding part of a small object costs more than hiding as much of a large one."""
    binary = (masks > MASK_THRESHOLD).float()
    areas = binary.sum((-2, -1)).clamp(min=1)
    return (binary / areas[:, None, None]).sum(0)


def label_position(
    picture, text: str, mask: torch.Tensor, text_px: int, cost: torch.Tensor, taken: Sequence[tuple[int, int, int, int]]
) -> tuple[int, int] | None:
    """Centre ``(x, y)`` for ``text`` labelling ``mask`` on the PIL ``picture``; ``None`` for an empty mask.

    The places tried are just above, below, left and right of the mask's bounding box and its
    :func:`label_anchor`, each moved inside the picture as :func:`draw_label` moves it. The one chosen overlaps
    the boxes in ``taken`` (labels already drawn) the least, then hides the least ``cost`` (see
    :func:`coverage_cost`), then comes first in that order."""
    anchor = label_anchor(mask)
    if anchor is None:
        return None
    rows, columns = torch.nonzero(mask > MASK_THRESHOLD, as_tuple=True)
    top, bottom = int(rows.min()), int(rows.max()) + 1
    left, right = int(columns.min()), int(columns.max()) + 1
    text_left, text_top, text_right, text_bottom = label_box(picture, text, (0, 0), text_px, keep_inside=False)
    gap = max(1, round(text_px * LABEL_GAP_FRACTION))
    middle_x, middle_y = (left + right) // 2, (top + bottom) // 2
    candidates = [
        (middle_x, top - gap - text_bottom),
        (middle_x, bottom + gap - text_top),
        (left - gap - text_right, middle_y),
        (right + gap - text_left, middle_y),
        anchor,
    ]
    best, best_score = None, None
    for order, centre in enumerate(candidates):
        box = label_box(picture, text, centre, text_px)
        x0, y0, x1, y1 = (max(0, int(v)) for v in box)
        score = (sum(_overlap(box, other) for other in taken), float(cost[y0:y1, x0:x1].sum()), order)
        if best_score is None or score < best_score:
            best, best_score = centre, score
    return best


def label_box(picture, text: str, centre: tuple[int, int], text_px: int, keep_inside: bool = True):
    """The box (left, top, right, bottom) that :func:`draw_label` covers writing ``text`` at ``centre``."""
    from PIL import ImageDraw

    outline = max(MIN_LABEL_OUTLINE_PX, round(text_px * LABEL_OUTLINE_FRACTION))
    left, top, right, bottom = ImageDraw.Draw(picture).textbbox(
        centre, text, font=label_font(text_px), anchor="mm", stroke_width=outline)
    if not keep_inside:
        return left, top, right, bottom
    dx = _shift_inside(left, right, picture.width)
    dy = _shift_inside(top, bottom, picture.height)
    return left + dx, top + dy, right + dx, bottom + dy


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> int:
    """Area shared by two (left, top, right, bottom) boxes."""
    return max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))


def label_anchor(mask: torch.Tensor) -> tuple[int, int] | None:
    """``(x, y)`` where a mask's label goes: its centre of mass, or the mask's pixel nearest to it when the
    centre falls outside the mask (a ring, a crescent); ``None`` for an empty mask."""
    where = torch.nonzero(mask > MASK_THRESHOLD)
    if where.numel() == 0:
        return None
    centre = where.float().mean(0)
    row, column = where[(where.float() - centre).pow(2).sum(1).argmin()].tolist()
    return int(column), int(row)


def draw_label(picture, text: str, centre: tuple[int, int], text_px: int) -> tuple[int, int, int, int]:
    """Write ``text`` on the PIL ``picture`` centred on ``centre`` (x, y), white with a dark outline, moved
    inwards where it would cross the picture's edge; returns the box it covers (left, top, right, bottom)."""
    from PIL import ImageDraw

    outline = max(MIN_LABEL_OUTLINE_PX, round(text_px * LABEL_OUTLINE_FRACTION))
    (x, y), (left, top, _, _) = centre, label_box(picture, text, centre, text_px, keep_inside=False)
    box = label_box(picture, text, centre, text_px)
    ImageDraw.Draw(picture).text((x + box[0] - left, y + box[1] - top), text, font=label_font(text_px), anchor="mm",
                                 fill=LABEL_FILL, stroke_width=outline, stroke_fill=LABEL_OUTLINE)
    return box


def _shift_inside(low: float, high: float, size: int) -> int:
    """How far to move the span ``low..high`` so it lies inside ``0..size`` (its start wins when it is wider)."""
    if low < 0:
        return int(np.ceil(-low))
    if high > size:
        return -int(min(np.ceil(high - size), low))
    return 0


def label_font(text_px: int):
    """Pillow's default font at ``text_px`` pixels (a scalable font since Pillow 10.1; the fixed bitmap font before)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=text_px)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def upscale_nearest(tensor: torch.Tensor, factor: int) -> torch.Tensor:
    """``[..., H, W]`` (an image or a stack of masks) enlarged ``factor`` times by repeating each pixel, so
    small images stay sharp; any dtype."""
    if int(factor) != factor or factor < 1:
        raise ValueError(f"factor must be a whole number of at least 1, got {factor}.")
    return tensor.repeat_interleave(int(factor), dim=-2).repeat_interleave(int(factor), dim=-1)


def palette_colour(index: int) -> tuple[float, float, float]:
    """A distinct, saturated colour for label ``index`` (golden-angle hue walk)."""
    import colorsys

    hue = (index * 0.618033988749895) % 1.0
    return colorsys.hsv_to_rgb(hue, 0.85, 0.95)


def tensor_to_pil(image: torch.Tensor):
    from PIL import Image

    array = (image.detach().float().clamp(0, 1).cpu().permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    return Image.fromarray(array)


def png_bytes(picture) -> bytes:
    """A PIL image as the bytes of a PNG file."""
    import io

    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def mask_to_pil(mask: torch.Tensor):
    from PIL import Image

    array = (mask.detach().float().clamp(0, 1).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
    return Image.fromarray(array, mode="L")
