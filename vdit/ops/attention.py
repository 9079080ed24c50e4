"""The one attention dispatch. Every attention in vdit calls `attention()` (or, for a block of
ring attention, `attention_with_lse()`).

Non-causal multi-head attention, q [B, Lq, H, D], k and v [B, Lk, H, D]; self- or
cross-attention (Lq != Lk). Softmax statistics are float32 for every input dtype, and the
Pallas kernels accumulate both matmuls in float32.

Masks. `kv_mask` bool [B, Lk] (True: the key may be attended) and/or `segment_ids`: one int array
[B, L] for self-attention, or a pair (q_ids [B, Lq], kv_ids [B, Lk]). A query sees a key when
their ids are equal and the key is not masked; ids must be >= 0 because a masked key becomes id
-1. A `kv_mask` alone is the same as every query in segment 0 and masked keys in segment -1.
A query that sees no key (fully masked row) returns 0, and its lse is MASK_VALUE (-1e30), so
merging blocks by log-sum-exp gives it no weight (xla and Pallas; cuDNN's behaviour there is
not checked yet).

Implementations (`impl`):
- `xla`: einsum + float32 softmax; materialises [B, H, Lq, Lk], so memory is quadratic.
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")`, NVIDIA GPUs, bf16/fp16 only;
  segment ids become a dense [B, 1, Lq, Lk] mask (quadratic), and no lse is available.
- `pallas_gpu`: vdit's flash kernels through Pallas' Triton lowering (vdit/ops/pallas/flash_gpu.py).
- `pallas_tpu`: vdit's flash kernels through Mosaic (vdit/ops/pallas/flash_tpu.py).
- `pallas`: the Pallas kernel of the default backend (TPU: pallas_tpu, else pallas_gpu). Off
  their device both run in interpret mode (slow; for tests).
- `auto`: CPU -> xla; TPU -> pallas_tpu; GPU -> cudnn for bf16/fp16 without segment ids (a
  dense mask would make it quadratic), else pallas_gpu. The GPU order is provisional until
  tools/bench_attention.py has measured both on a lent GPU (docs/performance.md). A head dim
  the Pallas kernels are not built for (GPU: powers of two 16-256; TPU: 64 or multiples of 128)
  falls back to cudnn (bf16/fp16 on GPU) or xla.
Pallas tiles come from `blocks` (BlockSizes; None: BlockSizes.default for the backend).

Sharding. XLA cannot partition a Pallas kernel, so under a mesh (`jax.set_mesh`) with more than
one device the dispatch runs the kernel per shard in a `shard_map`: batch and heads split as the
active logical-axis rules map `act_batch` and `act_heads` (vdit/parallel/rules.py), the sequences
whole. Inside a `shard_map` it calls the kernel as is.

Context parallelism (`context_parallel`, vdit/ops/context_parallel.py). When the caller names a
mode and the ambient mesh has a `context` axis of size n > 1, the sequences split n ways too,
with any impl: "ring" (K/V blocks rotated by ppermute, merged by log-sum-exp) or "ulysses"
(all-to-all to head-sharded, full attention, all-to-all back) for self-attention over the video
tokens, "queries" for cross-attention to a short text (queries split, K/V whole on every
device). Lengths must divide by n (ulysses: heads per tensor shard too), else a ValueError
names the numbers. None (the text encoder) never splits the sequence.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdit.ops.context_parallel import MODES, ring_attention, ulysses_attention
from vdit.ops.pallas.common import MASK_VALUE, BlockSizes
from vdit.ops.pallas.flash_gpu import flash_attention_gpu
from vdit.ops.pallas.flash_tpu import flash_attention_tpu

Impl = Literal["auto", "xla", "cudnn", "pallas", "pallas_gpu", "pallas_tpu"]
IMPLS = ("auto", "xla", "cudnn", "pallas", "pallas_gpu", "pallas_tpu")
SegmentIds = jax.Array | tuple[jax.Array, jax.Array] | None
ContextParallel = Literal["ring", "ulysses", "queries"] | None

__all__ = ["IMPLS", "MASK_VALUE", "BlockSizes", "attention", "attention_with_lse",
           "resolve_impl"]


def _pallas_fits(backend: str, head_dim: int | None) -> bool:
    """Head dims the kernels are built for: Triton tiles are powers of two (tensor-core dots
    need >= 16); Mosaic compiles were checked at 64 and 128."""
    if head_dim is None:
        return True
    if backend == "tpu":
        return head_dim == 64 or head_dim % 128 == 0
    return 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0


def resolve_impl(impl: Impl, dtype, *, segments: bool = False,
                 head_dim: int | None = None) -> str:
    """The concrete implementation `impl` means on the default backend (see the module doc);
    `auto` avoids a Pallas kernel for a head dim it is not built for."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl {impl!r}; allowed: {', '.join(IMPLS)}")
    backend = jax.default_backend()
    if impl == "pallas":
        return "pallas_tpu" if backend == "tpu" else "pallas_gpu"
    if impl != "auto":
        return impl
    fits = _pallas_fits(backend, head_dim)
    if backend == "tpu":
        return "pallas_tpu" if fits else "xla"
    if backend == "gpu":
        half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
        if half and (not segments or not fits):
            return "cudnn"
        return "pallas_gpu" if fits else "xla"
    return "xla"


def _segments(q, k, kv_mask, segment_ids: SegmentIds):
    """-> (q_ids [B, Lq], kv_ids [B, Lk]) int32, or (None, None) when nothing is masked."""
    if segment_ids is None and kv_mask is None:
        return None, None
    if segment_ids is None:
        q_ids = jnp.zeros(q.shape[:2], jnp.int32)
        kv_ids = jnp.zeros(k.shape[:2], jnp.int32)
    elif isinstance(segment_ids, tuple | list):
        q_ids, kv_ids = (jnp.asarray(s, jnp.int32) for s in segment_ids)
    else:
        if q.shape[1] != k.shape[1]:
            raise ValueError("one segment-id array needs Lq == Lk; pass (q_ids, kv_ids)")
        q_ids = kv_ids = jnp.asarray(segment_ids, jnp.int32)
    if q_ids.shape != q.shape[:2] or kv_ids.shape != k.shape[:2]:
        raise ValueError(f"segment ids {q_ids.shape}, {kv_ids.shape} for q {q.shape}, k {k.shape}")
    if kv_mask is not None:
        kv_ids = jnp.where(kv_mask, kv_ids, -1)
    return q_ids, kv_ids


def _visibility(q_ids, kv_ids, kv_mask, segment_ids):
    """Bool mask broadcastable to [B, 1, Lq, Lk] for XLA/cuDNN, or None."""
    if segment_ids is None:  # a key mask alone stays [B, 1, 1, Lk]: no [Lq, Lk] compare
        return None if kv_mask is None else kv_mask[:, None, None, :]
    return (q_ids[:, :, None] == kv_ids[:, None, :])[:, None]


def _heads_first(x):
    """[B, L, H, D] -> [B, H, L, D]: every attention matmul is then a plain batched matmul over
    (B, H), with no transposes of the [Lq, Lk] operands for XLA to insert."""
    return jnp.swapaxes(x, 1, 2)


def _cpu_unfused(*xs):
    """xs unchanged; on CPU, XLA may not fuse across this point (an optimization barrier).

    XLA:CPU hands a matmul and the element-wise work around it to YNNPACK as one fusion. For
    attention's [Lq, Lk] operands that fusion is slower than the matmuls and the softmax run
    apart, and it folds a transposed matmul output back into a contraction over the first axis
    of P, which runs at half speed. Other backends fuse these well and get no barrier."""
    out = jax.lax.platform_dependent(
        *xs, cpu=lambda *a: jax.lax.optimization_barrier(a), default=lambda *a: a)
    return out if len(xs) > 1 else out[0]


def _xla_forward(q, k, v, mask):
    """q, k, v [B, H, L, D] -> (o [B, H, Lq, D] in v's dtype, lse [B, H, Lq] f32,
    p [B, H, Lq, Lk] in v's dtype)."""
    # The scale goes on q ([Lq, D]) rather than on the logits ([Lq, Lk]): one pass fewer.
    q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    logits = _cpu_unfused(jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32))
    if mask is not None:
        logits = jnp.where(mask, logits, MASK_VALUE)
    peak = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    unnormalised = jnp.exp(logits - peak)
    total = jnp.sum(unnormalised, axis=-1, keepdims=True)
    p = unnormalised / total
    lse = (peak + jnp.log(total))[..., 0]
    if mask is not None:
        # Masked weights are exactly 0 already unless the whole row is masked; zeroing them
        # makes such a row return 0 instead of the mean of v.
        p = jnp.where(mask, p, 0.0)
        lse = jnp.where(jnp.any(mask, axis=-1), lse, MASK_VALUE)
    p = _cpu_unfused(p.astype(v.dtype))
    return jnp.einsum("bhqk,bhkd->bhqd", p, v), lse, p


@jax.custom_vjp
def _xla_attention(q, k, v, mask):
    """q, k, v [B, H, L, D] -> (o [B, H, Lq, D] in v's dtype, lse [B, H, Lq] f32); `mask`
    bool, broadcastable to [B, 1, Lq, Lk], or None.

    The backward pass is FlashAttention's, written in XLA ops: it keeps the probabilities from
    the forward pass and uses delta = rowsum(dO * O) ([Lq], cheap) where autodiff of softmax
    sums dP * P over [Lq, Lk]. On the 2-core CPU this made attention's forward and backward
    20-25 % faster and the bench step's memory 40 % smaller (docs/performance.md)."""
    o, lse, _ = _xla_forward(q, k, v, mask)
    return o, lse


def _xla_attention_fwd(q, k, v, mask):
    o, lse, p = _xla_forward(q, k, v, mask)
    return (o, lse), (q, k, v, o, p)


def _transposed_contraction(p, x):
    """p [B, H, Lq, Lk], x [B, H, Lq, D] -> sum over q of p x: [B, H, Lk, D] in float32.

    Computed as (x^T p)^T: the matmul's output is [D, Lk], its operands contract over their
    first axis in the same way, and on CPU the barrier keeps XLA from folding the transpose
    back into the matmul (which then ran at half the speed; docs/performance.md)."""
    t = jnp.einsum("bhqd,bhqk->bhdk", x, p, preferred_element_type=jnp.float32)
    return jnp.swapaxes(_cpu_unfused(t), -1, -2)


def _xla_attention_bwd(residuals, cotangents):
    q, k, v, o, p = residuals
    d_o, d_lse = cotangents
    scale = q.shape[-1] ** -0.5
    f32 = jnp.float32
    # d logits = P * (dP - delta + d_lse): d lse / d logits is P too. Masked entries have P = 0.
    delta = jnp.einsum("bhqd,bhqd->bhq", d_o, o, preferred_element_type=f32)
    d_p = jnp.einsum("bhqd,bhkd->bhqk", d_o, v, preferred_element_type=f32)
    d_logits = (p.astype(f32) * (d_p - (delta - d_lse)[..., None])).astype(q.dtype)
    d_q = jnp.einsum("bhqk,bhkd->bhqd", d_logits, k, preferred_element_type=f32) * scale
    d_k = _transposed_contraction(d_logits, q) * scale
    d_v = _transposed_contraction(p, d_o)
    return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None


_xla_attention.defvjp(_xla_attention_fwd, _xla_attention_bwd)


def _mesh_axes(mesh, logical: str, size: int) -> tuple[str, ...] | None:
    """The mesh axes the rules give `logical`, or None unless they split `size` evenly."""
    axes = nn.logical_to_mesh_axes((logical,))[0]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if a in mesh.shape)
    return axes if axes and size % math.prod(mesh.shape[a] for a in axes) == 0 else None


def _manual(mesh) -> bool:
    return any(t == jax.sharding.AxisType.Manual for t in mesh.axis_types)


def _per_shard(kernel: Callable, q, k, v, q_ids, kv_ids, q_len: str | None = None,
               kv_len: str | None = None):
    """kernel(q, k, v, q_ids, kv_ids) -> (o, lse), in a shard_map over the ambient mesh when
    there is one (see the module doc); `q_len`/`kv_len` name the mesh axis the query/key
    sequence splits over (None: whole)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or _manual(mesh):
        return kernel(q, k, v, q_ids, kv_ids)
    batch = _mesh_axes(mesh, "act_batch", q.shape[0])
    heads = _mesh_axes(mesh, "act_heads", q.shape[2])
    qs, kvs = jax.P(batch, q_len, heads, None), jax.P(batch, kv_len, heads, None)
    q_ids_spec = None if q_ids is None else jax.P(batch, q_len)
    kv_ids_spec = None if kv_ids is None else jax.P(batch, kv_len)
    lse = jax.P(batch, heads, q_len)
    # check_vma=False: a pallas_call inside a shard_map needs it (its outputs carry no
    # varying-axes type); the collectives of ring/ulysses differentiate without it.
    return jax.shard_map(kernel, mesh=mesh, in_specs=(qs, kvs, kvs, q_ids_spec, kv_ids_spec),
                         out_specs=(qs, lse), check_vma=False)(q, k, v, q_ids, kv_ids)


def _context_size(mode: ContextParallel) -> int:
    """How many ways `mode` splits the sequences: the ambient mesh's `context` size, or 1
    (no mode, no mesh, no such axis, or already inside a shard_map)."""
    if mode is None:
        return 1
    if mode not in MODES:
        raise ValueError(f"context_parallel {mode!r}; allowed: {', '.join(MODES)} or None")
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or _manual(mesh):
        return 1
    return dict(mesh.shape).get("context", 1)


def _context_parallel(mode: str, block: Callable, q, k, v, q_ids, kv_ids):
    """(o, lse) with the sequences split over the mesh axis `context` (see the module doc)."""
    n = _context_size(mode)
    lengths = {"query": q.shape[1]} if mode == "queries" else {"query": q.shape[1],
                                                               "key": k.shape[1]}
    for name, length in lengths.items():
        if length % n:
            raise ValueError(f"context parallelism ({mode}): {length} {name} tokens do not "
                             f"split over mesh.context={n}; use a multiple of {n}")
    if mode == "ulysses":
        mesh = jax.sharding.get_abstract_mesh()
        heads = _mesh_axes(mesh, "act_heads", q.shape[2])
        local = q.shape[2] // math.prod(mesh.shape[a] for a in heads or ())
        if local % n:
            raise ValueError(f"context parallelism (ulysses): {local} heads per tensor shard "
                             f"({q.shape[2]} heads) do not split over mesh.context={n}; use "
                             "ring or a head count divisible by tensor x context")
    inner = {"ring": ring_attention, "ulysses": ulysses_attention}.get(mode)

    def local(q, k, v, q_ids, kv_ids):
        ids = None if q_ids is None else (q_ids, kv_ids)
        return block(q, k, v, ids) if inner is None else inner(q, k, v, ids, block)

    return _per_shard(local, q, k, v, q_ids, kv_ids, q_len="context",
                      kv_len=None if mode == "queries" else "context")


def is_fused_attention(prim, *_, **__) -> bool:
    """A remat policy (jax.checkpoint): save the outputs of fused attention kernels (cuDNN's
    forward, vdit's Pallas kernels). Their residuals (O, lse) are O(L) memory; recomputing them
    in the backward pass is O(L^2) work, 10 % of the bench_gpu step on an H100."""
    return prim.name.startswith("dot_product_attention_fwd") or prim.name == "pallas_call"


def attention_with_lse(
    q: jax.Array, k: jax.Array, v: jax.Array, *, kv_mask: jax.Array | None = None,
    segment_ids: SegmentIds = None, impl: Impl = "auto", blocks: BlockSizes | None = None,
    interpret=None, context_parallel: ContextParallel = None,
) -> tuple[jax.Array, jax.Array]:
    """Attention of one (query block, key block) pair plus its log-sum-exp, for ring attention.

    Returns (o [B, Lq, H, D] in q's dtype, lse [B, H, Lq] float32, natural log). Both are
    differentiable. Blocks (o_i, lse_i) over disjoint key sets merge exactly as
    lse = logsumexp_i(lse_i), o = sum_i exp(lse_i - lse) o_i. `interpret` goes to the Pallas
    kernels (None: interpret mode off their device; False to compile for TPU on a CPU host).
    cuDNN returns no lse, so `auto` never picks it here. `context_parallel`: see the module doc.
    """
    q_ids, kv_ids = _segments(q, k, kv_mask, segment_ids)
    chosen = resolve_impl(impl, q.dtype, segments=True, head_dim=q.shape[-1])
    chosen = "xla" if chosen == "cudnn" and impl == "auto" else chosen  # cudnn has no lse
    if _context_size(context_parallel) > 1:
        # Per device, each block is this same dispatch (the mesh is manual there, so it calls
        # the kernel directly) with the key mask already folded into the ids.
        def block(q, k, v, ids):
            return attention_with_lse(q, k, v, segment_ids=ids, impl=chosen, blocks=blocks,
                                      interpret=interpret)

        return _context_parallel(context_parallel, block, q, k, v, q_ids, kv_ids)
    if chosen == "xla":
        o, lse = _xla_attention(*map(_heads_first, (q, k, v)),
                                _visibility(q_ids, kv_ids, kv_mask, segment_ids))
        return _heads_first(o).astype(q.dtype), lse
    if chosen in ("pallas_gpu", "pallas_tpu"):
        flash = flash_attention_gpu if chosen == "pallas_gpu" else flash_attention_tpu
        kernel = lambda *a: flash(*a, blocks=blocks, interpret=interpret)
        return _per_shard(kernel, q, k, v, q_ids, kv_ids)
    raise ValueError(f"attention_with_lse: impl {chosen!r} returns no lse; use xla or pallas")


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, kv_mask: jax.Array | None = None,
    segment_ids: SegmentIds = None, impl: Impl = "auto", blocks: BlockSizes | None = None,
    interpret=None, context_parallel: ContextParallel = None,
) -> jax.Array:
    """Non-causal multi-head attention (masks and implementations: see the module doc).

    q: [B, Lq, H, D]; k, v: [B, Lk, H, D]; kv_mask: bool [B, Lk], True where a key may be
    attended; segment_ids: [B, L] or ([B, Lq], [B, Lk]) int; context_parallel: None, "ring" or
    "ulysses" (self-attention), "queries" (cross-attention), used when the mesh has a `context`
    axis > 1. Returns [B, Lq, H, D] in q's dtype.
    """
    split = _context_size(context_parallel) > 1
    # Split sequences merge blocks by lse, which cuDNN does not return: `auto` is resolved
    # by attention_with_lse then (an explicit "cudnn" is refused there).
    chosen = impl if split else resolve_impl(impl, q.dtype, segments=segment_ids is not None,
                                             head_dim=q.shape[-1])
    if chosen == "cudnn" and not split:
        q_ids, kv_ids = _segments(q, k, kv_mask, segment_ids)
        mask = _visibility(q_ids, kv_ids, kv_mask, segment_ids)
        if mask is not None:  # cuDNN takes no broadcast sequence axes in a mask
            mask = jnp.broadcast_to(mask, (q.shape[0], 1, q.shape[1], k.shape[1]))
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
    return attention_with_lse(q, k, v, kv_mask=kv_mask, segment_ids=segment_ids, impl=chosen,
                              blocks=blocks, interpret=interpret,
                              context_parallel=context_parallel)[0]
