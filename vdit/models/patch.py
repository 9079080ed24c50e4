"""Spacetime patches: a latent video [B, T, H, W, C] <-> tokens [B, N, pt*ph*pw*C]."""

from __future__ import annotations

import jax
import numpy as np
from einops import rearrange


def patchify(x: jax.Array, patch: tuple[int, int, int]) -> jax.Array:
    """[B, T, H, W, C] -> [B, (T/pt)(H/ph)(W/pw), pt*ph*pw*C], tokens in (t, h, w) raster order."""
    pt, ph, pw = patch
    return rearrange(x, "b (t pt) (h ph) (w pw) c -> b (t h w) (pt ph pw c)", pt=pt, ph=ph, pw=pw)


def unpatchify(
    tokens: jax.Array, grid: tuple[int, int, int], patch: tuple[int, int, int]
) -> jax.Array:
    """Inverse of `patchify`: [B, N, pt*ph*pw*C] with grid (T/pt, H/ph, W/pw) -> [B, T, H, W, C]."""
    (t, h, w), (pt, ph, pw) = grid, patch
    return rearrange(
        tokens, "b (t h w) (pt ph pw c) -> b (t pt) (h ph) (w pw) c",
        t=t, h=h, w=w, pt=pt, ph=ph, pw=pw,
    )


def token_grid(latent_shape: tuple[int, ...], patch: tuple[int, int, int]) -> tuple[int, int, int]:
    """(T/pt, H/ph, W/pw) for a latent of shape (T, H, W, C)."""
    return tuple(s // p for s, p in zip(latent_shape[:3], patch, strict=True))  # type: ignore


def grid_positions(grid: tuple[int, int, int]) -> np.ndarray:
    """Integer (t, h, w) coordinates of each token in raster order: [N, 3]."""
    t, h, w = np.meshgrid(*(np.arange(g) for g in grid), indexing="ij")
    return np.stack([t.ravel(), h.ravel(), w.ravel()], axis=-1)
