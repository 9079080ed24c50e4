"""A LoRA run's system (`train.lora.rank` > 0): the text-to-video system whose trained params
are low-rank adapters on a frozen DiT (vdit/models/lora.py, docs/fine-tuning.md).

    TrainState.params / ema_params   the adapters: a tree of module paths, each {"a": [(L,) *in,
                                     r], "b": [(L,) r, *out]} float32, B zero at the start
    TrainState.opt_state             AdamW's moments of the adapters only
    TrainState.stats["base"]         the frozen DiT params in bfloat16, sharded by the same
                                     logical-axis table as a full run's params (`sharded_stats`)

Every method takes the adapters where `TextToVideo` takes the DiT's params and runs the base
with the adapters' branch in each targeted `Linear` (scale alpha / rank folded into b here);
dropout on the adapters' input only in `loss`. `make_system` picks the class for a config.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from vdit.config import Config, ConfigError
from vdit.diffusion.text_to_video import Stats, TextToVideo
from vdit.models import lora

BASE_DTYPE = jnp.bfloat16


def values(boxed: Any) -> Any:
    """Boxed (logically partitioned) variables -> their values, without the sharding
    constraint `nn.unbox` applies (which abstract values under a mesh cannot take)."""
    return jax.tree.map(lambda b: b.value if isinstance(b, nn.Partitioned) else b, boxed,
                        is_leaf=lambda b: isinstance(b, nn.Partitioned))


class LoraTextToVideo(TextToVideo):
    """TextToVideo with adapters as the trained params (see the module doc)."""

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.lora = cfg.train.lora
        self.scale = self.lora.scale()
        boxed = jax.eval_shape(self.init_dit, jax.random.key(0))
        self.base_specs = nn.get_partition_spec(boxed)["params"]  # logical axis names
        base = values(boxed)["params"]
        pattern = self.lora.targets or lora.DEFAULT_TARGETS[cfg.model.kind]
        try:
            self.targets = lora.find_targets(base, pattern)
        except ValueError as e:
            raise ConfigError(f"train.lora.targets: {e}") from None
        specs = traverse_util.flatten_dict(self.base_specs)
        self._names = {t.name: tuple(specs[(*t.path, "kernel")]) for t in self.targets}
        self.base_shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, BASE_DTYPE), base)

    # --- shapes and parameters -----------------------------------------------------------
    def init_dit(self, key: jax.Array):
        """Boxed variables of the DiT the adapters adapt (the frozen base's structure)."""
        return TextToVideo.init(self, key)

    def init(self, key: jax.Array):
        """Boxed {"params": adapters} (models/lora.py `init_adapters`), each leaf named with
        its kernel's logical axes."""
        return {"params": lora.init_adapters(key, self.targets, self.lora.rank, self._names)}

    def stats_shapes(self) -> Stats:
        return {**super().stats_shapes(), "base": self.base_shapes}

    def sharded_stats(self) -> dict[str, Any]:
        return {"base": self.base_specs}

    def base_from(self, params: Any) -> Any:
        """DiT params (any float dtype) -> the frozen base as stats["base"] holds it."""
        return jax.tree.map(lambda w: jnp.asarray(w).astype(BASE_DTYPE), params)

    def adapted(self, params, stats: Stats, key: jax.Array | None = None) -> lora.Adapted:
        """The base and the scaled adapters, run together by `apply_dit`; `key`: dropout."""
        return lora.Adapted(stats["base"], lora.scaled(params, self.scale), key,
                            self.lora.dropout if key is not None else 0.0)

    def merged(self, params, stats: Stats) -> Any:
        """The DiT's params with the adapters folded in, float32 (exports, other tools)."""
        return lora.fold(stats["base"], params, self.scale)

    # --- the objective and generation on the adapted DiT -----------------------------------
    def loss(self, params, batch: dict, stats: Stats, key: jax.Array,
             step: jax.Array | None = None) -> tuple[jax.Array, dict]:
        dropout_key = jax.random.fold_in(key, lora.DROPOUT_STREAM)
        return super().loss(self.adapted(params, stats, dropout_key), batch, stats, key, step)

    def evaluate(self, params, batch: dict, stats: Stats, key: jax.Array) -> dict:
        return super().evaluate(self.adapted(params, stats), batch, stats, key)

    def generate(self, params, tokens, stats: Stats, key: jax.Array, **kw) -> jax.Array:
        return super().generate(self.adapted(params, stats), tokens, stats, key, **kw)


def make_system(cfg: Config) -> TextToVideo:
    """The DiT system a config trains: LoraTextToVideo with train.lora.rank > 0."""
    return LoraTextToVideo(cfg) if cfg.train.lora.enabled else TextToVideo(cfg)
