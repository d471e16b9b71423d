"""Stage Two losses: masked diffusion loss, timestep and noise sampling, pooled-embedding triplets, and
attention alignment by a converged entropic Wasserstein distance.

Everything here is a small pure function of tensors; ``learn.py`` wires them into training steps.
Deliberate differences from the reference code (docs/DECISIONS.md, Stage Two) are documented where they
happen: the masked loss is normalised by mask area (``learn.py`` area-averages the masks to the latent grid
with ``imaging.resize_soft_mask``); triplets use cosine distances so margins can switch off, and never divide
by a count of active terms; phase-two margins need no word lookup, so an object word equal to an anchor word
just works (the reference fails with a KeyError); Sinkhorn anneals epsilon and iterates to a marginal
tolerance.
"""
from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F

# The reference's constants (its config.py and main_stage_two.py, lines as noted).
NOISE_OFFSET = 0.1  # config.py:109, noise_offset
TIMESTEP_T_DIST = 0.5  # config.py:110, t_dist of w(t) ∝ 1 - t_dist·cos(πt/T)
ANCHOR_MARGIN_SCALE = 0.7  # main_stage_two.py:403-420, margin = 0.7 · (distance between the words)

# Phase-one triplet margin, in cosine distance (1 - cos, range 0..2). Pooled CLIP text embeddings of
# different single nouns typically have cosine similarities around 0.75-0.9 (distances 0.1-0.25), so 0.1
# asks the instance token to sit at least as far from the category word as a neighbouring noun does,
# relative to the object token, without pushing it off the text manifold. The reference's γ = 0.05 acts on
# a per-dimension MSE of unit vectors (bounded by 4/1024 in SD 2.x), where it never lets the hinge close
# (§2.7c), so it cannot be translated; this margin is chosen to be attainable and to matter.
DEFAULT_TRIPLET_MARGIN = 0.1

# Masked diffusion loss: floor of the normalising mask area (in mask-weighted elements). It only decides
# the 0/0 case of an all-zero mask (the loss is then 0 with a zero gradient); any real mask has a far
# larger area, so it does not change the loss of a non-empty mask measurably.
MASK_AREA_FLOOR = 1e-8

# Sinkhorn defaults. The cost is measured in units of the grid side (grid_cost), so these hold at any
# attention resolution. epsilon = 1 % of the grid side keeps the entropic bias of <P, C> below ~2 % of the
# exact EMD on 6x6..16x16 grids (measured against an LP solver), with a few hundred iterations at most.
SINKHORN_EPSILON = 0.01
# Stop when the column-marginal error ||P^T 1 - nu||_1 (rows are exact after every update) is below this:
# at most 0.1 % of the mass is misplaced.
SINKHORN_TOLERANCE = 1e-3
# Upper bound on Sinkhorn updates (annealing included); typical solves on 8x8..32x32 grids need < 600.
SINKHORN_MAX_ITERATIONS = 2000
# Epsilon-scaling: epsilon starts at the cost diameter and is multiplied by this factor per update until
# it reaches the target (the usual halving schedule of annealed Sinkhorn solvers).
SINKHORN_ANNEALING_FACTOR = 0.5
# Over-relaxation of the potential updates (Thibault, Chizat, Dossal, Papadakis 2017, "Overrelaxed
# Sinkhorn-Knopp algorithm for regularized optimal transport": factors in (1, 2) speed up convergence).
# 1.5 cut the iterations about 2.5x in our measurements; larger factors sometimes oscillated. A safeguard
# falls back to plain updates when the marginal error stops decreasing.
SINKHORN_OVERRELAXATION = 1.5
# The convergence test needs a device sync; do it once per this many updates.
SINKHORN_CHECK_EVERY = 10
# A distribution's entries must sum to 1 within this before Sinkhorn (then they are renormalised exactly).
DISTRIBUTION_MASS_TOLERANCE = 1e-3


# ---------------------------------------------------------------------------------------------------
# Diffusion loss
# ---------------------------------------------------------------------------------------------------


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet should predict: the noise (epsilon models) or the velocity (v-prediction models)."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(
        f"Unsupported prediction type {prediction_type!r}; ICE trains epsilon or v-prediction Stable Diffusion "
        "models (SD 1.x, SD 2.x). Load one of those checkpoints."
    )


def masked_diffusion_loss(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Squared error weighted by a soft latent mask ``[B or 1, 1, h, w]``, normalised by mask area per item.

    Each item's loss is ``sum(mask · (prediction - target)²) / (channels · sum(mask))``, so a small object
    gets the same loss scale as a large one (the reference divides by the full latent size); the batch
    mean of those is returned. Computed in float32. An all-zero mask gives 0 with a zero gradient.
    """
    if prediction.shape != target.shape or prediction.ndim != 4:
        raise ValueError(
            f"Prediction and target must both be [B, C, h, w] latents of the same shape, got "
            f"{tuple(prediction.shape)} and {tuple(target.shape)}."
        )
    batch, channels, height, width = prediction.shape
    if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[0] not in (1, batch) or mask.shape[2:] != (height, width):
        raise ValueError(
            f"The mask must be [B or 1, 1, {height}, {width}] to match the latents {tuple(prediction.shape)}, got "
            f"{tuple(mask.shape)}; resize it with ice_ops.imaging.resize_soft_mask(mask, ({height}, {width}))."
        )
    mask = mask.float().expand(batch, 1, height, width)
    squared_error = (prediction.float() - target.float()).square()
    weighted = (squared_error * mask).sum(dim=(1, 2, 3))
    area = mask.sum(dim=(1, 2, 3)) * channels
    return (weighted / area.clamp_min(MASK_AREA_FLOOR)).mean()


def timestep_weights(num_train_timesteps: int, t_dist: float = TIMESTEP_T_DIST) -> torch.Tensor:
    """Sampling probabilities of t = 0..T-1, proportional to ``1 - t_dist·cos(πt/T)`` (the reference's
    timestep density).

    With t_dist = 0.5 the density rises from 0.5/T to 1.5/T, so E[t] ≈ T(1/2 + 2·t_dist/π²) ≈ 0.6 T.
    """
    if int(num_train_timesteps) != num_train_timesteps or num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be a positive integer, got {num_train_timesteps}.")
    if not -1.0 <= t_dist <= 1.0:
        raise ValueError(f"t_dist must lie in -1..1 so every weight is non-negative, got {t_dist}.")
    steps = torch.arange(int(num_train_timesteps), dtype=torch.float64)
    density = 1.0 - t_dist * torch.cos(math.pi * steps / num_train_timesteps)
    return (density / density.sum()).float()


def sample_timesteps(weights: torch.Tensor, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw ``batch`` timesteps independently (with replacement) from ``weights``, on the weights' device."""
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}.")
    return torch.multinomial(weights, int(batch), replacement=True, generator=generator)


def offset_noise(
    shape_like: torch.Tensor, offset: float = NOISE_OFFSET, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Gaussian noise shaped like latents ``[B, C, h, w]`` plus ``offset`` times a per-(item, channel)
    constant Gaussian shift (the reference's offset noise). Drawn on the generator's device, returned like the
    latents."""
    if shape_like.ndim != 4:
        raise ValueError(f"Expected latents shaped [B, C, h, w], got {tuple(shape_like.shape)}.")
    device = generator.device if generator is not None else shape_like.device
    batch, channels = shape_like.shape[:2]
    noise = torch.randn(shape_like.shape, generator=generator, device=device)
    shift = torch.randn((batch, channels, 1, 1), generator=generator, device=device)
    return (noise + offset * shift).to(device=shape_like.device, dtype=shape_like.dtype)


# ---------------------------------------------------------------------------------------------------
# Triplets on pooled embeddings
# ---------------------------------------------------------------------------------------------------


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``1 - cos(a, b)`` along the last dimension (0..2; any vector scale; zero vectors give 1, not NaN)."""
    return 1.0 - F.cosine_similarity(a, b, dim=-1)


def _pairwise_cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[K, M]`` matrix of cosine distances between the rows of ``a [K, D]`` and ``b [M, D]``."""
    return cosine_distance(a[:, None, :], b[None, :, :])


def object_instance_triplet(
    word: torch.Tensor,
    object_token: torch.Tensor,
    instance_token: torch.Tensor,
    margin: float = DEFAULT_TRIPLET_MARGIN,
) -> torch.Tensor:
    """Phase-one triplet: ``mean(relu(d(word, object) - d(word, instance) + margin))`` with d the cosine distance.

    Inputs are pooled embeddings ``[B, D]`` or ``[D]``. The object token is kept near its word and the instance
    token pushed away; the hinge is exactly 0 (zero gradient) once the instance token is ``margin`` farther
    from the word than the object token. Unlike the reference there is no division by a count of active
    terms (the reference's 0/0). At initialisation (all three equal) the loss is exactly ``margin``.
    """
    if not (word.shape[-1] == object_token.shape[-1] == instance_token.shape[-1]):
        raise ValueError(
            f"Embeddings must share their last dimension, got {tuple(word.shape)}, {tuple(object_token.shape)}, "
            f"{tuple(instance_token.shape)}."
        )
    hinge = cosine_distance(word, object_token) - cosine_distance(word, instance_token) + margin
    return F.relu(hinge).mean()


def anchor_margins(
    anchor_embeddings: torch.Tensor,
    object_embedding: torch.Tensor | None = None,
    scale: float = ANCHOR_MARGIN_SCALE,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Phase-two margins from the anchor words' own pooled embeddings (constants: returned detached).

    ``m[k, j] = scale · d(anchor_k, anchor_j)`` (zero diagonal) and, when an object embedding is given,
    ``m_obj[k] = scale · d(object_word, anchor_k)`` (else None). The reference uses 0.7 times an element-wise
    squared difference; this is the same idea as a cosine distance, and it is defined
    for every pair of embeddings, so an object word equal to an anchor word just gives a zero margin.
    """
    anchors = anchor_embeddings.detach()
    if anchors.ndim != 2 or anchors.shape[0] < 1:
        raise ValueError(f"Expected anchor embeddings [K, D] with K >= 1, got {tuple(anchors.shape)}.")
    margins = scale * _pairwise_cosine_distance(anchors, anchors)
    margins = margins * (1.0 - torch.eye(anchors.shape[0], device=anchors.device, dtype=margins.dtype))
    if object_embedding is None:
        return margins, None
    if object_embedding.shape != anchors.shape[1:]:
        raise ValueError(
            f"The object embedding must be [D] = [{anchors.shape[1]}], got {tuple(object_embedding.shape)}."
        )
    object_margins = scale * cosine_distance(object_embedding.detach()[None, :], anchors)
    return margins, object_margins


def intrinsic_triplet(
    anchors: torch.Tensor,
    intrinsic: torch.Tensor,
    margins: torch.Tensor,
    object_word: torch.Tensor,
    object_token: torch.Tensor,
    object_margins: torch.Tensor,
) -> torch.Tensor:
    """Phase-two triplet over K anchors (pooled embeddings ``A [K, D]``, intrinsic tokens ``T [K, D]``).

    Terms, all hinged with relu and averaged together (K·K terms, no division by a count of active terms):
    - for every k and j != k: ``d(A_k, T_k) - d(A_k, T_j) + margins[k, j]`` (each intrinsic token near its
      anchor word, away from the other anchors' tokens);
    - for every k: ``d(O, C) - d(O, T_k) + object_margins[k]`` with O the object word and C the object token
      (intrinsic tokens farther from the object word than the object token is).
    With K == 1 only the object term remains. The reference sums two separately averaged parts over kept
    positive terms only; averaging all terms keeps the scale independent of K.
    """
    if anchors.ndim != 2 or intrinsic.shape != anchors.shape:
        raise ValueError(
            f"Anchors and intrinsic tokens must both be [K, D], got {tuple(anchors.shape)} and "
            f"{tuple(intrinsic.shape)}."
        )
    count = anchors.shape[0]
    if margins.shape != (count, count) or object_margins.shape != (count,):
        raise ValueError(
            f"Margins must be [{count}, {count}] and object margins [{count}] (see anchor_margins), got "
            f"{tuple(margins.shape)} and {tuple(object_margins.shape)}."
        )
    if object_word.shape != anchors.shape[1:] or object_token.shape != anchors.shape[1:]:
        raise ValueError(
            f"The object word and object token must be [D] = [{anchors.shape[1]}], got "
            f"{tuple(object_word.shape)} and {tuple(object_token.shape)}."
        )
    to_tokens = _pairwise_cosine_distance(anchors, intrinsic)  # [k, j] = d(A_k, T_j)
    own = to_tokens.diagonal()[:, None]
    off_diagonal = ~torch.eye(count, dtype=torch.bool, device=anchors.device)
    anchor_terms = F.relu(own - to_tokens + margins)[off_diagonal]
    object_terms = F.relu(
        cosine_distance(object_word, object_token) - cosine_distance(object_word[None, :], intrinsic) + object_margins
    )
    return torch.cat([anchor_terms, object_terms]).mean()


# ---------------------------------------------------------------------------------------------------
# Attention alignment: entropic optimal transport on the attention grid
# ---------------------------------------------------------------------------------------------------


def grid_cost(h: int, w: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[h·w, h·w]`` Euclidean distances between cell centres (row-major), in units of the longer grid side,
    so transport costs do not depend on the attention resolution (the reference uses pixel units)."""
    if h < 1 or w < 1:
        raise ValueError(f"The grid must have positive sides, got {h}x{w}.")
    side = max(h, w)
    rows, cols = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    centres = (torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=-1) + 0.5) / side
    distances = torch.cdist(centres, centres, compute_mode="donot_use_mm_for_euclid_dist")
    return distances.to(device=device, dtype=dtype)  # built in float64 on the CPU (MPS has no float64)


class SinkhornSolution(NamedTuple):
    """Dual potentials of an entropic OT problem; the plan is ``mu_i nu_j exp((f_i + g_j - C_ij) / epsilon)``."""

    f: torch.Tensor  # [B, N], potential of the source mu
    g: torch.Tensor  # [B, N], potential of the target nu
    marginal_error: float  # max over the batch of ||P^T 1 - nu||_1 (rows are exact)
    iterations: int


def _soft_c_transform(potential: torch.Tensor, log_weights: torch.Tensor, cost: torch.Tensor, epsilon: float):
    """``-epsilon · LSE_j(log w_j + (potential_j - cost_ij) / epsilon)`` for every i, batched over rows."""
    exponent = (log_weights + potential / epsilon)[:, None, :] - cost[None] / epsilon
    return -epsilon * torch.logsumexp(exponent, dim=-1)


def sinkhorn_potentials(
    mu: torch.Tensor,
    nu: torch.Tensor,
    cost: torch.Tensor,
    *,
    epsilon: float = SINKHORN_EPSILON,
    max_iterations: int = SINKHORN_MAX_ITERATIONS,
    tolerance: float = SINKHORN_TOLERANCE,
) -> SinkhornSolution:
    """Log-domain Sinkhorn with epsilon-scaling for distributions ``mu, nu [B, N]`` and ``cost [N, N]``.

    Epsilon starts at the cost diameter and halves per update down to ``epsilon``; then over-relaxed
    updates (falling back to plain ones, see SINKHORN_OVERRELAXATION) continue at ``epsilon`` until the
    column-marginal error is below ``tolerance`` or ``max_iterations`` updates (annealing included) are
    spent. Zero-mass entries are exact (their log weight is -inf); their potentials are the soft
    c-transforms, which stay finite. No autograd: see :func:`sinkhorn_distance`.
    """
    if not (epsilon > 0 and tolerance > 0 and max_iterations >= 1):
        raise ValueError(
            f"Sinkhorn needs epsilon > 0, tolerance > 0 and max_iterations >= 1, got {epsilon}, {tolerance}, "
            f"{max_iterations}."
        )
    with torch.no_grad():
        log_mu, log_nu = mu.log(), nu.log()
        f = torch.zeros_like(mu)
        g = torch.zeros_like(nu)
        current = max(float(cost.max()), epsilon)
        iterations = 0
        while True:  # annealing; its last update is at epsilon itself, so f = c-transform of g at epsilon
            g = _soft_c_transform(f, log_mu, cost.T, current)
            f = _soft_c_transform(g, log_nu, cost, current)
            iterations += 1
            if current <= epsilon or iterations >= max_iterations:
                break
            current = max(current * SINKHORN_ANNEALING_FACTOR, epsilon)
        if current > epsilon:  # max_iterations ran out while annealing
            return SinkhornSolution(f, g, math.inf, iterations)
        previous_error = math.inf
        relaxation = SINKHORN_OVERRELAXATION
        step = 0
        while True:
            g_next = _soft_c_transform(f, log_mu, cost.T, epsilon)
            if step % SINKHORN_CHECK_EVERY == 0 or iterations >= max_iterations:
                # f is the exact c-transform of g here, so rows are exact and the columns of the plan
                # (f, g) sum to nu_j exp((g_j - g_next_j) / epsilon).
                column_mass = torch.exp(log_nu + (g - g_next) / epsilon)
                error = float((column_mass - nu).abs().sum(dim=-1).max())
                if error < tolerance or iterations >= max_iterations:
                    break
                if error >= previous_error:
                    relaxation = 1.0  # safeguard: plain Sinkhorn always converges
                previous_error = error
            g = g + relaxation * (g_next - g)
            f_next = _soft_c_transform(g, log_nu, cost, epsilon)
            iterations += 1
            step += 1
            exact_rows = step % SINKHORN_CHECK_EVERY == 0 or iterations >= max_iterations
            f = f_next if exact_rows else f + relaxation * (f_next - f)
        return SinkhornSolution(f, g, error, iterations)


class _EntropicTransportCost(torch.autograd.Function):
    """``<P, C>`` of the plan given by converged potentials; the backward pass returns the centred dual
    potentials (envelope theorem: the gradient of the entropic OT value, which differs from the gradient of
    <P, C> only by the entropy term's O(epsilon) share). Centring removes the component along the all-ones
    direction, so a gradient step keeps the total mass. No autograd runs through the iterations."""

    @staticmethod
    def forward(ctx, mu, nu, cost, f, g, epsilon):
        log_plan = (
            mu.log()[:, :, None] + nu.log()[:, None, :] + (f[:, :, None] + g[:, None, :] - cost[None]) / epsilon
        )
        ctx.save_for_backward(f - f.mean(dim=-1, keepdim=True), g - g.mean(dim=-1, keepdim=True))
        return (log_plan.exp() * cost[None]).sum(dim=(1, 2))

    @staticmethod
    def backward(ctx, grad_output):
        f_centred, g_centred = ctx.saved_tensors
        return grad_output[:, None] * f_centred, grad_output[:, None] * g_centred, None, None, None, None


def _check_distributions(mu: torch.Tensor, nu: torch.Tensor, cost: torch.Tensor) -> None:
    if mu.ndim != 2 or mu.shape != nu.shape or cost.shape != (mu.shape[1], mu.shape[1]):
        raise ValueError(
            f"Expected mu and nu [B, N] and cost [N, N], got {tuple(mu.shape)}, {tuple(nu.shape)}, "
            f"{tuple(cost.shape)}."
        )
    # Rounding a non-negative vector to its dtype changes its sum by at most eps/2 relative (bf16: 0.4 %).
    allowed = max(DISTRIBUTION_MASS_TOLERANCE, torch.finfo(mu.dtype).eps, torch.finfo(nu.dtype).eps)
    both = torch.stack([mu.detach().float(), nu.detach().float()])
    mass_ok = ((both.sum(dim=-1) - 1.0).abs() <= allowed).all()
    if not bool(mass_ok & (both >= 0).all() & torch.isfinite(both).all()):
        raise ValueError(
            "Every row of mu and nu must be a probability distribution (finite, non-negative, summing to 1); "
            "for maps that may be empty or unnormalised use attention_alignment_loss."
        )


def sinkhorn_distance(
    mu: torch.Tensor,
    nu: torch.Tensor,
    cost: torch.Tensor,
    *,
    epsilon: float = SINKHORN_EPSILON,
    max_iterations: int = SINKHORN_MAX_ITERATIONS,
    tolerance: float = SINKHORN_TOLERANCE,
) -> torch.Tensor:
    """Entropic Wasserstein transport cost ``<P, C>`` ``[B]`` between distributions ``mu, nu [B, N]``.

    The plan is converged (see :func:`sinkhorn_potentials`), unlike the reference's fixed 200 iterations at
    epsilon 1e-3 in pixel units, which stop far from the optimum (docs/DECISIONS.md, Stage Two, Sinkhorn).
    The returned
    value excludes the entropy term. Gradients w.r.t. mu and nu are the centred dual potentials (custom
    autograd; see ``_EntropicTransportCost``); ``cost`` is treated as a constant. Computed in at least
    float32 with autocast off. Warns (RuntimeWarning) if ``max_iterations`` ran out first.
    """
    _check_distributions(mu, nu, cost)
    dtype = torch.promote_types(torch.promote_types(mu.dtype, nu.dtype), torch.float32)
    with torch.autocast(device_type=mu.device.type, enabled=False):
        mu = mu.to(dtype)
        nu = nu.to(dtype)
        mu = mu / mu.sum(dim=-1, keepdim=True)  # remove rounding error only; the mass was checked above
        nu = nu / nu.sum(dim=-1, keepdim=True)
        cost = cost.detach().to(device=mu.device, dtype=dtype)
        solution = sinkhorn_potentials(
            mu.detach(), nu.detach(), cost, epsilon=epsilon, max_iterations=max_iterations, tolerance=tolerance
        )
        if solution.marginal_error >= tolerance:
            warnings.warn(
                f"Sinkhorn stopped after {solution.iterations} updates with marginal error "
                f"{solution.marginal_error:.2g} (tolerance {tolerance:g}); raise max_iterations or epsilon.",
                RuntimeWarning,
                stacklevel=2,
            )
        return _EntropicTransportCost.apply(mu, nu, cost, solution.f, solution.g, epsilon)


def attention_alignment_loss(attention: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the Wasserstein distance between a mask ``[B, h, w]`` and attention ``[B, h, w]``.

    Both are normalised to distributions on the grid (cost in units of the grid side, :func:`grid_cost`).
    Items whose mask or attention has no mass contribute 0 with a zero, finite gradient (the reference
    returns NaN for an empty mask).
    """
    if attention.ndim != 3 or mask.shape != attention.shape:
        raise ValueError(
            f"Attention and mask must both be [B, h, w] at the same size, got {tuple(attention.shape)} and "
            f"{tuple(mask.shape)}; resize the mask to the attention grid first."
        )
    batch, height, width = attention.shape
    with torch.autocast(device_type=attention.device.type, enabled=False):
        attention = attention.float().reshape(batch, -1)
        mask = mask.to(device=attention.device, dtype=torch.float32).reshape(batch, -1)
        if bool((attention.detach() < 0).any() | (mask.detach() < 0).any()):
            raise ValueError("Attention maps and masks must be non-negative.")
        attention_mass = attention.sum(dim=-1, keepdim=True)
        mask_mass = mask.sum(dim=-1, keepdim=True)
        valid = (attention_mass > 0) & (mask_mass > 0)
        uniform = torch.full_like(attention, 1.0 / attention.shape[1])
        one = torch.ones_like(attention_mass)
        nu = torch.where(valid, attention / torch.where(valid, attention_mass, one), uniform)
        mu = torch.where(valid, mask / torch.where(valid, mask_mass, one), uniform)
        cost = grid_cost(height, width, device=attention.device)
        distances = sinkhorn_distance(mu, nu, cost)
        return (distances * valid[:, 0].float()).sum() / batch
