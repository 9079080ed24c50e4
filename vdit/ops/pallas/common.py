"""What the GPU and TPU flash-attention kernels share: block sizes, the mask rule, the per-block
softmax math, padding, and the one `custom_vjp` both backends plug their kernels into.

Layout: q [B, Lq, H, D], k and v [B, Lk, H, D]; segment ids int32 q_seg [B, Lq], kv_seg [B, Lk];
lse float32 [B, H, Lq] (natural log). A key is visible to a query when their segment ids are
equal and the key is not padding. A query row that sees no key returns 0 and lse = MASK_VALUE, so
a block merged by log-sum-exp with any block that has a visible key gets weight 0.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

# Finite (like the XLA path) so that exp(s - m) never sees inf - inf; any real logit is far above
# it, so `m > MASK_VALUE / 2` tells a row that has seen a visible key.
MASK_VALUE = -1e30


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes. Forward: a [block_q, D] query tile sweeps [block_k, D] key tiles. Backward:
    the dK/dV kernel holds a key tile (block_k_dkv) and sweeps query tiles (block_q_dkv); the dQ
    kernel holds a query tile (block_q_dq) and sweeps key tiles (block_k_dq). num_warps and
    num_stages only matter to the Triton lowering (None: flash_gpu picks them per kernel)."""

    block_q: int
    block_k: int
    block_q_dkv: int
    block_k_dkv: int
    block_q_dq: int
    block_k_dq: int
    num_warps: int | None = None
    num_stages: int | None = None

    @classmethod
    def default(cls, backend: str) -> BlockSizes:
        """Starting points per backend, to be tuned with tools/bench_attention.py.

        GPU: the FlashAttention-2 Triton tiles (wide key tiles for dK/dV, wide query tiles for
        dQ) keep the resident tile in registers and stream the other. TPU: 512-wide tiles fill
        the 128x128 MXU several times per step while the [512, 512] f32 logits (1 MiB) leave
        the scoped VMEM room for double-buffered inputs.
        """
        if backend == "tpu":
            return cls(512, 512, 512, 512, 512, 512)
        if backend == "gpu":
            return cls(128, 64, 32, 128, 128, 32)
        raise ValueError(f"no default block sizes for backend {backend!r}; allowed: gpu, tpu")

    def clamp(self, lq: int, lk: int, fit: Callable[[int, int], int]) -> BlockSizes:
        """Shrinks each tile to `fit(tile, length)` so short sequences are not padded to a
        full default tile."""
        return dataclasses.replace(
            self, block_q=fit(self.block_q, lq), block_k=fit(self.block_k, lk),
            block_q_dkv=fit(self.block_q_dkv, lq), block_k_dkv=fit(self.block_k_dkv, lk),
            block_q_dq=fit(self.block_q_dq, lq), block_k_dq=fit(self.block_k_dq, lk))

    @property
    def q_multiple(self) -> int:
        return math.lcm(self.block_q, self.block_q_dkv, self.block_q_dq)

    @property
    def k_multiple(self) -> int:
        return math.lcm(self.block_k, self.block_k_dkv, self.block_k_dq)


def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
    # float32 operands get float32 products: Triton (and Mosaic) would otherwise round them to
    # tf32 / bf16 passes, 1e-3 off a float32 reference; bf16 operands are unaffected.
    exact = a.dtype == jnp.float32 and b.dtype == jnp.float32
    return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                               precision=jax.lax.Precision.HIGHEST if exact else None,
                               preferred_element_type=jnp.float32)


def dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [m, d] @ b[n, d]^T -> [m, n] in float32; a transposed operand instead of a transpose."""
    return _dot(a, b, (1, 1))


def dot_tn(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [m, n]^T @ b [m, d] -> [n, d] in float32 (dK and dV accumulate over query rows)."""
    return _dot(a, b, (0, 0))


def dot_nn(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [m, n] @ b [n, d] -> [m, d] in float32."""
    return _dot(a, b, (1, 0))


def visible(q_seg: jax.Array | None, kv_seg: jax.Array | None, col0: jax.Array | int,
            shape: tuple[int, int], kv_len: int | None) -> jax.Array | None:
    """Which logits of a [block_q, block_k] tile are visible, or None when all are.

    q_seg [block_q, 1], kv_seg [1, block_k]; col0: index of the tile's first key; kv_len: the
    true key length when the keys were padded (else None)."""
    mask = None
    if q_seg is not None:
        mask = q_seg == kv_seg
    if kv_len is not None:
        cols = col0 + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
        in_range = cols < kv_len
        mask = in_range if mask is None else jnp.logical_and(mask, in_range)
    return mask


def softmax_step(s: jax.Array, m_prev: jax.Array, l_prev: jax.Array, acc_prev: jax.Array,
                 v: jax.Array, exp: Callable = jnp.exp):
    """One online-softmax step (FlashAttention-2): fold the logits s [bq, bk] (already scaled
    and masked) and values v [bk, D] into the running max m, sum l [bq, 1] and unnormalised
    output acc [bq, D]; returns (m, l, acc). `exp` is exp2 when the logits are in base 2."""
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    alpha = exp(m_prev - m_next)  # rescales what was summed under the old max
    p = exp(s - m_next)
    l_next = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
    acc_next = alpha * acc_prev + dot_nn(p.astype(v.dtype), v)
    return m_next, l_next, acc_next


def finish(m: jax.Array, row_sum: jax.Array, acc: jax.Array, log: Callable = jnp.log,
           to_natural: float = 1.0):
    """Normalise; rows that saw no visible key give 0 and lse = MASK_VALUE. Returns (o, lse)
    with o [bq, D] float32 and lse [bq, 1] in natural log."""
    seen = m > MASK_VALUE / 2
    o = jnp.where(seen, acc / row_sum, 0.0)  # row_sum >= 1: the max term contributes exp(0)
    lse = jnp.where(seen, (m + log(row_sum)) * to_natural, MASK_VALUE)
    return o, lse


def grad_tile(q, k, v, do, lse, delta, mask, scale: float, exp: Callable = jnp.exp,
              log2e: float = 1.0):
    """Backward of one [bq, bk] tile: returns (p, ds) in float32 with ds = dL/ds * scale, so
    that dV += p^T dO, dK += ds^T Q and dQ += ds K.

    lse, delta [bq, 1] (delta = rowsum(dO * O) - dlse); `lse` is +inf on rows that saw no key
    so their p is 0. With exp2, lse and the logits are multiplied by log2e first."""
    s = dot_nt(q, k) * (scale * log2e)
    if mask is not None:
        s = jnp.where(mask, s, MASK_VALUE)
    p = exp(s - lse * log2e)
    dp = dot_nt(do, v)
    return p, p * (dp - delta) * scale


def cost(q: jax.Array, k: jax.Array, matmuls: int, *arrays: jax.Array | None) -> pl.CostEstimate:
    """What one kernel costs, for XLA's scheduler (the kernels are opaque to it): `matmuls`
    [Lq, Lk, D] products (forward 2, dK/dV 4, dQ 3), one exp per logit, `arrays` read or
    written once."""
    b, lq, h, d = q.shape
    return pl.CostEstimate(
        flops=2 * matmuls * b * h * lq * k.shape[1] * d, transcendentals=b * h * lq * k.shape[1],
        bytes_accessed=sum(x.size * x.dtype.itemsize for x in arrays if x is not None))


Kernel = Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class Static:
    """Everything static about one call: the backend's kernels, the true key length when the
    keys were padded, tiles, and the interpret mode passed to `pallas_call`."""

    forward: Kernel  # (q, k, v, q_seg, kv_seg, static) -> (o, lse [B, H, Lq])
    backward: Kernel  # (q, k, v, q_seg, kv_seg, lse, delta, do, static) -> (dq, dk, dv)
    kv_len: int | None
    blocks: BlockSizes
    interpret: Any


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, q_seg, kv_seg, static: Static):
    return static.forward(q, k, v, q_seg, kv_seg, static)


def _flash_fwd(q, k, v, q_seg, kv_seg, static: Static):
    o, lse = static.forward(q, k, v, q_seg, kv_seg, static)
    return (o, lse), (q, k, v, q_seg, kv_seg, o, lse)


def _flash_bwd(static: Static, res, cts):
    q, k, v, q_seg, kv_seg, o, lse = res
    do, dlse = cts
    # d lse / d s = p, so an lse cotangent folds into delta: ds = p * (dp - (delta - dlse)).
    delta = jnp.einsum("bqhd,bqhd->bhq", o.astype(jnp.float32), do.astype(jnp.float32))
    delta = delta - dlse
    lse = jnp.where(lse > MASK_VALUE / 2, lse, jnp.inf)  # rows that saw no key: p = 0
    dq, dk, dv = static.backward(q, k, v, q_seg, kv_seg, lse, delta, do.astype(q.dtype), static)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _pad(x: jax.Array | None, axis: int, to: int, value: int = 0) -> jax.Array | None:
    if x is None or x.shape[axis] == to:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, to - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_seg: jax.Array | None,
                    kv_seg: jax.Array | None, *, forward: Kernel, backward: Kernel,
                    blocks: BlockSizes, interpret: Any) -> tuple[jax.Array, jax.Array]:
    """Pads to whole tiles, runs the kernels under the shared custom_vjp, crops.

    q [B, Lq, H, D], k, v [B, Lk, H, D], q_seg [B, Lq] and kv_seg [B, Lk] int32 or both None;
    `blocks` already clamped. Returns (o [B, Lq, H, D] in q's dtype, lse [B, H, Lq] float32).
    Padding happens outside the custom_vjp, so autodiff crops the gradients itself.
    """
    if (q_seg is None) != (kv_seg is None):
        raise ValueError("pass both q and kv segment ids, or neither")
    if q.shape[-1] != k.shape[-1] or k.shape != v.shape:
        raise ValueError(f"shapes q {q.shape}, k {k.shape}, v {v.shape}")
    lq, lk = q.shape[1], k.shape[1]
    lq_pad = -(-lq // blocks.q_multiple) * blocks.q_multiple
    lk_pad = -(-lk // blocks.k_multiple) * blocks.k_multiple
    q, k, v = _pad(q, 1, lq_pad), _pad(k, 1, lk_pad), _pad(v, 1, lk_pad)
    if q_seg is not None:
        q_seg, kv_seg = q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32)
    q_seg, kv_seg = _pad(q_seg, 1, lq_pad), _pad(kv_seg, 1, lk_pad)
    static = Static(forward, backward, lk if lk_pad != lk else None, blocks, interpret)
    o, lse = _flash(q, k, v, q_seg, kv_seg, static)
    return o[:, :lq], lse[:, :, :lq]
