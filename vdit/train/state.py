"""TrainState: everything a run needs to continue, as one pytree; and the optimizer."""

from __future__ import annotations

from typing import Any, Protocol

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vdit.config import TrainConfig
from vdit.parallel.rules import Rules

Stats = dict[str, Any]


class System(Protocol):
    """What the training loop needs from a trainable system (TextToVideo, AutoencoderSystem).

    `stats` are values that travel with the params without being trained: latent statistics,
    and for a DiT the frozen autoencoder's params."""

    kind: str  # "dit" | "autoencoder"
    primary_metric: tuple[str, str, str]  # (eval metric, unit, "lower" | "higher" is better)

    def init(self, key: jax.Array) -> Any: ...
    def initial_stats(self, videos: Any) -> Stats: ...
    def stats_shapes(self) -> Stats: ...  # initial_stats' structure, as ShapeDtypeStructs
    # {stats key: logical PartitionSpecs} of the stats sharded by the rule table like params
    # (a LoRA run's frozen base); every other stat is replicated
    def sharded_stats(self) -> dict[str, Any]: ...
    def loss(self, params, batch: dict, stats: Stats, key: jax.Array,
             step: jax.Array) -> tuple[jax.Array, dict]: ...
    def evaluate(self, params, batch: dict, stats: Stats, key: jax.Array) -> dict: ...


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 []
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array  # uint32 raw key data; the step's key is fold_in(rng, step)
    stats: Stats  # untrained values that travel with the params (see System)


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warm-up to `lr`, then cosine decay to lr * min_lr_ratio at the last step.

    A run shorter than its warm-up warms up for at most `steps - 1` steps, so at least one step
    is left to decay over (optax refuses a decay of zero steps); a warm-up of 0 (or a one-step
    run) starts at `lr` rather than spending its first step at lr 0."""
    warmup = min(cfg.warmup_steps, cfg.steps - 1)
    end_value = cfg.lr * cfg.min_lr_ratio
    if warmup <= 0:
        return optax.cosine_decay_schedule(cfg.lr, decay_steps=cfg.steps,
                                           alpha=cfg.min_lr_ratio)
    return optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, warmup_steps=warmup, decay_steps=cfg.steps, end_value=end_value,
    )


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping + AdamW; weight decay on matrices only (not biases, norms)."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                    mask=decay_mask),
    )


def param_shardings(system: System, mesh: Mesh, rules: Rules):
    """NamedShardings of the (unboxed) params from their logical axis names."""
    boxed = jax.eval_shape(system.init, jax.random.key(0))
    specs = nn.get_partition_spec(boxed)["params"]
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def opt_state_shardings(tx: optax.GradientTransformation, opt_state, p_shard, replicated):
    """Optimizer-state shardings: moments (param-shaped leaves) as their params, counters and
    the like replicated. Set explicitly because propagation cannot infer them: the moments
    start as zeros, which depend on no sharded value, so XLA would replicate them (every chip
    holding the whole of Adam's mu and nu)."""
    return optax.tree_map_params(tx, lambda _, s: s, opt_state, p_shard,
                                 transform_non_params=lambda _: replicated)


def _layout(system: System, tx: optax.GradientTransformation, stats: Stats, mesh: Mesh,
            rules: Rules):
    """(init(key, stats, params=None) -> TrainState, its abstract result, its shardings):
    params follow the logical-axis table, optimizer moments their params, the stats the
    system names (`sharded_stats`) the table too, everything else is replicated. `params`
    (already sharded, e.g. train.init_from's) replace the system's fresh init."""
    p_shard = param_shardings(system, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())

    def init(key, stats, params=None):
        if params is None:
            params = nn.unbox(system.init(key))["params"]
        params = jax.lax.with_sharding_constraint(params, p_shard)
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
            opt_state=tx.init(params), rng=jax.random.key_data(jax.random.fold_in(key, 1)),
            stats=stats,
        )

    abstract = jax.eval_shape(init, jax.random.key(0), stats)
    shardings = jax.tree.map(lambda _: replicated, abstract)
    specs = system.sharded_stats()
    stats_shard = {k: nn.logical_to_mesh_sharding(specs[k], mesh, rules) if k in specs else v
                   for k, v in shardings.stats.items()}
    shardings = shardings.replace(params=p_shard, ema_params=p_shard, opt_state=opt_state_shardings(
        tx, abstract.opt_state, p_shard, replicated), stats=stats_shard)
    return init, abstract, shardings


def create_state(system: System, tx: optax.GradientTransformation, seed: int, stats: Stats,
                 mesh: Mesh, rules: Rules, params: Any | None = None) -> TrainState:
    """A fresh TrainState, created sharded: params follow the logical-axis table. `params`
    (sharded jax.Arrays: train.init_from's) start it instead of the system's init; they and
    the sharded stats (a LoRA run's base) are donated into the state, never copied."""
    init, _, shardings = _layout(system, tx, stats, mesh, rules)
    sharded = {k: stats[k] for k in system.sharded_stats()}
    # Other stats stay constants of the program, as host values every process holds alike.
    host = {k: v for k, v in stats.items() if k not in sharded}
    make = jax.jit(lambda key, sharded, params: init(key, {**host, **sharded}, params),
                   out_shardings=shardings, donate_argnums=(1, 2))
    return make(jax.random.key(seed), sharded, params)


def abstract_state(system: System, tx: optax.GradientTransformation, stats: Stats, mesh: Mesh,
                   rules: Rules) -> TrainState:
    """The TrainState's shapes, dtypes and shardings (jax.ShapeDtypeStruct leaves), from shapes
    alone: what a checkpoint restores into. `stats` may be abstract too."""
    _, abstract, shardings = _layout(system, tx, stats, mesh, rules)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)


def state_shardings(state: TrainState):
    return jax.tree.map(lambda x: x.sharding, state)


def count_params(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))
