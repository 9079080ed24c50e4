"""Rectified flow (Liu et al. 2022; Esser et al. 2024): x_t = (1 - t) x0 + t eps, v = eps - x0.

t = 0 is data, t = 1 is noise. Training draws t from a logit-normal and shifts it toward noise
for longer token sequences, where more of the signal survives at a given t.

This is Wan's flow matching in diffusers' terms (tests/test_wan_flow.py against diffusers
0.42.1): t is the sigma of FlowMatchEulerDiscreteScheduler(shift=s), whose training sigmas are
`shift_time` of its unshifted grid; `noisy` is its `scale_noise` (and UniPC's `add_noise`), the
target noise - x0 is finetrainers' and diffusers' examples'; the Wan DiT's timestep is 1000 t
(models/wan_dit.py `time_scale`), the trainers' float timestep.
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


def unshift_time(t, shift: float):
    """The inverse of `shift_time`: u = t / (s - (s - 1) t)."""
    return t / (shift - (shift - 1) * t)


def sample_time(key: jax.Array, batch: int, cfg: DiffusionConfig, shift: float,
                t_range: tuple[float, float] | None = None) -> jax.Array:
    """Logit-normal t in (0, 1), then shifted: [batch]. With `t_range` (lo, hi) the same
    distribution conditioned on lo <= t < hi (hi = 1: t <= 1), drawn exactly by a truncated
    normal (a Wan 2.2 expert's range, diffusion/experts.py)."""
    if t_range is None:
        u = cfg.t_mean + cfg.t_std * jax.random.normal(key, (batch,))
        return shift_time(jax.nn.sigmoid(u), shift)
    lo, hi = t_range
    bounds = []
    for t in (lo, hi):  # t -> u -> the normal's value (+-inf at t = 0 and 1)
        u = unshift_time(t, shift)
        z = -math.inf if u <= 0 else math.inf if u >= 1 else math.log(u / (1 - u))
        bounds.append((z - cfg.t_mean) / cfg.t_std)
    n = jax.random.truncated_normal(key, bounds[0], bounds[1], (batch,))
    t = shift_time(jax.nn.sigmoid(cfg.t_mean + cfg.t_std * n), shift)
    # float32 rounding on the way must not cross the bounds: lo <= t, and t < hi below 1.
    top = jnp.float32(hi) if hi >= 1 else jnp.nextafter(jnp.float32(hi), jnp.float32(0))
    return jnp.clip(t, jnp.float32(lo), top)


def noisy(x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """x_t for x0, noise [B, ...] and t [B]."""
    tb = t.reshape((-1,) + (1,) * (x0.ndim - 1))
    return (1 - tb) * x0 + tb * noise


def velocity_loss(v_pred: jax.Array, x0: jax.Array, noise: jax.Array) -> jax.Array:
    """Mean squared error against the target v = noise - x0, per sample: [B]."""
    err = jnp.square(v_pred.astype(jnp.float32) - (noise - x0))
    return err.reshape(err.shape[0], -1).mean(axis=1)
