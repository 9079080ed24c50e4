"""The autoencoder interface: `encode(video) -> latent`, `decode(latent) -> video`.

Videos are float [B, T, H, W, 3] in [-1, 1]; latents [B, T', H', W', C]. `SpaceToDepth` is a
lossless, parameter-free stand-in (pixels folded into channels) until a learned causal video
autoencoder takes its place behind the same interface.
"""

from __future__ import annotations

from typing import Protocol

import jax
from einops import rearrange

from vdit.config import AutoencoderConfig


class Autoencoder(Protocol):
    def encode(self, video: jax.Array) -> jax.Array: ...
    def decode(self, latent: jax.Array) -> jax.Array: ...


class SpaceToDepth:
    """[B, T, H, W, 3] <-> [B, T/ft, H/fh, W/fw, ft*fh*fw*3]; decode(encode(x)) == x exactly."""

    def __init__(self, factors: tuple[int, int, int]):
        self.factors = factors

    def encode(self, video: jax.Array) -> jax.Array:
        ft, fh, fw = self.factors
        return rearrange(video, "b (t ft) (h fh) (w fw) c -> b t h w (ft fh fw c)",
                         ft=ft, fh=fh, fw=fw)

    def decode(self, latent: jax.Array) -> jax.Array:
        ft, fh, fw = self.factors
        return rearrange(latent, "b t h w (ft fh fw c) -> b (t ft) (h fh) (w fw) c",
                         ft=ft, fh=fh, fw=fw)


def make_autoencoder(cfg: AutoencoderConfig) -> Autoencoder:
    if cfg.kind == "space_to_depth":
        return SpaceToDepth(cfg.factors)
    raise ValueError(f"autoencoder.kind {cfg.kind!r}; allowed: space_to_depth")
