"""Everything a training process builds before its first step, shared by `vdit train`,
`vdit bench` and the tests: mesh, system, optimizer, sharded state, the jitted step."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vdit.config import Config, ConfigError
from vdit.data.physics import physics_tokenizer
from vdit.data.pipeline import fixed_batch
from vdit.diffusion.lora_system import make_system
from vdit.diffusion.text_to_video import TextToVideo
from vdit.parallel.mesh import batch_sharding, batch_shards, make_mesh
from vdit.parallel.rules import Rules, get_rules
from vdit.train.state import (
    System,
    TrainState,
    abstract_state,
    create_state,
    make_optimizer,
    state_shardings,
)
from vdit.train.step import eval_step, train_step


@dataclass
class Trainer:
    cfg: Config
    mesh: Mesh
    rules: Rules
    system: System
    tx: optax.GradientTransformation
    state: TrainState
    batch_sharding: NamedSharding
    step_fn: Any  # jitted (state, batch) -> (state, metrics), state donated
    eval_fn: Any  # jitted (params, batch, stats, key) -> {metric: array}
    init_record: dict | None = None  # what train.init_from read (train/init_from.py)

    def device_batch(self, host: dict) -> dict:
        """This host's rows of the global batch (numpy) -> global jax.Arrays sharded over the
        batch axes."""
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
                for k, v in host.items() if k != "seed"}

    def replicated_batch(self, full: dict) -> dict:
        """A batch every host holds whole (eval clips, statistics clips) -> global jax.Arrays
        sharded over the batch axes; each host places only the rows its devices own."""
        out = {}
        for k, v in full.items():
            if k == "seed":
                continue
            v = np.asarray(v)
            shards = batch_shards(self.mesh)
            # A few eval clips need not divide the batch shards: then every device holds all.
            sharding = (self.batch_sharding if len(v) % shards == 0
                        else NamedSharding(self.mesh, PartitionSpec()))
            out[k] = jax.make_array_from_callback(v.shape, sharding, lambda index, v=v: v[index])
        return out

    @contextlib.contextmanager
    def context(self):
        """Mesh + logical-axis rules: enter it around anything that traces the model."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield


def mesh_and_rules(cfg: Config, devices: list | None = None) -> tuple[Mesh, Rules]:
    """The device mesh of `cfg.mesh` over `devices` (default: all) and its logical-axis rules."""
    return make_mesh(cfg.mesh, devices), get_rules(cfg.mesh.rules, cfg.mesh.rule_overrides)


def _abstract_state(system: System, tx: optax.GradientTransformation, mesh: Mesh,
                    rules: Rules) -> TrainState:
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return abstract_state(system, tx, system.stats_shapes(), mesh, rules)


def restore_target(cfg: Config, system: System) -> TrainState:
    """The abstract, sharded TrainState a checkpoint restores into, built from shapes alone: no
    data, no autoencoder export and no parameter init are needed (a DiT checkpoint holds the
    frozen autoencoder's params in its stats)."""
    mesh, rules = mesh_and_rules(cfg)
    return _abstract_state(system, make_optimizer(cfg.train), mesh, rules)


def build_trainer(cfg: Config, system: System | None = None, devices: list | None = None, *,
                  restoring: bool = False, stats: dict | None = None) -> Trainer:
    """A fresh sharded TrainState (stats from `data.stats_clips` training clips) and the jitted
    step, for `system` (default: the text-to-video DiT). Restoring a checkpoint into
    `trainer.state` is the caller's choice; with `restoring` the state is only its abstract
    target (`restore_target`), so a resumed run reads neither its stats clips nor its
    autoencoder export. Given `stats` (`vdit bench` on synthetic batches) the state starts from
    them and no data is read. The mesh spans `devices` (default: all). A fresh DiT state
    starts from `train.init_from` where the config names one, a LoRA run's frozen base from it
    or a fresh init (train/init_from.py)."""
    mesh, rules = mesh_and_rules(cfg, devices)
    system = system if system is not None else make_system(cfg)
    tx = make_optimizer(cfg.train)
    if cfg.data.source == "shards" and stats is None:
        from vdit.data.shard_pipeline import check_shards

        check_shards(cfg.data.shards, cfg.autoencoder)
    shards = batch_shards(mesh)
    per_slice = cfg.train.batch_size // cfg.train.microbatches
    if per_slice % shards:
        raise ConfigError(
            f"train.batch_size {cfg.train.batch_size} / train.microbatches "
            f"{cfg.train.microbatches} = {per_slice} rows per step cannot be split over the "
            f"{shards} batch shards (mesh data x fsdp); use a multiple of {shards}")
    record = None
    if restoring:
        state = _abstract_state(system, tx, mesh, rules)
    else:
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            if stats is None:
                clips = fixed_batch(cfg.data, physics_tokenizer(cfg.text.max_length), "train",
                                    cfg.data.stats_clips)
                # uint8 videos (physics) or stored latents (shards): the system measures either.
                stats = system.initial_stats(clips["video"] if "video" in clips
                                             else clips["latent"])
            params = None
            if system.kind == "dit":
                from vdit.train.init_from import initial_weights

                params, extra, record = initial_weights(cfg, system, mesh, rules)
                stats = {**stats, **extra}
            state = create_state(system, tx, cfg.train.seed, stats, mesh, rules, params)
    shardings = state_shardings(state)
    b_shard = batch_sharding(mesh)
    # Metrics come back replicated: every host can read them (multi-host runs).
    replicated = NamedSharding(mesh, PartitionSpec())
    step_fn = jax.jit(partial(train_step, system=system, tx=tx, cfg=cfg.train),
                      in_shardings=(shardings, b_shard), out_shardings=(shardings, replicated),
                      donate_argnums=0)
    eval_fn = jax.jit(partial(eval_step, system=system), out_shardings=replicated)
    return Trainer(cfg, mesh, rules, system, tx, state, b_shard, step_fn, eval_fn,
                   None if restoring else record)


def load_run(run_dir: str | Path,
             step: int | None = None) -> tuple[Config, TextToVideo, TrainState]:
    """Config, system and restored TrainState of a run directory (the newest readable checkpoint
    by default), restored into shapes alone: the run's data and autoencoder export need not
    exist anymore."""
    from vdit.io.checkpoint import Checkpointer
    from vdit.io.run_dir import run_config

    cfg = run_config(run_dir)
    ckpt = Checkpointer(Path(run_dir) / "checkpoints", async_save=False)
    if ckpt.latest_step() is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoint yet")
    system = make_system(cfg)
    state, _ = ckpt.restore(restore_target(cfg, system), step)
    ckpt.close()
    return cfg, system, state

