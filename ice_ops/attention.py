"""Attention capture for a diffusers ``UNet2DConditionModel``.

:func:`capture_attention` swaps the attention processors of the chosen layers for a processor that
computes attention explicitly (so the softmax probabilities exist), records head-averaged maps into an
:class:`AttentionStore`, and puts the original processor objects back when the block ends, also after an
exception. Layers that record nothing keep their original processor (PyTorch SDPA) untouched.

Grids are never hard-coded: a forward pre-hook on the UNet records the latent's ``(H, W)`` and a layer with
``N`` queries is placed on the grid ``(ceil(H/f), ceil(W/f))`` (or ``(H//f, W//f)``) whose area is ``N``, for a
power of two ``f``. This works for non-square latents. Which layers sit at which factor ``f`` is read from the
UNet's block structure (``down_blocks.i`` / ``mid_block`` / ``up_blocks.i`` and their down/upsamplers).

Self-attention probabilities are computed ``query_chunk`` queries at a time, softmax in fp32, and the head
mean is accumulated into the store per chunk (a running mean over layers, updated in place); the layer's
output is ``probs @ V`` from the same probabilities, so recording changes the UNet output only by float
rounding. Self maps are always detached. Cross maps keep the autograd graph when ``keep_graph=True`` (the
Stage Two attention loss backpropagates through them into token embeddings).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from collections.abc import Collection, Iterator, Sequence

import torch
import torch.nn.functional as F

from .defaults import Grid

# SD 1.5 at 512^2 has 4096 queries per layer: 1024 queries x 4096 keys x 8 heads in fp32 is 128 MiB per chunk.
DEFAULT_QUERY_CHUNK = 1024

# Processors that compute plain scaled-dot-product attention around the same projections; the capture
# processor reproduces exactly what they compute, so it may stand in for them.
REPLACEABLE_PROCESSORS = frozenset(
    {"AttnProcessor", "AttnProcessor2_0", "XFormersAttnProcessor", "SlicedAttnProcessor", "AttnProcessorNPU"}
)



@dataclass
class AttentionStore:
    """Head-averaged attention probabilities, averaged over the recorded layer calls at each grid.

    ``self_maps[(h, w)]`` is ``[B, h*w, h*w]`` float32 (rows: query pixels in row-major order, each row a
    distribution over key pixels). ``cross_maps[(h, w)]`` is ``[B, h*w, P]`` float32: the softmax over all text
    keys, then the ``P`` chosen token columns. ``self_counts`` / ``cross_counts`` give how many layer calls
    each average holds (several UNet calls inside one block are averaged together; ``clear()`` in between to
    keep them apart).
    """

    self_maps: dict[Grid, torch.Tensor] = field(default_factory=dict)
    cross_maps: dict[Grid, torch.Tensor] = field(default_factory=dict)
    self_counts: dict[Grid, int] = field(default_factory=dict)
    cross_counts: dict[Grid, int] = field(default_factory=dict)

    def clear(self) -> None:
        """Forget every recorded map."""
        self.self_maps.clear()
        self.cross_maps.clear()
        self.self_counts.clear()
        self.cross_counts.clear()

    def _begin_self_layer(self, grid: Grid, batch: int, queries: int, device: torch.device) -> tuple[torch.Tensor, int]:
        """The running-mean buffer for ``grid`` (created on first use) and this layer's 1-based count."""
        count = self.self_counts.get(grid, 0) + 1
        if count == 1:
            self.self_maps[grid] = torch.zeros(batch, queries, queries, dtype=torch.float32, device=device)
        else:
            _check_batch(self.self_maps[grid], batch, grid)
        self.self_counts[grid] = count
        return self.self_maps[grid], count

    def _add_cross_layer(self, grid: Grid, maps: torch.Tensor) -> None:
        """Fold one layer's ``[B, N, P]`` maps into the running mean (out of place, so graphs stay valid)."""
        count = self.cross_counts.get(grid, 0) + 1
        if count == 1:
            self.cross_maps[grid] = maps
        else:
            previous = self.cross_maps[grid]
            _check_batch(previous, maps.shape[0], grid)
            self.cross_maps[grid] = previous + (maps - previous) / count
        self.cross_counts[grid] = count


def _check_batch(existing: torch.Tensor, batch: int, grid: Grid) -> None:
    if existing.shape[0] != batch:
        raise ValueError(
            f"Attention at grid {grid} was recorded for a batch of {existing.shape[0]} and now arrives with a batch "
            f"of {batch}; call store.clear() between UNet calls with different batch sizes."
        )


@dataclass
class _QueryChunk:
    """Queries per self-attention chunk, shared by a capture's layers (it shrinks when memory runs out)."""

    size: int


@dataclass
class _LatentSize:
    """The (H, W) of the latent of the UNet call in progress, written by the UNet's forward pre-hook."""

    hw: Grid | None = None


def candidate_grids(latent_hw: Grid) -> list[Grid]:
    """Grids a UNet can reach from a latent of ``latent_hw`` by halving: for every power of two ``f`` the
    strided-conv size ``(ceil(H/f), ceil(W/f))`` and the pooling size ``(H//f, W//f)``, finest first."""
    height, width = latent_hw
    grids: list[Grid] = []
    factor = 1
    while factor <= max(height, width):
        for grid in ((-(-height // factor), -(-width // factor)), (height // factor, width // factor)):
            if min(grid) > 0 and grid not in grids:
                grids.append(grid)
        factor *= 2
    return grids


def grid_for_queries(latent_hw: Grid, queries: int) -> Grid:
    """The grid of ``queries`` pixels reached from ``latent_hw`` (see :func:`candidate_grids`)."""
    for grid in candidate_grids(latent_hw):
        if grid[0] * grid[1] == queries:
            return grid
    raise ValueError(
        f"An attention layer has {queries} queries, which is no downsampled grid of the {latent_hw[0]}x"
        f"{latent_hw[1]} latent; capture_attention supports UNets that halve the latent between levels."
    )


def attention_layer_factors(unet) -> dict[str, int | None]:
    """Each ``Attention`` module's name -> its downsampling factor relative to the latent, read from the
    block structure (``None`` for modules outside ``down_blocks`` / ``mid_block`` / ``up_blocks``)."""
    from diffusers.models.attention_processor import Attention

    down_steps = [getattr(block, "downsamplers", None) is not None for block in getattr(unet, "down_blocks", [])]
    up_steps = [getattr(block, "upsamplers", None) is not None for block in getattr(unet, "up_blocks", [])]
    deepest = sum(down_steps)
    factors: dict[str, int | None] = {}
    for name, module in unet.named_modules():
        if not isinstance(module, Attention):
            continue
        parts = name.split(".")
        if parts[0] == "mid_block":
            factors[name] = 2**deepest
        elif parts[0] == "down_blocks" and len(parts) > 1 and parts[1].isdigit():
            factors[name] = 2 ** sum(down_steps[: int(parts[1])])
        elif parts[0] == "up_blocks" and len(parts) > 1 and parts[1].isdigit():
            factors[name] = 2 ** (deepest - sum(up_steps[: int(parts[1])]))
        else:
            factors[name] = None
    return factors


class _CaptureProcessor:
    """Stands in for ``AttnProcessor2_0`` on one layer: same computation, with the probabilities recorded."""

    def __init__(
        self,
        store: AttentionStore,
        latent: _LatentSize,
        *,
        record_self: bool,
        cross_positions: list[int] | None,
        keep_graph: bool,
        query_chunk: "_QueryChunk",
    ) -> None:
        self.store = store
        self.latent = latent
        self.record_self = record_self
        self.cross_positions = cross_positions
        self.keep_graph = keep_graph
        self.chunk = query_chunk

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        spatial_grid = None
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            spatial_grid = (height, width)
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        is_cross = encoder_hidden_states is not None
        batch, queries, _ = hidden_states.shape
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        context = hidden_states
        if is_cross:
            context = encoder_hidden_states
            if attn.norm_cross:
                context = attn.norm_encoder_hidden_states(context)
        key = attn.to_k(context)
        value = attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        bias = _attention_bias(attn, attention_mask, key.shape[2], batch)

        if is_cross and self.cross_positions is not None:
            grid = spatial_grid or self._grid(queries)
            out = self._cross_attention(attn, query, key, value, bias, grid)
        elif not is_cross and self.record_self:
            grid = spatial_grid or self._grid(queries)
            out = self._chunked_self_attention(attn, query, key, value, bias, grid)
        else:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=attn.scale)

        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(residual.shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _grid(self, queries: int) -> Grid:
        if self.latent.hw is None:
            raise ValueError(
                "An attention layer ran outside a UNet call; capture_attention needs the UNet itself to be "
                "called so it can read the latent size."
            )
        return grid_for_queries(self.latent.hw, queries)

    def _chunked_self_attention(self, attn, query, key, value, bias, grid: Grid) -> torch.Tensor:
        """Self-attention ``query_chunk`` queries at a time. A chunk that runs out of device memory is tried
        again at half the size (down to one query), and the capture's later layers keep the smaller size."""
        batch, _, queries, _ = query.shape
        mean_maps, count = self.store._begin_self_layer(grid, batch, queries, query.device)
        keys_t = key.float().transpose(-1, -2)
        outputs = []
        start = 0
        while start < queries:
            stop = min(start + self.chunk.size, queries)
            try:
                probs, output = _attend_rows(query[:, :, start:stop], keys_t, value, attn.scale,
                                             bias if bias is None or bias.shape[2] == 1 else bias[:, :, start:stop])
            except torch.OutOfMemoryError:
                if self.chunk.size == 1:
                    raise
                self.chunk.size = smaller_chunk(self.chunk.size)
                _release_cached_memory(query.device)
                continue
            with torch.no_grad():
                rows = mean_maps[:, start:stop]
                rows.add_(probs.detach().mean(dim=1).sub_(rows).div_(count))
            outputs.append(output)
            start = stop
        return torch.cat(outputs, dim=2)

    def _cross_attention(self, attn, query, key, value, bias, grid: Grid) -> torch.Tensor:
        keys = key.shape[2]
        bad = [p for p in self.cross_positions if p >= keys]
        if bad:
            raise ValueError(
                f"cross_positions {bad} are beyond the {keys} text tokens the UNet was given; "
                f"use positions 0..{keys - 1}."
            )
        scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * attn.scale
        if bias is not None:
            scores = scores + bias
        probs = scores.softmax(dim=-1)
        chosen = probs.mean(dim=1)[..., self.cross_positions]
        self.store._add_cross_layer(grid, chosen if self.keep_graph else chosen.detach())
        return torch.matmul(probs.to(value.dtype), value)


def _attend_rows(query_rows, keys_t, value, scale: float, bias):
    """(probabilities in fp32, their output ``probs @ V``) for a block of query rows."""
    scores = torch.matmul(query_rows.float(), keys_t) * scale
    if bias is not None:
        scores = scores + bias
    probs = scores.softmax(dim=-1)
    return probs, torch.matmul(probs.to(value.dtype), value)


def smaller_chunk(chunk: int) -> int:
    """The query chunk to retry with after running out of memory: half, at least one query."""
    return max(1, chunk // 2)


def _release_cached_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _attention_bias(attn, attention_mask: torch.Tensor | None, keys: int, batch: int) -> torch.Tensor | None:
    """``attention_mask`` as an additive ``[B, heads, 1 or Nq, Nk]`` bias, prepared as ``AttnProcessor2_0``
    prepares it (boolean masks: ``True`` = may attend)."""
    if attention_mask is None:
        return None
    mask = attn.prepare_attention_mask(attention_mask, keys, batch)
    mask = mask.view(batch, attn.heads, -1, mask.shape[-1])
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(~mask, -math.inf)
    return mask.float()


def _check_cross_positions(cross_positions: Sequence[int] | None) -> list[int] | None:
    if cross_positions is None:
        return None
    positions = [int(p) for p in cross_positions]
    if not positions:
        raise ValueError("cross_positions is empty; give at least one token position, or None to skip cross attention.")
    if any(p < 0 for p in positions) or any(p != q for p, q in zip(positions, cross_positions)):
        raise ValueError(f"cross_positions must be non-negative integer token positions, got {list(cross_positions)}.")
    return positions


def _layers_to_record(
    factors: dict[str, int | None], is_cross: dict[str, bool], record_self: bool, record_cross: bool,
    downsample_factors: Collection[int] | None,
) -> list[str]:
    wanted = [name for name in factors if (record_cross if is_cross[name] else record_self)]
    if downsample_factors is None:
        return wanted
    chosen = {int(f) for f in downsample_factors}
    available = sorted({f for name, f in factors.items() if f is not None and name in wanted})
    missing = sorted(chosen - set(available))
    if missing:
        raise ValueError(
            f"No recorded attention layers at downsample factors {missing}; this UNet has them at {available}."
        )
    unplaced = [name for name in wanted if factors[name] is None]
    if unplaced:
        raise ValueError(
            f"Cannot tell the resolution of attention layers {unplaced[:3]}; use downsample_factors=None "
            "with this UNet."
        )
    return [name for name in wanted if factors[name] in chosen]


@contextlib.contextmanager
def capture_attention(
    unet,
    *,
    record_self: bool = True,
    cross_positions: Sequence[int] | None = None,
    downsample_factors: Collection[int] | None = None,
    keep_graph: bool = False,
    query_chunk: int = DEFAULT_QUERY_CHUNK,
) -> Iterator[AttentionStore]:
    """Record head-averaged attention of ``unet`` while the block runs; yields the :class:`AttentionStore`.

    ``record_self``: self-attention maps of every recorded layer. ``cross_positions``: token positions whose
    cross-attention columns are kept (None: cross attention is not recorded). ``downsample_factors``: only
    layers at these factors relative to the latent record (None: all), e.g. ``{4}`` for the 16x16 layers of
    SD at 512^2. ``keep_graph``: cross maps keep the autograd graph. ``query_chunk``: queries per chunk of the
    self-attention softmax (memory knob). The original processors are restored on exit, also after errors.
    """
    from diffusers.models.attention_processor import Attention

    positions = _check_cross_positions(cross_positions)
    if not record_self and positions is None:
        raise ValueError("Nothing to record: set record_self=True or give cross_positions.")
    if int(query_chunk) != query_chunk or query_chunk < 1:
        raise ValueError(f"query_chunk must be a positive integer, got {query_chunk!r}.")
    modules = {name: m for name, m in unet.named_modules() if isinstance(m, Attention)}
    if not modules:
        raise ValueError("This model has no diffusers Attention layers; pass a UNet2DConditionModel.")
    factors = attention_layer_factors(unet)
    is_cross = {name: bool(m.is_cross_attention) for name, m in modules.items()}
    names = _layers_to_record(factors, is_cross, record_self, positions is not None, downsample_factors)
    for name in names:
        kind = type(modules[name].processor).__name__
        if kind not in REPLACEABLE_PROCESSORS:
            raise ValueError(
                f"Attention layer {name} uses the processor {kind}, which capture_attention cannot stand in for "
                "(capture blocks cannot be nested); call unet.set_default_attn_processor() first."
            )

    store = AttentionStore()
    latent = _LatentSize()
    chunk = _QueryChunk(int(query_chunk))

    def remember_latent_size(_module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample")
        latent.hw = (int(sample.shape[-2]), int(sample.shape[-1]))

    originals = {name: modules[name].processor for name in names}
    handle = unet.register_forward_pre_hook(remember_latent_size, with_kwargs=True)
    try:
        for name in names:
            modules[name].set_processor(
                _CaptureProcessor(
                    store, latent, record_self=record_self, cross_positions=positions,
                    keep_graph=keep_graph, query_chunk=chunk,
                )
            )
        yield store
    finally:
        for name, processor in originals.items():
            modules[name].set_processor(processor)
        handle.remove()
