"""ODE samplers for rectified flow with classifier-free guidance: one `lax.scan` per solver.

`integrate` runs any `Schedule` (vdit/diffusion/schedulers.py): Euler (vdit's `euler`,
diffusers' FlowMatchEuler), Heun, and diffusers' flow-matching UniPC, whose multistep state
(past data predictions, the last corrected sample) is carried through the scan. `sample_ode`
is vdit's own DiT on top of it: `sample.sampler` picks the schedule and solver.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from vdit.diffusion.schedulers import Schedule, unipc_tables, vdit_schedule

# velocity(x [B, ...], t [B], cond: bool) -> v [B, ...]
VelocityFn = Callable[[jax.Array, jax.Array, bool], jax.Array]
# v_fn(x [B, ...], sigma [] float32, timestep [] float32) -> v [B, ...], already guided: the
# velocity dx/dsigma at the sample x, where the update uses sigma and the model is called with
# timestep (Schedule.timesteps: diffusers' value for diffusers' schedules, the sigma for vdit's).
StepVelocityFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


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
    """Euler's and Heun's decreasing times from 1 (noise) to 0 (data), shifted like training:
    [steps + 1]."""
    return jnp.asarray(vdit_schedule("euler", steps, shift).sigmas)


def euler_step(x: jax.Array, v: jax.Array, sigma, sigma_next, cast: bool = False) -> jax.Array:
    """x + (sigma_next - sigma) v; `cast`: rounded to v's dtype, kept in x's (FlowMatchEuler)."""
    out = x + (sigma_next - sigma) * v
    return (out.astype(v.dtype) if cast else out).astype(x.dtype)


def integrate(v_fn: StepVelocityFn, noise: jax.Array, schedule: Schedule, *,
              trajectory: bool = False) -> jax.Array:
    """Integrate dx/dsigma = v along `schedule` from x = noise at sigmas[0] to sigmas[-1];
    one `lax.scan` of `schedule.steps` steps (v_fn is traced once, Heun's twice). Returns the
    final x, or with `trajectory` the sample after each step [steps, *noise.shape] (UniPC's:
    the predictor's, which the next step's model sees and its corrector then refines)."""
    sig = np.asarray(schedule.sigmas, np.float32)
    ts = np.asarray(schedule.timesteps, np.float32)
    if sig.shape != (schedule.steps + 1,):
        raise ValueError(f"schedule: {len(sig)} sigmas for {schedule.steps} timesteps; "
                         "need steps + 1")
    dt = np.dtype(noise.dtype)
    rows = {"sigma": sig[:-1], "sigma_next": sig[1:], "t": ts}

    if schedule.solver == "euler":
        def step(x, r):
            v = v_fn(x, r["sigma"], r["t"])
            x = euler_step(x, v, r["sigma"], r["sigma_next"], schedule.cast_to_output_dtype)
            return x, x

        init = noise
    elif schedule.solver == "heun":
        if not np.array_equal(ts, sig[:-1]):
            raise ValueError("heun evaluates at sigma_next, so it needs a schedule whose "
                             "timesteps are its sigmas (vdit's own)")

        def step(x, r):
            v = v_fn(x, r["sigma"], r["t"])
            x_euler = euler_step(x, v, r["sigma"], r["sigma_next"])
            # The last step ends at sigma = 0, where the second evaluation is skipped (Karras
            # et al.).
            v_next = v_fn(x_euler, r["sigma_next"], r["sigma_next"])
            x_heun = x + (r["sigma_next"] - r["sigma"]) * 0.5 * (v + v_next)
            x = jnp.where(r["sigma_next"] > 0, x_heun, x_euler).astype(dt)
            return x, x

        init = noise
    elif schedule.solver == "unipc":
        tab = unipc_tables(schedule)
        rows.update(on=tab.corrector, c_last=tab.c_last, c_new=tab.c_new, c_hist=tab.c_hist,
                    p_x=tab.p_x, p_new=tab.p_new, p_hist=tab.p_hist)

        def mix(a, hist):  # sum_j a[j] hist[j]
            return jnp.tensordot(a.astype(dt), hist, axes=1)

        def step(carry, r):
            x, last, hist = carry  # model input, last corrected sample, past data predictions
            v = v_fn(x, r["sigma"], r["t"])
            m = (x - r["sigma"] * v).astype(dt)  # the data prediction, from the model's input
            corrected = (r["c_last"].astype(dt) * last + r["c_new"].astype(dt) * m
                         + mix(r["c_hist"], hist))
            x = jnp.where(r["on"], corrected, x)
            x_next = (r["p_x"].astype(dt) * x + r["p_new"].astype(dt) * m
                      + mix(r["p_hist"], hist)).astype(dt)
            return (x_next, x, jnp.concatenate([hist[1:], m[None]])), x_next

        init = (noise, noise, jnp.zeros((tab.order, *noise.shape), dt))
    else:
        raise ValueError(f"schedule solver {schedule.solver!r}; allowed: euler, heun, unipc")

    def body(carry, r):
        carry, x = step(carry, r)
        return carry, (x if trajectory else None)

    carry, xs = jax.lax.scan(body, init, rows)
    if trajectory:
        return xs
    return carry[0] if isinstance(carry, tuple) else carry


def sample_ode(
    velocity: VelocityFn, noise: jax.Array, *, steps: int, guidance: float, shift: float,
    method: str = "euler",
) -> jax.Array:
    """vdit's own DiT: integrate dx/dt = v from t = 1 (x = noise [B, ...]) to t = 0 with the
    `sample.sampler` method (schedulers.vdit_schedule: the DiT's t is the sigma); returns x0."""
    v = guided(velocity, guidance)
    batch = noise.shape[0]
    schedule = vdit_schedule(method, steps, shift)
    return integrate(lambda x, sigma, t: v(x, jnp.full((batch,), t)), noise, schedule)
