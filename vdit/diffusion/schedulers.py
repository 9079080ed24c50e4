"""Noise schedules for the flow ODE, and diffusers' flow-matching schedulers read from their
`scheduler/scheduler_config.json`: `FlowMatchEulerDiscreteScheduler` and
`UniPCMultistepScheduler` with `prediction_type: flow_prediction`, `use_flow_sigmas` (what Wan
ships: order 2, `bh2`, the UniC corrector on, lower order at the end).

Everything here is host-side numpy, computed once per (config, steps); `sampler.integrate`
runs a `Schedule` in one `lax.scan`. sigma is the flow time: x_sigma = (1 - sigma) x0 +
sigma eps, so sigma 1 is noise and 0 is data, as vdit's t.

What the model is called with is not always the sigma the update uses. diffusers' UniPC
truncates sigma * num_train_timesteps to int64 (sigma 0.96432 -> timestep 964) and its
FlowMatchEuler passes sigma * num_train_timesteps in float32; both update with the float32
sigma. `Schedule.timesteps` holds exactly what diffusers gives the model (as float32, which
holds every such integer exactly); for vdit's own DiT it is the sigma itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from vdit.diffusion.flow import shift_time

Solver = Literal["euler", "heun", "unipc"]


@dataclass(frozen=True)
class UniPC:
    """UniPC's settings (Zhao et al. 2023, diffusers' `UniPCMultistepScheduler`, data
    prediction): predictor order (lowered to 1, 2, ... while its history fills, and at the
    last steps with `lower_order_final`), B(h) variant, and the step indices whose following
    step skips the UniC corrector (diffusers' `disable_corrector`)."""

    order: int = 2
    variant: Literal["bh1", "bh2"] = "bh2"
    lower_order_final: bool = True
    disable_corrector: tuple[int, ...] = ()


@dataclass(frozen=True, eq=False)
class Schedule:
    """A sampling schedule: `sigmas` float32 [steps + 1], decreasing to the final sigma (0);
    `timesteps` float32 [steps], the model's time input at step i (see the module docstring);
    the solver that integrates it. `cast_to_output_dtype`: each new sample is rounded to the
    velocity's dtype, as diffusers' FlowMatchEuler does (bf16 latents under a bf16 model)."""

    sigmas: np.ndarray
    timesteps: np.ndarray
    solver: Solver
    unipc: UniPC | None = None
    cast_to_output_dtype: bool = False

    @property
    def steps(self) -> int:
        return len(self.timesteps)


# --- vdit's own DiT: t is the sigma -----------------------------------------------------------
VDIT_METHODS = ("euler", "heun", "unipc", "flow_euler")
_TRAIN_TIMESTEPS = 1000  # diffusers' grid for the flow sigmas of unipc and flow_euler


def vdit_schedule(method: str, steps: int, shift: float) -> Schedule:
    """`sample.sampler` for vdit's own DiT, with its training shift (flow.shift_time):
    euler/heun on shift(linspace(1, 0)); unipc and flow_euler on diffusers' sigmas for that
    shift (UniPC's flow sigmas, FlowMatchEuler's); the DiT gets the sigma as its t."""
    if method not in VDIT_METHODS:
        raise ValueError(f"sampler {method!r}; allowed: {', '.join(VDIT_METHODS)}")
    if steps < 1:
        raise ValueError(f"steps: must be >= 1, got {steps}")
    if method == "unipc":
        sigmas, _ = unipc_flow_sigmas(steps, shift, _TRAIN_TIMESTEPS)
        return Schedule(sigmas, sigmas[:-1].copy(), "unipc", UniPC())
    if method == "flow_euler":
        sigmas, _ = flow_match_euler_sigmas(steps, shift, _TRAIN_TIMESTEPS)
        return Schedule(sigmas, sigmas[:-1].copy(), "euler")
    sigmas = shift_time(np.linspace(1.0, 0.0, steps + 1), shift).astype(np.float32)
    return Schedule(sigmas, sigmas[:-1].copy(), method)


# --- diffusers' sigmas, op for op -------------------------------------------------------------
def unipc_flow_sigmas(steps: int, flow_shift: float, num_train_timesteps: int,
                      final: str = "zero") -> tuple[np.ndarray, np.ndarray]:
    """`UniPCMultistepScheduler.set_timesteps` with use_flow_sigmas: (sigmas float32
    [steps + 1], timesteps int64 [steps]). In float64: linspace(1, 1/N, steps + 1) without its
    last point, shifted, the first lowered by 1e-6 (log(1 - sigma) must stay finite); the
    timesteps are that float64 sigma * N truncated to int64; then float32 and the final sigma."""
    sigmas = np.linspace(1, 1 / num_train_timesteps, steps + 1)[:-1]
    sigmas = flow_shift * sigmas / (1 + (flow_shift - 1) * sigmas)
    if np.fabs(sigmas[0] - 1) < 1e-6:
        sigmas[0] -= 1e-6
    timesteps = (sigmas * num_train_timesteps).copy().astype(np.int64)
    last = sigmas[-1] if final == "sigma_min" else 0
    return np.concatenate([sigmas, [last]]).astype(np.float32), timesteps


def flow_match_euler_sigmas(steps: int, shift: float, num_train_timesteps: int
                            ) -> tuple[np.ndarray, np.ndarray]:
    """`FlowMatchEulerDiscreteScheduler.set_timesteps` without dynamic shifting: (sigmas
    float32 [steps + 1], timesteps float32 [steps]). The grid runs from the constructor's
    sigma_max to its sigma_min, and that sigma_min (1/N, shifted in float32) is shifted
    again here: diffusers shifts the lower end twice (shift 3, N 1000: 0.00299 -> 0.00893)."""
    n = num_train_timesteps
    train = np.linspace(1, n, n, dtype=np.float32)[::-1] / np.float32(n)
    train = shift * train / (1 + (shift - 1) * train)  # float32, as the constructor's torch
    sigma_max, sigma_min = float(train[0]), float(train[-1])
    ts = np.linspace(sigma_max * n, sigma_min * n, steps)
    sigmas = ts / n
    sigmas = (shift * sigmas / (1 + (shift - 1) * sigmas)).astype(np.float32)
    timesteps = sigmas * np.float32(n)
    return np.concatenate([sigmas, np.zeros(1, np.float32)]), timesteps


# --- scheduler_config.json --------------------------------------------------------------------
# Keys with no effect on these paths (the VP betas are not used by flow sigmas, and the options
# below only act when another key is on, which is refused).
_UNIPC_IGNORED = {"beta_start", "beta_end", "beta_schedule", "trained_betas",
                  "rescale_betas_zero_snr", "dynamic_thresholding_ratio", "sample_max_value",
                  "timestep_spacing", "steps_offset", "time_shift_type", "sigma_min",
                  "sigma_max"}
_UNIPC_DEFAULTS = {  # diffusers' defaults, for keys an older config leaves out
    "num_train_timesteps": 1000, "solver_order": 2, "prediction_type": "epsilon",
    "thresholding": False, "predict_x0": True, "solver_type": "bh2", "lower_order_final": True,
    "disable_corrector": [], "solver_p": None, "use_karras_sigmas": False,
    "use_exponential_sigmas": False, "use_beta_sigmas": False, "use_flow_sigmas": False,
    "flow_shift": 1.0, "final_sigmas_type": "zero", "use_dynamic_shifting": False,
    "shift_terminal": None,
}
_EULER_IGNORED = {"base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len",
                  "time_shift_type"}
_EULER_DEFAULTS = {
    "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False,
    "invert_sigmas": False, "shift_terminal": None, "use_karras_sigmas": False,
    "use_exponential_sigmas": False, "use_beta_sigmas": False, "stochastic_sampling": False,
}
# What each refused setting must be: (key, required value, why).
_UNIPC_REQUIRED = (
    ("prediction_type", "flow_prediction", "the flow models' velocity output"),
    ("use_flow_sigmas", True, "sigmas on the flow path"),
    ("predict_x0", True, "diffusers has no noise-prediction UniPC for flow_prediction"),
    ("thresholding", False, "dynamic thresholding is not built"),
    ("solver_p", None, "an external predictor is not built"),
    ("use_karras_sigmas", False, "Karras sigmas are not built"),
    ("use_exponential_sigmas", False, "exponential sigmas are not built"),
    ("use_beta_sigmas", False, "beta sigmas are not built"),
    ("use_dynamic_shifting", False, "resolution-dependent shifting (mu) is not built"),
    ("shift_terminal", None, "a stretched terminal sigma is not built"),
)
_EULER_REQUIRED = (
    ("use_dynamic_shifting", False, "resolution-dependent shifting (mu) is not built"),
    ("invert_sigmas", False, "inverted sigmas (Mochi) are not built"),
    ("shift_terminal", None, "a stretched terminal sigma is not built"),
    ("use_karras_sigmas", False, "Karras sigmas are not built"),
    ("use_exponential_sigmas", False, "exponential sigmas are not built"),
    ("use_beta_sigmas", False, "beta sigmas are not built"),
    ("stochastic_sampling", False, "stochastic sampling is not built"),
)
# diffusers maps these solver_type names to bh2 when it builds the scheduler.
_BH2_ALIASES = ("bh2", "midpoint", "heun", "logrho")


def _settings(config: dict, name: str, defaults: dict, ignored: set, required: tuple,
              where: str) -> dict:
    keys = {k for k in config if not k.startswith("_")}
    unknown = sorted(keys - set(defaults) - ignored)
    if unknown:
        raise ValueError(f"{where}: {name} keys not understood: {', '.join(unknown)} (known: "
                         f"{', '.join(sorted(set(defaults) | ignored))})")
    cfg = {**defaults, **{k: config[k] for k in keys if k in defaults}}
    for key, want, why in required:
        if cfg[key] != want:
            raise ValueError(f"{where}: {key}: {cfg[key]!r} is not supported for {name} "
                             f"(allowed: {want!r}; {why})")
    n = cfg["num_train_timesteps"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"{where}: num_train_timesteps: must be an integer >= 1, got {n!r}")
    return cfg


def _shift_value(cfg: dict, key: str, where: str) -> float:
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{where}: {key}: must be a number > 0, got {value!r}")
    return float(value)


def schedule_from_config(config: dict, steps: int, where: str = "scheduler_config.json"
                         ) -> Schedule:
    """A diffusers `scheduler_config.json` (as a dict) and a step count -> its `Schedule`.
    `_class_name` picks the scheduler; settings this module does not build are refused,
    naming the key and the allowed value; `where` names the file in messages."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps: must be an integer >= 1, got {steps!r}")
    name = config.get("_class_name")
    if name == "UniPCMultistepScheduler":
        cfg = _settings(config, name, _UNIPC_DEFAULTS, _UNIPC_IGNORED, _UNIPC_REQUIRED, where)
        order = cfg["solver_order"]
        if isinstance(order, bool) or not isinstance(order, int) or order < 1:
            raise ValueError(f"{where}: solver_order: must be an integer >= 1, got {order!r}")
        kind = cfg["solver_type"]
        if kind not in ("bh1", *_BH2_ALIASES):
            raise ValueError(f"{where}: solver_type: {kind!r}; allowed: bh1, bh2 (diffusers "
                             "reads midpoint, heun and logrho as bh2)")
        final = cfg["final_sigmas_type"]
        if final not in ("zero", "sigma_min"):
            raise ValueError(f"{where}: final_sigmas_type: {final!r}; allowed: zero, sigma_min")
        off = cfg["disable_corrector"]
        if not isinstance(off, list | tuple) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in off):
            raise ValueError(f"{where}: disable_corrector: must be a list of step indices, "
                             f"got {off!r}")
        lof = cfg["lower_order_final"]
        if not isinstance(lof, bool):
            raise ValueError(f"{where}: lower_order_final: must be true or false, got {lof!r}")
        if not lof and final == "zero" and order > 1 and steps > 1:
            # The last step would run at order > 1 into sigma 0, where lambda is infinite:
            # diffusers divides by zero there and returns inf/NaN samples.
            raise ValueError(f"{where}: lower_order_final: false with final_sigmas_type "
                             f"'zero' and solver_order {order} gives NaN in diffusers' last "
                             "step; allowed: lower_order_final true (or solver_order 1)")
        if kind == "bh1" and final == "zero":
            # B(h) = h is infinite at sigma 0 and diffusers multiplies it by a zero residual.
            raise ValueError(f"{where}: solver_type: 'bh1' with final_sigmas_type 'zero' "
                             "gives NaN in diffusers' last step; allowed: bh2 (or "
                             "final_sigmas_type sigma_min)")
        shift = _shift_value(cfg, "flow_shift", where)
        sigmas, timesteps = unipc_flow_sigmas(steps, shift, cfg["num_train_timesteps"], final)
        opts = UniPC(order, "bh1" if kind == "bh1" else "bh2", lof,
                     tuple(sorted(set(off))))
        return Schedule(sigmas, timesteps.astype(np.float32), "unipc", opts)
    if name == "FlowMatchEulerDiscreteScheduler":
        cfg = _settings(config, name, _EULER_DEFAULTS, _EULER_IGNORED, _EULER_REQUIRED, where)
        shift = _shift_value(cfg, "shift", where)
        sigmas, timesteps = flow_match_euler_sigmas(steps, shift, cfg["num_train_timesteps"])
        return Schedule(sigmas, timesteps, "euler", cast_to_output_dtype=True)
    raise ValueError(f"{where}: _class_name: {name!r}; allowed: UniPCMultistepScheduler, "
                     "FlowMatchEulerDiscreteScheduler")


# --- UniPC as per-step linear coefficients ----------------------------------------------------
@dataclass(frozen=True, eq=False)
class UniPCTables:
    """UniPC's steps as linear maps, float32 per step i (`order` history slots, slot
    order - 1 holding the previous step's data prediction m_{i-1}, slot order - 1 - k m_{i-1-k}):

      corrector (where `corrector[i]`):  x_i <- c_last x_{i-1} + c_new m_i + c_hist . hist
      predictor:                         x_{i+1} = p_x x_i + p_new m_i + p_hist . hist

    with m_i = x_i - sigma_i v_i from the uncorrected x_i, and x_{i-1} the previous corrected
    sample: diffusers' `step` in its order (the model sees the predictor's sample; the corrector
    then fixes that sample with the new output before the next prediction)."""

    order: int
    corrector: np.ndarray  # bool [steps]
    c_last: np.ndarray  # [steps]
    c_new: np.ndarray  # [steps]
    c_hist: np.ndarray  # [steps, order]
    p_x: np.ndarray  # [steps]
    p_new: np.ndarray  # [steps]
    p_hist: np.ndarray  # [steps, order]
    orders: np.ndarray  # int [steps]: the predictor's order at each step


def _lambda(sigma: np.float32) -> np.float32:
    """log(alpha) - log(sigma) with alpha = 1 - sigma (flow sigmas), float32; inf at 0."""
    return np.log(np.float32(1) - sigma) - np.log(sigma)


def _bh(sigmas: np.ndarray, t: int, s0: int, prev: list[int], order: int, variant: str,
        corrector: bool) -> tuple[np.float32, np.float32, list[np.float32], np.float32]:
    """One B(h) update from sigma index s0 to t, `prev` the sigma indices of the older outputs
    (nearest first), as diffusers' multistep_uni_p/c_bh_update compute it in float32:
    (coefficient of the sample, of m0 (the output at s0), of each older output, of the new
    output m_t (corrector only))."""
    f32 = np.float32
    sigma_t, sigma_s0 = sigmas[t], sigmas[s0]
    alpha_t = f32(1) - sigma_t
    lam_s0 = _lambda(sigma_s0)
    h = _lambda(sigma_t) - lam_s0
    rks = [(_lambda(sigmas[si]) - lam_s0) / h for si in prev]
    rk_all = np.array([*rks, f32(1)], np.float32)
    hh = -h
    h_phi_1 = np.expm1(hh)
    h_phi_k = h_phi_1 / hh - f32(1)
    factorial = 1
    b_h = hh if variant == "bh1" else np.expm1(hh)
    rows, b = [], []
    for i in range(1, order + 1):
        rows.append(rk_all ** f32(i - 1))
        b.append(h_phi_k * f32(factorial) / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - f32(1) / f32(factorial)
    r = np.stack(rows).astype(np.float32)
    b = np.array(b, np.float32)
    c_x = sigma_t / sigma_s0
    c_m0 = -alpha_t * h_phi_1
    c_prev: list[np.float32] = []
    c_t = f32(0)
    if corrector:
        rhos = np.array([0.5], np.float32) if order == 1 else np.linalg.solve(r, b)
        rhos = rhos.astype(np.float32)
        for k, rk in enumerate(rks):  # D1_k = (m_k - m0) / rk
            c_prev.append(-alpha_t * b_h * rhos[k] / rk)
            c_m0 = c_m0 + alpha_t * b_h * rhos[k] / rk
        c_t = -alpha_t * b_h * rhos[-1]  # D1_t = m_t - m0
        c_m0 = c_m0 + alpha_t * b_h * rhos[-1]
    elif rks:
        rhos = (np.array([0.5], np.float32) if order == 2
                else np.linalg.solve(r[:-1, :-1], b[:-1]).astype(np.float32))
        for k, rk in enumerate(rks):
            c_prev.append(-alpha_t * b_h * rhos[k] / rk)
            c_m0 = c_m0 + alpha_t * b_h * rhos[k] / rk
    return c_x, c_m0, c_prev, c_t


def unipc_tables(schedule: Schedule) -> UniPCTables:
    """The per-step coefficients of `schedule` (solver "unipc"), following diffusers' `step`:
    the predictor's order is min(order, steps - i) with lower_order_final, then at most one
    more than the steps taken (warm-up); the corrector at step i > 0 has the order of step
    i - 1's predictor and is skipped where i - 1 is in disable_corrector."""
    opts = schedule.unipc or UniPC()
    p, n = opts.order, schedule.steps
    sig = np.asarray(schedule.sigmas, np.float32)
    out = {k: np.zeros(n, np.float32) for k in ("c_last", "c_new", "p_x", "p_new")}
    c_hist, p_hist = np.zeros((n, p), np.float32), np.zeros((n, p), np.float32)
    corrector, orders = np.zeros(n, bool), np.zeros(n, np.int32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for i in range(n):
            this = min(p, n - i) if opts.lower_order_final else p
            orders[i] = min(this, min(i, p) + 1)
            if i > 0 and (i - 1) not in opts.disable_corrector:
                q = int(orders[i - 1])
                corrector[i] = True
                c_x, c_m0, c_prev, c_t = _bh(sig, i, i - 1, [i - 1 - k for k in range(1, q)],
                                             q, opts.variant, corrector=True)
                out["c_last"][i], out["c_new"][i] = c_x, c_t
                c_hist[i, p - 1] = c_m0
                for k, c in enumerate(c_prev, start=1):
                    c_hist[i, p - 1 - k] = c
            q = int(orders[i])
            c_x, c_m0, c_prev, _ = _bh(sig, i + 1, i, [i - k for k in range(1, q)], q,
                                       opts.variant, corrector=False)
            out["p_x"][i], out["p_new"][i] = c_x, c_m0
            for k, c in enumerate(c_prev, start=1):
                p_hist[i, p - k] = c
    return UniPCTables(p, corrector, out["c_last"], out["c_new"], c_hist, out["p_x"],
                       out["p_new"], p_hist, orders)
