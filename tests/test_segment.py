"""DiffSeg in torch, word labels for segments, instance split: constructed attention with known answers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ice_ops.segment import (
    aggregate_cross_attention,
    aggregate_self_attention,
    anchor_grid,
    anchor_indices,
    diffseg,
    label_map,
    label_segments,
    merge_by_kl,
    merge_greedy,
    refine_by_kmeans,
    split_instances,
    symmetric_kl,
)


def three_regions(height: int, width: int) -> torch.Tensor:
    """Left-top, left-bottom and right rectangles (boundaries on even cells, so halving keeps them)."""
    regions = torch.zeros(height, width, dtype=torch.long)
    regions[height // 2 :, : width // 2] = 1
    regions[:, width // 2 :] = 2
    return regions


def uniform_within_regions(regions: torch.Tensor) -> torch.Tensor:
    """Self-attention where every query attends uniformly to the pixels of its own region."""
    flat = regions.reshape(-1)
    same = (flat[:, None] == flat[None, :]).float()
    return same / same.sum(dim=1, keepdim=True)


def gaussian_attention(height: int, width: int, sigma: float) -> torch.Tensor:
    """Self-attention where every query attends to its neighbourhood (no region structure)."""
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    points = torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=1).float()
    return (-torch.cdist(points, points) ** 2 / (2 * sigma**2)).softmax(dim=1)


def same_up_to_permutation(a: torch.Tensor, b: torch.Tensor) -> bool:
    pairs = set(zip(a.reshape(-1).tolist(), b.reshape(-1).tolist()))
    return len(pairs) == len({x for x, _ in pairs}) == len({y for _, y in pairs})


def region_maps(height: int, width: int) -> dict:
    return {
        (height, width): uniform_within_regions(three_regions(height, width)),
        (height // 2, width // 2): uniform_within_regions(three_regions(height // 2, width // 2)),
    }


@pytest.mark.parametrize("grid", [(16, 16), (16, 12)])
@pytest.mark.parametrize("refine", [True, False])
def test_diffseg_recovers_known_regions_from_two_resolutions(grid, refine):
    height, width = grid
    labels = diffseg(region_maps(height, width), (2 * height, 2 * width), refine=refine)
    expected = three_regions(height, width).repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert labels.shape == expected.shape and labels.dtype == torch.long
    assert len(torch.unique(labels)) == 3
    assert same_up_to_permutation(labels, expected)


def test_kl_thresholds_control_how_much_is_merged():
    maps = {(16, 16): gaussian_attention(16, 16, 1.5), (8, 8): gaussian_attention(8, 8, 0.75)}
    counts = {
        threshold: len(torch.unique(diffseg(maps, (16, 16), kl_thresholds=(threshold,) * 3, refine=False)))
        for threshold in (1e-4, 1.1, 1e6)
    }
    assert counts[1e6] == 1
    assert counts[1e-4] > counts[1.1] > 1
    assert counts[1e-4] >= 64  # nothing merges: every anchor of the 16x16 grid keeps its own map


def test_each_threshold_is_its_own_iteration():
    agg = aggregate_self_attention({(16, 16): gaussian_attention(16, 16, 1.5)})
    anchors = anchor_indices(16, 16)
    only_first = merge_by_kl(agg, anchors, thresholds=(0.5,))
    two = merge_by_kl(agg, anchors, thresholds=(0.5, 0.5))
    three = merge_by_kl(agg, anchors, thresholds=(0.5, 0.5, 0.5))
    assert only_first.shape[0] == len(anchors)
    assert three.shape[0] < two.shape[0] < only_first.shape[0]  # every threshold merges once more
    torch.testing.assert_close(three.sum(dim=1), torch.ones(three.shape[0]))
    with pytest.raises(ValueError, match="positive"):
        merge_by_kl(agg, anchors, thresholds=(1.1, 0.0))


def test_merging_takes_each_map_once_and_anchors_must_be_rows_of_the_map():
    peaked = torch.softmax(torch.eye(8) * 6, dim=1)  # eight maps, each peaked on its own cell
    near_first = torch.softmax(torch.eye(8)[0] * 6 + 0.05 * torch.arange(8), dim=0)
    maps = torch.stack([peaked[0], peaked[5], near_first])  # the third is close to the first, the second is far
    merged = merge_greedy(maps, threshold=0.5)
    assert merged.shape[0] == 2
    torch.testing.assert_close(merged[0], (maps[0] + maps[2]) / 2)
    agg = aggregate_self_attention({(4, 4): gaussian_attention(4, 4, 1.0)})
    for anchors in (torch.tensor([0, 16]), torch.tensor([], dtype=torch.long), torch.tensor([[0, 1]])):
        with pytest.raises(ValueError, match="non-empty 1-D tensor of row indices below 16"):
            merge_by_kl(agg, anchors)


def test_out_of_range_sizes_are_refused_and_the_smallest_ones_work():
    assert anchor_grid(5, 7, 1).tolist() == [[2, 3]]  # one anchor per side: the centre cell
    assert anchor_grid(1, 1, 1).tolist() == [[0, 0]]
    grid = anchor_grid(12, 11, 4)  # spacing 3 on both axes, centred: rows from 1, columns from 0
    assert sorted(set(grid[:, 0].tolist())) == [1, 4, 7, 10] and sorted(set(grid[:, 1].tolist())) == [0, 3, 6, 9]
    for sizes in ((0, 4, 2), (4, 0, 2), (4, 4, 0)):
        with pytest.raises(ValueError, match="anchor_grid needs positive sizes"):
            anchor_grid(*sizes)
    maps = {(2, 2): torch.full((4, 1), 0.25)}
    assert aggregate_cross_attention(maps, (1, 1)).shape == (1, 1, 1)
    for size in ((0, 4), (4, 0)):
        with pytest.raises(ValueError, match=r"out_size must be two positive integers \(height, width\)"):
            aggregate_cross_attention(maps, size)


def test_anchor_grid_of_64_cells_is_the_reference_grid():
    coordinates = np.linspace(1, 61, 16)
    rows, cols = np.meshgrid(coordinates, coordinates, indexing="ij")
    reference = np.stack([rows.reshape(-1), cols.reshape(-1)], axis=-1).astype(int)
    grid = anchor_grid(64, 64, 16)
    assert grid.dtype == torch.long
    assert np.array_equal(grid.numpy(), reference)
    assert torch.equal(anchor_indices(64, 64), grid[:, 0] * 64 + grid[:, 1])


def test_anchor_grid_uses_every_cell_of_small_grids_and_spans_non_square_ones():
    small = anchor_grid(8, 6, 16)
    assert small.shape == (48, 2)
    assert len({tuple(p) for p in small.tolist()}) == 48
    wide = anchor_grid(32, 48, 16)
    assert wide.shape == (256, 2)
    assert wide[:, 0].max() < 32 and wide[:, 1].max() < 48
    assert torch.unique(wide[:, 1]).numel() == 16 and wide[:, 1].max() - wide[:, 1].min() >= 40


def test_symmetric_kl_matches_the_definition_and_survives_zeros():
    torch.manual_seed(0)
    x = torch.rand(5, 30).softmax(dim=1)
    y = torch.rand(4, 30).softmax(dim=1)
    xd, yd = x.double()[:, None], y.double()[None]
    expected = 0.5 * (xd * (xd / yd).log()).sum(-1) + 0.5 * (yd * (yd / xd).log()).sum(-1)
    torch.testing.assert_close(symmetric_kl(x, y).double(), expected, atol=1e-5, rtol=1e-4)
    assert symmetric_kl(x, y).dtype == torch.float32
    torch.testing.assert_close(symmetric_kl(x, x).diagonal(), torch.zeros(5), atol=1e-6, rtol=0)
    disjoint = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]])
    distances = symmetric_kl(disjoint, disjoint)
    assert torch.isfinite(distances).all()
    assert distances[0, 1] > 10 and abs(float(distances[0, 0])) < 1e-6


def test_aggregation_weights_grids_by_resolution_and_rows_are_distributions():
    fine = torch.eye(16 * 16)  # each query attends only to itself
    coarse = torch.full((8 * 8, 8 * 8), 1 / 64)  # each query attends everywhere
    agg = aggregate_self_attention({(16, 16): fine, (8, 8): coarse})
    assert agg.shape == (256, 256)
    expected = (16 / 24) * torch.eye(256) + (8 / 24) * torch.full((256, 256), 1 / 256)
    torch.testing.assert_close(agg, expected)
    non_square = aggregate_self_attention(region_maps(16, 12))
    assert non_square.shape == (192, 192)
    torch.testing.assert_close(non_square.sum(dim=1), torch.ones(192))
    with pytest.raises(ValueError, match="batch item"):
        aggregate_self_attention({(4, 4): torch.ones(2, 16, 16)})


def test_refine_by_kmeans_finds_cluster_means_and_drops_empty_clusters():
    torch.manual_seed(0)
    a = torch.zeros(20, 6)
    a[:, 0] = 1
    b = torch.zeros(30, 6)
    b[:, 5] = 1
    points = torch.cat([a, b]) + 0.01 * torch.rand(50, 6)
    start = torch.tensor([[0.6, 0.4, 0, 0, 0, 0], [0, 0, 0, 0, 0.4, 0.6], [0, 0, 50.0, 0, 0, 0]])
    centres = refine_by_kmeans(points, start)
    assert centres.shape == (2, 6)
    torch.testing.assert_close(centres[0], points[:20].mean(dim=0))
    torch.testing.assert_close(centres[1], points[20:].mean(dim=0))


def test_refine_by_kmeans_moves_a_poor_start_to_the_clusters_over_several_updates():
    generator = torch.Generator().manual_seed(0)
    near, far = torch.zeros(10, 2), torch.zeros(12, 2)
    near[:, 0] = torch.arange(10) / 10  # 0.0 .. 0.9 on the first axis
    far[:, 1] = 5 + torch.arange(12) / 10  # 5.0 .. 6.1 on the second axis, far from the origin
    points = torch.cat([near, far]) + 0.001 * torch.rand(22, 2, generator=generator)
    start = torch.tensor([[0.0, 0.0], [0.5, 0.5]])  # the second centre first takes half of the near points
    centres = refine_by_kmeans(points, start)
    torch.testing.assert_close(centres, torch.stack([points[:10].mean(0), points[10:].mean(0)]))
    assert refine_by_kmeans(points, start, iterations=1).shape == (2, 2)
    for iterations in (0, 1.5):
        with pytest.raises(ValueError, match=f"iterations must be a positive integer, got {iterations}"):
            refine_by_kmeans(points, start, iterations=iterations)


def test_label_map_upsamples_and_takes_the_argmax():
    maps = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]])  # 2x2 grid: left column / right column
    labels = label_map(maps, (2, 2), (4, 6))
    assert labels.shape == (4, 6)
    assert torch.equal(labels, torch.tensor([[0, 0, 0, 1, 1, 1]] * 4))


def test_cross_attention_grids_are_upsampled_and_summed():
    column = torch.zeros(4, 4, 2)
    column[:, :2, 0] = 1.0
    column[:, 2:, 1] = 1.0
    coarse = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])  # 2x2, same left/right split
    cross = aggregate_cross_attention({(4, 4): column.reshape(16, 2), (2, 2): coarse}, (8, 8))
    assert cross.shape == (8, 8, 2)
    torch.testing.assert_close(cross.sum(dim=-1), torch.full((8, 8), 2.0))
    assert torch.equal(cross.argmax(dim=-1), torch.tensor([[0] * 4 + [1] * 4] * 8))


def test_cross_attention_is_upsampled_bilinearly_from_cell_centres():
    one_cell = torch.tensor([[1.0], [0.0], [0.0], [0.0]])  # 2x2 grid, attention only in the top-left cell
    cross = aggregate_cross_attention({(2, 2): one_cell}, (4, 4))[..., 0]
    profile = torch.tensor([1.0, 0.75, 0.25, 0.0])  # cell centres at 0.5 and 2.5 of the 4 output pixels
    torch.testing.assert_close(cross, profile[:, None] * profile[None, :])


def _word_scene():
    """Segments 0 (left), 1 (middle), 2 (right) on a 6x9 image and 4 token columns: word 0 = [0],
    word 1 = two BPE pieces [1, 2] whose attention to segment 1 is split over both, word 2 = [3]."""
    labels = torch.tensor([[0] * 3 + [1] * 3 + [2] * 3] * 6)
    cross = torch.full((6, 9, 4), 0.05)
    cross[:, 0:3, 0] = 0.8
    cross[:, 0:3, 1] = 0.6  # the first piece alone mostly likes the left segment ...
    cross[:, 3:6, 1] = 0.15
    cross[:, 3:6, 2] = 0.6  # ... the second piece carries the middle one
    cross[:, 3:6, 3] = 0.35
    cross[:, 6:9, 3] = 0.9
    return labels, cross


def test_label_segments_picks_the_dominating_word_using_all_pieces_of_a_word():
    labels, cross = _word_scene()
    mapping = label_segments(labels, cross, [[0], [1, 2], [3]])
    assert mapping == {0: 0, 1: 1, 2: 2}
    # Using only the first BPE piece (as the reference does) loses the middle segment to the third word.
    assert label_segments(labels, cross, [[0], [1], [3]])[1] == 2


def test_label_segments_do_not_depend_on_how_strongly_a_word_attends_overall():
    labels, cross = _word_scene()
    loud = cross.clone()
    loud[..., 3] *= 10  # the third word attends ten times more everywhere
    assert label_segments(labels, loud, [[0], [1, 2], [3]]) == {0: 0, 1: 1, 2: 2}


def test_label_segments_rejects_mismatched_inputs():
    labels, cross = _word_scene()
    with pytest.raises(ValueError, match="every word at least one token column"):
        label_segments(labels, cross, [[0], []])
    with pytest.raises(ValueError, match="columns"):
        label_segments(labels, cross, [[0], [4]])
    with pytest.raises(ValueError, match="size"):
        label_segments(labels[:, :5], cross, [[0]])


def test_split_instances_keeps_large_components_largest_first():
    mask = torch.zeros(40, 40, dtype=torch.bool)
    mask[2:10, 2:10] = True  # 64 px
    mask[20:35, 20:35] = True  # 225 px
    mask[0:3, 30:33] = True  # 9 px < 0.025 * 1600 = 40 px
    instances = split_instances(mask)
    assert [float(m.sum()) for m in instances] == [225.0, 64.0]
    assert all(m.dtype == torch.float32 and m.shape == (40, 40) for m in instances)
    assert torch.equal(instances[0].bool() | instances[1].bool(), mask & ~torch.tensor(
        np.pad(np.ones((3, 3), dtype=bool), ((0, 37), (30, 7)))
    ))
    assert len(split_instances(mask, min_fraction=0.0)) == 3


def test_split_instances_orders_equal_areas_by_scan_order_and_checks_the_fraction():
    mask = torch.zeros(20, 20, dtype=torch.bool)
    mask[12:16, 2:6] = True  # two squares of 16 px each: the lower one is further left ...
    mask[2:6, 12:16] = True  # ... but the upper one comes first in scan order
    first, second = split_instances(mask, min_fraction=0.0)
    assert bool(first[2, 12]) and bool(second[12, 2])
    for fraction in (-0.1, 1.0):
        with pytest.raises(ValueError, match=r"min_fraction must lie in \[0, 1\)"):
            split_instances(mask, min_fraction=fraction)
    with pytest.raises(ValueError, match=r"needs a \[H, W\] mask, got shape \(1, 20, 20\)"):
        split_instances(mask[None])


def test_split_instances_joins_diagonal_neighbours():
    mask = torch.zeros(20, 20, dtype=torch.bool)
    mask[2:8, 2:8] = True
    mask[8:14, 8:14] = True  # touches the first square only at a corner
    instances = split_instances(mask)
    assert len(instances) == 1 and float(instances[0].sum()) == 72.0


def test_segmentation_composes_with_labelling():
    height, width = 16, 12
    labels = diffseg(region_maps(height, width), (32, 24))
    regions = three_regions(32, 24)
    cross_fine = torch.stack([(three_regions(height, width) == k).float() for k in range(3)], dim=-1)
    cross_maps = {(height, width): cross_fine.reshape(-1, 3)}
    cross = aggregate_cross_attention(cross_maps, (32, 24))
    mapping = label_segments(labels, cross, [[0], [1], [2]])
    for word in range(3):
        segments = [segment for segment, labelled in mapping.items() if labelled == word]
        assert torch.equal(torch.isin(labels, torch.tensor(segments)), regions == word)
