"""ODE samplers for rectified flow with classifier-free guidance, one `lax.scan` each."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from vdit.diffusion.flow import shift_time

# velocity(x [B, ...], t [B], cond: bool) -> v [B, ...]
VelocityFn = Callable[[jax.Array, jax.Array, bool], jax.Array]


def guided(velocity: VelocityFn, guidance: float) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """v = v_uncond + w (v_cond - v_uncond); w = 1 needs no unconditional pass."""

    def fn(x, t):
        v_cond = velocity(x, t, True)
        if guidance == 1.0:
            return v_cond
        v_uncond = velocity(x, t, False)
        return v_uncond + guidance * (v_cond - v_uncond)

    return fn


def timesteps(steps: int, shift: float) -> jax.Array:
    """Decreasing times from 1 (noise) to 0 (data), shifted like training: [steps + 1]."""
    return shift_time(jnp.linspace(1.0, 0.0, steps + 1), shift)


def sample_ode(
    velocity: VelocityFn, noise: jax.Array, *, steps: int, guidance: float, shift: float,
    method: str = "euler",
) -> jax.Array:
    """Integrate dx/dt = v from t = 1 (x = noise [B, ...]) to t = 0; returns x0 [B, ...]."""
    v_fn = guided(velocity, guidance)
    ts = timesteps(steps, shift)
    batch = noise.shape[0]

    def euler(x, t_pair):
        t, t_next = t_pair
        return x + (t_next - t) * v_fn(x, jnp.full((batch,), t)), None

    def heun(x, t_pair):
        t, t_next = t_pair
        dt = t_next - t
        v = v_fn(x, jnp.full((batch,), t))
        x_euler = x + dt * v
        # The last step ends at t = 0, where the second evaluation is skipped (Karras et al.).
        v_next = v_fn(x_euler, jnp.full((batch,), t_next))
        return jnp.where(t_next > 0, x + dt * 0.5 * (v + v_next), x_euler), None

    if method not in ("euler", "heun"):
        raise ValueError(f"sampler {method!r}; allowed: euler, heun")
    step = euler if method == "euler" else heun
    x, _ = jax.lax.scan(step, noise, (ts[:-1], ts[1:]))
    return x
