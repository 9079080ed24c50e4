"""Flash attention for NVIDIA GPUs through Pallas' Triton lowering (FlashAttention-2).

Three kernels on [B, L, H, D] arrays, none of which materialises an [Lq, Lk] matrix, so memory
is linear in the sequence length:
- forward, grid (Lq / block_q, B, H): a query tile sweeps the key tiles with an online softmax
  and writes o and the log-sum-exp;
- dK/dV, grid (Lk / block_k_dkv, B, H): a key tile sweeps the query tiles;
- dQ, grid (Lq / block_q_dq, B, H): a query tile sweeps the key tiles.
Splitting dK/dV from dQ (rather than JAX's fused backward) lets Lq differ from Lk, which
cross-attention needs, and avoids atomics; the price is recomputing q k^T and dO v^T once more.

Logits are kept in base 2 (scaled by log2(e)) so the kernels use exp2, the GPU's native
exponential. Runs on CPU with `interpret=True` (tests).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from vdit.ops.pallas import common
from vdit.ops.pallas.common import BlockSizes, Static

LOG2E = math.log2(math.e)


def _fit(block: int, length: int) -> int:
    """Triton tiles are powers of two and at least 16 (the smallest tensor-core tile)."""
    return min(block, max(16, pl.next_power_of_2(length)))


def _seg_tile(ref, start: Any, size: int, axis: int) -> jax.Array | None:
    """A [size] slice of a segment-id row as [size, 1] (axis 0: queries) or [1, size] (keys)."""
    if ref is None:
        return None
    ids = ref[pl.ds(start, size)]
    return ids[:, None] if axis == 0 else ids[None, :]


def _params(blocks: BlockSizes, q: jax.Array, is_forward: bool) -> plgpu.CompilerParams:
    """Passing Triton's CompilerParams also pins the Triton lowering (not Mosaic GPU).
    Defaults after the Triton tutorial's FlashAttention-2 (untuned here: no GPU yet): 8 warps
    for the forward at head dim 128, else 4; 3 pipeline stages for 2-byte inputs, 2 for f32,
    whose tiles take twice the shared memory."""
    warps = blocks.num_warps or (8 if is_forward and q.shape[-1] > 64 else 4)
    stages = blocks.num_stages or (3 if q.dtype.itemsize <= 2 else 2)
    return plgpu.CompilerParams(num_warps=warps, num_stages=stages)


def _forward_kernel(q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref, *, scale: float,
                    block_k: int, kv_len: int | None):
    block_q, head_dim = q_ref.shape
    q = q_ref[...]
    q_seg = None if qs_ref is None else qs_ref[...][:, None]

    def body(j, carry):
        start = j * block_k
        k = k_ref[pl.ds(start, block_k), :]
        s = common.dot_nt(q, k) * (scale * LOG2E)
        mask = common.visible(q_seg, _seg_tile(ks_ref, start, block_k, 1), start,
                              (block_q, block_k), kv_len)
        if mask is not None:
            s = jnp.where(mask, s, common.MASK_VALUE)
        return common.softmax_step(s, *carry, v_ref[pl.ds(start, block_k), :], exp=jnp.exp2)

    carry = (jnp.full((block_q, 1), common.MASK_VALUE, jnp.float32),
             jnp.zeros((block_q, 1), jnp.float32), jnp.zeros((block_q, head_dim), jnp.float32))
    m, row_sum, acc = jax.lax.fori_loop(0, k_ref.shape[0] // block_k, body, carry)
    o, lse = common.finish(m, row_sum, acc, log=jnp.log2, to_natural=1.0 / LOG2E)
    o_ref[...] = o.astype(o_ref.dtype)
    lse_ref[...] = lse[:, 0]


def _specs(lq: int, lk: int, d: int, tile: int, tiled_is_q: bool):
    """BlockSpecs for grid (tiles, B, H): the tiled side gets [tile, D] blocks, the swept side
    whole rows: q, k, v, q_seg, kv_seg, do and the per-row values (lse, delta)."""
    tiled = pl.BlockSpec((None, tile, None, d), lambda i, bi, h: (bi, i, h, 0))
    tiled_row = pl.BlockSpec((None, None, tile), lambda i, bi, h: (bi, h, i))
    tiled_seg = pl.BlockSpec((None, tile), lambda i, bi, h: (bi, i))

    def whole(n: int):
        return (pl.BlockSpec((None, n, None, d), lambda i, bi, h: (bi, 0, h, 0)),
                pl.BlockSpec((None, None, n), lambda i, bi, h: (bi, h, 0)),
                pl.BlockSpec((None, n), lambda i, bi, h: (bi, 0)))

    if tiled_is_q:
        wk, _, wks = whole(lk)
        return dict(q=tiled, k=wk, v=wk, q_seg=tiled_seg, kv_seg=wks, do=tiled, row=tiled_row)
    wq, wrow, wqs = whole(lq)
    return dict(q=wq, k=tiled, v=tiled, q_seg=wqs, kv_seg=tiled_seg, do=wq, row=wrow)


def forward(q, k, v, q_seg, kv_seg, static: Static):
    """Padded q [B, Lq, H, D], k, v [B, Lk, H, D] -> (o [B, Lq, H, D], lse [B, H, Lq] f32)."""
    batch, lq, heads, d = q.shape
    b = static.blocks
    sp = _specs(lq, k.shape[1], d, b.block_q, tiled_is_q=True)
    seg = q_seg is not None
    kernel = functools.partial(_forward_kernel, scale=d ** -0.5, block_k=b.block_k,
                               kv_len=static.kv_len)
    return pl.pallas_call(
        kernel,
        grid=(lq // b.block_q, batch, heads),
        in_specs=[sp["q"], sp["k"], sp["v"], sp["q_seg"] if seg else None,
                  sp["kv_seg"] if seg else None],
        out_specs=[sp["q"], sp["row"]],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((batch, heads, lq), jnp.float32)],
        compiler_params=_params(b, q, is_forward=True),
        interpret=static.interpret,
        cost_estimate=common.cost(q, k, 2, q, k, v, q_seg, kv_seg, q),
        name="vdit_flash_fwd",
    )(q, k, v, q_seg, kv_seg)


def _dkv_kernel(q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
                *, scale: float, block_q: int, kv_len: int | None):
    block_k, head_dim = k_ref.shape
    k, v = k_ref[...], v_ref[...]
    col0 = pl.program_id(0) * block_k
    kv_seg = None if ks_ref is None else ks_ref[...][None, :]

    def body(i, carry):
        dk, dv = carry
        start = i * block_q
        rows = pl.ds(start, block_q)
        q, do = q_ref[rows, :], do_ref[rows, :]
        mask = common.visible(_seg_tile(qs_ref, start, block_q, 0), kv_seg, col0,
                              (block_q, block_k), kv_len)
        p, ds = common.grad_tile(q, k, v, do, lse_ref[rows][:, None],
                                 delta_ref[rows][:, None], mask, scale, exp=jnp.exp2,
                                 log2e=LOG2E)
        dv = dv + common.dot_tn(p.astype(do.dtype), do)
        dk = dk + common.dot_tn(ds.astype(q.dtype), q)
        return dk, dv

    zeros = jnp.zeros((block_k, head_dim), jnp.float32)
    dk, dv = jax.lax.fori_loop(0, q_ref.shape[0] // block_q, body, (zeros, zeros))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, lse_ref, delta_ref, dq_ref, *,
               scale: float, block_k: int, kv_len: int | None):
    block_q, head_dim = q_ref.shape
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
    q_seg = None if qs_ref is None else qs_ref[...][:, None]

    def body(j, dq):
        start = j * block_k
        k = k_ref[pl.ds(start, block_k), :]
        mask = common.visible(q_seg, _seg_tile(ks_ref, start, block_k, 1), start,
                              (block_q, block_k), kv_len)
        _, ds = common.grad_tile(q, k, v_ref[pl.ds(start, block_k), :], do, lse, delta, mask,
                                 scale, exp=jnp.exp2, log2e=LOG2E)
        return dq + common.dot_nn(ds.astype(k.dtype), k)

    dq = jax.lax.fori_loop(0, k_ref.shape[0] // block_k, body,
                           jnp.zeros((block_q, head_dim), jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def backward(q, k, v, q_seg, kv_seg, lse, delta, do, static: Static):
    """Padded inputs, lse and delta [B, H, Lq] f32, do [B, Lq, H, D] -> (dq, dk, dv)."""
    batch, lq, heads, d = q.shape
    lk = k.shape[1]
    b = static.blocks
    seg = q_seg is not None
    args = (q, k, v, q_seg, kv_seg, do, lse, delta)
    common_kw = dict(compiler_params=_params(b, q, is_forward=False), interpret=static.interpret)

    def in_specs(sp):
        return [sp["q"], sp["k"], sp["v"], sp["q_seg"] if seg else None,
                sp["kv_seg"] if seg else None, sp["do"], sp["row"], sp["row"]]

    sp = _specs(lq, lk, d, b.block_k_dkv, tiled_is_q=False)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=d ** -0.5, block_q=b.block_q_dkv,
                          kv_len=static.kv_len),
        grid=(lk // b.block_k_dkv, batch, heads),
        in_specs=in_specs(sp),
        out_specs=[sp["k"], sp["v"]],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        cost_estimate=common.cost(q, k, 4, *args, k, v),
        name="vdit_flash_dkv", **common_kw,
    )(*args)
    sp = _specs(lq, lk, d, b.block_q_dq, tiled_is_q=True)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=d ** -0.5, block_k=b.block_k_dq,
                          kv_len=static.kv_len),
        grid=(lq // b.block_q_dq, batch, heads),
        in_specs=in_specs(sp),
        out_specs=sp["q"],
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        cost_estimate=common.cost(q, k, 3, *args, q),
        name="vdit_flash_dq", **common_kw,
    )(*args)
    return dq, dk, dv


def flash_attention_gpu(q: jax.Array, k: jax.Array, v: jax.Array,
                        q_seg: jax.Array | None = None, kv_seg: jax.Array | None = None, *,
                        blocks: BlockSizes | None = None, interpret: bool | None = None):
    """Flash attention with the Triton-lowered kernels.

    q [B, Lq, H, D], k, v [B, Lk, H, D]; q_seg [B, Lq], kv_seg [B, Lk] int (or None).
    Returns (o [B, Lq, H, D], lse [B, H, Lq] float32). interpret=None: interpret mode unless
    the default backend is a GPU.
    """
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    blocks = (blocks or BlockSizes.default("gpu")).clamp(q.shape[1], k.shape[1], _fit)
    return common.flash_attention(q, k, v, q_seg, kv_seg, forward=forward, backward=backward,
                                  blocks=blocks, interpret=interpret)
