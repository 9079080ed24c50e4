"""A diffusers WanPipeline folder in Wan 2.2 TI2V-5B's text-to-video mode (vdit/io/wan_pipeline.py,
vdit/sample/pipeline.py) against diffusers' own run of the same folder: `expand_timesteps=True`
(per-token timesteps, all equal to the step's t without an image), the Wan 2.2 VAE (is_residual,
patch_size 2, 4x16x16, latents_mean/std) and a transformer whose in_channels is the VAE's z_dim.

Fixture: tests/fixtures/wan_ti2v/, written by `tools/make_reference_fixtures.py wan_ti2v`
(diffusers 0.42.1): tiny UMT5 + wan22-style VAE (z 6) + transformer (in/out 6) + UniPC
(flow_shift 5), 4 steps at 5 x 32 x 64, guidance 5, fixed initial latents.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from pipeline_cases import bthwc, ncthw, reference_case, trajectory

from vdit.io.wan_pipeline import resolve_pipeline
from vdit.sample import pipeline as wp

FOLDER = Path(__file__).parent / "fixtures" / "wan_ti2v"
SPATIAL = 16  # Wan 2.2's VAE: 4 x 16 x 16 (its own 8x, then patch_size 2)


def _case():
    return reference_case(FOLDER)


@pytest.fixture(scope="module")
def ti2v():
    folder, ref, meta, settings = _case()
    loaded = wp.load_pipeline(resolve_pipeline(folder), settings)
    return loaded, ref, meta, settings


_ncthw, _bthwc, _trajectory = ncthw, bthwc, trajectory


def test_the_folder_is_ti2v_text_to_video():
    folder, ref, meta, settings = _case()
    spec = resolve_pipeline(folder)
    assert spec.expand_timesteps and spec.boundary_ratio is None and spec.transformer_2 is None
    assert spec.transformer.in_channels == spec.vae_config["z_dim"] == ref["latents_init"].shape[1]
    assert spec.vae_config["is_residual"] and spec.vae_config["patch_size"] == 2
    assert meta["vae_scale_factor_spatial"] == SPATIAL
    # diffusers' per-token timesteps are the step's t for every token (the mask is all ones)
    tokens = ref["timestep_tokens"]
    assert tokens.shape == (settings.steps, 1, meta["tokens"])
    np.testing.assert_array_equal(tokens, np.broadcast_to(ref["timesteps"][:, None, None],
                                                          tokens.shape))
    # vdit's latent grid is diffusers' (16-pixel cells), and sizes are checked against 16 x 2
    assert wp.latent_shape(spec, settings) == np.moveaxis(ref["latents_init"], 1, -1).shape[1:]
    assert wp.check_settings(spec, settings) == []
    bad = wp.check_settings(spec, wp.PipelineSettings(frames=5, height=48, width=64))
    assert any(p.startswith("--height") and f"multiple of {SPATIAL * 2}" in p for p in bad)


def test_prompt_embeddings_match_the_pipeline(ti2v):
    loaded, ref, meta, _ = ti2v
    for key, prompt in (("prompt_embeds", meta["prompt"]),
                        ("negative_prompt_embeds", meta["negative_prompt"])):
        got = wp.embed_prompts(loaded, [prompt], "float32")
        np.testing.assert_allclose(got, ref[key], atol=2e-5, err_msg=key)


def test_latents_and_frames_match_diffusers(ti2v):
    loaded, ref, meta, settings = ti2v
    _, _, steps = _trajectory(loaded, ref, meta, settings)
    scale = np.abs(ref["latents_final"]).max()
    for i in range(settings.steps):  # every step, so a wrong step is named
        err = np.abs(steps[i] - ref["latents_steps"][i, 0]).max() / scale
        assert err <= 1e-4, f"step {i}: {err:.2e}"
    videos, latents = wp.generate(loaded, [meta["prompt"]], meta["negative_prompt"], num=1,
                                  seed=0, settings=settings,
                                  noise=np.moveaxis(ref["latents_init"], 1, -1))
    err = np.abs(_ncthw(latents) - ref["latents_final"]).max() / scale
    assert err <= 1e-4, err
    frames = wp.decode(loaded.vae, loaded.vae_params, loaded.stats,
                       jnp.asarray(np.moveaxis(ref["latents_final"], 1, -1)))
    frames01 = np.clip(np.asarray(frames) / 2 + 0.5, 0, 1)
    assert frames01.shape == ref["frames"].shape
    assert np.abs(frames01 - ref["frames"]).max() <= 1e-3
    # the uint8 videos written are those frames, rounded
    assert videos.shape == ref["frames"].shape
    assert np.abs(videos.astype(np.float32) / 255 - ref["frames"]).max() <= 1e-3 + 0.5 / 255
