"""Tiled encode/decode of long or large videos with a causal autoencoder (vdit's causal VAE or
the Wan VAE), in bounded memory.

Time: the video is cut into chunks (the first 1 + chunk_frames frames, then chunk_frames each)
and the encoder runs chunk by chunk, carrying each causal convolution's unconsumed frames in the
`cache` collection, so the result equals the one-shot pass (up to float rounding).
Space: overlapping tiles, each encoded (or decoded) on its own, blended with linear ramps across
the overlap. Tiles see zero padding at their borders, so this part is an approximation whose error
shrinks with the overlap; with one tile covering the frame it is exact.

Peak memory is that of one (tile, chunk), whatever the video's length and size. The Wan VAE
streams through its own `encode_chunk` / `decode_chunk` (the same cache, passed explicitly).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from vdit.models.autoencoder import Autoencoder, CausalAutoencoder, Params, pad_to_valid
from vdit.models.causal_vae import CausalVAE


@functools.cache
def _chunk_fn(module: CausalVAE, method: str):
    """jit((params, cache, x) -> (y, new cache)) for one chunk of the encoder or decoder."""

    def run(params, cache, x):
        variables = {"params": params, **({"cache": cache} if cache else {})}
        y, state = module.apply(variables, x, method=getattr(CausalVAE, method),
                                mutable=["cache"])
        return y, state["cache"]

    return jax.jit(run)


@functools.cache
def _stream_fn(ae: Autoencoder, method: str):
    """The same for a model with `encode_chunk` / `decode_chunk` (the Wan VAE); an empty
    cache is its first chunk."""

    def run(params, cache, x):
        if method == "encode_mean":
            (y, _), cache = ae.encode_chunk(params, x, cache or None)
            return y, cache
        return ae.decode_chunk(params, x, cache or None)

    return jax.jit(run)


def _chunked(ae: Autoencoder, params: Params, x: jax.Array, method: str,
             first: int, rest: int) -> jax.Array:
    """Run encode or decode over x [B, T, ...] in time chunks of `first`, then `rest` steps."""
    fn = (_chunk_fn(ae.module, method) if isinstance(ae, CausalAutoencoder)
          else _stream_fn(ae, method))
    outs, cache, start = [], {}, 0
    while start < x.shape[1]:
        size = first if start == 0 else rest
        y, cache = fn(params, cache, x[:, start: start + size])
        outs.append(np.asarray(y))
        start += size
    return np.concatenate(outs, axis=1)


def _ramp(n: int, overlap: int, at_start: bool, at_end: bool) -> np.ndarray:
    """Blend weights [n]: linear over `overlap` at each side that borders another tile."""
    w = np.ones(n, np.float32)
    ramp = (np.arange(overlap, dtype=np.float32) + 0.5) / overlap
    if overlap and not at_start:
        w[:overlap] = ramp
    if overlap and not at_end:
        w[n - overlap:] = ramp[::-1]
    return w


def _starts(size: int, tile: int, step: int) -> list[int]:
    """Tile origins covering [0, size) with tiles of `tile` advancing by `step`."""
    if size <= tile:
        return [0]
    starts = [*range(0, size - tile, step), size - tile]
    return sorted(set(starts))


def _tiled(fn, x: np.ndarray, tile: int, overlap: int, scale: float) -> np.ndarray:
    """Apply fn to overlapping spatial tiles of x [B, T, H, W, C]; blend the outputs.

    `scale` is output pixels per input pixel (1/8 when encoding, 8 when decoding)."""
    _, _, h, w, _ = x.shape
    ys, xs = _starts(h, tile, tile - overlap), _starts(w, tile, tile - overlap)
    out = weight = None
    for y0 in ys:
        for x0 in xs:
            part = fn(x[:, :, y0: y0 + tile, x0: x0 + tile])
            th, tw = part.shape[2:4]
            o = round(overlap * scale)
            wy = _ramp(th, min(o, th), y0 == 0, y0 == ys[-1])
            wx = _ramp(tw, min(o, tw), x0 == 0, x0 == xs[-1])
            wgt = (wy[:, None] * wx[None, :])[None, None, :, :, None]
            if out is None:
                shape = (*part.shape[:2], round(h * scale), round(w * scale), part.shape[-1])
                out, weight = np.zeros(shape, np.float32), np.zeros((*shape[:4], 1), np.float32)
            oy, ox = round(y0 * scale), round(x0 * scale)
            out[:, :, oy: oy + th, ox: ox + tw] += part * wgt
            weight[:, :, oy: oy + th, ox: ox + tw] += wgt
    return out / weight


def encode_tiled(ae: Autoencoder, params: Params, video: jax.Array) -> np.ndarray:
    """Posterior mean [B, T', H', W', C] of video [B, T, H, W, 3] in [-1, 1], tiled by
    `ae.cfg.chunk_frames`, `tile` and `tile_overlap` (pixels)."""
    cfg = ae.cfg
    video = np.asarray(pad_to_valid(jnp.asarray(video), cfg.factors))
    fn = lambda v: _chunked(ae, params, v, "encode_mean", 1 + cfg.chunk_frames,
                            cfg.chunk_frames)
    return _tiled(fn, video, cfg.tile, cfg.tile_overlap, 1 / cfg.factors[1])


def decode_tiled(ae: Autoencoder, params: Params, latent: jax.Array,
                 size: tuple[int, int, int] | None = None) -> np.ndarray:
    """Video [B, T, H, W, 3] of latent [B, T', H', W', C], tiled like `encode_tiled`."""
    cfg = ae.cfg
    ft, fh, _ = cfg.factors
    chunk = cfg.chunk_frames // ft
    fn = lambda z: _chunked(ae, params, z, "decode", 1 + chunk, chunk)
    video = _tiled(fn, np.asarray(latent), cfg.tile // fh, cfg.tile_overlap // fh, fh)
    if size is not None:
        video = video[:, : size[0], : size[1], : size[2]]
    return video
