"""capture_attention on the tiny UNet: grids, probabilities, restoration, output equality, gradients."""
from __future__ import annotations

import pytest
import torch

from ice_ops.attention import capture_attention

TIMESTEP = torch.tensor([150])
PROMPTS = ["a cat things background", "a red vase"]


def _inputs(bundle, height=16, width=16, batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(batch, bundle.unet.config.in_channels, height, width, generator=generator)
    context = bundle.encode_prompt(PROMPTS[:batch])
    return latent, context


def _processors(unet):
    return dict(unet.attn_processors)


@pytest.fixture(scope="module", params=[((32, 32), 2), ((32, 24), 1)], ids=["square", "non-square"])
def full_capture(request, tiny_bundle):
    """One plain and one captured UNet call (all 77 token columns, chunks that do not divide the grid);
    the 32x32 latent is what the tiny model makes of a 64x64 image."""
    latent_hw, batch = request.param
    latent, context = _inputs(tiny_bundle, *latent_hw, batch=batch)
    unet = tiny_bundle.unet
    with torch.no_grad():
        plain = unet(latent, TIMESTEP, encoder_hidden_states=context).sample
        with capture_attention(unet, cross_positions=list(range(context.shape[1])), query_chunk=100) as store:
            captured = unet(latent, TIMESTEP, encoder_hidden_states=context).sample
    return latent_hw, latent, context, plain, captured, store


def test_every_grid_is_recorded_with_distributions_as_rows(full_capture):
    (height, width), latent, context, _plain, _captured, store = full_capture
    batch = latent.shape[0]
    grids = [(height, width), (height // 2, width // 2), (height // 4, width // 4)]
    assert sorted(store.self_maps) == sorted(grids)
    assert sorted(store.cross_maps) == sorted(grids)
    # tiny UNet: one down layer + two up layers at the two finest grids, the mid block at the coarsest
    assert [store.self_counts[g] for g in grids] == [3, 3, 1]
    for h, w in grids:
        self_maps = store.self_maps[(h, w)]
        assert self_maps.shape == (batch, h * w, h * w) and self_maps.dtype == torch.float32
        torch.testing.assert_close(self_maps.sum(-1), torch.ones(batch, h * w), atol=1e-5, rtol=0)
        cross = store.cross_maps[(h, w)]
        assert cross.shape == (batch, h * w, context.shape[1])
        torch.testing.assert_close(cross.sum(-1), torch.ones(batch, h * w), atol=1e-5, rtol=0)
    if batch == 2:  # the two prompts differ, so their cross-attention differs
        assert not torch.allclose(store.cross_maps[grids[1]][0], store.cross_maps[grids[1]][1])


def test_capture_does_not_change_the_unet_output(full_capture):
    _hw, _latent, _context, plain, captured, _store = full_capture
    torch.testing.assert_close(captured, plain, atol=1e-4, rtol=0)


def test_chosen_cross_positions_are_columns_of_the_full_softmax(tiny_bundle, full_capture):
    _hw, latent, context, _plain, _captured, full = full_capture
    with torch.no_grad(), capture_attention(tiny_bundle.unet, record_self=False, cross_positions=[2, 1]) as chosen:
        tiny_bundle.unet(latent, TIMESTEP, encoder_hidden_states=context)
    assert chosen.self_maps == {}
    assert chosen.cross_maps.keys() == full.cross_maps.keys()
    for grid, maps in chosen.cross_maps.items():
        assert maps.shape[-1] == 2
        torch.testing.assert_close(maps, full.cross_maps[grid][..., [2, 1]], atol=1e-6, rtol=0)


def test_chunk_size_does_not_change_the_maps(tiny_bundle, full_capture):
    _hw, latent, context, _plain, _captured, small_chunks = full_capture
    with torch.no_grad(), capture_attention(tiny_bundle.unet, query_chunk=4096) as whole:
        tiny_bundle.unet(latent, TIMESTEP, encoder_hidden_states=context)
    for grid, maps in whole.self_maps.items():
        torch.testing.assert_close(small_chunks.self_maps[grid], maps, atol=1e-6, rtol=1e-5)


def test_recorded_self_attention_is_the_head_mean_softmax(tiny_bundle):
    unet = tiny_bundle.unet
    latent, context = _inputs(tiny_bundle, batch=1)
    layer = unet.mid_block.attentions[0].transformer_blocks[0].attn1
    seen = {}
    handle = layer.register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0]))
    try:
        with torch.no_grad(), capture_attention(unet, downsample_factors={4}) as store:
            unet(latent, TIMESTEP, encoder_hidden_states=context)
    finally:
        handle.remove()
    with torch.no_grad():
        x = seen["x"]
        heads = layer.heads
        q = layer.to_q(x).view(1, -1, heads, x.shape[-1] // heads).transpose(1, 2)
        k = layer.to_k(x).view(1, -1, heads, x.shape[-1] // heads).transpose(1, 2)
        expected = (q @ k.transpose(-1, -2) * layer.scale).softmax(-1).mean(1)
    assert list(store.self_maps) == [(4, 4)]  # the mid block of a 16x16 latent
    torch.testing.assert_close(store.self_maps[(4, 4)], expected, atol=1e-6, rtol=1e-5)


def test_capture_honours_an_encoder_attention_mask(tiny_bundle):
    latent, context = _inputs(tiny_bundle)
    mask = torch.ones(2, context.shape[1])
    mask[:, 6:] = 0
    unet = tiny_bundle.unet
    with torch.no_grad():
        plain = unet(latent, TIMESTEP, encoder_hidden_states=context, encoder_attention_mask=mask).sample
        unmasked = unet(latent, TIMESTEP, encoder_hidden_states=context).sample
        with capture_attention(unet, cross_positions=[1, 7]) as store:
            captured = unet(latent, TIMESTEP, encoder_hidden_states=context, encoder_attention_mask=mask).sample
    assert not torch.allclose(plain, unmasked, atol=1e-4)
    torch.testing.assert_close(captured, plain, atol=1e-4, rtol=0)
    for maps in store.cross_maps.values():
        assert float(maps[..., 1].abs().max()) == 0.0  # position 7 is masked out


def test_processors_are_restored_after_an_exception(tiny_bundle):
    unet = tiny_bundle.unet
    before = _processors(unet)
    hooks_before = len(unet._forward_pre_hooks)
    latent, context = _inputs(tiny_bundle)
    with pytest.raises(RuntimeError, match="boom"):
        with capture_attention(unet, cross_positions=[1]):
            during = _processors(unet)
            assert all(during[name] is not before[name] for name in before)
            unet(latent, TIMESTEP, encoder_hidden_states=context)
            raise RuntimeError("boom")
    after = _processors(unet)
    assert after.keys() == before.keys()
    assert all(after[name] is before[name] for name in before)
    assert len(unet._forward_pre_hooks) == hooks_before


def test_downsample_factors_restrict_recording_and_leave_other_layers_alone(tiny_bundle):
    unet = tiny_bundle.unet
    before = _processors(unet)
    latent, context = _inputs(tiny_bundle)
    with torch.no_grad(), capture_attention(unet, cross_positions=[1], downsample_factors={2}) as store:
        during = _processors(unet)
        unet(latent, TIMESTEP, encoder_hidden_states=context)
    assert list(store.self_maps) == [(8, 8)] and list(store.cross_maps) == [(8, 8)]
    replaced = {name for name in before if during[name] is not before[name]}
    assert replaced and all(name.startswith(("down_blocks.1.", "up_blocks.1.")) for name in replaced)
    assert all(during[name] is before[name] for name in before if name not in replaced)


def test_cross_only_capture_keeps_self_attention_processors(tiny_bundle):
    unet = tiny_bundle.unet
    before = _processors(unet)
    with capture_attention(unet, record_self=False, cross_positions=[1]):
        during = _processors(unet)
    assert all((during[n] is before[n]) == n.endswith("attn1.processor") for n in before)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"downsample_factors": {3}}, "downsample factors"),
        ({"cross_positions": []}, "cross_positions"),
        ({"cross_positions": [-1]}, "non-negative"),
        ({"record_self": False}, "Nothing to record"),
        ({"query_chunk": 0}, "query_chunk"),
    ],
)
def test_bad_arguments_raise_value_errors(tiny_bundle, kwargs, message):
    before = _processors(tiny_bundle.unet)
    with pytest.raises(ValueError, match=message):
        with capture_attention(tiny_bundle.unet, **kwargs):
            pass
    assert all(_processors(tiny_bundle.unet)[n] is p for n, p in before.items())


def test_cross_position_beyond_the_prompt_raises(tiny_bundle):
    latent, context = _inputs(tiny_bundle)
    with pytest.raises(ValueError, match="beyond"):
        with torch.no_grad(), capture_attention(tiny_bundle.unet, cross_positions=[context.shape[1]]):
            tiny_bundle.unet(latent, TIMESTEP, encoder_hidden_states=context)


def test_keep_graph_gives_gradients_to_text_embeddings(tiny_bundle):
    latent, context = _inputs(tiny_bundle, batch=1)
    unet = tiny_bundle.unet
    embeddings = context.clone().requires_grad_(True)
    with capture_attention(
        unet, record_self=False, cross_positions=[1, 2], downsample_factors={2}, keep_graph=True
    ) as store:
        unet(latent, TIMESTEP, encoder_hidden_states=embeddings)
    target = torch.zeros(8 * 8, 1)
    target[:32] = 1.0
    loss = ((store.cross_maps[(8, 8)][0] - target) ** 2).sum()
    loss.backward()
    assert embeddings.grad is not None
    assert float(embeddings.grad[0, 1].abs().sum()) > 0 and float(embeddings.grad[0, 2].abs().sum()) > 0

    with torch.enable_grad(), capture_attention(unet, cross_positions=[1], downsample_factors={2}) as detached:
        unet(latent, TIMESTEP, encoder_hidden_states=context.clone().requires_grad_(True))
    assert not detached.cross_maps[(8, 8)].requires_grad
    assert not detached.self_maps[(8, 8)].requires_grad


def test_clear_empties_the_store(tiny_bundle):
    latent, context = _inputs(tiny_bundle)
    with torch.no_grad(), capture_attention(tiny_bundle.unet, cross_positions=[1]) as store:
        tiny_bundle.unet(latent, TIMESTEP, encoder_hidden_states=context)
        store.clear()
        assert store.self_maps == {} and store.cross_maps == {} and store.self_counts == {}
        tiny_bundle.unet(latent[:1], TIMESTEP, encoder_hidden_states=context[:1])
    assert store.self_maps[(16, 16)].shape[0] == 1


def test_a_chunk_that_runs_out_of_memory_is_retried_smaller_with_the_same_maps(tiny_bundle, full_capture, monkeypatch):
    """On a GPU that is nearly full, Stage One's capture halves its query chunks instead of failing."""
    import ice_ops.attention as attention_module

    _hw, latent, context, _plain, _captured, reference = full_capture
    real = attention_module._attend_rows
    sizes = []

    def short_of_memory(query_rows, *args):
        sizes.append(query_rows.shape[2])
        if query_rows.shape[2] > 64:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(query_rows, *args)

    monkeypatch.setattr(attention_module, "_attend_rows", short_of_memory)
    with torch.no_grad(), capture_attention(tiny_bundle.unet, query_chunk=1024) as store:
        tiny_bundle.unet(latent, TIMESTEP, encoder_hidden_states=context)
    assert max(sizes) > 64 and 64 in sizes
    for grid, maps in reference.self_maps.items():
        torch.testing.assert_close(store.self_maps[grid], maps, atol=1e-6, rtol=1e-5)


def test_running_out_of_memory_at_one_query_is_raised(tiny_bundle, monkeypatch):
    import ice_ops.attention as attention_module

    def never_fits(*args):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(attention_module, "_attend_rows", never_fits)
    latent, context = _inputs(tiny_bundle, batch=1)
    with pytest.raises(torch.OutOfMemoryError), torch.no_grad(), capture_attention(tiny_bundle.unet):
        tiny_bundle.unet(latent, TIMESTEP, encoder_hidden_states=context)
