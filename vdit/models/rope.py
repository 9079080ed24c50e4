"""3D rotary position embedding: the head dimension is split across the t, h and w axes.

Two splits exist: vdit's own DiT gives time a quarter of the head dim (`split_head_dim`); the
Wan DiT (diffusers' `WanRotaryPosEmbed`) gives height and width 2 * (d // 6) each and time the
rest (`wan_split`). Both rotate interleaved channel pairs (2i, 2i + 1) with inverse frequencies
theta^(-2i / d_axis) per axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Split = tuple[int, int, int]
# angles [..., N, D/2], or (cos, sin) tables of that shape computed in float64 (fixed grids)
Rope = jax.Array | np.ndarray | tuple


def split_head_dim(head_dim: int) -> Split:
    """Channels per axis (t, h, w), each even: a quarter for time, the rest shared by h and w."""
    if head_dim % 8:
        raise ValueError(f"3D RoPE needs a head dim divisible by 8, got {head_dim}")
    dt = 2 * (head_dim // 8)
    rest = head_dim - dt
    dh = 2 * (rest // 4)
    return dt, dh, rest - dh


def wan_split(head_dim: int) -> Split:
    """Wan's split (t, h, w): h = w = 2 * (d // 6), t the rest; 128 -> (44, 42, 42)."""
    if head_dim % 2:
        raise ValueError(f"3D RoPE needs an even head dim, got {head_dim}")
    dh = 2 * (head_dim // 6)
    return head_dim - 2 * dh, dh, dh


def rope_angles(positions, head_dim: int, theta: float = 10000.0, split: Split | None = None):
    """positions [..., N, 3] (t, h, w) -> rotation angles [..., N, head_dim / 2]: numpy float64
    for a fixed grid (a constant), jax float32 for the per-row positions of packed batches.
    `split`: channels per axis (default `split_head_dim`)."""
    if isinstance(positions, np.ndarray):
        xp, wide = np, np.float64
    else:
        xp, wide = jnp, jnp.float32
    parts = []
    for axis, dim in enumerate(split or split_head_dim(head_dim)):
        inv_freq = theta ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
        parts.append(positions[..., axis : axis + 1].astype(wide) * inv_freq.astype(wide))
    angles = xp.concatenate(parts, axis=-1)
    return angles if xp is np else angles.astype(jnp.float32)


def rope_tables(positions: np.ndarray, head_dim: int, theta: float = 10000.0,
                split: Split | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin) float32 [N, head_dim / 2] of a fixed grid, computed in float64 (as diffusers
    does) and rounded once: exact to float32 at any position."""
    angles = rope_angles(np.asarray(positions), head_dim, theta, split)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: jax.Array, rope: Rope) -> jax.Array:
    """Rotate channel pairs (2i, 2i+1) of x [B, N, H, D] by angles [N, D/2] or [B, N, D/2], or
    by (cos, sin) tables of those shapes (`rope_tables`)."""
    if isinstance(rope, tuple):
        cos, sin = (jnp.asarray(r) for r in rope)
    else:
        angles = jnp.asarray(rope, jnp.float32)
        cos, sin = jnp.cos(angles), jnp.sin(angles)
    cos, sin = (c if c.ndim == 3 else c[None] for c in (cos, sin))
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    a, b = xf[..., 0], xf[..., 1]
    out = jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)
