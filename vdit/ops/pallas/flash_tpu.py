"""Flash attention for TPUs through Pallas' Mosaic lowering (FlashAttention-2 on a grid).

Mosaic wants the last two dims of every block to be whole (8, 128) tiles, so the wrapper moves
heads ahead of the sequence ([B, L, H, D] -> [B, H, L, D]; inside a model XLA can fold that
transpose into the producing projection, standalone it is a copy) and each grid step sees
[block, D] tiles. Unlike the GPU kernels, the sweep over the other sequence is the last grid axis
("arbitrary"), so Pallas double-buffers the HBM->VMEM copies of the next tile while the MXU
works on this one; running statistics live in VMEM scratch across those steps:
- forward, grid (B, H, Lq / block_q, Lk / block_k): m, l, acc scratch; o and lse at the end;
- dK/dV, grid (B, H, Lk / block_k_dkv, Lq / block_q_dkv): dk, dv scratch;
- dQ, grid (B, H, Lq / block_q_dq, Lk / block_k_dq): dq scratch.
Per-row values (lse, delta) enter and leave the kernels as [B, H, L, 1] columns that broadcast
against a [block_q, block_k] logits tile; the tiled HBM layout pads such a column to 128 lanes
while a kernel runs, so the saved residual is the compact [B, H, L].
Runs on CPU in TPU interpret mode (tests) and compiles on a CPU host for real TPUs with libtpu
(tests/test_flash_attention.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from vdit.ops.pallas import common
from vdit.ops.pallas.common import BlockSizes, Static

LANES = 128


def _fit(block: int, length: int) -> int:
    """Tiles are whole multiples of 128 lanes (keys sit on lanes in the logits tile)."""
    return min(block, -(-length // LANES) * LANES)


def _to_kernel(x: jax.Array) -> jax.Array:
    return x.transpose(0, 2, 1, 3)  # [B, L, H, D] -> [B, H, L, D]


def _from_kernel(x: jax.Array) -> jax.Array:
    return x.transpose(0, 2, 1, 3)


def _column(x: jax.Array) -> jax.Array:
    return x[..., None]  # [B, H, L] -> [B, H, L, 1]


def _tile_specs(block: int, d: int, tiled_axis: int):
    """BlockSpecs for the grid (B, H, i, j) where grid axis `tiled_axis` (2 or 3) picks the
    tile along the sequence: [block, D] data, [block, 1] per-row values, and segment ids as
    [block, 1] (queries) and [1, block] (keys)."""

    def pick(*idx):
        return idx[tiled_axis]

    data = pl.BlockSpec((None, None, block, d), lambda b, h, i, j: (b, h, pick(b, h, i, j), 0))
    rows = pl.BlockSpec((None, None, block, 1),
                        lambda b, h, i, j: (b, h, pick(b, h, i, j), 0))
    q_seg = pl.BlockSpec((None, block, 1), lambda b, h, i, j: (b, pick(b, h, i, j), 0))
    kv_seg = pl.BlockSpec((None, 1, block), lambda b, h, i, j: (b, 0, pick(b, h, i, j)))
    return data, rows, q_seg, kv_seg


def _compiler_params() -> pltpu.CompilerParams:
    # Batch, heads and the tiled sequence are independent (megacore may split them); the swept
    # sequence carries the scratch accumulators, so it must run in order.
    return pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def _mask(qs_ref, ks_ref, col0, shape, kv_len):
    q_seg = None if qs_ref is None else qs_ref[...]
    kv_seg = None if ks_ref is None else ks_ref[...]
    return common.visible(q_seg, kv_seg, col0, shape, kv_len)


def _forward_kernel(q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref,
                    *, scale: float, kv_len: int | None):
    j = pl.program_id(3)
    block_q, block_k = q_ref.shape[0], k_ref.shape[0]

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, common.MASK_VALUE, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    s = common.dot_nt(q_ref[...], k_ref[...]) * scale
    mask = _mask(qs_ref, ks_ref, j * block_k, (block_q, block_k), kv_len)
    if mask is not None:
        s = jnp.where(mask, s, common.MASK_VALUE)
    m, row_sum, acc = common.softmax_step(s, m_ref[...], l_ref[...], acc_ref[...], v_ref[...])
    m_ref[...], l_ref[...], acc_ref[...] = m, row_sum, acc

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        o, lse = common.finish(m, row_sum, acc)
        o_ref[...] = o.astype(o_ref.dtype)
        lse_ref[...] = lse


def forward(q, k, v, q_seg, kv_seg, static: Static):
    """Padded q [B, Lq, H, D], k, v [B, Lk, H, D] -> (o [B, Lq, H, D], lse [B, H, Lq] f32)."""
    batch, lq, heads, d = q.shape
    b = static.blocks
    q_data, q_rows, q_segs, _ = _tile_specs(b.block_q, d, 2)
    k_data, _, _, k_segs = _tile_specs(b.block_k, d, 3)
    seg = q_seg is not None
    o, lse = pl.pallas_call(
        functools.partial(_forward_kernel, scale=d ** -0.5, kv_len=static.kv_len),
        grid=(batch, heads, lq // b.block_q, k.shape[1] // b.block_k),
        in_specs=[q_data, k_data, k_data, q_segs if seg else None, k_segs if seg else None],
        out_specs=[q_data, q_rows],
        out_shape=[jax.ShapeDtypeStruct((batch, heads, lq, d), q.dtype),
                   jax.ShapeDtypeStruct((batch, heads, lq, 1), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((b.block_q, 1), jnp.float32),
                        pltpu.VMEM((b.block_q, 1), jnp.float32),
                        pltpu.VMEM((b.block_q, d), jnp.float32)],
        compiler_params=_compiler_params(),
        interpret=static.interpret,
        cost_estimate=common.cost(q, k, 2, q, k, v, q_seg, kv_seg, q),
        name="vdit_flash_fwd",
    )(*map(_to_kernel, (q, k, v)), *_segments(q_seg, kv_seg))
    return _from_kernel(o), lse[..., 0]


def _segments(q_seg, kv_seg):
    """[B, Lq] -> [B, Lq, 1] and [B, Lk] -> [B, 1, Lk]: queries on sublanes, keys on lanes."""
    if q_seg is None:
        return None, None
    return q_seg[:, :, None], kv_seg[:, None, :]


def _dkv_kernel(q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
                dk_acc, dv_acc, *, scale: float, kv_len: int | None):
    i = pl.program_id(3)
    block_q, block_k = q_ref.shape[0], k_ref.shape[0]

    @pl.when(i == 0)
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    q, do = q_ref[...], do_ref[...]
    mask = _mask(qs_ref, ks_ref, pl.program_id(2) * block_k, (block_q, block_k), kv_len)
    p, ds = common.grad_tile(q, k_ref[...], v_ref[...], do, lse_ref[...],
                             delta_ref[...], mask, scale)
    dv_acc[...] += common.dot_tn(p.astype(do.dtype), do)
    dk_acc[...] += common.dot_tn(ds.astype(q.dtype), q)

    @pl.when(i == pl.num_programs(3) - 1)
    def _write():
        dk_ref[...] = dk_acc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_acc,
               *, scale: float, kv_len: int | None):
    j = pl.program_id(3)
    block_q, block_k = q_ref.shape[0], k_ref.shape[0]

    @pl.when(j == 0)
    def _init():
        dq_acc[...] = jnp.zeros(dq_acc.shape, jnp.float32)

    k = k_ref[...]
    mask = _mask(qs_ref, ks_ref, j * block_k, (block_q, block_k), kv_len)
    _, ds = common.grad_tile(q_ref[...], k, v_ref[...], do_ref[...], lse_ref[...],
                             delta_ref[...], mask, scale)
    dq_acc[...] += common.dot_nn(ds.astype(k.dtype), k)

    @pl.when(j == pl.num_programs(3) - 1)
    def _write():
        dq_ref[...] = dq_acc[...].astype(dq_ref.dtype)


def backward(q, k, v, q_seg, kv_seg, lse, delta, do, static: Static):
    """Padded inputs, lse and delta [B, H, Lq] f32, do [B, Lq, H, D] -> (dq, dk, dv)."""
    batch, lq, heads, d = q.shape
    lk = k.shape[1]
    b = static.blocks
    seg = q_seg is not None
    args = (*map(_to_kernel, (q, k, v)), *_segments(q_seg, kv_seg), _to_kernel(do),
            _column(lse), _column(delta))
    kw = dict(compiler_params=_compiler_params(), interpret=static.interpret)

    def specs(q_axis: int, k_axis: int, bq: int, bk: int):
        q_data, q_rows, q_segs, _ = _tile_specs(bq, d, q_axis)
        k_data, _, _, k_segs = _tile_specs(bk, d, k_axis)
        return q_data, k_data, [q_data, k_data, k_data, q_segs if seg else None,
                                k_segs if seg else None, q_data, q_rows, q_rows]

    _, k_data, in_specs = specs(3, 2, b.block_q_dkv, b.block_k_dkv)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=d ** -0.5, kv_len=static.kv_len),
        grid=(batch, heads, lk // b.block_k_dkv, lq // b.block_q_dkv),
        in_specs=in_specs,
        out_specs=[k_data, k_data],
        out_shape=[jax.ShapeDtypeStruct((batch, heads, lk, d), k.dtype),
                   jax.ShapeDtypeStruct((batch, heads, lk, d), v.dtype)],
        scratch_shapes=[pltpu.VMEM((b.block_k_dkv, d), jnp.float32)] * 2,
        cost_estimate=common.cost(q, k, 4, *args, k, v),
        name="vdit_flash_dkv", **kw,
    )(*args)
    q_data, _, in_specs = specs(2, 3, b.block_q_dq, b.block_k_dq)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=d ** -0.5, kv_len=static.kv_len),
        grid=(batch, heads, lq // b.block_q_dq, lk // b.block_k_dq),
        in_specs=in_specs,
        out_specs=q_data,
        out_shape=jax.ShapeDtypeStruct((batch, heads, lq, d), q.dtype),
        scratch_shapes=[pltpu.VMEM((b.block_q_dq, d), jnp.float32)],
        cost_estimate=common.cost(q, k, 3, *args, q),
        name="vdit_flash_dq", **kw,
    )(*args)
    return _from_kernel(dq), _from_kernel(dk), _from_kernel(dv)


def _targets_tpu() -> bool:
    """Whether the program being traced runs on TPUs."""
    if jax.default_backend() == "tpu":
        return True
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return getattr(device, "platform", None) == "tpu"


def flash_attention_tpu(q: jax.Array, k: jax.Array, v: jax.Array,
                        q_seg: jax.Array | None = None, kv_seg: jax.Array | None = None, *,
                        blocks: BlockSizes | None = None, interpret=None):
    """Flash attention with the Mosaic kernels.

    q [B, Lq, H, D], k, v [B, Lk, H, D]; q_seg [B, Lq], kv_seg [B, Lk] int (or None).
    Returns (o [B, Lq, H, D], lse [B, H, Lq] float32). interpret=None: TPU interpret mode
    unless it runs on TPUs: the default backend's, or those of the ambient mesh (a CPU host
    compiling for a TPU topology, `vdit plan`); pass False to compile for TPU regardless.
    Inside `shard_map` it needs `check_vma=False` (a Mosaic kernel cannot be partitioned).
    """
    if interpret is None:
        interpret = False if _targets_tpu() else pltpu.InterpretParams()
    blocks = (blocks or BlockSizes.default("tpu")).clamp(q.shape[1], k.shape[1], _fit)
    return common.flash_attention(q, k, v, q_seg, kv_seg, forward=forward, backward=backward,
                                  blocks=blocks, interpret=interpret)
