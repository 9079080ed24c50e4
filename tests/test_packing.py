"""`TextToVideo.packed_loss` (vdit/diffusion/text_to_video.py) on rows made by the real packer
(vdit/data/packing.py): two clips packed into one row give the losses they give run alone through
the ordinary (unpacked) path, at the same per-clip time and noise; each clip draws its own time;
captions go to their own clip; padding changes nothing."""

from __future__ import annotations

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_dict
from einops import rearrange
from state_checks import perturbed

from vdit.config import from_dict
from vdit.data.packing import clip_to_patches, pack
from vdit.diffusion.flow import sample_time
from vdit.diffusion.text_to_video import TextToVideo

PATCH = (1, 2, 2)
CAPTIONS = ("a red ball falls", "a blue ball rolls right")


@pytest.fixture(scope="module")
def setup():
    d = tiny_dict()
    d["diffusion"]["caption_dropout"] = 0.0  # every clip keeps its caption
    cfg = from_dict(d)
    system = TextToVideo(cfg)
    params = perturbed(jax.jit(system.init)(jax.random.key(0))["params"], scale=0.3)
    c = cfg.latent_shape()[-1]
    rng = np.random.default_rng(0)
    # Raw (unnormalised) latents of two clips of different shapes: 8 and 12 patch tokens.
    latents = [rng.normal(0.5, 2.0, (2, 4, 4, c)).astype(np.float32),
               rng.normal(-0.3, 1.5, (3, 4, 4, c)).astype(np.float32)]
    stats = {"mean": jnp.asarray(rng.normal(0.2, 0.5, c), jnp.float32),
             "std": jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32), "autoencoder": {}}
    clips = [{**clip_to_patches(lat, PATCH), "tokens": system.tokenizer.encode(cap)}
             for lat, cap in zip(latents, CAPTIONS, strict=True)]
    ds = grain.MapDataset.source(clips).to_iter_dataset()
    # Room for 3 clips and 28 tokens: one caption slot and 8 tokens stay padding.
    row = next(iter(pack(ds, budget=28, caption_length=cfg.text.max_length, clips_per_row=3,
                         rows=1, seed=0)))
    row = {k: jnp.asarray(v) for k, v in row.items()}
    assert list(np.asarray(row["segment_ids"][0])) == [1] * 8 + [2] * 12 + [0] * 8
    return cfg, system, params, stats, latents, row


def _draws(cfg, system, key, row) -> tuple[jax.Array, jax.Array]:
    """The per-clip times [B, K + 1] (index = segment id) and the noise [B, L, P] that
    packed_loss draws from `key` (its documented order: dropout, time, noise keys)."""
    _, k_t, k_noise = jax.random.split(key, 3)
    b, length, p = row["patches"].shape
    clips = row["tokens"].shape[1] // cfg.text.max_length
    t_clip = sample_time(k_t, b * (clips + 1), cfg.diffusion, system.shift).reshape(b, -1)
    return t_clip, jax.random.normal(k_noise, (b, length, p))


def _alone(system, params, stats, latent, noise_patches, t, caption) -> float:
    """The ordinary path's loss of one clip (normalised latent, noise in latent layout)."""
    x0 = (jnp.asarray(latent) - stats["mean"]) / stats["std"]
    grid = [s // p for s, p in zip(latent.shape[:3], PATCH, strict=True)]
    noise = rearrange(noise_patches, "(t h w) (pt ph pw c) -> (t pt) (h ph) (w pw) c",
                      t=grid[0], h=grid[1], w=grid[2], pt=PATCH[0], ph=PATCH[1], pw=PATCH[2])
    tokens = jnp.asarray(system.tokenizer.encode(caption))[None]
    loss = jax.jit(system.flow_loss)(params, x0[None], noise[None], jnp.full((1,), t), tokens)
    return float(loss[0])


def test_packed_clips_give_their_losses_alone_with_their_own_time_noise_and_caption(setup):
    cfg, system, params, stats, latents, row = setup
    key = jax.random.key(7)
    packed = float(jax.jit(system.packed_loss)(params, row, stats, key)[0])
    t_clip, noise = _draws(cfg, system, key, row)
    ids = np.asarray(row["segment_ids"][0])
    assert float(t_clip[0, 1]) != float(t_clip[0, 2])  # each clip draws its own time
    alone = [_alone(system, params, stats, lat, noise[0, ids == i + 1], float(t_clip[0, i + 1]),
                    cap) for i, (lat, cap) in enumerate(zip(latents, CAPTIONS, strict=True))]
    counts = [int((ids == i + 1).sum()) for i in range(2)]
    # The row's loss is the token-weighted mean of the clips' own losses, padding left out.
    want = sum(n * loss for n, loss in zip(counts, alone, strict=True)) / sum(counts)
    assert packed == pytest.approx(want, rel=1e-5)
    # Per clip: the row with the other clip turned into padding gives the clip's loss alone.
    for i in range(2):
        only = dict(row)
        for name in ("segment_ids", "text_segment_ids"):
            only[name] = jnp.where(row[name] == 2 - i, 0, row[name])
        got = float(jax.jit(system.packed_loss)(params, only, stats, key)[0])
        assert got == pytest.approx(alone[i], rel=1e-5), i
    # The caption matters, so the match above says each clip saw its own caption.
    other = _alone(system, params, stats, latents[0], noise[0, ids == 1], float(t_clip[0, 1]),
                   CAPTIONS[1])
    assert abs(other - alone[0]) > 1e-4 * alone[0]


def test_padding_changes_nothing_in_a_packed_loss(setup):
    _, system, params, stats, _, row = setup
    key = jax.random.key(7)
    loss = jax.jit(system.packed_loss)
    want = float(loss(params, row, stats, key)[0])
    rng = np.random.default_rng(1)
    pad = np.asarray(row["segment_ids"]) == 0
    text_pad = np.asarray(row["text_segment_ids"]) == 0
    assert pad.sum() == 8 and text_pad.sum() == 12  # 8 padding tokens, one empty caption slot
    garbage = dict(row)
    garbage["patches"] = jnp.where(pad[..., None], 50.0 * rng.standard_normal(
        row["patches"].shape), row["patches"]).astype(row["patches"].dtype)
    garbage["positions"] = jnp.where(pad[..., None], rng.integers(0, 9, row["positions"].shape),
                                     row["positions"]).astype(row["positions"].dtype)
    garbage["tokens"] = jnp.where(text_pad, rng.integers(1, system.tokenizer.vocab_size,
                                                         row["tokens"].shape),
                                  row["tokens"]).astype(row["tokens"].dtype)
    assert float(loss(params, garbage, stats, key)[0]) == pytest.approx(want, rel=1e-6)
