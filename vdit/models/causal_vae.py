"""The causal video autoencoder: video [B, 1 + 4k, H, W, 3] <-> latent [B, 1 + k, H/8, W/8, C].

Every convolution is causal in time: it pads only on the past side, so the latent of frame t
depends on frames <= t alone and the first frame is encoded by itself (a still image is a
one-frame video). Normalisation is per position (LayerNorm over channels), never over time or
space, which keeps both causality and spatial tiling exact.

Streaming: each `CausalConv3d` keeps the last input frames it has not yet consumed in the
mutable `cache` collection. Applying the encoder (or decoder) chunk by chunk with
`mutable=["cache"]` carries that state, so a chunked pass equals the one-shot pass.
The first chunk must hold 1 + 4a frames (1 + a latent frames), later chunks 4b (b latent frames).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange

from vdit.config import AutoencoderConfig

INITIAL_LOGVAR = -6.0


class CausalConv3d(nn.Module):
    """3D convolution, causal in time. x [B, T, H, W, Cin] -> [B, T', H/s, W/s, features].

    Without a cache the past is the first frame repeated (kernel_t - 1 times); with one, the
    unconsumed frames of the previous chunk. The frames left over after this call's last
    output window become the next cache.
    """

    features: int
    kernel: tuple[int, int, int] = (3, 3, 3)
    stride: tuple[int, int, int] = (1, 1, 1)
    zero: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kt, kh, kw = self.kernel
        st = self.stride[0]
        streaming = self.is_mutable_collection("cache")
        if self.has_variable("cache", "past"):
            past = self.get_variable("cache", "past")
        else:
            past = jnp.repeat(x[:, :1], kt - 1, axis=1)
        xp = jnp.concatenate([past.astype(x.dtype), x], axis=1)
        n_out = (xp.shape[1] - kt) // st + 1
        if streaming:
            self.put_variable("cache", "past", xp[:, n_out * st:])
        init = nn.initializers.zeros_init() if self.zero else nn.initializers.lecun_normal()
        kernel = self.param("kernel", init, (kt, kh, kw, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        # A sum of 2D convolutions over the time taps: XLA:CPU runs 2D convolutions about 3x
        # faster than 3D ones (measured), and accelerators fuse either form equally well.
        b, _, h, w, c = xp.shape
        pad = (((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2))
        out = 0.0
        for dt in range(kt):
            frames = xp[:, dt: dt + st * (n_out - 1) + 1: st].reshape(b * n_out, h, w, c)
            out = out + jax.lax.conv_general_dilated(
                frames, kernel[dt].astype(x.dtype), self.stride[1:], pad,
                dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return out.reshape(b, n_out, *out.shape[1:]) + bias.astype(x.dtype)


class ResBlock(nn.Module):
    """Pre-norm residual block of two causal convolutions; the second starts at zero."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = CausalConv3d(self.features)(nn.silu(nn.LayerNorm(name="norm1")(x)))
        h = CausalConv3d(self.features, zero=True)(nn.silu(nn.LayerNorm(name="norm2")(h)))
        if x.shape[-1] != self.features:
            x = nn.Dense(self.features, name="skip")(x)
        return x + h


def _levels(cfg: AutoencoderConfig) -> list[tuple[int, bool]]:
    """Per downsampling step after the stem: (features, whether time is halved too).

    Time is halved in the last log2(factors[0]) steps, where the maps are smallest."""
    ft, fh, _ = cfg.factors
    n_space = int(math.log2(fh // cfg.stem))
    n_time = int(math.log2(ft))
    return [(cfg.channels[min(i + 1, len(cfg.channels) - 1)], i >= n_space - n_time)
            for i in range(n_space)]


# Non-parametric shortcuts around every resolution change (Chen et al. 2024, "Deep Compression
# Autoencoder"): space (and time) folded into channels, then channel groups averaged on the way
# down and duplicated on the way up. At initialisation the autoencoder is already a pooling /
# unpooling pair, and the convolutions learn the residual, which trains much faster.


def _group_mean(x: jax.Array, features: int) -> jax.Array | None:
    c = x.shape[-1]
    return None if c % features else x.reshape(*x.shape[:-1], features, c // features).mean(-1)


def _repeat_channels(x: jax.Array, features: int) -> jax.Array | None:
    c = x.shape[-1]
    return None if features % c else jnp.repeat(x, features // c, axis=-1)


def _fold_down(x: jax.Array, halve_t: bool, first: bool) -> jax.Array:
    """[B, T, H, W, C] -> [B, T', H/2, W/2, (2) 4C], aligned with a causal stride-2 conv:
    output t holds frames (2t - 1, 2t); the first chunk pairs frame 0 with itself."""
    if halve_t:
        if first:
            x = jnp.concatenate([x[:, :1], x], axis=1)
        x = rearrange(x, "b (t f) h w c -> b t h w (f c)", f=2)
    return rearrange(x, "b t (h p) (w q) c -> b t h w (p q c)", p=2, q=2)


def _plus(x: jax.Array, shortcut: jax.Array | None) -> jax.Array:
    return x if shortcut is None else x + shortcut


def _first_chunk(module: nn.Module) -> bool:
    """True unless an earlier chunk of a streamed (chunked) pass left its mark in the cache."""
    first = not module.has_variable("cache", "started")
    if module.is_mutable_collection("cache"):
        module.put_variable("cache", "started", jnp.zeros((), jnp.int32))
    return first


class Encoder(nn.Module):
    """[B, T, H, W, 3] in [-1, 1] -> (mean, logvar), each [B, T', H', W', latent_channels]."""

    cfg: AutoencoderConfig

    @nn.compact
    def __call__(self, video: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg, s = self.cfg, self.cfg.stem
        # Stem: fold s x s pixel patches into channels, so no layer runs at full resolution.
        x = rearrange(video, "b t (h p) (w q) c -> b t h w (p q c)", p=s, q=s)
        first = _first_chunk(self)
        x = CausalConv3d(cfg.channels[0], name="stem")(x)
        for i, (features, halve_t) in enumerate(_levels(cfg)):
            for j in range(cfg.res_blocks):
                x = ResBlock(x.shape[-1], name=f"down{i}_res{j}")(x)
            shortcut = _group_mean(_fold_down(x, halve_t, first), features)
            x = CausalConv3d(features, stride=(2 if halve_t else 1, 2, 2), name=f"down{i}")(x)
            x = _plus(x, shortcut)
        for j in range(cfg.res_blocks):
            x = ResBlock(x.shape[-1], name=f"mid_res{j}")(x)
        shortcut = _group_mean(x, cfg.latent_channels)
        x = nn.silu(nn.LayerNorm(name="norm_out")(x))
        moments = CausalConv3d(2 * cfg.latent_channels, name="moments")(x)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        # The posterior std starts at exp(-3) ~ 0.05, not 1: with a small KL weight, unit noise
        # would drown the latent and the decoder would first learn to ignore it (measured: the
        # reconstructions lost all colour for the first thousand steps).
        logvar = logvar + INITIAL_LOGVAR
        return _plus(mean, shortcut), jnp.clip(logvar, -30.0, 20.0)


class Decoder(nn.Module):
    """[B, T', H', W', latent_channels] -> [B, 1 + ft (T' - 1), H, W, 3] (unbounded; ~[-1, 1])."""

    cfg: AutoencoderConfig

    @nn.compact
    def __call__(self, latent: jax.Array) -> jax.Array:
        cfg, s = self.cfg, self.cfg.stem
        # The first frame of the first chunk is dropped after each time doubling (a latent's
        # first frame stands for one video frame, the others for `2` each); later chunks keep all.
        first = _first_chunk(self)
        levels = _levels(cfg)
        x = CausalConv3d(levels[-1][0], name="conv_in")(latent)
        x = _plus(x, _repeat_channels(latent, levels[-1][0]))
        for j in range(cfg.res_blocks):
            x = ResBlock(x.shape[-1], name=f"mid_res{j}")(x)
        for i in reversed(range(len(levels))):
            features = levels[i - 1][0] if i else cfg.channels[0]  # the encoder's input width
            halve_t = levels[i][1]
            ft = 2 if halve_t else 1
            # A pointwise projection, then pixel shuffle; the residual blocks mix space.
            shortcut = _repeat_channels(x, ft * 4 * features)
            x = _plus(CausalConv3d(ft * 4 * features, kernel=(1, 1, 1), name=f"up{i}")(x),
                      shortcut)
            x = rearrange(x, "b t h w (f p q c) -> b (t f) (h p) (w q) c", f=ft, p=2, q=2)
            if halve_t and first:
                x = x[:, 1:]
            for j in range(cfg.res_blocks):
                x = ResBlock(features, name=f"up{i}_res{j}")(x)
        x = nn.silu(nn.LayerNorm(name="norm_out")(x))
        x = CausalConv3d(s * s * 3, name="head")(x)
        return rearrange(x, "b t h w (p q c) -> b t (h p) (w q) c", p=s, q=s)


class CausalVAE(nn.Module):
    """Encoder + decoder; `__call__` is the training pass with a reparameterised sample."""

    cfg: AutoencoderConfig

    def setup(self):
        self.encoder = Encoder(self.cfg)
        self.decoder = Decoder(self.cfg)

    def encode(self, video: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.encoder(video)

    def encode_mean(self, video: jax.Array) -> jax.Array:
        return self.encoder(video)[0]

    def decode(self, latent: jax.Array) -> jax.Array:
        return self.decoder(latent)

    def __call__(self, video: jax.Array, key: jax.Array):
        """-> (reconstruction [B, T, H, W, 3], mean, logvar)."""
        mean, logvar = self.encoder(video)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
        return self.decoder(z), mean, logvar


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mean, exp(logvar)) || N(0, 1)) per latent element, averaged: a scalar >= 0."""
    return 0.5 * jnp.mean(mean**2 + jnp.exp(logvar) - 1.0 - logvar)
