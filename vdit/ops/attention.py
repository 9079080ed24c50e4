"""The one attention dispatch. Every attention in vdit calls `attention()`.

Implementations: `xla` (portable einsum + float32 softmax), `cudnn` (fused kernel on NVIDIA GPUs,
bf16/fp16 only). `auto` takes cuDNN on GPU for half-precision inputs and XLA elsewhere.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

Impl = Literal["auto", "xla", "cudnn"]

# Large but finite, so a fully masked row gives a uniform average instead of NaN.
_MASK_VALUE = -1e30


def _xla_attention(q, k, v, kv_mask):
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if kv_mask is not None:
        logits = jnp.where(kv_mask[:, None, None, :], logits, _MASK_VALUE)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def resolve_impl(impl: Impl, dtype) -> str:
    if impl != "auto":
        return impl
    on_gpu = jax.default_backend() == "gpu"
    return "cudnn" if on_gpu and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "xla"


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, kv_mask: jax.Array | None = None,
    impl: Impl = "auto",
) -> jax.Array:
    """Non-causal multi-head attention.

    q: [B, Lq, H, D]; k, v: [B, Lk, H, D]; kv_mask: bool [B, Lk], True where a key may be attended.
    Returns [B, Lq, H, D] in q's dtype.
    """
    chosen = resolve_impl(impl, q.dtype)
    if chosen == "xla":
        return _xla_attention(q, k, v, kv_mask)
    if chosen == "cudnn":
        mask = None if kv_mask is None else kv_mask[:, None, None, :]
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
    raise ValueError(f"attention impl {impl!r}; allowed: auto, xla, cudnn")
