"""Rectified flow (Liu et al. 2022; Esser et al. 2024): x_t = (1 - t) x0 + t eps, v = eps - x0.

t = 0 is data, t = 1 is noise. Training draws t from a logit-normal and shifts it toward noise
for longer token sequences, where more of the signal survives at a given t.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from vdit.config import DiffusionConfig


def resolve_shift(cfg: DiffusionConfig, num_tokens: int) -> float:
    """The time shift s: configured, or sqrt(tokens / base tokens) (SD3's resolution rule)."""
    return cfg.shift if cfg.shift is not None else math.sqrt(num_tokens / cfg.shift_base_tokens)


def shift_time(t: jax.Array, shift: float) -> jax.Array:
    """t' = s t / (1 + (s - 1) t): s > 1 moves t toward 1 (noise); s = 1 is the identity."""
    return shift * t / (1 + (shift - 1) * t)


def sample_time(key: jax.Array, batch: int, cfg: DiffusionConfig, shift: float) -> jax.Array:
    """Logit-normal t in (0, 1), then shifted: [batch]."""
    u = cfg.t_mean + cfg.t_std * jax.random.normal(key, (batch,))
    return shift_time(jax.nn.sigmoid(u), shift)


def noisy(x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """x_t for x0, noise [B, ...] and t [B]."""
    tb = t.reshape((-1,) + (1,) * (x0.ndim - 1))
    return (1 - tb) * x0 + tb * noise


def velocity_loss(v_pred: jax.Array, x0: jax.Array, noise: jax.Array) -> jax.Array:
    """Mean squared error against the target v = noise - x0, per sample: [B]."""
    err = jnp.square(v_pred.astype(jnp.float32) - (noise - x0))
    return err.reshape(err.shape[0], -1).mean(axis=1)
