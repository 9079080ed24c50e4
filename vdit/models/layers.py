"""Building blocks shared by the DiT and the text encoder: linear, attention and MLP layers whose
parameters carry logical axis names (see vdit/parallel/rules.py)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdit.models import lora
from vdit.models.rope import apply_rope
from vdit.ops.attention import attention
from vdit.ops.pallas.common import BlockSizes

Dtype = Any


def zeros_init(names: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


class Linear(nn.Module):
    """y = x W + b contracting the last `in_dims` axes of x; W has logical axes `names`.

    x [..., *in] -> [..., *features]. The kernel keeps its full rank (e.g. [D, 3, H, Dh] for a
    fused QKV), so each axis carries its own logical name. Params are float32; the matmul runs
    in `dtype`. Where the variables hold a "lora" collection for this module (a [*in, r], b
    [r, *features]), its low-rank branch is added: x W + (x a) b (vdit/models/lora.py).
    """

    features: tuple[int, ...]
    names: tuple[str | None, ...]
    in_dims: int = 1
    dtype: Dtype = jnp.float32
    zero: bool = False  # zero-initialised kernel: a residual branch that starts at 0

    @nn.compact
    def __call__(self, x):
        features, n_in = tuple(self.features), self.in_dims
        shape = x.shape[x.ndim - n_in:] + features
        init = nn.initializers.zeros_init() if self.zero else nn.initializers.variance_scaling(
            1.0, "fan_avg", "uniform", in_axis=tuple(range(n_in)),
            out_axis=tuple(range(n_in, len(shape))))
        kernel = self.param("kernel", nn.with_logical_partitioning(init, self.names), shape)
        bias = self.param("bias", zeros_init(self.names[n_in:]), features)
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                                (contract, ((), ())))
        if self.has_variable(lora.COLLECTION, "a"):  # a LoRA run's adapter (models/lora.py)
            y = y + lora.branch(self, x, n_in, self.dtype)
        return y + bias.astype(self.dtype)


def _ones(name: str):
    return nn.with_logical_partitioning(nn.initializers.ones_init(), (name,))


def attend(q, k, v, *, cross: bool, kv_mask=None, segment_ids=None, impl: str = "auto",
           blocks: tuple[int, int] | None = None, context_parallel: str | None = None):
    """q [B, Lq, H, Dh] (constrained to the activation axes), k, v [B, Lk, H, Dh] -> the one
    attention dispatch, [B, Lq, H, Dh]: Pallas (query, key) tiles from `blocks`; under context
    parallelism cross-attention splits only the queries (the text is short, K/V stay whole
    per device). Shared by vdit's DiT and the Wan DiT."""
    q = nn.with_logical_constraint(q, ("act_batch", "act_length", "act_heads", "act_kv"))
    tiles = None if blocks is None else BlockSizes(*blocks, *blocks, *blocks)
    split = "queries" if cross and context_parallel is not None else context_parallel
    return attention(q, k, v, kv_mask=kv_mask, segment_ids=segment_ids, impl=impl,
                     blocks=tiles, context_parallel=split)


class Attention(nn.Module):
    """Multi-head attention with RMS-normalised queries and keys.

    Self-attention when `context` is None (fused QKV projection), else cross-attention to
    `context` [B, S, E] (fused KV projection). x: [B, N, D] -> [B, N, D].
    `context_parallel` ("ring" | "ulysses"; None: never): how self-attention splits x's tokens
    when the mesh has a `context` axis > 1; cross-attention then splits only the queries
    (vdit/ops/context_parallel.py).
    """

    heads: int
    dtype: Dtype = jnp.float32
    impl: str = "auto"
    zero_out: bool = False  # zero-init the output projection (residual branch starts at 0)
    blocks: tuple[int, int] | None = None  # Pallas (query, key) tile; None: backend default
    context_parallel: str | None = None

    @nn.compact
    def __call__(self, x, context=None, kv_mask=None, rope=None, segment_ids=None):
        d = x.shape[-1]
        hd = d // self.heads
        if context is None:
            qkv = Linear((3, self.heads, hd), ("embed", None, "heads", "kv"), dtype=self.dtype,
                         name="qkv")(x)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        else:
            q = Linear((self.heads, hd), ("embed", "heads", "kv"), dtype=self.dtype, name="q")(x)
            kv = Linear((2, self.heads, hd), ("embed", None, "heads", "kv"), dtype=self.dtype,
                        name="kv")(context)
            k, v = kv[:, :, 0], kv[:, :, 1]
        q = nn.RMSNorm(dtype=self.dtype, name="q_norm", scale_init=_ones("kv"))(q)
        k = nn.RMSNorm(dtype=self.dtype, name="k_norm", scale_init=_ones("kv"))(k)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        # segment_ids (packed clips): [B, N], or ([B, N], [B, S]) for cross-attention.
        out = attend(q, k, v, cross=context is not None, kv_mask=kv_mask,
                     segment_ids=segment_ids, impl=self.impl, blocks=self.blocks,
                     context_parallel=self.context_parallel)
        return Linear((d,), ("heads", "kv", "embed"), in_dims=2, dtype=self.dtype,
                      zero=self.zero_out, name="out")(out)


class Mlp(nn.Module):
    """x [B, N, D] -> GELU(x W1) W2 -> [B, N, D]."""

    hidden: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = Linear((self.hidden,), ("embed", "mlp"), dtype=self.dtype, name="fc1")(x)
        h = nn.with_logical_constraint(jax.nn.gelu(h), ("act_batch", "act_length", "act_mlp"))
        return Linear((x.shape[-1],), ("mlp", "embed"), dtype=self.dtype, name="fc2")(h)


def norm(dtype: Dtype, name: str | None = None) -> nn.LayerNorm:
    """LayerNorm without learned affine: adaLN supplies the scale and shift."""
    return nn.LayerNorm(use_scale=False, use_bias=False, epsilon=1e-6, dtype=dtype, name=name)
