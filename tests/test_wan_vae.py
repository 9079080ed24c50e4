"""The Wan 2.1 / 2.2 VAE against diffusers 0.42.1 (tests/fixtures/wan, made by
tools/fixtures/wan.py), streaming against one-shot, and the loader's refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from vdit.io.diffusers_wan import WEIGHTS, checkpoint_sha256, load_wan_vae
from vdit.io.hf_folder import CheckpointFormatError
from vdit.models.wan_vae import WanVAE, WanVAESpec

FIXTURES = Path(__file__).parent / "fixtures" / "wan"
MODELS = ("wan21", "wan22")
PARITY = 1e-4  # f32, against diffusers (measured: <= 1.5e-6 encode, <= 2.8e-5 decode)
# Streamed with the cache carried, against one-shot. Measured: encode <= 1.2e-6; decode
# <= 1.4e-5, all of it float32 rounding that the tiny 2.1 decoder amplifies about a
# hundredfold (diffusers' own decode of a clip's prefix differs from the prefix of its decode
# by up to 2.4e-6; the same streamed-vs-one-shot comparison in float64 gives 0.0).
STREAM_ENCODE, STREAM_DECODE = 1e-5, 5e-5


def _channels_last(x: np.ndarray) -> np.ndarray:
    """diffusers' [B, C, T, H, W] -> vdit's [B, T, H, W, C]."""
    return np.moveaxis(x, 1, -1)


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    return {k: _channels_last(v) for k, v in
            load_file(str(FIXTURES / "reference.safetensors")).items()}


@pytest.fixture(scope="module")
def models() -> dict[str, tuple]:
    """name -> (WanVAE, params, stats, jitted moments, jitted decode)."""
    out = {}
    for name in MODELS:
        spec, params, stats = load_wan_vae(FIXTURES / name)
        vae = WanVAE(spec)
        out[name] = (vae, params, stats, jax.jit(vae.moments), jax.jit(vae.decode))
    return out


def test_specs_follow_config(models):
    v21, v22 = models["wan21"][0], models["wan22"][0]
    assert (v21.factors, v21.latent_channels, v21.spec.is_residual) == ((4, 8, 8), 4, False)
    assert (v22.factors, v22.latent_channels, v22.spec.patch_size) == ((4, 16, 16), 6, 2)
    config = json.loads((FIXTURES / "wan22" / "config.json").read_text())
    stats = models["wan22"][2]
    np.testing.assert_array_equal(stats["mean"], np.float32(config["latents_mean"]))
    np.testing.assert_array_equal(stats["std"], np.float32(config["latents_std"]))


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("frames", [1, 5, 9])
def test_parity_with_diffusers(models, reference, name, frames):
    """Posterior mean / log-variance and decoded video of the first `frames` frames; diffusers'
    outputs for a prefix clip are the prefix of the 9-frame ones (checked by the fixture tool).
    The decoder gets diffusers' mean, so its error is its own."""
    _, params, _, moments, decode = models[name]
    latent = 1 + (frames - 1) // 4
    mean, logvar = moments(params, jnp.asarray(reference[f"{name}/video"][:, :frames]))
    ref_mean = reference[f"{name}/mean"][:, :latent]
    assert mean.shape == ref_mean.shape
    assert float(np.abs(mean - ref_mean).max()) <= PARITY
    assert float(np.abs(logvar - reference[f"{name}/logvar"][:, :latent]).max()) <= PARITY
    video = decode(params, jnp.asarray(ref_mean))
    ref_video = reference[f"{name}/decoded"][:, :frames]
    assert video.shape == ref_video.shape
    assert float(np.abs(video - ref_video).max()) <= PARITY


@pytest.mark.parametrize("name,enc_chunks,dec_chunks",
                         [("wan21", [1, 4, 4], [1, 1, 1]), ("wan22", [5, 4], [2, 1])])
def test_streaming_equals_one_shot(models, reference, name, enc_chunks, dec_chunks):
    """Chunk by chunk with the cache passed back in: diffusers' own chunking (first frame alone,
    then 4; one latent frame at a time) for 2.1, coarser chunks for 2.2."""
    vae, params, _, moments, decode = models[name]
    video = jnp.asarray(reference[f"{name}/video"])
    enc, dec = jax.jit(vae.encode_chunk), jax.jit(vae.decode_chunk)
    means, logvars, cache, start = [], [], None, 0
    for n in enc_chunks:
        (m, lv), cache = enc(params, video[:, start: start + n], cache)
        means.append(m)
        logvars.append(lv)
        start += n
    mean, logvar = moments(params, video)
    assert float(jnp.abs(jnp.concatenate(means, 1) - mean).max()) <= STREAM_ENCODE
    assert float(jnp.abs(jnp.concatenate(logvars, 1) - logvar).max()) <= STREAM_ENCODE

    latent = jnp.asarray(reference[f"{name}/mean"])
    frames, cache, start = [], None, 0
    for n in dec_chunks:
        v, cache = dec(params, latent[:, start: start + n], cache)
        frames.append(v)
        start += n
    streamed = jnp.concatenate(frames, 1)
    assert float(jnp.abs(streamed - decode(params, latent)).max()) <= STREAM_DECODE
    assert float(jnp.abs(streamed - reference[f"{name}/decoded"]).max()) <= PARITY


def test_chunk_rules(models, reference):
    vae, params = models["wan21"][:2]
    video = jnp.asarray(reference["wan21/video"])
    with pytest.raises(ValueError, match="first chunk holds 1 \\+ 4a frames, got 4"):
        vae.encode_chunk(params, video[:, :4])
    # Shapes only (eval_shape traces without compiling): the cache a first chunk returns.
    _, cache = jax.eval_shape(vae.encode_chunk, params, video[:, :1])
    with pytest.raises(ValueError, match="later chunk holds 4b"):
        vae.encode_chunk(params, video[:, 1:3], cache)
    with pytest.raises(ValueError, match="needs the cache of the previous chunk"):
        vae.decode_chunk(params, jnp.zeros((1, 1, 2, 3, 4)), {"decoder": {}})


def test_odd_sizes_pad_and_crop(models, reference):
    """vdit's odd-size rule: 6 frames of 15x23 are padded to 9 of 16x24, cropped back by size."""
    vae, params = models["wan21"][:2]
    video = jnp.asarray(reference["wan21/video"][:, :6, :15, :23])
    with pytest.warns(UserWarning, match="padded to 9 frames of 16x24"):
        mean = jax.eval_shape(vae.encode, params, video)
    assert mean.shape == (1, 3, 2, 3, 4)
    decoded = jax.eval_shape(lambda p, z: vae.decode(p, z, size=(6, 15, 23)), params, mean)
    assert decoded.shape == (1, 6, 15, 23, 3)


def test_init_matches_loaded_tree(models):
    vae, params = models["wan22"][:2]
    fresh = jax.eval_shape(vae.init, jax.random.key(0))
    shapes = lambda t: jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), t)
    assert shapes(fresh) == shapes(params) == shapes(vae.param_shapes())
    specs = vae.logical_specs()
    assert tuple(specs["decoder"]["conv_in"]["kernel"]) == (None, None, None, "embed", "mlp")
    assert tuple(specs["encoder"]["norm_out"]["gamma"]) == ("norm",)


# --- the loader's refusals -------------------------------------------------------------------


def _copy(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    folder = tmp_path / "wan21"
    shutil.copytree(FIXTURES / "wan21", folder)
    return folder, load_file(str(folder / WEIGHTS))


def test_missing_tensor_is_named(tmp_path):
    folder, tensors = _copy(tmp_path)
    del tensors["decoder.up_blocks.1.upsamplers.0.time_conv.weight"]
    save_file(tensors, str(folder / WEIGHTS))
    with pytest.raises(CheckpointFormatError,
                       match=r"missing tensor decoder.up_blocks.1.upsamplers.0.time_conv.weight"):
        load_wan_vae(folder)


def test_extra_tensor_is_named(tmp_path):
    folder, tensors = _copy(tmp_path)
    tensors["encoder.down_blocks.9.conv1.weight"] = np.zeros((4, 4, 3, 3, 3), np.float32)
    save_file(tensors, str(folder / WEIGHTS))
    with pytest.raises(CheckpointFormatError,
                       match=r"unexpected tensor encoder.down_blocks.9.conv1.weight"):
        load_wan_vae(folder)


def test_wrong_shape_is_named(tmp_path):
    folder, tensors = _copy(tmp_path)
    tensors["encoder.mid_block.attentions.0.norm.gamma"] = np.ones((4, 1, 1, 1), np.float32)
    save_file(tensors, str(folder / WEIGHTS))
    with pytest.raises(CheckpointFormatError,
                       match=r"encoder.mid_block.attentions.0.norm.gamma: expected shape "
                             r"\(4, 1, 1\), found \(4, 1, 1, 1\)"):
        load_wan_vae(folder)


def test_missing_config_is_named(tmp_path):
    folder, _ = _copy(tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointFormatError, match=r"no config\.json"):
        load_wan_vae(folder)
    with pytest.raises(CheckpointFormatError, match=r"no config\.json"):
        checkpoint_sha256(folder)


def test_unsupported_config_is_named(tmp_path):
    folder, _ = _copy(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "z_dim": 5}))
    with pytest.raises(CheckpointFormatError, match="latents_mean must be a list of 5"):
        load_wan_vae(folder)


@pytest.mark.parametrize("change,field", [
    ({"attn_scales": [0.5]}, "attn_scales"),
    ({"in_channels": 4}, "in_channels"),
    ({"temperal_downsample": [True, True]}, "temperal_downsample"),
    ({"latents_std": [1.0]}, "latents_std"),
    ({"scale_factor_spatial": 16}, "scale_factor_spatial"),
    ({"clip_output": True}, "clip_output"),
    ({"base_dim": 0}, "base_dim"),
    ({"is_residual": True, "patch_size": 2, "in_channels": 12, "out_channels": 12,
      "scale_factor_spatial": 16, "base_dim": 4, "dim_mult": [1, 3, 3, 3]}, "dim_mult"),
])
def test_spec_refuses_naming_the_field(change, field):
    config = json.loads((FIXTURES / "wan21" / "config.json").read_text())
    with pytest.raises(ValueError, match=field):
        WanVAESpec.from_diffusers_config({**config, **change})


def test_checkpoint_sha256(tmp_path):
    folder, _ = _copy(tmp_path)
    digest = checkpoint_sha256(folder)
    assert digest == checkpoint_sha256(FIXTURES / "wan21") and len(digest) == 64
    (folder / "README.md").write_text("unrelated")
    assert checkpoint_sha256(folder) == digest
    with open(folder / WEIGHTS, "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    assert checkpoint_sha256(folder) != digest
    sharded = checkpoint_sha256(FIXTURES / "wan22")
    assert sharded != digest
