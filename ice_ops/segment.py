"""DiffSeg in torch (self-attention aggregation, anchor grid, KL merging, k-means refinement), word labels
for segments from cross-attention, and the split of a mask into connected instances.

Every size is read from the inputs. A "grid" is ``(h, w)``; maps indexed by pixels use row-major order.
Typical composition for one batch item ``b`` of an :class:`~ice_ops.attention.AttentionStore`::

    labels = diffseg({g: m[b] for g, m in store.self_maps.items()}, out_size)
    cross = aggregate_cross_attention({g: m[b] for g, m in store.cross_maps.items()}, out_size)
    mapping = label_segments(labels, cross, word_positions)
    mask = torch.isin(labels, torch.tensor([s for s, w in mapping.items() if w == word_index]))
    instances = split_instances(mask)
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .defaults import Grid


# ICE main_stage_one.py:93 (KL_THRESHOLD = [1.1]*3), also DiffSeg's COCO-Stuff setting: three merging
# iterations, each with threshold 1.1 on the halved symmetric KL.
DIFFSEG_KL_THRESHOLDS = (1.1, 1.1, 1.1)
# DiffSeg generate_sampling_grid(16): 16x16 = 256 anchors on the 64x64 grid of SD at 512^2.
DIFFSEG_ANCHORS_PER_SIDE = 16
# The reference refines with sklearn KMeans (n_init=1), whose defaults are max_iter=300, tol=1e-4.
KMEANS_MAX_ITERATIONS = 300
KMEANS_TOLERANCE = 1e-4
# Floor applied to probabilities before taking logs in the KL, so zeros give a large finite divergence
# instead of NaN/inf (the reference's fp16 KL underflows to log 0 = NaN; docs/DECISIONS.md, Stage One).
KL_PROBABILITY_FLOOR = 1e-12
# ICE utils.py: connected components with area > 0.025 * 512^2 (2.5 % of the image) become instances.
INSTANCE_MIN_FRACTION = 0.025


# ---------------------------------------------------------------------------------------- aggregation
def _check_grid_maps(maps: Mapping[Grid, torch.Tensor], columns_equal_rows: bool) -> None:
    if not maps:
        raise ValueError("No attention maps were given; record attention with capture_attention first.")
    for (h, w), m in maps.items():
        rows = h * w
        if m.ndim != 2 or m.shape[0] != rows or (columns_equal_rows and m.shape[1] != rows):
            expected = f"[{rows}, {rows}]" if columns_equal_rows else f"[{rows}, P]"
            raise ValueError(
                f"The map for grid {(h, w)} has shape {tuple(m.shape)}, expected {expected} (one batch item: "
                "index the store's maps with [b])."
            )


def largest_grid(grids) -> Grid:
    """The finest grid; every other grid must fit inside it."""
    grids = list(grids)
    finest = max(grids, key=lambda g: g[0] * g[1])
    if any(h > finest[0] or w > finest[1] for h, w in grids):
        raise ValueError(f"The attention grids {grids} are not nested resolutions of one image.")
    return finest


def nearest_indices(source: int, target: int, device=None) -> torch.Tensor:
    """Index of the source cell each of ``target`` cells takes under nearest resizing (``floor(i*s/t)``);
    for an integer ratio this is repetition, as ``tf.repeat`` in the reference."""
    return torch.arange(target, device=device) * source // target


def aggregate_self_attention(self_maps: Mapping[Grid, torch.Tensor]) -> torch.Tensor:
    """DiffSeg aggregation of one batch item's ``{(h, w): [h*w, h*w]}`` maps into ``[H*W, H*W]`` float32,
    ``(H, W)`` the largest grid.

    Key dims are bilinearly upsampled to ``(H, W)`` and each map renormalised to sum 1; query dims are tiled by
    nearest repetition; grids are weighted in proportion to their resolution, ``r = (h + w) / sum(h + w)``
    (the reference's ``s / sum(s)`` for square grids). Every row is a distribution.
    """
    _check_grid_maps(self_maps, columns_equal_rows=True)
    height, width = largest_grid(self_maps)
    total_side = sum(h + w for h, w in self_maps)
    device = next(iter(self_maps.values())).device
    agg = torch.zeros(height * width, height * width, dtype=torch.float32, device=device)
    for (h, w), maps in self_maps.items():
        keys = maps.float().reshape(h * w, 1, h, w)
        keys = F.interpolate(keys, size=(height, width), mode="bilinear", align_corners=False)
        keys = keys.reshape(h, w, height * width)
        keys = keys / keys.sum(dim=-1, keepdim=True)
        tiled = keys[nearest_indices(h, height, device)][:, nearest_indices(w, width, device)]
        agg.add_(tiled.reshape(height * width, height * width), alpha=(h + w) / total_side)
    return agg


def aggregate_cross_attention(cross_maps: Mapping[Grid, torch.Tensor], out_size: Grid) -> torch.Tensor:
    """``{(h, w): [h*w, P]}`` cross-attention of one batch item -> ``[out_h, out_w, P]`` float32: each grid
    bilinearly upsampled to ``out_size`` and summed with weight 1 (docs/DECISIONS.md, Stage One: layer
    weights).

    The reference also divides every pixel by its sum over all 77 tokens; the captured columns come from a
    softmax over all tokens and bilinear weights sum to 1, so that sum is 1 and the division is omitted.
    """
    _check_grid_maps(cross_maps, columns_equal_rows=False)
    counts = {m.shape[1] for m in cross_maps.values()}
    if len(counts) != 1:
        raise ValueError(
            f"The cross maps hold different numbers of token columns {sorted(counts)}; record them together."
        )
    out_h, out_w = _check_size(out_size)
    total = None
    for (h, w), maps in cross_maps.items():
        grid = maps.float().reshape(h, w, -1).permute(2, 0, 1)[None]
        up = F.interpolate(grid, size=(out_h, out_w), mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
        total = up if total is None else total + up
    return total


def _check_size(out_size) -> Grid:
    out_h, out_w = (int(v) for v in out_size)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"out_size must be two positive integers (height, width), got {tuple(out_size)}.")
    return out_h, out_w


# ---------------------------------------------------------------------------------------- anchors and KL
def _axis_anchors(size: int, per_side: int) -> torch.Tensor:
    """DiffSeg's 1-D spacing generalised: ``n = min(per_side, size)`` points with integer step
    ``(size - 1) // (n - 1)``, centred (``linspace(1, 61, 16)`` for 64 cells and 16 per side). A grid with
    fewer cells than ``per_side`` uses every cell; a single cell gives coordinate 0."""
    count = min(per_side, size)
    if count == 1:
        return torch.tensor([(size - 1) // 2])
    step = (size - 1) // (count - 1)
    start = (size - 1 - step * (count - 1)) // 2
    return start + step * torch.arange(count)


def anchor_grid(height: int, width: int, per_side: int = DIFFSEG_ANCHORS_PER_SIDE) -> torch.Tensor:
    """``[n, 2]`` (row, col) anchor coordinates of the DiffSeg sampling grid on a ``height x width`` grid,
    rows first (``meshgrid(indexing='ij')``). See :func:`_axis_anchors` for the spacing."""
    if min(height, width, per_side) < 1:
        raise ValueError(f"anchor_grid needs positive sizes, got height={height}, width={width}, per_side={per_side}.")
    rows, cols = torch.meshgrid(_axis_anchors(height, per_side), _axis_anchors(width, per_side), indexing="ij")
    return torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=1).long()


def anchor_indices(height: int, width: int, per_side: int = DIFFSEG_ANCHORS_PER_SIDE) -> torch.Tensor:
    """The anchors of :func:`anchor_grid` as row-major pixel indices ``row * width + col``."""
    grid = anchor_grid(height, width, per_side)
    return grid[:, 0] * width + grid[:, 1]


def symmetric_kl(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pairwise ``[len(x), len(y)]`` halved symmetric KL, ``(KL(x||y) + KL(y||x)) / 2``, between rows
    (distributions) in fp32. Probabilities are floored at ``KL_PROBABILITY_FLOOR`` inside the logs only."""
    x, y = x.float(), y.float()
    log_x = x.clamp_min(KL_PROBABILITY_FLOOR).log()
    log_y = y.clamp_min(KL_PROBABILITY_FLOOR).log()
    self_x = (x * log_x).sum(dim=1)
    self_y = (y * log_y).sum(dim=1)
    return 0.5 * (self_x[:, None] + self_y[None, :] - x @ log_y.T - log_x @ y.T)


# ---------------------------------------------------------------------------------------- merging
def _check_thresholds(thresholds: Sequence[float]) -> list[float]:
    values = [float(t) for t in thresholds]
    if not values or any(not (t > 0) for t in values):
        raise ValueError(
            f"KL thresholds must be one or more positive numbers (DiffSeg uses 1.1), got {list(thresholds)}."
        )
    return values


def merge_anchors(agg: torch.Tensor, anchors: torch.Tensor, threshold: float) -> torch.Tensor:
    """DiffSeg iteration 0: each anchor's map is replaced by the mean of all query maps within
    ``threshold`` of it (the anchor itself always counts). ``[n, H*W]``."""
    anchor_maps = agg[anchors]
    close = symmetric_kl(anchor_maps, agg) < threshold
    close[torch.arange(len(anchors), device=agg.device), anchors.to(agg.device)] = True
    weights = close.float()
    return (weights @ agg.float()) / weights.sum(dim=1, keepdim=True)


def merge_greedy(maps: torch.Tensor, threshold: float) -> torch.Tensor:
    """DiffSeg iterations 1+: in order, every map not yet taken takes all maps within ``threshold`` (taken
    ones included) and emits their mean. ``[K', H*W]``."""
    close = symmetric_kl(maps, maps) < threshold
    close.fill_diagonal_(True)
    taken = torch.zeros(len(maps), dtype=torch.bool, device=maps.device)
    merged = []
    for index in range(len(maps)):
        if taken[index]:
            continue
        group = close[index]
        taken |= group
        merged.append(maps[group].mean(dim=0))
    return torch.stack(merged)


def merge_by_kl(
    agg: torch.Tensor, anchors: torch.Tensor, thresholds: Sequence[float] = DIFFSEG_KL_THRESHOLDS
) -> torch.Tensor:
    """DiffSeg merging: iteration 0 merges every query into the anchors (``anchors``: row
    indices of ``agg``, see :func:`anchor_indices`) with ``thresholds[0]``, then one greedy iteration per
    further threshold. Returns ``[K, H*W]`` merged maps."""
    values = _check_thresholds(thresholds)
    anchors = torch.as_tensor(anchors, dtype=torch.long)
    if anchors.ndim != 1 or len(anchors) == 0 or anchors.min() < 0 or anchors.max() >= agg.shape[0]:
        raise ValueError(
            f"anchors must be a non-empty 1-D tensor of row indices below {agg.shape[0]}; "
            "build them with anchor_indices."
        )
    maps = merge_anchors(agg, anchors, values[0])
    for threshold in values[1:]:
        maps = merge_greedy(maps, threshold)
    return maps


def refine_by_kmeans(
    agg: torch.Tensor,
    centroids: torch.Tensor,
    iterations: int = KMEANS_MAX_ITERATIONS,
    tolerance: float = KMEANS_TOLERANCE,
) -> torch.Tensor:
    """Lloyd k-means of the rows of ``agg`` initialised at ``centroids`` (the reference's sklearn refinement).

    Stops when no assignment changes or the total squared centroid shift is at most ``tolerance`` times the
    mean per-column variance of ``agg`` (sklearn's rule). Empty clusters are dropped (sklearn would relocate
    them). Returns the ``[K', H*W]`` means of the final non-empty clusters.
    """
    if int(iterations) != iterations or iterations < 1:
        raise ValueError(f"iterations must be a positive integer, got {iterations!r}.")
    points = agg.float()
    centres = centroids.float().to(points.device)
    limit = float(tolerance) * float(points.var(dim=0, unbiased=False).mean())
    labels = _nearest_centre(points, centres)
    for _ in range(int(iterations)):
        updated = _cluster_means(points, labels, centres)
        shift = float(((updated - centres) ** 2).sum())
        centres = updated
        new_labels = _nearest_centre(points, centres)
        if torch.equal(new_labels, labels) or shift <= limit:
            labels = new_labels
            break
        labels = new_labels
    present = torch.unique(labels)
    return torch.stack([points[labels == k].mean(dim=0) for k in present.tolist()])


def _nearest_centre(points: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    distances = (centres**2).sum(dim=1)[None, :] - 2 * points @ centres.T
    return distances.argmin(dim=1)


def _cluster_means(points: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Mean of each cluster's points; an empty cluster keeps its centre."""
    sums = torch.zeros_like(centres).index_add_(0, labels, points)
    counts = torch.bincount(labels, minlength=len(centres)).to(points.dtype)[:, None]
    return torch.where(counts > 0, sums / counts.clamp_min(1), centres)


def label_map(maps: torch.Tensor, grid_hw: Grid, out_size: Grid) -> torch.Tensor:
    """``[K, h*w]`` maps -> ``[out_h, out_w]`` labels: bilinear upsampling of each map, then argmax over K
    (first index on ties)."""
    h, w = grid_hw
    if maps.ndim != 2 or maps.shape[1] != h * w:
        raise ValueError(f"maps must be [K, {h * w}] for grid {tuple(grid_hw)}, got {tuple(maps.shape)}.")
    out_h, out_w = _check_size(out_size)
    up = F.interpolate(maps.float().reshape(1, -1, h, w), size=(out_h, out_w), mode="bilinear", align_corners=False)
    return up[0].argmax(dim=0)


def diffseg(
    self_maps: Mapping[Grid, torch.Tensor],
    out_size: Grid,
    *,
    kl_thresholds: Sequence[float] = DIFFSEG_KL_THRESHOLDS,
    refine: bool = True,
    anchors_per_side: int = DIFFSEG_ANCHORS_PER_SIDE,
) -> torch.Tensor:
    """DiffSeg on one batch item's self-attention ``{(h, w): [h*w, h*w]}``: aggregate, merge from the anchor
    grid, optionally refine by k-means, upsample and argmax. Returns ``[out_h, out_w]`` segment ids in
    ``0..K-1`` (an id whose map never wins is absent)."""
    agg = aggregate_self_attention(self_maps)
    height, width = largest_grid(self_maps)
    maps = merge_by_kl(agg, anchor_indices(height, width, anchors_per_side).to(agg.device), kl_thresholds)
    if refine:
        maps = refine_by_kmeans(agg, maps)
    return label_map(maps, (height, width), out_size)


# ---------------------------------------------------------------------------------------- labels and masks
def label_segments(
    labels: torch.Tensor, cross: torch.Tensor, word_positions: Sequence[Sequence[int]]
) -> dict[int, int]:
    """Segment id -> index of the word whose cross-attention dominates it.

    ``word_positions[i]`` lists the columns of ``cross`` (``[H, W, P]``) that belong to word ``i``; a word of
    several BPE pieces uses all of them (their mean). Each word map is L2-normalised over pixels; a segment
    goes to the word with the largest mean over its pixels (first word on ties).
    """
    if labels.shape != cross.shape[:2]:
        raise ValueError(
            f"labels {tuple(labels.shape)} and cross-attention {tuple(cross.shape)} differ in size; aggregate the "
            "cross-attention at the label map's size."
        )
    columns = cross.shape[2]
    if not word_positions or any(len(p) == 0 for p in word_positions):
        raise ValueError("word_positions needs at least one word, and every word at least one token column.")
    if any(int(c) < 0 or int(c) >= columns for p in word_positions for c in p):
        raise ValueError(
            f"word_positions {[list(p) for p in word_positions]} point outside the {columns} cross-attention columns."
        )
    flat = cross.float().reshape(-1, columns)
    words = torch.stack([flat[:, [int(c) for c in p]].mean(dim=1) for p in word_positions], dim=1)
    words = F.normalize(words, dim=0)
    ids = labels.reshape(-1).to(words.device)
    return {int(s): int(words[ids == s].mean(dim=0).argmax()) for s in torch.unique(ids).tolist()}


def split_instances(mask: torch.Tensor, min_fraction: float = INSTANCE_MIN_FRACTION) -> list[torch.Tensor]:
    """8-connected components of a boolean ``[H, W]`` mask with area > ``min_fraction * H * W``, largest first
    (ties in scan order), each as a float ``[H, W]`` mask on the input's device."""
    from scipy import ndimage

    if mask.ndim != 2:
        raise ValueError(f"split_instances needs a [H, W] mask, got shape {tuple(mask.shape)}.")
    if not 0 <= min_fraction < 1:
        raise ValueError(f"min_fraction must lie in [0, 1), got {min_fraction}.")
    binary = mask.detach().bool().cpu().numpy()
    components, count = ndimage.label(binary, structure=np.ones((3, 3), dtype=bool))
    areas = np.bincount(components.reshape(-1), minlength=count + 1)[1:]
    minimum = min_fraction * binary.size
    keep = [i + 1 for i in np.argsort(-areas, kind="stable") if areas[i] > minimum]
    return [torch.from_numpy(components == k).float().to(mask.device) for k in keep]
