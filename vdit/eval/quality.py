"""Reconstruction quality: PSNR and SSIM of videos, as jittable functions.

SSIM follows Wang et al. (2004): an 11-tap Gaussian window (sigma 1.5) per frame and colour
channel, K1 = 0.01, K2 = 0.03, averaged over the valid window positions. Frames smaller than the
window use a window as large as the frame allows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def psnr(a: jax.Array, b: jax.Array, data_range: float = 255.0) -> jax.Array:
    """Peak signal-to-noise ratio in dB over whole videos a, b [B, T, H, W, C] -> [B]."""
    err = jnp.mean((a.astype(jnp.float32) - b.astype(jnp.float32)) ** 2, axis=(1, 2, 3, 4))
    return 10.0 * jnp.log10(data_range**2 / jnp.maximum(err, 1e-12))


def _gaussian(size: int, sigma: float) -> jax.Array:
    x = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2
    g = jnp.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _blur(x: jax.Array, taps: jax.Array) -> jax.Array:
    """Separable 'valid' filtering of x [N, H, W, 1] with the 1D window `taps`."""
    n = taps.shape[0]
    dn = ("NHWC", "HWIO", "NHWC")
    x = jax.lax.conv_general_dilated(x, taps.reshape(n, 1, 1, 1), (1, 1), "VALID",
                                     dimension_numbers=dn)
    return jax.lax.conv_general_dilated(x, taps.reshape(1, n, 1, 1), (1, 1), "VALID",
                                        dimension_numbers=dn)


def ssim(a: jax.Array, b: jax.Array, data_range: float = 255.0, window: int = 11,
         sigma: float = 1.5) -> jax.Array:
    """Structural similarity of videos a, b [B, T, H, W, C] -> [B], in [-1, 1] (1 = identical)."""
    bsz, _, h, w, _ = a.shape
    window = min(window, h, w)
    taps = _gaussian(window, sigma)
    # Every (frame, channel) is an independent image: fold them into the batch.
    fold = lambda v: v.astype(jnp.float32).transpose(0, 1, 4, 2, 3).reshape(-1, h, w, 1)
    x, y = fold(a), fold(b)
    mx, my = _blur(x, taps), _blur(y, taps)
    sxx = _blur(x * x, taps) - mx * mx
    syy = _blur(y * y, taps) - my * my
    sxy = _blur(x * y, taps) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.reshape(bsz, -1).mean(axis=1)
