"""3D rotary position embedding: the head dimension is split across the t, h and w axes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def split_head_dim(head_dim: int) -> tuple[int, int, int]:
    """Channels per axis (t, h, w), each even: a quarter for time, the rest shared by h and w."""
    if head_dim % 8:
        raise ValueError(f"3D RoPE needs a head dim divisible by 8, got {head_dim}")
    dt = 2 * (head_dim // 8)
    rest = head_dim - dt
    dh = 2 * (rest // 4)
    return dt, dh, rest - dh


def rope_angles(positions, head_dim: int, theta: float = 10000.0):
    """positions [..., N, 3] (t, h, w) -> rotation angles [..., N, head_dim / 2]: numpy for a
    fixed grid (a constant), jax for the per-row positions of packed batches."""
    if isinstance(positions, np.ndarray):
        xp, wide = np, np.float64
    else:
        xp, wide = jnp, jnp.float32
    parts = []
    for axis, dim in enumerate(split_head_dim(head_dim)):
        inv_freq = theta ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
        parts.append(positions[..., axis : axis + 1].astype(wide) * inv_freq.astype(wide))
    return xp.concatenate(parts, axis=-1).astype(xp.float32)


def apply_rope(x: jax.Array, angles: jax.Array) -> jax.Array:
    """Rotate channel pairs (2i, 2i+1) of x [B, N, H, D] by angles [N, D/2] or [B, N, D/2]."""
    angles = angles if angles.ndim == 3 else angles[None]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    a, b = xf[..., 0], xf[..., 1]
    out = jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)
