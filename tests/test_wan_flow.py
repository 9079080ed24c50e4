"""Wan's flow matching is vdit's rectified flow (vdit/diffusion/flow.py), checked against
diffusers 0.42.1 on a committed fixture (tools/fixtures/wan_flow.py, tests/fixtures/wan_flow/):

- the training sigmas of FlowMatchEulerDiscreteScheduler(shift=s) are vdit's `shift_time` of
  the unshifted grid, and its timesteps are 1000 x sigma;
- `scale_noise` (FlowMatchEuler) and `add_noise` (UniPC at the Wan pipeline's sampling
  timesteps) are vdit's `noisy`; the target noise - x0 is vdit's velocity target;
- a diffusers trainer's loss on the tiny wan21 pipeline's transformer (timestep = 1000 x sigma,
  target noise - x0) is vdit's `flow_loss`, whose Wan DiT gets t = sigma and scales it by 1000
  (WanDiT.time_scale)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from vdit.diffusion.flow import noisy, shift_time, velocity_loss

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "wan_flow"
PIPELINE = ROOT / "tests" / "fixtures" / "wan_pipeline" / "wan21"
REF = load_file(str(FIXTURE / "reference.safetensors"))
META = json.loads((FIXTURE / "reference.json").read_text())
SHIFTS = META["shifts"]


def _vdit_layout(x: np.ndarray) -> jnp.ndarray:
    return jnp.asarray(x).transpose(0, 2, 3, 4, 1)  # [B, C, F, H, W] -> [B, F, H, W, C]


def test_fixture_is_diffusers_0_42_1():
    assert META["diffusers"] == "0.42.1" and SHIFTS == [3.0, 5.0]


@pytest.mark.parametrize("shift", SHIFTS)
def test_diffusers_training_sigmas_are_shift_time_and_timesteps_1000_sigma(shift):
    p = f"s{shift:g}/"
    n = len(REF[p + "train_sigmas"])
    unshifted = (n - np.arange(n, dtype=np.float32)) / np.float32(n)  # index i: (N - i) / N
    np.testing.assert_allclose(shift_time(jnp.asarray(unshifted), shift), REF[p + "train_sigmas"],
                               rtol=2e-7, atol=0)
    np.testing.assert_allclose(1000 * REF[p + "train_sigmas"], REF[p + "train_timesteps"],
                               rtol=2e-7)
    # The trainer's draw: u -> index -> (sigma, timestep 1000 sigma).
    idx = REF[p + "indices"]
    np.testing.assert_array_equal(idx, (REF[p + "u"] * n).astype(np.int64))
    np.testing.assert_allclose(shift_time(jnp.asarray(unshifted[idx]), shift),
                               REF[p + "sigmas"], rtol=2e-7)
    np.testing.assert_allclose(1000 * REF[p + "sigmas"], REF[p + "timesteps"], rtol=2e-7)


@pytest.mark.parametrize("shift", SHIFTS)
def test_scale_noise_is_noisy_and_the_target_is_vdits(shift):
    p = f"s{shift:g}/"
    x0, noise = REF["x0"], REF["noise"]
    np.testing.assert_allclose(noisy(x0, noise, REF[p + "sigmas"]), REF[p + "scale_noise"],
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(REF[p + "target"], noise - x0)
    # vdit's loss against the target is the trainer's MSE: the target itself has zero loss.
    np.testing.assert_array_equal(velocity_loss(REF[p + "target"], x0, noise), 0.0)


def test_unipc_add_noise_at_the_pipeline_timesteps_is_noisy():
    x0, noise = REF["x0"], REF["noise"]
    sig, ts = REF["unipc/sigmas"], REF["unipc/timesteps"]
    np.testing.assert_array_equal(ts, np.floor(sig[:-1].astype(np.float64) * 1000 + 1e-9))
    for k, sigma in enumerate(sig[:-1]):
        np.testing.assert_allclose(noisy(x0, noise, np.full(len(x0), sigma)),
                                   REF["unipc/add_noise"][k], rtol=1e-6, atol=1e-6)


def _system_and_params():
    from vdit.config import from_dict
    from vdit.diffusion.text_to_video import TextToVideo
    from vdit.io.wan_transformer import load_params

    spec, params = load_params(PIPELINE / "transformer")
    model = {k: v for k, v in dataclasses.asdict(spec.model).items()}
    cfg = from_dict({
        "model": model,
        "text": {"encoder": "precomputed", "width": spec.text_dim, "max_length": 8},
        "autoencoder": {"kind": "wan", "checkpoint": str(PIPELINE / "vae"),
                        "factors": [4, 8, 8], "latent_channels": spec.in_channels},
        "data": {"world": {"frames": 5, "height": 32, "width": 32}, "source": "shards",
                 "shards": "unused"}})
    return TextToVideo(cfg), params


@pytest.mark.parametrize("shift", SHIFTS)
def test_vdit_flow_loss_is_the_diffusers_trainers_loss(shift):
    """timestep = 1000 x sigma (the trainer's float timestep, WanDiT.time_scale), x_t and the
    target as above, the caption zero-padded and unmasked: vdit's per-sample loss is the
    trainer's to float32 rounding. finetrainers' truncated timestep `(sigma * 1000).long()`
    is farther away (recorded as loss_long)."""
    system, params = _system_and_params()
    p = f"s{shift:g}/"
    mask = REF["text"].any(-1)
    assert mask.sum(1).tolist() == META["lengths"]
    got = np.asarray(system.flow_loss(params, _vdit_layout(REF["x0"]),
                                      _vdit_layout(REF["noise"]), jnp.asarray(REF[p + "sigmas"]),
                                      (jnp.asarray(REF["text"]), jnp.asarray(mask))))
    want = REF[p + "loss"]
    assert want.min() > 0.1  # the transformer is far from the target: a real comparison
    np.testing.assert_allclose(got, want, rtol=2e-5)
    off = np.abs(REF[p + "loss_long"] - want).max()
    assert np.abs(got - want).max() < off  # truncating the timestep moves the loss more
