"""Wan 2.2's two experts (`train.expert`): each trains on its own range of t around a boundary.

diffusers' WanPipeline runs `transformer` (the high-noise expert) while the scheduler's
timestep >= boundary_ratio x num_train_timesteps and `transformer_2` (low noise) below it; vdit's
t is that timestep / 1000 (diffusion/flow.py), so with b = boundary_ratio:

    high   b <= t <= 1      transformer/ of an export
    low    0 <= t < b       transformer_2/

train.expert
  none         the whole range, one transformer (Wan 2.1, Wan 2.2 TI2V-5B)
  high | low   one expert: t drawn from the training distribution (shifted logit-normal)
               conditioned on the expert's range (flow.sample_time's t_range, a truncated
               normal), so the expert sees its t's at the density a full-range run gives them
  both         one run holding both experts, params {"high": tree, "low": tree}. Each batch
               is cut into two interleaved halves: rows 0, 2, 4, ... train the high expert,
               rows 1, 3, 5, ... the low one (every device keeps its rows, as microbatches
               do). Each half draws its t's in its expert's range and its loss reaches only its
               expert's params; the step's loss is the mean of the halves' (the batch mean).
               Two runs of batch B/2 in one step, whatever share of t each range holds; Adam
               is per parameter, so only the gradient clip (one global norm) couples them.

The boundary is `train.boundary_ratio`, else the boundary_ratio of a `train.init_from`
WanPipeline folder, else 0.875 (Wan 2.2 T2V-A14B); `vdit train` writes the one it used into the
run's config.yaml (`resolve_experts`). Sampling a run routes each step by its t (`route`), and
`vdit export --to diffusers` writes the experts as transformer/ and transformer_2/.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vdit.config import Config, ConfigError

EXPERTS = ("high", "low")
DEFAULT_BOUNDARY = 0.875  # Wan 2.2 T2V-A14B's model_index.json
FOLDERS = {"high": "transformer", "low": "transformer_2"}  # an export's folder per expert


def _pipeline_boundary(init_from: str) -> float | None:
    """boundary_ratio of a `train.init_from` WanPipeline folder (None: not a pipeline, or one
    transformer)."""
    from vdit.io.wan_pipeline import is_pipeline_folder, resolve_pipeline

    if not init_from or not is_pipeline_folder(init_from):
        return None
    return resolve_pipeline(init_from).boundary_ratio


def boundary_of(cfg: Config) -> float:
    """The run's boundary b (see the module doc), in vdit's t (= diffusers' boundary_ratio)."""
    t = cfg.train
    if t.boundary_ratio is not None:
        return float(t.boundary_ratio)
    found = _pipeline_boundary(t.init_from)
    return DEFAULT_BOUNDARY if found is None else found


def resolve_experts(cfg: Config) -> Config:
    """The config with `train.boundary_ratio` filled in for an expert run, so the run directory
    names the boundary its sampling and export use without the init_from folder."""
    if cfg.train.expert == "none" or cfg.train.boundary_ratio is not None:
        return cfg
    return dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, boundary_ratio=boundary_of(cfg)))


def t_range(expert: str, boundary: float) -> tuple[float, float] | None:
    """(lo, hi) of an expert's t (lo <= t < hi; hi = 1 includes 1); None for the whole range."""
    if expert == "high":
        return (boundary, 1.0)
    if expert == "low":
        return (0.0, boundary)
    return None


def is_high(t: jax.Array, boundary: float) -> jax.Array:
    """Whether the high-noise expert runs at t (WanPipeline: timestep >= boundary_ratio x
    1000)."""
    return t >= jnp.float32(boundary)


def expert_at(t: float, boundary: float) -> str:
    """The expert of a fixed t (`is_high` in float32, as the traced rule compares)."""
    return "high" if np.float32(t) >= np.float32(boundary) else "low"


def eval_times(cfg: Config) -> tuple[float, ...]:
    """The eval timesteps a run evaluates: diffusion.eval_timesteps, for a one-expert run only
    those in its range (refused, naming the key, when none is)."""
    times = tuple(cfg.diffusion.eval_timesteps)
    if cfg.train.expert not in EXPERTS:
        return times
    b = boundary_of(cfg)
    mine = tuple(t for t in times if expert_at(t, b) == cfg.train.expert)
    if not mine:
        raise ConfigError(f"diffusion.eval_timesteps: none of {list(times)} is in the range of "
                          f"train.expert '{cfg.train.expert}' (boundary {b}: high t >= {b}, "
                          f"low t < {b}); add one")
    return mine


def halves(tree: Any) -> tuple[Any, Any]:
    """A batch [B, ...] (any pytree of arrays) -> (rows 0, 2, 4, ..., rows 1, 3, 5, ...), each
    [B / 2, ...], by a reshape that keeps the sharded batch axis in place."""
    import flax.linen as nn

    def part(x, i):
        y = x.reshape(x.shape[0] // 2, 2, *x.shape[1:])
        y = nn.with_logical_constraint(y, ("batch",) + (None,) * (y.ndim - 1))
        return y[:, i]

    return jax.tree.map(lambda x: part(x, 0), tree), jax.tree.map(lambda x: part(x, 1), tree)


def both_loss(loss_fn: Callable, params: dict, batch: dict, key: jax.Array,
              boundary: float) -> tuple[jax.Array, dict]:
    """`train.expert: both` (see the module doc): loss_fn(expert_params, half_batch, key,
    t_range) -> (loss, aux) on each half with its expert; returns (mean of the halves' losses,
    {"loss_high", "loss_low"})."""
    parts = dict(zip(EXPERTS, halves(batch), strict=True))
    keys = dict(zip(EXPERTS, jax.random.split(key), strict=True))
    losses = {e: loss_fn(params[e], parts[e], keys[e], t_range(e, boundary))[0]
              for e in EXPERTS}
    return (losses["high"] + losses["low"]) / 2, {f"loss_{e}": v for e, v in losses.items()}


def route(params: dict, t: jax.Array, boundary: float, fn: Callable, *args) -> jax.Array:
    """fn(expert_params, *args) with the expert of t ([B], one value: a sampling step's time),
    one branch executed (`lax.cond`), as WanPipeline switches transformers per step."""
    return jax.lax.cond(is_high(jnp.max(t), boundary),
                        lambda a: fn(params["high"], *a), lambda a: fn(params["low"], *a), args)


def init_both(init: Callable, key: jax.Array) -> dict:
    """Boxed variables {"params": {"high": ..., "low": ...}} of two independently initialised
    experts (logical axis names kept, so each shards as one DiT)."""
    k_high, k_low = jax.random.split(key)
    return {"params": {"high": init(k_high)["params"], "low": init(k_low)["params"]}}


def partner_folder(cfg: Config) -> Path | None:
    """For a one-expert run started from a two-expert WanPipeline (`train.init_from`), the
    folder of the expert it did not train (sampling needs it for the other range)."""
    from vdit.io.wan_pipeline import is_pipeline_folder, resolve_pipeline

    t = cfg.train
    if t.expert not in EXPERTS or not t.init_from or not is_pipeline_folder(t.init_from):
        return None
    spec = resolve_pipeline(t.init_from)
    if spec.transformer_2 is None:
        return None
    return spec.path / FOLDERS["low" if t.expert == "high" else "high"]



def with_partner(cfg: Config, params: Any, log: Callable = print) -> tuple[Config, Any]:
    """What samples a run: a one-expert run's params joined with the expert it did not train
    (its init_from pipeline's, `partner_folder`) as a `both` config and params {"high", "low"},
    so each step runs the expert of its t. Without a partner the run's expert runs every step
    (warned). Other runs come back unchanged."""
    if cfg.train.expert not in EXPERTS:
        return cfg, params
    folder = partner_folder(cfg)
    if folder is None:
        log(f"warning: this run trained Wan 2.2's {cfg.train.expert}-noise expert only (t "
            f"{'>=' if cfg.train.expert == 'high' else '<'} {boundary_of(cfg)}) and train."
            "init_from names no two-expert pipeline to take the other from: its expert runs "
            "every step")
        return cfg, params
    from vdit.io.wan_transformer import load_params

    _, other = load_params(folder, log=lambda *_, **__: None)
    mine = cfg.train.expert
    both = {mine: params, "low" if mine == "high" else "high": other}
    log(f"sampling with the run's {mine}-noise expert and {folder} for the other range "
        f"(boundary {boundary_of(cfg)})")
    return dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, expert="both", boundary_ratio=boundary_of(cfg))), both
