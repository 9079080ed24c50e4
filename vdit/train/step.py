"""The pure training step: (state, batch) -> (state, metrics)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vdit.config import TrainConfig
from vdit.train.state import System, TrainState, lr_schedule


def train_step(state: TrainState, batch: dict, *, system: System,
               tx: optax.GradientTransformation, cfg: TrainConfig):
    """One AdamW update on batch {"video": uint8 [B, T, H, W, 3], "tokens": int32 [B, S]}.

    Randomness (caption dropout, t, noise, posterior samples) comes from fold_in(state.rng, step),
    so a resumed run draws exactly what an uninterrupted one would.
    """
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    loss, aux, grads = _loss_and_grads(state, batch, key, system, cfg.microbatches)
    grad_norm = optax.tree.norm(grads)
    # A non-finite loss or gradient skips the update (params, optimizer and EMA unchanged): one
    # bad batch must not poison the run. The loop counts skips and stops after too many.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(state: TrainState) -> tuple:
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # EMA with a warm-up, so early averages are not dominated by the random init.
        step = state.step.astype(jnp.float32)
        decay = jnp.minimum(cfg.ema_decay, (1.0 + step) / (10.0 + step))
        ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state.ema_params, params)
        return params, ema, opt_state

    # A branch, not a select over the updated and old trees: a select re-reads and re-writes
    # params, EMA and both Adam moments (15 ms of a 527 ms step of bench_gpu on an H100).
    params, ema, opt_state = jax.lax.cond(
        finite, update, lambda s: (s.params, s.ema_params, s.opt_state), state)
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr_schedule(cfg)(state.step),
               "skipped": 1 - finite.astype(jnp.int32), **aux}
    new_state = state.replace(step=state.step + 1, params=params, ema_params=ema,
                              opt_state=opt_state)
    return new_state, metrics


def _loss_and_grads(state: TrainState, batch: dict, key: jax.Array, system: System,
                    microbatches: int):
    """Mean loss, aux and gradients over the batch; with `microbatches` > 1 the batch is cut
    into that many slices whose gradients are summed in a scan, so only one slice's
    activations are alive at a time. Slice m takes rows m, m + M, m + 2M, ...: every device
    keeps its own rows (the batch axis stays sharded the same way), and draws its randomness
    from fold_in(key, m)."""
    value_and_grad = jax.value_and_grad(system.loss, has_aux=True)
    if microbatches == 1:
        (loss, aux), grads = value_and_grad(state.params, batch, state.stats, key, state.step)
        return loss, aux, grads

    def split(x: jax.Array) -> jax.Array:  # [B, ...] -> [M, B / M, ...]
        x = x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:])
        x = nn.with_logical_constraint(x, ("batch",) + (None,) * (x.ndim - 1))
        return jnp.moveaxis(x, 1, 0)

    def accumulate(carry, inputs):
        index, micro = inputs
        (loss, aux), grads = value_and_grad(state.params, micro, state.stats,
                                            jax.random.fold_in(key, index), state.step)
        return jax.tree.map(jnp.add, carry, (loss, aux, grads)), None

    (loss, aux), grads = jax.eval_shape(value_and_grad, state.params, jax.tree.map(
        lambda x: x[: x.shape[0] // microbatches], batch), state.stats, key, state.step)
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), (loss, aux, grads))
    total, _ = jax.lax.scan(accumulate, zeros,
                            (jnp.arange(microbatches), jax.tree.map(split, batch)))
    return jax.tree.map(lambda x: x / microbatches, total)


def eval_step(params, batch: dict, stats, key: jax.Array, *, system: System) -> dict:
    """The system's eval metrics on a fixed batch with fixed randomness: {name: array}."""
    return system.evaluate(params, batch, stats, key)
