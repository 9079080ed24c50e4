"""Helpers for equivalence tests: perturbed parameters (so every layer reaches the loss from the
first step) and whole-state comparisons (params, optimizer state, EMA), in memory or from a run's
checkpoints.

At initialisation the adaLN-Zero gates, the cross-attention output and the final layer are zero:
the network is the zero velocity and attention, MLP, cross-attention and the text encoder do not
reach the loss. Tests that claim two computations agree start from `perturbed` parameters and a
learning rate that is not zero at the first step, and compare the whole state afterwards."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

# The train section of an equivalence test: full learning rate from the first step (no warm-up
# from 0), so the first update already moves every parameter that has a gradient.
LIVE_TRAIN = {"lr": 1e-3, "warmup_steps": 0}


def perturbed(params: Any, scale: float = 0.1, seed: int = 0) -> Any:
    """params + seeded Gaussian noise (drawn on the host with numpy, so every mesh and process
    draws the same values), each leaf keeping its sharding."""
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree.flatten(params)
    noisy = [jax.device_put(np.asarray(p) + scale * rng.standard_normal(p.shape).astype(p.dtype),
                            p.sharding) for p in leaves]
    return jax.tree.unflatten(treedef, noisy)


def perturbed_state(state: Any) -> Any:
    """A TrainState whose params and EMA are perturbed (by different noise, so the EMA update
    is visible in the comparison)."""
    return state.replace(params=perturbed(state.params, seed=0),
                         ema_params=perturbed(state.ema_params, seed=1))


def flat(tree: Any) -> dict[str, np.ndarray]:
    """A pytree (TrainState, nested dicts, optax states) -> {path: numpy array}. Typed PRNG keys
    become their key data."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype,
                                                                  jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        out[_name(path)] = np.asarray(jax.device_get(leaf))
    return out


def _name(path) -> str:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def state_parts(state: Any) -> dict[str, dict[str, np.ndarray]]:
    """{"params", "ema_params", "opt_state", "step", "rng"} of a TrainState or of a checkpoint's
    nested dicts (`Checkpointer.restore_raw`), each flattened. Optax's named tuples and the
    checkpoint's dicts flatten to the same leaf order, so names are compared by position."""
    get = state.__getitem__ if isinstance(state, dict) else lambda k: getattr(state, k)
    return {k: flat(get(k)) for k in ("params", "ema_params", "opt_state", "step", "rng")}


def save_state(path: str | Path, state: Any) -> None:
    """A TrainState's parts as one .npz (no pickle): 'part:name' -> array."""
    arrays = {f"{part}:{name}": a for part, leaves in state_parts(state).items()
              for name, a in leaves.items()}
    np.savez(path, **arrays)


def load_state(path: str | Path) -> dict[str, dict[str, np.ndarray]]:
    out: dict[str, dict[str, np.ndarray]] = {}
    with np.load(path, allow_pickle=False) as f:
        for key in f.files:
            part, name = key.split(":", 1)
            out.setdefault(part, {})[name] = f[key]
    return out


def checkpoint_state(run_dir: str | Path, step: int | None = None) -> dict:
    """The parts of a run's checkpoint (the newest by default), read whole on one device."""
    from vdit.io.checkpoint import Checkpointer

    ckpt = Checkpointer(Path(run_dir) / "checkpoints", async_save=False)
    raw, _ = ckpt.restore_raw(step)
    ckpt.close()
    return state_parts(raw)


def _parts(state: Any) -> dict:
    if isinstance(state, dict) and set(state) >= {"params", "opt_state"} and all(
            isinstance(v, dict) and all(isinstance(a, np.ndarray) for a in v.values())
            for v in state.values()):
        return state  # already flattened parts
    return state_parts(state)


PARTS = ("params", "ema_params", "opt_state", "step", "rng")

# Two layouts (or meshes) of one computation reduce in different orders, so their states differ
# by float32 noise. Adam's moments stay within 1e-4 relative (measured: 2e-9 absolute at most).
# A parameter's update is about lr * mu / sqrt(nu), which amplifies that noise where a gradient
# is near zero: after 3 steps at lr 1e-3 the params differed by up to 1.9e-5 (dp, 8 devices),
# against 1e-3 that one step moves each of them. A computation that differs (a gradient wrong
# in one layout) moves the moments by far more than 1e-4 relative and a parameter by ~lr.
ACROSS_LAYOUTS = {"params": (1e-4, 0.0), "ema_params": (1e-4, 0.0), "opt_state": (1e-8, 1e-4)}


def assert_states_equal(got: Any, want: Any, *, tolerances: dict | None = None,
                        what: str = "", parts: tuple[str, ...] = PARTS) -> None:
    """Params, EMA, both Adam moments (every optimizer leaf), step and rng of two states are
    equal: bit for bit by default, or within atol + rtol * |want| where `tolerances` gives
    {part: (atol, rtol)} (floats only; step and rng always exactly). `parts` limits the
    comparison."""
    got, want = _parts(got), _parts(want)
    for part in parts:
        atol, rtol = (tolerances or {}).get(part, (0.0, 0.0))
        a, b = list(got[part].items()), list(want[part].items())
        assert len(a) == len(b), f"{what} {part}: {len(a)} leaves against {len(b)}"
        for (name, x), (_, y) in zip(a, b, strict=True):
            msg = f"{what} {part}/{name}"
            assert x.shape == y.shape and x.dtype == y.dtype, (msg, x.shape, y.shape)
            exact = (atol == rtol == 0.0 or part in ("step", "rng")
                     or not np.issubdtype(x.dtype, np.floating))
            if exact:
                np.testing.assert_array_equal(x, y, err_msg=msg)
            else:
                np.testing.assert_allclose(x, y, atol=atol, rtol=rtol, err_msg=msg)


def max_differences(got: Any, want: Any) -> dict[str, float]:
    """The largest |difference| per part (for reports and for choosing tolerances)."""
    got, want = _parts(got), _parts(want)
    return {part: max((float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)),
                                     initial=0.0))
                       for x, y in zip(got[part].values(), want[part].values(), strict=True)),
                      default=0.0)
            for part in ("params", "ema_params", "opt_state")}


def assert_every_parameter_reached_the_loss(state: Any) -> None:
    """Every parameter leaf had a non-zero gradient at some step: Adam's first moment of each
    leaf is non-zero somewhere. Without perturbed parameters, the attention, MLP, cross-attention
    and text-encoder leaves fail this for the first steps."""
    parts = _parts(state)
    mu = {name: a for name, a in parts["opt_state"].items() if "/mu/" in f"/{name}/"}
    assert len(mu) == len(parts["params"]), (len(mu), len(parts["params"]))
    dead = [name for name, a in mu.items() if not np.any(a != 0)]
    assert not dead, f"parameters with zero gradient at every step: {dead}"
