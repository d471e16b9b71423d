"""DiffusionBundle loading and the original-layout (single-file) writer in devtools.ldm_layout.

Single files are verified by round trip: a tiny model is written with ``save_single_file`` and read back
with diffusers' own LDM -> diffusers converters (inside ``DiffusionBundle.from_single_file``); every weight
must come back bit-identical. The tiny models keep the real text widths (768 for SD 1.x, 1024 for SD 2.x)
because that is what tells the two families apart, and are small everywhere else.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from ice_ops.bundle import (
    LDM_CROSS_ATTENTION_KEY,
    LDM_LAST_NORM_BIAS_KEY,
    LDM_UNET_PREFIX,
    LDM_VAE_PREFIX,
    V_PREDICTION_NORM_STD,
    DiffusionBundle,
    detect_family,
    detect_prediction_type,
)
from devtools.ldm_layout import (
    LDM_SD1_TEXT_PREFIX,
    LDM_SD2_TEXT_PREFIX,
    LDM_V_PREDICTION_KEY,
    bundle_to_ldm_state_dict,
    clip_text_to_ldm,
    save_single_file,
    unet_to_ldm,
    vae_to_ldm,
)
from ice_ops.text import END_OF_TEXT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_ROOT = os.path.join(ROOT, "ice_ops", "configs")
# The layout tests only move weights; a short vocabulary keeps the files small. These bundles are not for
# encoding prompts (their tokenizer knows 49408 tokens).
LAYOUT_TEST_VOCAB = 1000
SD1_WIDTH, SD2_WIDTH = 768, 1024

# Three levels, one layer each, 1x1-conv transformer projections: the SD 1.x pattern, shrunk.
SD1_LIKE_UNET = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [16, 32, 32],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": SD1_WIDTH,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}
# Four levels, two layers each, linear projections, per-level heads: the SD 2.x pattern, shrunk. Its last
# up level has cross-attention, so output_blocks.11 exists (the block the v-prediction rule reads).
SD2_LIKE_UNET = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [8, 16, 16, 16],
    "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": SD2_WIDTH,
    "attention_head_dim": [1, 2, 2, 2],
    "use_linear_projection": True,
    "norm_num_groups": 4,
}
SD1_LIKE_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [8, 16],
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "sample_size": 32,
    "scaling_factor": 0.18215,
}
SD2_LIKE_VAE = {**SD1_LIKE_VAE, "block_out_channels": [8, 8, 16], "layers_per_block": 2,
                "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3}
SMALL_TEXT = {
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "max_position_embeddings": 77,
    "vocab_size": LAYOUT_TEST_VOCAB,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
SD1_LIKE_TEXT = {**SMALL_TEXT, "hidden_size": SD1_WIDTH, "num_attention_heads": 12, "hidden_act": "quick_gelu",
                 "projection_dim": SD1_WIDTH}
SD2_LIKE_TEXT = {**SMALL_TEXT, "hidden_size": SD2_WIDTH, "num_attention_heads": 16, "hidden_act": "gelu",
                 "projection_dim": SD2_WIDTH}


# ---------------------------------------------------------------------------------------------- helpers
def build_bundle(unet_cfg: dict, vae_cfg: dict, text_cfg: dict, prediction: str, pad: str, seed: int):
    """A random bundle whose weights are all non-trivial (norm and bias tensors are perturbed too, so a
    swapped or zero-filled tensor cannot pass a round trip by accident)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ice_ops.text import build_clip_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(unet_cfg)
    vae = AutoencoderKL.from_config(vae_cfg)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    with torch.no_grad():
        for module in (unet, vae, text_encoder):
            for tensor in module.parameters():
                if tensor.ndim == 1:
                    tensor.add_(torch.randn_like(tensor) * 0.01)
    return DiffusionBundle.from_components(
        unet, vae, text_encoder, build_clip_tokenizer(pad_token=pad), prediction_type=prediction
    )


def write_config_dir(folder: str, unet_cfg: dict, vae_cfg: dict, text_cfg: dict) -> str:
    os.makedirs(folder, exist_ok=True)
    for name, config in (("unet", unet_cfg), ("vae", vae_cfg), ("text_encoder", text_cfg)):
        with open(os.path.join(folder, f"{name}.json"), "w", encoding="utf-8") as handle:
            json.dump(config, handle)
    return folder


def without_text_level(state: dict) -> dict:
    return {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in state.items()}


def assert_bit_identical(expected: dict, actual: dict, what: str) -> None:
    expected = {k: v for k, v in expected.items() if "position_ids" not in k}
    actual = {k: v for k, v in actual.items() if "position_ids" not in k}
    assert sorted(actual) == sorted(expected), f"{what}: key sets differ"
    different = [k for k in expected if actual[k].dtype != expected[k].dtype or not torch.equal(actual[k], expected[k])]
    assert not different, f"{what}: {len(different)} tensors differ, e.g. {different[:3]}"


def read_shipped_config(family: str, part: str) -> dict:
    with open(os.path.join(CONFIG_ROOT, family, f"{part}.json"), encoding="utf-8") as handle:
        return json.load(handle)


@pytest.fixture
def no_network(monkeypatch):
    """Every outgoing connection raises and is recorded; the hub libraries are told to stay offline."""
    attempts: list = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    return attempts


@pytest.fixture(scope="module")
def sd1_like():
    return build_bundle(SD1_LIKE_UNET, SD1_LIKE_VAE, SD1_LIKE_TEXT, "epsilon", END_OF_TEXT, seed=1)


@pytest.fixture(scope="module")
def sd2_like():
    return build_bundle(SD2_LIKE_UNET, SD2_LIKE_VAE, SD2_LIKE_TEXT, "v_prediction", "!", seed=2)


@pytest.fixture(scope="module")
def sd1_file(tmp_path_factory, sd1_like):
    folder = tmp_path_factory.mktemp("sd1_like")
    config_dir = write_config_dir(str(folder / "configs"), SD1_LIKE_UNET, SD1_LIKE_VAE, SD1_LIKE_TEXT)
    return save_single_file(sd1_like, str(folder / "sd1_like.safetensors")), config_dir


@pytest.fixture(scope="module")
def sd2_file(tmp_path_factory, sd2_like):
    folder = tmp_path_factory.mktemp("sd2_like")
    config_dir = write_config_dir(str(folder / "configs"), SD2_LIKE_UNET, SD2_LIKE_VAE, SD2_LIKE_TEXT)
    return save_single_file(sd2_like, str(folder / "sd2_like.safetensors")), config_dir


@pytest.fixture(scope="module")
def meta_models():
    """Full-size SD 1.x / 2.x modules from the shipped configs on the meta device (shapes, no memory)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    models = {}
    for family in ("sd1", "sd2"):
        text_cfg = {k: v for k, v in read_shipped_config(family, "text_encoder").items() if k != "architectures"}
        with torch.device("meta"):
            models[family] = SimpleNamespace(
                unet=UNet2DConditionModel.from_config(read_shipped_config(family, "unet")),
                vae=AutoencoderKL.from_config(read_shipped_config(family, "vae")),
                text_encoder=CLIPTextModel(CLIPTextConfig(**text_cfg)),
            )
    return models


# ---------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("which", ["sd1", "sd2"])
def test_single_file_round_trip_is_bit_identical_and_offline(which, request, no_network):
    bundle = request.getfixturevalue(f"{which}_like")
    path, config_dir = request.getfixturevalue(f"{which}_file")

    loaded = DiffusionBundle.from_single_file(path, config_dir=config_dir)

    assert no_network == [], "loading a single file tried to open a network connection"
    assert loaded.family == which
    assert loaded.prediction_type == bundle.prediction_type
    assert loaded.scheduler.config.prediction_type == bundle.prediction_type
    assert_bit_identical(bundle.unet.state_dict(), loaded.unet.state_dict(), "UNet")
    assert_bit_identical(bundle.vae.state_dict(), loaded.vae.state_dict(), "VAE")
    assert_bit_identical(
        without_text_level(bundle.text_encoder.state_dict()),
        without_text_level(loaded.text_encoder.state_dict()),
        "text encoder",
    )


def test_single_file_has_the_original_prefixes_and_shapes(sd1_like, sd2_like):
    sd1 = bundle_to_ldm_state_dict(sd1_like)
    sd2 = bundle_to_ldm_state_dict(sd2_like)
    assert detect_family(sd1) == "sd1" and detect_family(sd2) == "sd2"
    for state in (sd1, sd2):
        prefixes = {key.split(".")[0] for key in state if key != LDM_V_PREDICTION_KEY}
        assert prefixes == {"model", "first_stage_model", "cond_stage_model"}
    # SD 1.x: 1x1-conv transformer projections, Hugging Face CLIP under cond_stage_model.transformer.text_model.
    assert sd1[LDM_UNET_PREFIX + "input_blocks.1.1.proj_in.weight"].ndim == 4
    assert LDM_SD1_TEXT_PREFIX + "encoder.layers.1.self_attn.q_proj.weight" in sd1
    assert LDM_V_PREDICTION_KEY not in sd1
    # SD 2.x: linear projections, OpenCLIP with fused q/k/v, v-prediction marked.
    assert sd2[LDM_UNET_PREFIX + "input_blocks.1.1.proj_in.weight"].ndim == 2
    assert sd2[LDM_SD2_TEXT_PREFIX + "transformer.resblocks.1.attn.in_proj_weight"].shape == (3 * SD2_WIDTH, SD2_WIDTH)
    assert LDM_V_PREDICTION_KEY in sd2
    # The VAE mid-block attention is a 1x1 convolution in the original layout.
    for key in ("q", "k", "v", "proj_out"):
        assert sd1[f"{LDM_VAE_PREFIX}decoder.mid.attn_1.{key}.weight"].shape[2:] == (1, 1)


def test_from_pretrained_folder_offline_gives_identical_weights(tiny_bundle, tiny_diffusers_folder, no_network):
    loaded = DiffusionBundle.from_pretrained(tiny_diffusers_folder)

    assert no_network == [], "loading a diffusers folder tried to open a network connection"
    assert_bit_identical(tiny_bundle.unet.state_dict(), loaded.unet.state_dict(), "UNet")
    assert_bit_identical(tiny_bundle.vae.state_dict(), loaded.vae.state_dict(), "VAE")
    assert_bit_identical(
        without_text_level(tiny_bundle.text_encoder.state_dict()),
        without_text_level(loaded.text_encoder.state_dict()),
        "text encoder",
    )
    assert loaded.prediction_type == tiny_bundle.prediction_type


def test_network_guard_blocks_connections(no_network):
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", 9))
    assert len(no_network) == 1


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_full_size_layout_matches_diffusers_reader(family, meta_models):
    """Full SD configs (meta tensors): the written keys are the standard ones and diffusers' LDM reader
    maps every one of them back to the same diffusers key and shape."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    models = meta_models[family]
    unet, vae, text = models.unet.state_dict(), models.vae.state_dict(), models.text_encoder.state_dict()
    ldm_unet = unet_to_ldm(unet, models.unet.config)
    ldm_vae = vae_to_ldm(vae, models.vae.config)
    # Key counts and names of the original SD 1.x / 2.x checkpoints.
    assert (len(ldm_unet), len(ldm_vae)) == (686, 248)
    context = SD1_WIDTH if family == "sd1" else SD2_WIDTH
    assert ldm_unet["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape == (320, context)
    assert LDM_LAST_NORM_BIAS_KEY[len(LDM_UNET_PREFIX):] in ldm_unet
    for key in ("input_blocks.3.0.op.weight", "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight",
                "output_blocks.8.2.conv.weight", "middle_block.2.out_layers.3.weight", "out.2.weight"):
        assert key in ldm_unet, key
    assert ldm_vae["decoder.up.3.upsample.conv.weight"].shape[0] == 512  # decoder levels count from full size
    assert ldm_vae["decoder.up.0.block.0.nin_shortcut.weight"].shape[:2] == (128, 256)

    full = {LDM_UNET_PREFIX + k: v for k, v in ldm_unet.items()}
    full.update({LDM_VAE_PREFIX + k: v for k, v in ldm_vae.items()})
    full.update(clip_text_to_ldm(text, family))
    back = {
        "UNet": (unet, convert_ldm_unet_checkpoint(full, models.unet.config)),
        "VAE": (vae, convert_ldm_vae_checkpoint(full, models.vae.config)),
        "text": (
            text,
            convert_ldm_clip_checkpoint(full)
            if family == "sd1"
            else convert_open_clip_checkpoint(models.text_encoder, full),
        ),
    }
    for what, (original, converted) in back.items():
        converted = without_text_level(converted)
        original = without_text_level({k: v for k, v in original.items() if "position_ids" not in k})
        assert sorted(converted) == sorted(original), what
        assert all(converted[k].shape == original[k].shape for k in original), what


def test_open_clip_layout_loads_into_open_clip_and_computes_the_same():
    """The SD 2.x text layout is OpenCLIP's own: its TextTransformer loads it strictly and gives the same
    hidden states (and, with the identity projection, the same pooled output) as the Hugging Face model."""
    from open_clip.transformer import TextTransformer
    from transformers import CLIPTextConfig, CLIPTextModel

    width, heads, layers, mlp, vocab = 64, 4, 2, 128, 100
    torch.manual_seed(3)
    hf = CLIPTextModel(CLIPTextConfig(hidden_size=width, num_attention_heads=heads, num_hidden_layers=layers,
                                      intermediate_size=mlp, vocab_size=vocab, hidden_act="gelu",
                                      bos_token_id=0, eos_token_id=2, pad_token_id=1)).eval()
    with torch.no_grad():
        for tensor in hf.parameters():
            tensor.add_(torch.randn_like(tensor) * 0.02)
    ldm = clip_text_to_ldm(hf.state_dict(), "sd2")
    open_clip_model = TextTransformer(vocab_size=vocab, width=width, heads=heads, layers=layers,
                                      mlp_ratio=mlp / width, output_dim=width, output_tokens=True).eval()
    open_clip_model.load_state_dict({k[len(LDM_SD2_TEXT_PREFIX):]: v for k, v in ldm.items()}, strict=True)

    ids = torch.tensor([[0, 17, 42, 5, vocab - 1] + [1] * 72, [0, 8, vocab - 1] + [1] * 74])
    with torch.no_grad():
        pooled, tokens = open_clip_model(ids)
        reference = hf(ids)
    torch.testing.assert_close(tokens, reference.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, reference.pooler_output, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_text_layout_is_the_same_for_transformers_4_and_5_state_dicts(family, sd1_like, sd2_like):
    bundle = sd1_like if family == "sd1" else sd2_like
    bare = without_text_level(bundle.text_encoder.state_dict())  # transformers 5 form
    nested = {"text_model." + k: v for k, v in bare.items()}  # transformers 4 form
    from_bare, from_nested = clip_text_to_ldm(bare, family), clip_text_to_ldm(nested, family)
    assert sorted(from_bare) == sorted(from_nested)
    assert all(torch.equal(from_bare[k], from_nested[k]) for k in from_bare)
    prefix = LDM_SD1_TEXT_PREFIX if family == "sd1" else LDM_SD2_TEXT_PREFIX
    assert all(key.startswith(prefix) for key in from_bare)


# ---------------------------------------------------------------------------------------------- writer errors
def test_save_single_file_never_overwrites_silently(tmp_path, sd1_like, sd1_file):
    path, _ = sd1_file
    before = os.path.getmtime(path), os.path.getsize(path)
    with pytest.raises(ValueError, match="overwrite=True"):
        save_single_file(sd1_like, path)
    assert (os.path.getmtime(path), os.path.getsize(path)) == before

    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")
    save_single_file(sd1_like, str(target), overwrite=True)
    assert target.stat().st_size > len(b"old")
    assert os.listdir(tmp_path) == ["model.safetensors"], "the temporary file was left behind"


def test_save_single_file_rejects_bad_targets(tmp_path, sd1_like, tiny_bundle):
    with pytest.raises(ValueError, match="safetensors"):
        save_single_file(sd1_like, str(tmp_path / "model.ckpt"))
    with pytest.raises(ValueError, match="does not exist"):
        save_single_file(sd1_like, str(tmp_path / "missing" / "model.safetensors"))
    with pytest.raises(ValueError, match="diffusers folder"):  # 32-d text encoder: no single-file family
        save_single_file(tiny_bundle, str(tmp_path / "tiny.safetensors"))
    assert os.listdir(tmp_path) == []


def test_converters_reject_what_the_original_layout_cannot_hold(sd1_like):
    with pytest.raises(ValueError, match="sd1"):
        clip_text_to_ldm(sd1_like.text_encoder.state_dict(), "sdxl")
    unsupported_first_level = ["SimpleCrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
    config = {**SD1_LIKE_UNET, "down_block_types": unsupported_first_level}
    with pytest.raises(ValueError, match="CrossAttnDownBlock2D"):
        unet_to_ldm(sd1_like.unet.state_dict(), config)
    extra = {**sd1_like.unet.state_dict(), "class_embedding.linear_1.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="class_embedding"):
        unet_to_ldm(extra, sd1_like.unet.config)


# ---------------------------------------------------------------------------------------------- loader errors
def _write(path, state: dict) -> str:
    from safetensors.torch import save_file

    save_file(state, str(path))
    return str(path)


@pytest.mark.parametrize(
    "state, message",
    [
        ({LDM_CROSS_ATTENTION_KEY: torch.zeros(320, 2048)}, "2048"),
        ({LDM_VAE_PREFIX + "encoder.conv_in.weight": torch.zeros(1)}, "no Stable Diffusion UNet"),
        ({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(1)}, "SDXL"),
    ],
    ids=["sdxl-width", "no-unet", "sdxl-conditioner"],
)
def test_unsupported_checkpoints_name_what_is_supported(tmp_path, state, message):
    path = _write(tmp_path / "model.safetensors", state)
    with pytest.raises(ValueError, match=message) as error:
        DiffusionBundle.from_single_file(path)
    assert "Stable Diffusion 1.x" in str(error.value) and "2.x" in str(error.value)


def test_only_existing_safetensors_files_are_read(tmp_path):
    pickle_path = tmp_path / "model.ckpt"
    pickle_path.write_bytes(b"not read")
    with pytest.raises(ValueError, match=r"\.safetensors"):
        DiffusionBundle.from_single_file(str(pickle_path))
    with pytest.raises(ValueError, match="does not exist"):
        DiffusionBundle.from_single_file(str(tmp_path / "absent.safetensors"))


# ---------------------------------------------------------------------------------------------- prediction type
def _sd_dict(width: int, last_norm_bias: torch.Tensor | None = None, marker: bool = False) -> dict:
    state = {LDM_CROSS_ATTENTION_KEY: torch.zeros(320, width)}
    if last_norm_bias is not None:
        state[LDM_LAST_NORM_BIAS_KEY] = last_norm_bias
    if marker:
        state[LDM_V_PREDICTION_KEY] = torch.zeros(0)
    return state


def test_v_prediction_is_detected_from_the_marker_and_the_norm_statistics():
    spread = torch.linspace(-1, 1, 320) * V_PREDICTION_NORM_STD * 4  # std well above the threshold
    calm = torch.linspace(-1, 1, 320) * V_PREDICTION_NORM_STD / 4  # std well below it
    assert detect_prediction_type(_sd_dict(SD2_WIDTH, marker=True), "sd2") == "v_prediction"
    assert detect_prediction_type(_sd_dict(SD2_WIDTH, spread), "sd2") == "v_prediction"
    assert detect_prediction_type(_sd_dict(SD2_WIDTH, calm), "sd2") == "epsilon"
    assert detect_prediction_type(_sd_dict(SD2_WIDTH), "sd2") == "epsilon"
    assert detect_prediction_type(_sd_dict(SD1_WIDTH, spread), "sd1") == "epsilon"  # the rule is SD 2.x only


def test_norm_statistics_rule_reads_a_key_the_writer_produces(sd2_like):
    state = bundle_to_ldm_state_dict(sd2_like)
    del state[LDM_V_PREDICTION_KEY]
    assert LDM_LAST_NORM_BIAS_KEY in state
    state[LDM_LAST_NORM_BIAS_KEY] = torch.zeros_like(state[LDM_LAST_NORM_BIAS_KEY])
    assert detect_prediction_type(state, "sd2") == "epsilon"
    state[LDM_LAST_NORM_BIAS_KEY] = torch.linspace(-1, 1, state[LDM_LAST_NORM_BIAS_KEY].numel())
    assert detect_prediction_type(state, "sd2") == "v_prediction"


def test_prediction_type_override_wins_over_detection(sd2_file):
    path, config_dir = sd2_file  # written with the v_pred marker
    loaded = DiffusionBundle.from_single_file(path, config_dir=config_dir, prediction_type="epsilon")
    assert loaded.prediction_type == "epsilon"
    assert loaded.scheduler.config.prediction_type == "epsilon"
    with pytest.raises(ValueError, match="prediction type"):
        DiffusionBundle.from_single_file(path, config_dir=config_dir, prediction_type="sample")


# ---------------------------------------------------------------------------------------------- sizes
def test_sizes_of_the_tiny_model_follow_its_configs(tiny_bundle):
    vae_levels = len(tiny_bundle.vae.config.block_out_channels)
    unet_levels = len(tiny_bundle.unet.config.block_out_channels)
    assert tiny_bundle.vae_scale_factor == 2 ** (vae_levels - 1) == 2
    assert tiny_bundle.unet_downsampling == 2 ** (unet_levels - 1) == 4
    assert tiny_bundle.size_multiple == 8
    assert tiny_bundle.native_resolution == tiny_bundle.unet.config.sample_size * 2 == 64
    assert tiny_bundle.max_length == 77


@pytest.mark.parametrize("family, text_width", [("sd1", SD1_WIDTH), ("sd2", SD2_WIDTH)])
def test_sizes_of_the_shipped_configs(family, text_width, meta_models):
    models = meta_models[family]
    bundle = DiffusionBundle(models.unet, models.vae, models.text_encoder, None, None, torch.device("meta"), family,
                             "epsilon")
    assert bundle.vae_scale_factor == 8
    assert bundle.size_multiple == 64
    assert bundle.native_resolution == 512
    assert bundle.text_width == text_width


# ---------------------------------------------------------------------------------------------- import hygiene
def test_importing_the_engine_loads_no_comfyui_module():
    forbidden_top = ("folder_paths", "nodes", "server")
    code = (
        "import sys, ice_ops, ice_ops.bundle\n"
        "ice_ops.DiffusionBundle\n"
        f"bad = sorted(m for m in sys.modules if m.startswith('comfy') or m.split('.')[0] in {forbidden_top!r})\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"ComfyUI modules imported: {result.stdout.strip()}"


def test_bundle_from_a_state_dict_never_shares_the_callers_tensors(sd1_file):
    """ComfyUI patches its weights in place; a bundle built from its state dict must hold copies."""
    from safetensors.torch import load_file

    from ice_ops.bundle import DiffusionBundle

    path, config_dir = sd1_file
    state = load_file(path)
    bundle = DiffusionBundle.from_ldm_state_dict(state, config_dir=config_dir)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    before = bundle.unet.conv_in.weight.detach().clone()
    state[key].add_(1.0)  # the caller changes its own tensor in place
    assert torch.equal(bundle.unet.conv_in.weight, before)


def test_text_encoders_are_saved_in_the_layout_transformers_4_and_5_both_read(tmp_path, tiny_bundle):
    """transformers 4.x ignores weights without the ``text_model.`` level (it warns and keeps random ones);
    5.x reads both. The shipped Toy World encoder and every folder the pack writes keep the level."""
    from safetensors import safe_open
    from transformers import CLIPTextModel

    from ice_ops.bundle import save_text_encoder
    from ice_ops.toyworld import DIFFUSERS_FOLDER

    path = save_text_encoder(tiny_bundle.text_encoder, str(tmp_path / "text_encoder"))
    shipped = os.path.join(DIFFUSERS_FOLDER, "text_encoder", "model.safetensors")
    for written in (path, shipped):
        with safe_open(written, framework="pt") as handle:
            assert all(key.startswith("text_model.") for key in handle.keys()), written
    loaded = CLIPTextModel.from_pretrained(str(tmp_path / "text_encoder"), local_files_only=True)
    expected = tiny_bundle.text_encoder.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in loaded.state_dict().items() if "position_ids" not in key)


def test_frozen_parts_are_fp32_on_the_cpu_half_on_a_gpu_and_never_require_gradients(tiny_diffusers_folder, monkeypatch):
    from ice_ops.bundle import frozen_dtypes

    bundle = DiffusionBundle.from_pretrained(tiny_diffusers_folder)
    for part in ("unet", "vae", "text_encoder"):
        assert {p.dtype for p in bundle.part(part).parameters()} == {torch.float32}
        assert not any(p.requires_grad for p in bundle.part(part).parameters())
    assert bundle.unet_dtype == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert frozen_dtypes(torch.device("cuda")) == {"unet": torch.bfloat16, "text_encoder": torch.float16,
                                                   "vae": torch.bfloat16}
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    # SD VAEs overflow in fp16, so a GPU without bf16 keeps the VAE in fp32
    assert frozen_dtypes(torch.device("cuda")) == {"unet": torch.float16, "text_encoder": torch.float16,
                                                   "vae": torch.float32}
