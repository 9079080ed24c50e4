import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdit.config import DiffusionConfig
from vdit.diffusion.flow import noisy, resolve_shift, sample_time, shift_time, velocity_loss
from vdit.diffusion.sampler import guided, sample_ode, timesteps


def test_shift_moves_time_toward_noise_and_keeps_endpoints():
    t = jnp.linspace(0, 1, 11)
    np.testing.assert_allclose(shift_time(t, 1.0), t)
    s3 = shift_time(t, 3.0)
    assert float(s3[0]) == 0.0 and float(s3[-1]) == pytest.approx(1.0)
    assert bool(jnp.all(s3[1:-1] > t[1:-1]))
    assert resolve_shift(DiffusionConfig(shift_base_tokens=256), 1024) == pytest.approx(2.0)
    assert resolve_shift(DiffusionConfig(shift=1.5), 1024) == 1.5


def test_logit_normal_time_in_open_interval_and_seeded():
    cfg = DiffusionConfig()
    t = sample_time(jax.random.key(0), 10000, cfg, 1.0)
    assert float(t.min()) > 0 and float(t.max()) < 1
    assert abs(float(jnp.median(t)) - 0.5) < 0.02  # logit-normal(0, 1) is centred at 1/2
    np.testing.assert_array_equal(t, sample_time(jax.random.key(0), 10000, cfg, 1.0))
    assert float(jnp.median(sample_time(jax.random.key(0), 10000, cfg, 3.0))) > 0.7


def test_interpolation_and_velocity_target():
    x0, eps = jnp.ones((2, 3)), jnp.zeros((2, 3))
    np.testing.assert_allclose(noisy(x0, eps, jnp.array([0.0, 1.0])), [[1] * 3, [0] * 3])
    # The exact velocity of the straight path has zero loss.
    np.testing.assert_allclose(velocity_loss(eps - x0, x0, eps), [0.0, 0.0])


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_samplers_recover_a_point_mass_along_straight_paths(method):
    """For data = the single point c, the exact velocity is (x_t - c) / t; straight paths make
    both integrators exact, whatever the step count and shift."""
    c = jnp.array([[0.5, -2.0, 3.0]])

    def velocity(x, t, cond):
        return (x - c) / t[:, None]

    noise = jax.random.normal(jax.random.key(0), (4, 3))
    out = sample_ode(velocity, noise, steps=5, guidance=1.0, shift=2.0, method=method)
    np.testing.assert_allclose(out, jnp.broadcast_to(c, (4, 3)), atol=1e-5)


def test_guidance_combines_conditional_and_unconditional():
    v = guided(lambda x, t, cond: jnp.full_like(x, 2.0 if cond else 1.0), guidance=3.0)
    np.testing.assert_allclose(v(jnp.zeros(2), jnp.ones(2)), [4.0, 4.0])  # 1 + 3 * (2 - 1)


def test_sampler_is_deterministic_for_a_seed():
    def velocity(x, t, cond):
        return jnp.sin(x) * t[:, None] + (0.1 if cond else 0.0)

    def run(seed):
        noise = jax.random.normal(jax.random.key(seed), (2, 5))
        return sample_ode(velocity, noise, steps=8, guidance=2.0, shift=1.0, method="heun")

    np.testing.assert_array_equal(run(0), run(0))
    assert not np.allclose(run(0), run(1))
    ts = timesteps(4, 1.0)
    np.testing.assert_allclose(ts, [1.0, 0.75, 0.5, 0.25, 0.0])
