"""diffusers' flow-matching schedulers in JAX (vdit/diffusion/schedulers.py, sampler.integrate)
against diffusers 0.42.1 (tests/fixtures/schedulers, made by tools/fixtures/schedulers.py),
their refusals, and what they do on flows with a known solution."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from vdit.config import ConfigError, load_config
from vdit.diffusion.sampler import integrate, sample_ode
from vdit.diffusion.schedulers import (
    Schedule,
    UniPC,
    schedule_from_config,
    unipc_tables,
    vdit_schedule,
)

FIXTURES = Path(__file__).parent / "fixtures" / "schedulers"
META = json.loads((FIXTURES / "cases.json").read_text())
REF = load_file(str(FIXTURES / "reference.safetensors"))
REFUSED = {"unipc_no_lof": "lower_order_final", "unipc_bh1": "solver_type"}
BUILT = sorted(set(META["cases"]) - set(REFUSED))
WAN = {name: c for name, c in META["cases"].items() if name.startswith("unipc_shift")}


def model(x, sigma, timestep):
    """The fixture's model: v = x @ A + b * timestep / 1000 (timestep as diffusers gives it)."""
    return x @ REF["A"] + REF["b"] * (timestep / 1000)


def run(schedule: Schedule, v_fn=model) -> np.ndarray:
    fn = jax.jit(lambda noise: integrate(v_fn, noise, schedule, trajectory=True))
    return np.asarray(fn(jnp.asarray(REF["noise"])))


def case_schedule(name: str, **change) -> Schedule:
    case = META["cases"][name]
    return schedule_from_config({**case["config"], **change}, case["steps"])


@pytest.mark.parametrize("name", BUILT)
def test_sigmas_and_timesteps_are_diffusers(name):
    """sigmas bit for bit; timesteps are what the model is called with: UniPC's int64
    truncation of sigma * 1000 (964 for sigma 0.96432), FlowMatchEuler's float32 sigma * 1000."""
    s = case_schedule(name)
    np.testing.assert_array_equal(s.sigmas, REF[f"{name}/sigmas"])
    want = REF[f"{name}/timesteps"]
    assert want.dtype == (np.int64 if name.startswith("unipc") else np.float32)
    np.testing.assert_array_equal(s.timesteps, want.astype(np.float32))
    assert s.timesteps.dtype == np.float32 and s.sigmas.dtype == np.float32


def test_wan_timesteps_are_truncated_not_rounded_and_start_below_one():
    s = case_schedule("unipc_shift3_steps10")
    assert s.timesteps[1] == 964.0 and s.sigmas[1] == pytest.approx(0.964324, abs=1e-6)
    assert s.sigmas[0] == np.float32(1 - 1e-6) and s.timesteps[0] == 999.0  # not 1000
    np.testing.assert_array_equal(s.timesteps, np.floor(s.timesteps))
    assert np.all(s.timesteps <= s.sigmas[:-1] * 1000) and s.sigmas[-1] == 0.0
    e = case_schedule("flow_euler_shift3_steps10")  # the lower end is shifted twice
    assert e.sigmas[-2] == pytest.approx(3 * 0.002994012 / (1 + 2 * 0.002994012), rel=1e-5)


@pytest.mark.parametrize("name", BUILT)
def test_trajectories_match_diffusers(name):
    """The sample after every step, to 1e-5: Wan's UniPC at flow_shift 3 and 5, 1 to 50 steps
    (warm-up, corrector, lower order at the end), other orders, bh1, a disabled corrector, and
    FlowMatchEuler."""
    np.testing.assert_allclose(run(case_schedule(name)), REF[f"{name}/trajectory"],
                               atol=1e-5, rtol=1e-5)


def test_the_parity_test_can_fail():
    """Each of these changes moves the 10-step trajectory far past the 1e-5 tolerance: the
    corrector off, order 1, the float sigma given to the model instead of its timestep."""
    ref = REF["unipc_shift3_steps10/trajectory"]
    s = case_schedule("unipc_shift3_steps10")
    broken = {
        "corrector off": case_schedule("unipc_shift3_steps10", disable_corrector=list(range(10))),
        "order 1": case_schedule("unipc_shift3_steps10", solver_order=1),
        "bh1": case_schedule("unipc_shift3_steps10", solver_type="bh1",
                             final_sigmas_type="sigma_min"),
    }
    for what, schedule in broken.items():
        err = np.abs(run(schedule) - ref).max()
        assert err > 1e-3, (what, err)
    sigma_as_time = run(s, lambda x, sigma, t: model(x, sigma, sigma * 1000))
    assert np.abs(sigma_as_time - ref).max() > 1e-4
    # And the order of the steps: predictor order 1, then 2, then 1 at the last step.
    np.testing.assert_array_equal(unipc_tables(s).orders, [1] + [2] * 8 + [1])
    assert not unipc_tables(s).corrector[0] and unipc_tables(s).corrector[1:].all()


def test_flow_euler_rounds_samples_to_a_bf16_models_dtype_as_diffusers_does():
    """diffusers' FlowMatchEuler casts each new sample to the model output's dtype (bf16 latents
    under a bf16 model), kept here in the noise's float32; vdit's own euler does not round."""
    def bf16_model(x, sigma, t):
        return model(x, sigma, t).astype(jnp.bfloat16)

    for schedule, rounded in ((case_schedule("flow_euler_shift3_steps10"), True),
                              (vdit_schedule("euler", 10, 3.0), False)):
        traj = run(schedule, bf16_model)
        assert traj.dtype == np.float32
        as_bf16 = np.asarray(jnp.asarray(traj).astype(jnp.bfloat16).astype(jnp.float32))
        assert np.array_equal(traj, as_bf16) == rounded


def test_unipc_runs_in_one_scan_traced_once():
    calls = []

    def v_fn(x, sigma, t):
        calls.append(1)
        return model(x, sigma, t)

    out = jax.jit(lambda n: integrate(v_fn, n, case_schedule("unipc_shift5_steps50")))(
        jnp.asarray(REF["noise"]))
    assert len(calls) == 1
    np.testing.assert_allclose(out, REF["unipc_shift5_steps50/trajectory"][-1], atol=1e-5)


@pytest.mark.parametrize("change, key", [
    ({"prediction_type": "epsilon"}, "prediction_type"),
    ({"use_flow_sigmas": False}, "use_flow_sigmas"),
    ({"use_dynamic_shifting": True}, "use_dynamic_shifting"),
    ({"use_karras_sigmas": True}, "use_karras_sigmas"),
    ({"thresholding": True}, "thresholding"),
    ({"predict_x0": False}, "predict_x0"),
    ({"shift_terminal": 0.1}, "shift_terminal"),
    ({"solver_type": "bh3"}, "solver_type"),
    ({"solver_order": 0}, "solver_order"),
    ({"final_sigmas_type": "one"}, "final_sigmas_type"),
    ({"flow_shift": -1.0}, "flow_shift"),
    ({"lower_order_final": False}, "lower_order_final"),
    ({"solver_type": "bh1"}, "solver_type"),
    ({"new_option": 1}, "new_option"),
    ({"_class_name": "DDIMScheduler"}, "_class_name"),
])
def test_unipc_settings_not_built_are_refused_naming_the_key(change, key):
    config = {**META["cases"]["unipc_shift3_steps10"]["config"], **change}
    with pytest.raises(ValueError, match=key):
        schedule_from_config(config, 10, where="wan/scheduler/scheduler_config.json")


def test_refused_settings_are_the_ones_diffusers_cannot_run():
    """lower_order_final false and bh1 into a final sigma 0: diffusers' own samples are not
    finite there, which is why they are refused rather than matched."""
    for name, key in REFUSED.items():
        assert not META["cases"][name]["finite"]
        with pytest.raises(ValueError, match=key):
            case_schedule(name)
    # One step never runs above order 1, so lower_order_final does not matter there.
    schedule_from_config({**META["cases"]["unipc_no_lof"]["config"]}, 1)


@pytest.mark.parametrize("change, key", [
    ({"use_dynamic_shifting": True}, "use_dynamic_shifting"),
    ({"invert_sigmas": True}, "invert_sigmas"),
    ({"stochastic_sampling": True}, "stochastic_sampling"),
    ({"shift": 0}, "shift"),
])
def test_flow_euler_exotic_options_are_refused(change, key):
    config = {**META["cases"]["flow_euler_shift3_steps10"]["config"], **change}
    with pytest.raises(ValueError, match=key):
        schedule_from_config(config, 10)


def test_a_minimal_config_takes_diffusers_defaults():
    """Keys left out take diffusers' defaults (UniPC's prediction_type defaults to epsilon,
    refused); Wan's four keys give Wan's schedule."""
    wan = {"_class_name": "UniPCMultistepScheduler", "prediction_type": "flow_prediction",
           "use_flow_sigmas": True, "flow_shift": 3.0}
    s = schedule_from_config(wan, 10)
    np.testing.assert_array_equal(s.sigmas, REF["unipc_shift3_steps10/sigmas"])
    assert s.unipc == UniPC(order=2, variant="bh2", lower_order_final=True)
    with pytest.raises(ValueError, match="prediction_type"):
        schedule_from_config({"_class_name": "UniPCMultistepScheduler"}, 10)


# --- flows whose solution is known -----------------------------------------------------------
MU, STD = 1.0, 0.5


def gaussian_velocity(x, t):
    """The exact marginal velocity from N(0, 1) noise at t = 1 to N(MU, STD^2) data at t = 0
    (x_t = (1 - t) x0 + t eps, so v = E[eps - x0 | x_t], linear in x_t); the ODE carries noise
    z to MU + STD z."""
    var = (1 - t) ** 2 * STD**2 + t**2
    return (t - (1 - t) * STD**2) / var * (x - (1 - t) * MU) - MU


def endpoint_error(method: str, steps: int, shift: float) -> float:
    z = jax.random.normal(jax.random.key(0), (64, 4))
    out = sample_ode(lambda x, t, cond: gaussian_velocity(x, t[:, None]), z, steps=steps,
                     guidance=1.0, shift=shift, method=method)
    return float(jnp.abs(out - (MU + STD * z)).max())


@pytest.mark.parametrize("shift, steps", [(1.0, 10), (3.0, 20)])
def test_unipc_error_is_far_below_euler(shift, steps):
    """UniPC's endpoint error is far below Euler's (30x at shift 1 and 10 steps), and below
    Heun's, which calls the model twice as often. (At shift 3 and 10 steps it is only 1.4x
    below Euler's: the last step, at order 1, jumps from sigma 0.25 to 0.)"""
    err = {m: endpoint_error(m, steps, shift) for m in ("euler", "flow_euler", "heun", "unipc")}
    assert err["unipc"] < err["euler"] / 4 and err["unipc"] < err["flow_euler"] / 4, err
    assert err["unipc"] < err["heun"], err


def test_unipc_converges_at_second_order_and_euler_at_first():
    """Two doublings of the steps (40 -> 160) divide UniPC's error by > 12 and Euler's by ~4.
    (Below 40 steps UniPC's error changes sign, so its ratio there says nothing.)"""
    unipc = [endpoint_error("unipc", n, 1.0) for n in (40, 160)]
    euler = [endpoint_error("euler", n, 1.0) for n in (40, 160)]
    assert unipc[0] / unipc[1] > 12, unipc
    assert 3 < euler[0] / euler[1] < 5, euler


@pytest.mark.parametrize("method", ["euler", "heun", "unipc", "flow_euler"])
def test_vdit_methods_recover_a_point_mass(method):
    """For data = the point c the velocity is (x - c) / t; every method is exact on straight
    paths (UniPC's data prediction is c at every step)."""
    c = jnp.array([[0.5, -2.0, 3.0]])
    noise = jax.random.normal(jax.random.key(0), (4, 3))
    out = sample_ode(lambda x, t, cond: (x - c) / t[:, None], noise, steps=5, guidance=1.0,
                     shift=2.0, method=method)
    np.testing.assert_allclose(out, jnp.broadcast_to(c, (4, 3)), atol=1e-5)


def test_vdit_schedules_give_the_dit_its_sigma():
    for method in ("euler", "heun", "unipc", "flow_euler"):
        s = vdit_schedule(method, 8, 3.0)
        np.testing.assert_array_equal(s.timesteps, s.sigmas[:-1])
        assert s.sigmas[-1] == 0 and np.all(np.diff(s.sigmas) < 0)
    # unipc and flow_euler take diffusers' sigmas for the DiT's shift; euler keeps vdit's grid.
    wan = case_schedule("unipc_shift3_steps10")
    np.testing.assert_array_equal(vdit_schedule("unipc", 10, 3.0).sigmas, wan.sigmas)
    np.testing.assert_array_equal(vdit_schedule("flow_euler", 10, 3.0).sigmas,
                                  REF["flow_euler_shift3_steps10/sigmas"])
    assert vdit_schedule("euler", 4, 1.0).sigmas.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    with pytest.raises(ValueError, match="allowed: euler, heun, unipc, flow_euler"):
        vdit_schedule("dpm", 8, 1.0)


def test_sample_sampler_takes_the_new_methods():
    for method in ("unipc", "flow_euler"):
        assert load_config(None, [f"sample.sampler={method}"]).sample.sampler == method
    with pytest.raises(ConfigError, match=r"sample\.sampler"):
        load_config(None, ["sample.sampler=dpm"])
