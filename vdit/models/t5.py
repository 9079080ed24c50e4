"""The T5 family's text encoder (T5, T5 v1.1 / Flan-T5, mT5, UMT5), as a frozen conditioner.

Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
Transformer", encoder side only; UMT5 (Chung et al. 2023) differs by giving every layer its own
relative position bias. One layer, pre-norm:

    x = x + SelfAttention(RMSNorm(x)),   scores = q k^T + bias(bucket(j - i))   (no 1/sqrt(d))
    x = x + FFN(RMSNorm(x)),             FFN = act(x Wi0) * (x Wi1) Wo  (gated)  or  act(x Wi) Wo
    out = RMSNorm(x) after the last layer.

Weights come from Hugging Face folders through vdit/io/hf_t5.py; parameters carry logical axis
names (vdit/parallel/rules.py) so a 5.7 B UMT5-XXL encoder shards over the mesh like the DiT.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# Hugging Face's activation names (transformers' ACT2FN) -> functions. "gelu_new" and
# "gelu_pytorch_tanh" are the tanh approximation; "gelu" is the exact erf form.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
}
MODEL_TYPES = ("t5", "mt5", "umt5")


@dataclasses.dataclass(frozen=True)
class T5Spec:
    """The encoder's architecture, read from a checkpoint's config.json (`from_hf_config`)."""

    vocab_size: int
    d_model: int
    d_kv: int  # per-head width; heads * d_kv need not equal d_model
    d_ff: int
    num_layers: int
    num_heads: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    activation: str = "gelu_new"  # a key of ACTIVATIONS
    gated: bool = True  # T5 v1.1 / mT5 / UMT5: act(x Wi0) * (x Wi1); original T5: act(x Wi)
    layer_norm_epsilon: float = 1e-6
    bias_per_layer: bool = False  # UMT5: every layer has its own relative bias; T5: layer 0's

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> T5Spec:
        """The spec of a transformers T5Config / MT5Config / UMT5Config dict.

        As in transformers, `feed_forward_proj` ("relu", "gated-gelu", "gated-silu", ...) decides
        the FFN: a "gated-" prefix means two input projections, and "gated-gelu" means the tanh
        GELU ("gelu_new"). Stored `is_gated_act` / `dense_act_fn` (derived fields) must agree.
        Raises ValueError naming the field of anything this encoder does not implement.
        """
        model_type = config.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type: {model_type!r} is not a T5-family encoder "
                             f"(supported: {', '.join(MODEL_TYPES)})")
        sizes = {}
        for key in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"):
            value = config.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{key}: expected a positive integer, found {value!r}")
            sizes[key] = value
        proj = config.get("feed_forward_proj", "gated-gelu" if model_type == "umt5" else "relu")
        parts = str(proj).split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(f"feed_forward_proj: {proj!r} is not 'ACT' or 'gated-ACT'")
        gated = len(parts) == 2
        activation = "gelu_new" if proj == "gated-gelu" else parts[-1]
        if activation not in ACTIVATIONS:
            raise ValueError(f"feed_forward_proj: activation {activation!r} in {proj!r} is not "
                             f"supported (supported: {', '.join(ACTIVATIONS)})")
        for key, derived in (("is_gated_act", gated), ("dense_act_fn", activation)):
            if key in config and config[key] != derived:
                raise ValueError(f"{key}: {config[key]!r} contradicts feed_forward_proj "
                                 f"{proj!r} (which means {key}={derived!r})")
        buckets = config.get("relative_attention_num_buckets", 32)
        distance = config.get("relative_attention_max_distance", 128)
        if not isinstance(buckets, int) or buckets < 4:
            raise ValueError(f"relative_attention_num_buckets: expected an integer >= 4, "
                             f"found {buckets!r}")
        if not isinstance(distance, int) or distance <= buckets // 4:
            raise ValueError(f"relative_attention_max_distance: {distance!r} must exceed "
                             f"relative_attention_num_buckets // 4 = {buckets // 4}")
        return cls(**sizes, relative_attention_num_buckets=buckets,
                   relative_attention_max_distance=distance, activation=activation, gated=gated,
                   layer_norm_epsilon=float(config.get("layer_norm_epsilon", 1e-6)),
                   bias_per_layer=model_type == "umt5")


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """int32 [length, length]: the bidirectional bucket of key j relative to query i (j - i).

    Half the buckets are for keys after the query. Within each half, distances below
    num_buckets // 4 get a bucket each; larger ones share log-spaced buckets up to max_distance,
    beyond which all fall into the last. Computed on the host in float32 (as the reference
    does), since it depends only on the static length.
    """
    relative = np.arange(length)[None, :] - np.arange(length)[:, None]
    half = num_buckets // 2
    bucket = np.where(relative > 0, half, 0)
    distance = np.abs(relative)
    exact = half // 2
    # Log-spaced beyond `exact`; max(., 1) only keeps log() finite where `where` discards it.
    log_ratio = (np.log(np.maximum(distance, 1).astype(np.float32) / np.float32(exact))
                 / np.float32(math.log(max_distance / exact)) * np.float32(half - exact))
    large = np.minimum(exact + log_ratio.astype(np.int32), half - 1)
    return (bucket + np.where(distance < exact, distance, large)).astype(np.int32)


_INIT = nn.initializers.normal(0.05)  # random params only serve shape checks and tests


def _param(module: nn.Module, name: str, shape: tuple[int, ...], names: tuple[str | None, ...],
           init: Callable = _INIT) -> jax.Array:
    return module.param(name, nn.with_logical_partitioning(init, names), shape)


class RMSNorm(nn.Module):
    """T5LayerNorm: x / sqrt(mean(x^2) + eps) * scale, no mean subtraction and no bias.

    The mean square is taken in float32 whatever the compute dtype (it overflows or loses all
    precision in bf16 on wide residual streams). [..., D] -> [..., D] in `dtype`.
    """

    epsilon: float
    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = _param(self, "scale", (x.shape[-1],), ("norm",), nn.initializers.ones_init())
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
        return x32.astype(self.dtype) * scale.astype(self.dtype)


class SelfAttention(nn.Module):
    """Multi-head self-attention whose scores are q k^T + relative bias, unscaled (T5 folds the
    1/sqrt(d_kv) into the initialisation of q). x [B, S, D], bias [H, S, S] (f32),
    mask bool [B, S] -> [B, S, D]."""

    spec: T5Spec
    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array, mask: jax.Array) -> jax.Array:
        s, dt = self.spec, self.dtype
        q, k, v = (jnp.einsum("bsd,dhk->bshk", x, _param(
            self, n, (s.d_model, s.num_heads, s.d_kv), ("embed", "heads", "kv")).astype(dt))
            for n in ("q", "k", "v"))
        scores = jnp.einsum("bqhk,bshk->bhqs", q, k).astype(jnp.float32) + bias[None]
        # Padding keys get the lowest finite score: a row with no valid key stays finite.
        scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(dt)
        out = jnp.einsum("bhqs,bshk->bqhk", weights, v)
        wo = _param(self, "o", (s.num_heads, s.d_kv, s.d_model), ("heads", "kv", "embed"))
        return jnp.einsum("bqhk,hkd->bqd", out, wo.astype(dt))


class FeedForward(nn.Module):
    """act(x Wi0) * (x Wi1) Wo when gated, else act(x Wi) Wo; no biases. [B, S, D] -> [B, S, D]."""

    spec: T5Spec
    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s, dt = self.spec, self.dtype
        act = ACTIVATIONS[s.activation]

        def wi(name: str) -> jax.Array:
            return x @ _param(self, name, (s.d_model, s.d_ff), ("embed", "mlp")).astype(dt)

        h = act(wi("wi_0")) * wi("wi_1") if s.gated else act(wi("wi"))
        h = nn.with_logical_constraint(h, ("act_batch", "act_length", "act_mlp"))
        return h @ _param(self, "wo", (s.d_ff, s.d_model), ("mlp", "embed")).astype(dt)


class T5Layer(nn.Module):
    """One pre-norm layer: attention then FFN, each added to the residual stream.

    x [B, S, D], mask bool [B, S], bias [H, S, S] float32 (None: this layer owns one) ->
    (x, the bias it used, which T5 hands on to the next layer)."""

    spec: T5Spec
    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, buckets: np.ndarray,
                 bias: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        s, dt = self.spec, self.dtype
        if bias is None:
            table = _param(self, "rel_bias", (s.relative_attention_num_buckets, s.num_heads),
                           (None, "heads"))
            # [S, S, H] -> [H, S, S], kept in float32 with the scores it is added to.
            bias = jnp.take(table.astype(jnp.float32), buckets, axis=0).transpose(2, 0, 1)
        h = RMSNorm(s.layer_norm_epsilon, dt, name="attn_norm")(x)
        x = x + SelfAttention(s, dt, name="attn")(h, bias, mask)
        h = RMSNorm(s.layer_norm_epsilon, dt, name="mlp_norm")(x)
        x = x + FeedForward(s, dt, name="mlp")(h)
        return nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed")), bias


class T5Encoder(nn.Module):
    """ids int32 [B, S], mask [B, S] (nonzero = real token) -> last hidden state [B, S, d_model].

    Compute runs in `dtype` (float32 or bfloat16); parameters are used in whatever dtype they
    were loaded in, cast per use. Softmax and norms run in float32. Layers are unrolled (not
    scanned) since T5's layer 0 owns a bias the others lack. Params: embed [V, D],
    layer_{i}/{attn_norm, attn/{q, k, v, o}, rel_bias [buckets, H] (layer 0 or UMT5),
    mlp_norm, mlp/{wi_0, wi_1 | wi, wo}}, final_norm.
    """

    spec: T5Spec
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        s = self.spec
        table = _param(self, "embed", (s.vocab_size, s.d_model), ("vocab", "embed"),
                       nn.initializers.normal(1.0))
        x = jnp.take(table, ids, axis=0).astype(self.dtype)
        x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
        buckets = relative_position_buckets(ids.shape[1], s.relative_attention_num_buckets,
                                            s.relative_attention_max_distance)
        bias = None
        for i in range(s.num_layers):
            # T5 computes the bias in layer 0 and reuses it; UMT5 gives each layer its own.
            x, bias = T5Layer(s, self.dtype, name=f"layer_{i}")(
                x, mask.astype(bool), buckets, None if s.bias_per_layer else bias)
        return RMSNorm(s.layer_norm_epsilon, self.dtype, name="final_norm")(x)


def param_axes(spec: T5Spec) -> Any:
    """The params' tree of logical axis names (PartitionSpecs), from shapes alone: with
    `nn.logical_to_mesh_sharding(param_axes(spec), mesh, rules)` it gives each loaded tensor's
    sharding (vdit/parallel/rules.py)."""
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    boxed = jax.eval_shape(T5Encoder(spec).init, jax.random.key(0), ids, ids)["params"]
    return nn.get_partition_spec(boxed)


def param_shapes(spec: T5Spec) -> dict[str, tuple[int, ...]]:
    """{"/"-joined param path: shape} of the encoder's params (what a loader must supply)."""
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    boxed = jax.eval_shape(T5Encoder(spec).init, jax.random.key(0), ids, ids)["params"]
    flat = jax.tree_util.tree_flatten_with_path(nn.unbox(boxed))[0]
    return {"/".join(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}
