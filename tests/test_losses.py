"""Stage Two losses: masked diffusion loss, timestep/noise sampling, triplets and the
Sinkhorn attention alignment (checked against an exact transport LP)."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import scipy.sparse as sparse
import torch
import torch.nn.functional as F
from scipy.optimize import linprog

from ice_ops.losses import (
    DEFAULT_TRIPLET_MARGIN,
    SINKHORN_TOLERANCE,
    anchor_margins,
    attention_alignment_loss,
    cosine_distance,
    diffusion_target,
    grid_cost,
    intrinsic_triplet,
    masked_diffusion_loss,
    object_instance_triplet,
    offset_noise,
    sample_timesteps,
    sinkhorn_distance,
    sinkhorn_potentials,
    timestep_weights,
)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def exact_emd(mu: np.ndarray, nu: np.ndarray, cost: np.ndarray) -> float:
    """Earth mover's distance by the transport LP (HiGHS). One marginal row is dropped: the 2N equality
    constraints have rank 2N-1, and with float rounding the full system can be reported infeasible."""
    n = len(mu)
    mu = mu / mu.sum()
    nu = nu / nu.sum()
    rows = sparse.kron(sparse.identity(n), np.ones((1, n)))
    cols = sparse.kron(np.ones((1, n)), sparse.identity(n))
    constraints = sparse.vstack([rows, cols]).tocsr()[:-1]
    bounds = np.concatenate([mu, nu])[:-1]
    result = linprog(cost.reshape(-1), A_eq=constraints, b_eq=bounds, bounds=(0, None), method="highs")
    assert result.status == 0, result.message
    return float(result.fun)


def binary_mask(side: int, generator: torch.Generator) -> torch.Tensor:
    mask = torch.zeros(side, side, dtype=torch.float64)
    top, left = torch.randint(0, side // 2, (2,), generator=generator).tolist()
    mask[top : top + side // 2, left : left + side // 2 + 1] = 1.0
    return mask.reshape(-1)


def softmax_map(side: int, generator: torch.Generator, sharpness: float = 3.0) -> torch.Tensor:
    return torch.softmax(sharpness * torch.randn(side * side, generator=generator, dtype=torch.float64), 0)


def distribution_pairs(side: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows: binary mask vs softmax, soft random vs softmax, sparse random vs peaked softmax, uniform vs softmax."""
    generator = torch.Generator().manual_seed(seed)
    sparse_mask = (torch.rand(side * side, generator=generator, dtype=torch.float64) > 0.7).double()
    sources = [
        binary_mask(side, generator),
        torch.rand(side * side, generator=generator, dtype=torch.float64),
        sparse_mask,
        torch.ones(side * side, dtype=torch.float64),
    ]
    targets = [
        softmax_map(side, generator),
        softmax_map(side, generator, 1.0),
        softmax_map(side, generator, 6.0),
        softmax_map(side, generator),
    ]
    mu = torch.stack([s / s.sum() for s in sources])
    nu = torch.stack(targets)
    return mu, nu


# ------------------------------------------------------------------------------------------------
# optimal transport
# ------------------------------------------------------------------------------------------------


def test_grid_cost_units_and_layout():
    cost = grid_cost(4, 6)
    assert cost.shape == (24, 24)
    assert torch.equal(cost, cost.T)
    assert torch.all(cost.diagonal() == 0)
    # row-major cells; neighbours one cell apart are 1/max(h, w) apart
    assert cost[0, 1].item() == pytest.approx(1 / 6)
    assert cost[0, 6].item() == pytest.approx(1 / 6)
    assert cost[0, 23].item() == pytest.approx(math.hypot(3, 5) / 6)


@pytest.mark.parametrize("side", [6, 8])
def test_sinkhorn_within_5_percent_of_exact_emd(side):
    cost = grid_cost(side, side, dtype=torch.float64)
    for seed in (0, 1):
        mu, nu = distribution_pairs(side, seed)
        distances = sinkhorn_distance(mu, nu, cost)
        for item in range(mu.shape[0]):
            exact = exact_emd(mu[item].numpy(), nu[item].numpy(), cost.numpy())
            assert distances[item].item() == pytest.approx(exact, rel=0.05), (seed, item)


def test_sinkhorn_float32_matches_exact_emd():
    cost = grid_cost(8, 8)
    mu, nu = distribution_pairs(8, 2)
    distances = sinkhorn_distance(mu.float(), nu.float(), cost)
    assert distances.dtype == torch.float32
    for item in range(mu.shape[0]):
        exact = exact_emd(mu[item].numpy(), nu[item].numpy(), cost.double().numpy())
        assert distances[item].item() == pytest.approx(exact, rel=0.05)


def test_sinkhorn_converges_to_tolerance_without_warning():
    cost = grid_cost(8, 8, dtype=torch.float64)
    mu, nu = distribution_pairs(8, 3)
    solution = sinkhorn_potentials(mu, nu, cost)
    assert solution.marginal_error < SINKHORN_TOLERANCE
    epsilon = 0.01
    solution = sinkhorn_potentials(mu, nu, cost, epsilon=epsilon)
    plan = torch.exp(
        mu.log()[:, :, None] + nu.log()[:, None, :] + (solution.f[:, :, None] + solution.g[:, None, :] - cost) / epsilon
    )
    assert torch.allclose(plan.sum(2), mu, atol=1e-9)
    assert (plan.sum(1) - nu).abs().sum(1).max() < SINKHORN_TOLERANCE
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sinkhorn_distance(mu, nu, cost)


def test_sinkhorn_warns_when_iterations_run_out():
    cost = grid_cost(8, 8, dtype=torch.float64)
    mu, nu = distribution_pairs(8, 4)
    with pytest.warns(RuntimeWarning, match="max_iterations"):
        sinkhorn_distance(mu, nu, cost, max_iterations=3)


def test_sinkhorn_batched_equals_per_item():
    cost = grid_cost(8, 8, dtype=torch.float64)
    mu, nu = distribution_pairs(8, 5)
    batched = sinkhorn_distance(mu, nu, cost, tolerance=1e-8)
    single = torch.cat([sinkhorn_distance(mu[i : i + 1], nu[i : i + 1], cost, tolerance=1e-8) for i in range(4)])
    assert torch.allclose(batched, single, rtol=1e-5, atol=1e-7)


def test_sinkhorn_rejects_non_distributions():
    cost = grid_cost(4, 4)
    mu = torch.full((1, 16), 1 / 16)
    with pytest.raises(ValueError, match="probability distribution"):
        sinkhorn_distance(mu * 2, mu, cost)
    with pytest.raises(ValueError, match="probability distribution"):
        sinkhorn_distance(torch.zeros(1, 16), mu, cost)
    with pytest.raises(ValueError):
        sinkhorn_distance(mu, mu, grid_cost(3, 3))


def test_sinkhorn_gradient_matches_finite_differences():
    side = 6
    cost = grid_cost(side, side, dtype=torch.float64)
    mu, _ = distribution_pairs(side, 6)
    mu = mu[:1]
    logits = torch.randn(1, side * side, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    logits.requires_grad_(True)
    sinkhorn_distance(mu, torch.softmax(logits, -1), cost).sum().backward()
    step = 1e-5
    numeric = torch.zeros(side * side, dtype=torch.float64)
    for index in range(side * side):
        shift = torch.zeros_like(logits)
        shift[0, index] = step
        plus = sinkhorn_distance(mu, torch.softmax(logits.detach() + shift, -1), cost, tolerance=1e-9)
        minus = sinkhorn_distance(mu, torch.softmax(logits.detach() - shift, -1), cost, tolerance=1e-9)
        numeric[index] = (plus - minus).item() / (2 * step)
    # the gradient is that of the entropic OT value (dual potentials): it agrees up to O(epsilon)
    assert F.cosine_similarity(logits.grad[0], numeric, dim=0) > 0.95


def test_attention_alignment_moves_mass_toward_mask():
    side = 8
    mask = torch.zeros(1, side, side)
    mask[0, :3, :3] = 1.0
    attention = torch.full((1, side, side), 1.0)
    attention[0, 6:, 6:] = 5.0  # mass sits in the far corner
    attention.requires_grad_(True)
    loss = attention_alignment_loss(attention, mask)
    loss.backward()
    grad = attention.grad[0]
    # adding attention inside the mask lowers the loss, adding it in the far corner raises it
    assert grad[:3, :3].mean() < grad.mean() < grad[6:, 6:].mean()
    moved = attention.detach().clone()
    moved[0, 6:, 6:] -= 1.0
    moved[0, :2, :2] += 9.0 / 4.0
    assert attention_alignment_loss(moved, mask) < loss
    stepped = (attention.detach() - 20.0 * attention.grad).clamp_min(0)
    assert attention_alignment_loss(stepped, mask) < loss


def test_attention_alignment_edge_cases_are_finite():
    side = 8
    attention = torch.softmax(torch.randn(4, side * side, generator=torch.Generator().manual_seed(8)), -1)
    attention = attention.reshape(4, side, side)
    attention[3] = 0.0
    attention[3, 5, 5] = 1.0  # item 3: one-pixel attention
    attention.requires_grad_(True)
    masks = torch.zeros(4, side, side)  # item 0: empty mask
    masks[1, 3, 4] = 1.0  # item 1: one-pixel mask
    masks[2, 2:6, 2:6] = 1.0
    masks[3, 2:6, 2:6] = 1.0
    loss = attention_alignment_loss(attention, masks)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert torch.isfinite(attention.grad).all()
    assert torch.all(attention.grad[0] == 0)  # the empty-mask item contributes nothing
    for item in (1, 2, 3):
        assert attention.grad[item].abs().sum() > 0
    # even where the one-pixel attention has no mass, the gradient says where mass should go
    assert attention.grad[3, 2:6, 2:6].mean() < attention.grad[3, 0, 0]


def test_attention_alignment_accepts_half_precision():
    side = 8
    mask = torch.zeros(2, side, side)
    mask[:, 2:5, 1:6] = 1.0
    attention = torch.softmax(torch.randn(2, side * side, generator=torch.Generator().manual_seed(17)), -1)
    attention = attention.reshape(2, side, side)
    full = attention_alignment_loss(attention, mask)
    half = attention_alignment_loss(attention.bfloat16(), mask.bfloat16())
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(full.item(), rel=0.02)
    cost = grid_cost(side, side)
    uniform = torch.full((1, side * side), 1 / side**2).bfloat16()  # sums to 1.002 after rounding
    assert torch.isfinite(sinkhorn_distance(uniform, uniform, cost)).all()


def test_attention_alignment_empty_maps_contribute_zero():
    side = 6
    attention = torch.rand(2, side, side, requires_grad=True)
    mask = torch.zeros(2, side, side)
    mask[1, :2, :2] = 1.0
    both = attention_alignment_loss(attention, mask)
    alone = attention_alignment_loss(attention[1:], mask[1:])
    assert both.item() == pytest.approx(alone.item() / 2, rel=1e-5)
    zero_attention = torch.zeros(1, side, side, requires_grad=True)
    loss = attention_alignment_loss(zero_attention, mask[1:])
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(zero_attention.grad).all()


def test_attention_alignment_scale_does_not_depend_on_resolution():
    mask = torch.zeros(1, 8, 8)
    mask[0, 1:4, 1:5] = 1.0
    attention = torch.softmax(torch.randn(1, 64, generator=torch.Generator().manual_seed(9)), -1).reshape(1, 8, 8)
    coarse = attention_alignment_loss(attention, mask)
    fine = attention_alignment_loss(
        F.interpolate(attention[None], scale_factor=2, mode="nearest")[0],
        F.interpolate(mask[None], scale_factor=2, mode="nearest")[0],
    )
    assert fine.item() == pytest.approx(coarse.item(), rel=0.1)
    assert attention_alignment_loss(mask, mask) < 0.2 * coarse


def test_attention_alignment_rejects_bad_input():
    with pytest.raises(ValueError, match="same size"):
        attention_alignment_loss(torch.rand(1, 8, 8), torch.rand(1, 4, 4))
    with pytest.raises(ValueError, match="non-negative"):
        attention_alignment_loss(torch.rand(1, 4, 4) - 0.5, torch.rand(1, 4, 4))


# ------------------------------------------------------------------------------------------------
# triplets
# ------------------------------------------------------------------------------------------------


def basis(dimension: int, index: int, scale: float = 1.0) -> torch.Tensor:
    vector = torch.zeros(dimension)
    vector[index] = scale
    return vector


def test_object_instance_triplet_inactive_when_satisfied():
    word = basis(16, 0, 3.0)[None].requires_grad_(True)
    object_token = (basis(16, 0, 0.5) + basis(16, 1, 0.01))[None].requires_grad_(True)
    instance_token = basis(16, 2, 7.0)[None].requires_grad_(True)  # cosine distance 1 from the word
    loss = object_instance_triplet(word, object_token, instance_token)
    loss.backward()
    assert loss.item() == 0.0
    for tensor in (word, object_token, instance_token):
        assert torch.all(tensor.grad == 0)


def test_object_instance_triplet_active_when_violated():
    word = basis(16, 0)[None]
    object_token = basis(16, 1)[None].requires_grad_(True)  # far from the word
    instance_token = (basis(16, 0) + basis(16, 3, 0.2))[None].requires_grad_(True)  # close to the word
    loss = object_instance_triplet(word, object_token, instance_token)
    loss.backward()
    assert loss.item() > DEFAULT_TRIPLET_MARGIN
    assert object_token.grad.abs().sum() > 0 and instance_token.grad.abs().sum() > 0


def test_object_instance_triplet_at_initialisation_is_margin():
    embedding = torch.randn(2, 32, generator=torch.Generator().manual_seed(10))
    loss = object_instance_triplet(embedding, embedding.clone(), embedding.clone())
    assert loss.item() == torch.tensor(DEFAULT_TRIPLET_MARGIN).item()
    loss = object_instance_triplet(embedding, embedding.clone(), embedding.clone(), margin=0.3)
    assert loss.item() == torch.tensor(0.3).item()


def test_object_instance_triplet_ignores_vector_scale():
    generator = torch.Generator().manual_seed(11)
    word, object_token, instance_token = torch.randn(3, 4, 32, generator=generator)
    reference = object_instance_triplet(word, object_token, instance_token, margin=1.0)
    scaled = object_instance_triplet(5 * word, 0.1 * object_token, 30 * instance_token, margin=1.0)
    assert reference.item() > 0
    assert scaled.item() == pytest.approx(reference.item(), rel=1e-5)


def test_cosine_distance_range_and_zero_vectors():
    a = basis(8, 0)
    assert cosine_distance(a, 2 * a).item() == pytest.approx(0.0, abs=1e-6)
    assert cosine_distance(a, -a).item() == pytest.approx(2.0)
    assert cosine_distance(a, basis(8, 1)).item() == pytest.approx(1.0)
    zero = torch.zeros(8, requires_grad=True)
    distance = cosine_distance(zero, a)
    distance.backward()
    assert torch.isfinite(distance) and torch.isfinite(zero.grad).all()


def test_anchor_margins_from_word_distances():
    anchors = torch.stack([basis(8, 0), basis(8, 0) + basis(8, 1), basis(8, 2)])
    object_word = basis(8, 2)  # equal to the third anchor (the reference fails with a KeyError)
    margins, object_margins = anchor_margins(anchors, object_word)
    assert margins.shape == (3, 3) and object_margins.shape == (3,)
    assert torch.all(margins.diagonal() == 0)
    assert torch.allclose(margins, margins.T)
    assert margins[0, 1].item() == pytest.approx(0.7 * (1 - 1 / math.sqrt(2)), rel=1e-5)
    assert margins[0, 2].item() == pytest.approx(0.7)
    assert object_margins.tolist() == pytest.approx([0.7, 0.7, 0.0], abs=1e-6)
    only_anchors, none = anchor_margins(anchors, None, scale=1.0)
    assert none is None and only_anchors[0, 2].item() == pytest.approx(1.0)


def intrinsic_setup(count: int, dimension: int = 16):
    anchors = torch.stack([basis(dimension, k) for k in range(count)])
    object_word = basis(dimension, dimension - 1)
    margins, object_margins = anchor_margins(anchors, object_word)
    return anchors, object_word, margins, object_margins


def test_intrinsic_triplet_zero_when_tokens_sit_on_their_anchors():
    anchors, object_word, margins, object_margins = intrinsic_setup(3)
    intrinsic = anchors.clone().requires_grad_(True)
    loss = intrinsic_triplet(anchors, intrinsic, margins, object_word, object_word.clone(), object_margins)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.all(intrinsic.grad == 0)


def test_intrinsic_triplet_positive_when_swapped():
    anchors, object_word, margins, object_margins = intrinsic_setup(3)
    intrinsic = anchors[[1, 0, 2]].clone().requires_grad_(True)
    loss = intrinsic_triplet(anchors, intrinsic, margins, object_word, object_word.clone(), object_margins)
    loss.backward()
    assert loss.item() > 0
    assert intrinsic.grad[:2].abs().sum() > 0


def test_intrinsic_triplet_single_anchor_uses_object_term_only():
    anchors, object_word, margins, object_margins = intrinsic_setup(1)
    object_token = object_word + basis(16, 5, 0.5)
    near_object = (object_word + basis(16, 6, 0.1))[None]  # intrinsic token too close to the object word
    loss = intrinsic_triplet(anchors, near_object, margins, object_word, object_token, object_margins)
    expected = F.relu(
        cosine_distance(object_word, object_token) - cosine_distance(object_word, near_object[0]) + object_margins[0]
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert loss.item() > 0


def test_intrinsic_triplet_term_definition():
    generator = torch.Generator().manual_seed(12)
    anchors, intrinsic = torch.randn(2, 3, 16, generator=generator)
    object_word, object_token = torch.randn(2, 16, generator=generator)
    margins, object_margins = anchor_margins(anchors, object_word, scale=0.3)
    terms = []
    for k in range(3):
        own = cosine_distance(anchors[k], intrinsic[k])
        for j in range(3):
            if j != k:
                terms.append(F.relu(own - cosine_distance(anchors[k], intrinsic[j]) + margins[k, j]))
        object_gap = cosine_distance(object_word, object_token) - cosine_distance(object_word, intrinsic[k])
        terms.append(F.relu(object_gap + object_margins[k]))
    terms = torch.stack(terms)
    assert (terms == 0).any() and (terms > 0).any()  # a mix, so the pairing of k and j matters
    loss = intrinsic_triplet(anchors, intrinsic, margins, object_word, object_token, object_margins)
    assert loss.item() == pytest.approx(terms.mean().item(), rel=1e-5)


# ------------------------------------------------------------------------------------------------
# diffusion loss, timesteps and noise
# ------------------------------------------------------------------------------------------------


def test_masked_loss_is_normalised_by_mask_area():
    prediction = torch.zeros(1, 4, 16, 16)
    target = torch.full((1, 4, 16, 16), 0.5)
    small = torch.zeros(1, 1, 16, 16)
    small[..., 3:5, 7:9] = 1.0
    large = torch.ones(1, 1, 16, 16)
    large[..., :2, :] = 0.0
    assert masked_diffusion_loss(prediction, target, small).item() == pytest.approx(0.25)
    assert masked_diffusion_loss(prediction, target, large).item() == pytest.approx(0.25)
    soft = torch.full((1, 1, 16, 16), 0.1)
    assert masked_diffusion_loss(prediction, target, soft).item() == pytest.approx(0.25)


def test_masked_loss_ignores_error_outside_the_mask():
    prediction = torch.zeros(2, 4, 8, 8)
    target = torch.zeros(2, 4, 8, 8)
    target[..., :, 4:] = 3.0  # error only in the right half
    left = torch.zeros(1, 1, 8, 8)
    left[..., :, :4] = 1.0
    assert masked_diffusion_loss(prediction, target, left).item() == 0.0
    per_item = torch.cat([left, 1 - left])
    assert masked_diffusion_loss(prediction, target, per_item).item() == pytest.approx((0 + 9) / 2)


def test_masked_loss_full_mask_equals_mse():
    generator = torch.Generator().manual_seed(13)
    prediction, target = torch.randn(2, 3, 4, 8, 8, generator=generator)
    full = torch.ones(3, 1, 8, 8)
    assert masked_diffusion_loss(prediction, target, full).item() == pytest.approx(
        F.mse_loss(prediction, target).item(), rel=1e-6
    )


def test_masked_loss_empty_mask_is_finite():
    prediction = torch.randn(1, 4, 8, 8, requires_grad=True)
    loss = masked_diffusion_loss(prediction, torch.randn(1, 4, 8, 8), torch.zeros(1, 1, 8, 8))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(prediction.grad).all()


def test_masked_loss_rejects_mask_at_image_size():
    with pytest.raises(ValueError, match="resize_soft_mask"):
        masked_diffusion_loss(torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8), torch.ones(1, 1, 64, 64))


def test_diffusion_target_epsilon_and_velocity():
    from diffusers import DDPMScheduler

    generator = torch.Generator().manual_seed(14)
    latents, noise = torch.randn(2, 2, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([10, 900])
    epsilon = DDPMScheduler(prediction_type="epsilon")
    assert diffusion_target(epsilon, latents, noise, timesteps) is noise
    velocity = DDPMScheduler(prediction_type="v_prediction")
    alpha = velocity.alphas_cumprod[timesteps].reshape(2, 1, 1, 1)
    expected = alpha.sqrt() * noise - (1 - alpha).sqrt() * latents
    assert torch.allclose(diffusion_target(velocity, latents, noise, timesteps), expected, atol=1e-6)
    with pytest.raises(ValueError, match="prediction type"):
        diffusion_target(DDPMScheduler(prediction_type="sample"), latents, noise, timesteps)


def test_timestep_weights_shape_the_schedule():
    steps = 1000
    weights = timestep_weights(steps)
    assert weights.shape == (steps,)
    assert weights.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert torch.all(weights[1:] > weights[:-1])
    assert weights[-1] / weights[0] == pytest.approx(3.0, rel=1e-3)  # 1.5/T over 0.5/T
    mean = (torch.arange(steps, dtype=torch.float64) * weights.double()).sum().item()
    assert mean == pytest.approx(steps * (0.5 + 2 * 0.5 / math.pi**2), abs=1.0)  # ≈ 601
    uniform = timestep_weights(steps, t_dist=0.0)
    assert torch.allclose(uniform, torch.full((steps,), 1 / steps))
    with pytest.raises(ValueError):
        timestep_weights(steps, t_dist=1.5)


def test_sample_timesteps_follow_the_weights():
    weights = timestep_weights(1000)
    draws = sample_timesteps(weights, 20000, torch.Generator().manual_seed(15))
    assert draws.dtype == torch.long and draws.shape == (20000,)
    assert 0 <= draws.min() and draws.max() < 1000
    assert draws.double().mean().item() == pytest.approx(601, abs=10)
    again = sample_timesteps(weights, 20000, torch.Generator().manual_seed(15))
    assert torch.equal(draws, again)


def test_offset_noise_adds_a_per_channel_shift():
    latents = torch.zeros(64, 4, 64, 64, dtype=torch.float16)
    noise = offset_noise(latents, 0.1, torch.Generator().manual_seed(16))
    assert noise.shape == latents.shape and noise.dtype == torch.float16
    channel_means = noise.float().mean(dim=(2, 3))
    expected = math.sqrt(0.1**2 + 1 / (64 * 64))
    assert channel_means.std().item() == pytest.approx(expected, rel=0.15)
    plain = offset_noise(latents, 0.0, torch.Generator().manual_seed(16)).float()
    assert plain.mean(dim=(2, 3)).std().item() == pytest.approx(1 / 64, rel=0.15)
    assert plain.std().item() == pytest.approx(1.0, rel=0.01)


# ---------------------------------------------------------------------- what mutation testing found untested
def test_offset_noise_is_standard_noise_plus_offset_times_a_channel_shift_from_the_same_generator():
    latents = torch.zeros(2, 4, 8, 8)
    noise = offset_noise(latents, 0.25, torch.Generator().manual_seed(3))
    again = offset_noise(latents, 0.25, torch.Generator().manual_seed(3))
    assert torch.equal(noise, again)  # the generator decides every draw: a training run can be repeated
    generator = torch.Generator().manual_seed(3)
    plain = torch.randn(latents.shape, generator=generator)
    shift = torch.randn((2, 4, 1, 1), generator=generator)
    assert torch.allclose(noise, plain + 0.25 * shift)


def test_timestep_weights_and_draws_accept_their_extreme_values():
    assert timestep_weights(1).tolist() == [1.0]  # one training step: it is always drawn
    for t_dist in (-1.0, 1.0):  # the weights stay non-negative up to the ends
        assert (timestep_weights(10, t_dist) >= 0).all()
    with pytest.raises(ValueError, match="t_dist"):
        timestep_weights(10, 1.01)
    assert sample_timesteps(timestep_weights(10), 1).shape == (1,)


@pytest.mark.parametrize("prediction, target, mask", [
    ((2, 4, 8, 8), (2, 4, 8, 9), (2, 1, 8, 8)),  # prediction and target differ
    ((2, 4, 8, 8), (2, 4, 8, 8), (2, 2, 8, 8)),  # a mask with two channels
    ((2, 4, 8, 8), (2, 4, 8, 8), (3, 1, 8, 8)),  # a mask batch that is neither 1 nor the latents'
    ((2, 4, 8, 8), (2, 4, 8, 8), (2, 8, 8)),  # a mask without its channel
])
def test_masked_loss_refuses_shapes_that_do_not_match(prediction, target, mask):
    with pytest.raises(ValueError, match="must"):
        masked_diffusion_loss(torch.zeros(prediction), torch.zeros(target), torch.ones(mask))


def test_attention_alignment_refuses_negative_attention_even_with_a_valid_mask():
    attention = torch.rand(1, 4, 4)
    attention[0, 0, 0] = -0.1
    with pytest.raises(ValueError, match="non-negative"):
        attention_alignment_loss(attention, torch.rand(1, 4, 4))


def test_triplets_refuse_embeddings_of_other_shapes():
    anchors = torch.randn(2, 8)
    margins, object_margins = anchor_margins(anchors, torch.randn(8))
    with pytest.raises(ValueError, match="K, D"):
        anchor_margins(torch.randn(8))
    with pytest.raises(ValueError, match="object embedding"):
        anchor_margins(anchors, torch.randn(7))
    with pytest.raises(ValueError, match="K, D"):
        intrinsic_triplet(anchors, torch.randn(3, 8), margins, torch.randn(8), torch.randn(8), object_margins)
    with pytest.raises(ValueError):
        intrinsic_triplet(anchors, torch.randn(2, 8), margins[:1], torch.randn(8), torch.randn(8), object_margins)
    with pytest.raises(ValueError, match="object word and object token"):
        intrinsic_triplet(anchors, torch.randn(2, 8), margins, torch.randn(8), torch.randn(7), object_margins)
    with pytest.raises(ValueError, match="last dimension"):
        object_instance_triplet(torch.randn(8), torch.randn(7), torch.randn(8))
