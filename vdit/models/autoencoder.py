"""The autoencoder interface: `encode(params, video) -> latent`, `decode(params, latent) -> video`.

Videos are float [B, T, H, W, 3] in [-1, 1]; latents [B, T', H', W', C]. Two implementations:
`CausalAutoencoder`, the learned causal VAE (vdit/models/causal_vae.py, the default), and
`SpaceToDepth`, a lossless parameter-free stand-in (pixels folded into channels) for fast tests;
`WanAutoencoder` (vdit/models/wan_autoencoder.py) puts the Wan 2.1 / 2.2 VAE behind the same one.

Odd inputs (the documented rule): the causal VAE needs 1 + ft*k frames and sides divisible by
fh. `encode` pads a video that is not of that shape — the last frame repeated at the end, edge
pixels replicated at the bottom and right — and warns; `decode(..., size=(T, H, W))` crops the
decoded video back to the original size. Nothing is stretched and no content is dropped.
"""

from __future__ import annotations

import warnings
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from einops import rearrange

from vdit.config import AutoencoderConfig
from vdit.models.causal_vae import CausalVAE

Params = Any


class Autoencoder(Protocol):
    cfg: AutoencoderConfig

    def init(self, key: jax.Array, video: jax.Array) -> Params: ...
    def encode(self, params: Params, video: jax.Array) -> jax.Array: ...
    def decode(self, params: Params, latent: jax.Array,
               size: tuple[int, int, int] | None = None) -> jax.Array: ...


class SpaceToDepth:
    """[B, T, H, W, 3] <-> [B, T/ft, H/fh, W/fw, ft*fh*fw*3]; decode(encode(x)) == x exactly."""

    def __init__(self, cfg: AutoencoderConfig):
        self.cfg = cfg

    def init(self, key: jax.Array, video: jax.Array) -> Params:
        return {}

    def encode(self, params: Params, video: jax.Array) -> jax.Array:
        ft, fh, fw = self.cfg.factors
        return rearrange(video, "b (t ft) (h fh) (w fw) c -> b t h w (ft fh fw c)",
                         ft=ft, fh=fh, fw=fw)

    def decode(self, params: Params, latent: jax.Array,
               size: tuple[int, int, int] | None = None) -> jax.Array:
        ft, fh, fw = self.cfg.factors
        return rearrange(latent, "b t h w (ft fh fw c) -> b (t ft) (h fh) (w fw) c",
                         ft=ft, fh=fh, fw=fw)


def valid_size(frames: int, height: int, width: int,
               factors: tuple[int, int, int]) -> tuple[int, int, int]:
    """The smallest (1 + ft*k, multiple of fh, multiple of fw) at least as large as the input."""
    ft, fh, fw = factors
    up = lambda n, f: -(-n // f) * f
    return 1 + up(frames - 1, ft), up(height, fh), up(width, fw)


def pad_to_valid(video: jax.Array, factors: tuple[int, int, int]) -> jax.Array:
    """Pad [B, T, H, W, C] by the module rule (repeat the last frame, replicate edges)."""
    t, h, w = video.shape[1:4]
    vt, vh, vw = valid_size(t, h, w, factors)
    if (vt, vh, vw) == (t, h, w):
        return video
    warnings.warn(
        f"video of {t} frames of {h}x{w} is not 1 + {factors[0]}k frames of multiples of "
        f"{factors[1]}x{factors[2]}: padded to {vt} frames of {vh}x{vw} (last frame repeated, "
        "edges replicated); decode with size=(T, H, W) to crop back",
        stacklevel=3,
    )
    return jnp.pad(video, ((0, 0), (0, vt - t), (0, vh - h), (0, vw - w), (0, 0)), mode="edge")


class CausalAutoencoder:
    """The learned causal VAE behind the interface; encode returns the posterior mean."""

    def __init__(self, cfg: AutoencoderConfig):
        self.cfg = cfg
        self.module = CausalVAE(cfg)

    def init(self, key: jax.Array, video: jax.Array) -> Params:
        return self.module.init(key, video, key)["params"]

    def moments(self, params: Params, video: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Posterior (mean, logvar), each [B, T', H', W', C], of a (padded) video."""
        video = pad_to_valid(video, self.cfg.factors)
        return self.module.apply({"params": params}, video, method=CausalVAE.encode)

    def encode(self, params: Params, video: jax.Array) -> jax.Array:
        return self.moments(params, video)[0]

    def decode(self, params: Params, latent: jax.Array,
               size: tuple[int, int, int] | None = None) -> jax.Array:
        video = self.module.apply({"params": params}, latent, method=CausalVAE.decode)
        if size is not None:
            video = video[:, : size[0], : size[1], : size[2]]
        return video


def make_autoencoder(cfg: AutoencoderConfig) -> Autoencoder:
    """The autoencoder of a config section. `wan` is built from its checkpoint's config.json:
    `vdit.io.autoencoders.build_autoencoder(cfg)` (which calls this for the other kinds)."""
    if cfg.kind == "causal_vae":
        return CausalAutoencoder(cfg)
    if cfg.kind == "space_to_depth":
        return SpaceToDepth(cfg)
    if cfg.kind == "wan":
        raise ValueError("autoencoder.kind 'wan': the architecture is the checkpoint's "
                         "config.json; build it with vdit.io.autoencoders.build_autoencoder")
    raise ValueError(f"autoencoder.kind {cfg.kind!r}; allowed: causal_vae, wan, space_to_depth")
