"""vdit's Pallas flash attention against a float64 reference.

On CPU the GPU kernels run in Pallas interpret mode and the TPU kernels in TPU interpret mode;
`gpu`-marked tests run the compiled Triton kernels and are skipped without a GPU. The TPU
kernels are also compiled for a real v5p slice with libtpu.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdit.ops.attention import attention, attention_with_lse, resolve_impl
from vdit.ops.pallas.common import MASK_VALUE, BlockSizes
from vdit.ops.pallas.flash_gpu import flash_attention_gpu
from vdit.ops.pallas.flash_tpu import flash_attention_tpu

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def reference(q, k, v, visible, do, dlse):
    """float64 forward and backward. visible: bool [B, Lq, Lk]; do [B, Lq, H, D] and dlse
    [B, H, Lq] are the cotangents. Returns (o, lse, dq, dk, dv)."""
    q, k, v, do, dlse = (np.asarray(x, np.float64) for x in (q, k, v, do, dlse))
    scale = q.shape[-1] ** -0.5
    vis = visible[:, None]  # [B, 1, Lq, Lk]
    s = np.where(vis, np.einsum("bqhd,bkhd->bhqk", q, k) * scale, -np.inf)
    seen = vis.any(-1)
    m = np.where(seen, s.max(-1), 0.0)
    e = np.exp(s - m[..., None])
    den = np.where(seen, e.sum(-1), 1.0)
    p = e / den[..., None]  # a row with no visible key is all zeros
    lse = np.where(seen, m + np.log(den), MASK_VALUE)
    o = np.einsum("bhqk,bkhd->bqhd", p, v)
    dv = np.einsum("bhqk,bqhd->bkhd", p, do)
    dp = np.einsum("bqhd,bkhd->bhqk", do, v)
    delta = np.einsum("bqhd,bqhd->bhq", do, o) - dlse
    ds = p * (dp - delta[..., None]) * scale
    return (o, lse, np.einsum("bhqk,bkhd->bqhd", ds, k), np.einsum("bhqk,bqhd->bkhd", ds, q),
            dv)


def rel_err(got, want) -> float:
    """max |got - want| / max |want|: normwise, so entries near 0 do not blow it up."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


def _inputs(seed, b, lq, lk, h, d, dtype):
    ks = jax.random.split(jax.random.key(seed), 5)
    q, k, v, do = (jax.random.normal(key, (b, n, h, d), dtype)
                   for key, n in zip(ks, (lq, lk, lk, lq), strict=False))
    dlse = jax.random.normal(ks[4], (b, h, lq), jnp.float32)
    return q, k, v, do, dlse


# (batch, Lq, Lk, heads, head dim, dtype, masking): lengths not divisible by any tile.
CASES = {
    # Self-attention, 3 packed clips, and key padding that hides all of clip 2's keys, so
    # clip 2's queries are fully masked rows.
    "self-f32-d64-segments": (2, 100, 100, 2, 64, jnp.float32, "self"),
    # Cross-attention (text keys), per-side segment ids, bf16, head dim 128.
    "cross-bf16-d128-pair": (1, 72, 200, 2, 128, jnp.bfloat16, "pair"),
}
KERNELS = {
    # Small tiles so that the tiny shapes still span several tiles (and padding) per axis.
    "gpu": lambda *a, **kw: flash_attention_gpu(*a, blocks=BlockSizes(32, 32, 16, 32, 32, 16),
                                                **kw),
    "tpu": lambda *a, **kw: flash_attention_tpu(*a, blocks=BlockSizes(*(128,) * 6), **kw),
    # The XLA path follows the same rules (fully masked rows, lse, its gradient).
    "xla": lambda q, k, v, q_ids, kv_ids: attention_with_lse(q, k, v, segment_ids=(q_ids, kv_ids),
                                                             impl="xla"),
}


def _segments(case, b, lq, lk):
    rng = np.random.default_rng(len(case))
    if case == "self":
        ids = np.sort(rng.integers(0, 3, (b, lq)), axis=1)
        ids[:, :3], ids[:, -3:] = 0, 2  # every clip present
        key_ok = ids != 2
        return ids, ids, np.where(key_ok, ids, -1)
    q_ids = np.sort(rng.integers(0, 2, (b, lq)), axis=1)
    kv_ids = np.sort(rng.integers(0, 3, (b, lk)), axis=1)
    q_ids[:, -5:] = 7  # queries whose segment has no keys
    return q_ids, kv_ids, kv_ids


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_and_gradients_match_float64(kernel, case):
    b, lq, lk, h, d, dtype, masking = CASES[case]
    q, k, v, do, dlse = _inputs(sorted(CASES).index(case), b, lq, lk, h, d, dtype)
    q_ids, _, kv_ids_masked = _segments(masking, b, lq, lk)
    visible = q_ids[:, :, None] == kv_ids_masked[:, None, :]
    assert not visible.any(-1).all()  # the case has fully masked rows

    fn = lambda q, k, v: KERNELS[kernel](q, k, v, jnp.asarray(q_ids),
                                         jnp.asarray(kv_ids_masked))
    assert_matches_reference(fn, q, k, v, visible, do, dlse)


def assert_matches_reference(fn, q, k, v, visible, do, dlse):
    """fn(q, k, v) -> (o, lse): forward and the three gradients (with cotangents do, dlse)
    within TOL of float64; finite; fully masked rows give o = 0 and lse = MASK_VALUE."""
    (o, lse), vjp = jax.vjp(fn, q, k, v)
    grads = vjp((do, dlse))
    want = reference(q, k, v, visible, do, dlse)
    seen = visible.any(-1)[:, None, :]  # [B, 1, Lq]: rows with a visible key
    # A fully masked row's lse (MASK_VALUE, checked below) would swamp a normwise error.
    for name, got, ref in zip(("o", "lse", "dq", "dk", "dv"),
                              (o, np.where(seen, lse, 0.0), *grads),
                              (want[0], np.where(seen, want[1], 0.0), *want[2:]), strict=True):
        assert np.isfinite(np.asarray(got, np.float32)).all(), name
        assert rel_err(got, ref) < TOL[q.dtype.type], (name, rel_err(got, ref))
    assert o.dtype == q.dtype and all(g.dtype == q.dtype for g in grads)
    assert np.all(np.asarray(o, np.float32)[~seen[:, 0]] == 0)
    assert np.all(np.asarray(lse)[np.broadcast_to(~seen, lse.shape)] == MASK_VALUE)


def test_dispatch_with_key_mask_matches_xla():
    """The model's call: a key mask only; `pallas` (interpret mode on CPU) equals `xla`."""
    q, k, v, _, _ = _inputs(3, 2, 40, 24, 2, 64, jnp.float32)
    mask = jnp.arange(24)[None, :] < jnp.array([[24], [9]])
    out = attention(q, k, v, kv_mask=mask, impl="pallas")
    want = attention(q, k, v, kv_mask=mask, impl="xla")
    assert rel_err(out, want) < 1e-5
    # Self-attention segment ids (one array) combined with a key mask.
    ids = jnp.asarray(np.repeat([[0, 1, 2, 3]], 10, axis=1).reshape(1, 40).repeat(2, 0))
    kv_mask = jnp.arange(40)[None, :] % 7 != 3
    _, k, v, _, _ = _inputs(7, 2, 40, 40, 2, 64, jnp.float32)
    out = attention(q, k, v, kv_mask=kv_mask, segment_ids=ids, impl="pallas")
    want = attention(q, k, v, kv_mask=kv_mask, segment_ids=ids, impl="xla")
    assert rel_err(out, want) < 1e-5
    backend = jax.default_backend()
    assert resolve_impl("auto", jnp.bfloat16) == {"gpu": "cudnn", "tpu": "pallas_tpu"}.get(
        backend, "xla")
    assert resolve_impl("auto", jnp.bfloat16, segments=True) != "cudnn"  # dense mask: quadratic
    assert resolve_impl("auto", jnp.float32, head_dim=8) == "xla"  # no Pallas tile for it
    assert resolve_impl("pallas", jnp.float32) == ("pallas_tpu" if backend == "tpu"
                                                   else "pallas_gpu")


def test_blocks_merge_by_lse_inside_shard_map():
    """Ring attention's use: two key blocks inside shard_map, merged by log-sum-exp, equal
    attention over all keys (the TPU kernel, in TPU interpret mode)."""
    q, k, v, _, _ = _inputs(4, 1, 64, 256, 2, 128, jnp.float32)
    ids = jnp.asarray(np.repeat([[0, 1]], 128, axis=1).reshape(1, 256))
    q_ids = ids[:, ::4]
    mesh = jax.make_mesh((1,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))

    def merged(q, k, v, q_ids, kv_ids):
        parts = [attention_with_lse(q, k[:, s], v[:, s], segment_ids=(q_ids, kv_ids[:, s]),
                                    impl="pallas_tpu") for s in (slice(0, 128), slice(128, 256))]
        lse = jnp.logaddexp(parts[0][1], parts[1][1])
        w = [jnp.exp(p[1] - lse).transpose(0, 2, 1)[..., None] for p in parts]
        return w[0] * parts[0][0] + w[1] * parts[1][0]

    spec = jax.P("x")
    out = jax.jit(jax.shard_map(merged, mesh=mesh, in_specs=(spec,) * 5, out_specs=spec,
                                check_vma=False))(q, k, v, q_ids, ids)
    want = attention(q, k, v, segment_ids=(q_ids, ids), impl="xla")
    assert rel_err(out, want) < 1e-5


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_gpu_kernels_lower_to_triton(dtype):
    """Without a GPU, the Triton kernels still go through Pallas' Triton lowering (the step
    before PTX): forward, dK/dV and dQ for cross-attention with segment ids, default tiles."""
    q = jax.ShapeDtypeStruct((2, 1000, 4, 128), dtype)
    kv = jax.ShapeDtypeStruct((2, 700, 4, 128), dtype)
    ids = (jax.ShapeDtypeStruct((2, 1000), jnp.int32), jax.ShapeDtypeStruct((2, 700), jnp.int32))

    def loss(q, k, v, q_ids, kv_ids):
        o, lse = flash_attention_gpu(q, k, v, q_ids, kv_ids, interpret=False)
        return o.astype(jnp.float32).sum() + lse.sum()

    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv, *ids).lower(
        lowering_platforms=("cuda",))
    assert lowered.as_text().count("stablehlo.custom_call @__gpu$xla.gpu.triton") == 3


def _compile_uncached(lowered):
    """Compiles without writing the persistent cache (conftest turns it on): an executable
    compiled from a topology cannot be loaded back without a TPU client, so the next run would
    only warn about it."""
    key = "jax_persistent_cache_min_compile_time_secs"
    before = getattr(jax.config, key)
    jax.config.update(key, 1e9)
    try:
        return lowered.compile()
    finally:
        jax.config.update(key, before)


@pytest.fixture(scope="module")
def v5p_mesh():
    """A v5p:2x2x2 slice (8 chips) described by libtpu; nothing runs on it, it compiles."""
    pytest.importorskip("libtpu")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-16")  # quiets libtpu's start-up
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    from jax.experimental import topologies

    topo = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x2",
                                        chip_config_name="default",
                                        chips_per_host_bounds=(2, 2, 1), num_slices=1)
    return jax.sharding.Mesh(np.array(topo.devices), ("data",))


def test_dispatch_runs_tpu_kernels_per_shard_under_a_mesh(v5p_mesh):
    """XLA cannot partition a Mosaic kernel; under the trainer's mesh and rule table the
    dispatch splits batch and heads itself, so a GSPMD program compiles without gathers."""
    import flax.linen as nn

    from vdit.parallel.rules import RULE_TABLES

    auto = (jax.sharding.AxisType.Auto,) * 4
    mesh = jax.sharding.Mesh(v5p_mesh.devices.reshape(2, 2, 2, 1),
                             ("data", "fsdp", "tensor", "context"), axis_types=auto)
    act = jax.sharding.NamedSharding(mesh, jax.P(("data", "fsdp"), None, "tensor"))
    x = jax.ShapeDtypeStruct((8, 2048, 8, 128), jnp.bfloat16, sharding=act)
    mask = jax.ShapeDtypeStruct((8, 2048), jnp.bool_, sharding=jax.sharding.NamedSharding(
        mesh, jax.P(("data", "fsdp"))))

    def loss(q, k, v, kv_mask):
        out = attention(q, k, v, kv_mask=kv_mask, impl="pallas_tpu", interpret=False)
        return out.astype(jnp.float32).sum()

    with jax.set_mesh(mesh), nn.logical_axis_rules(RULE_TABLES["default"]):
        text = _compile_uncached(jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(
            x, x, x, mask)).as_text()
    assert text.count("tpu_custom_call") == 3 and "all-gather" not in text


def _compile_on(mesh, lq, lk, h, d, dtype, segments: bool, grad: bool):
    """Compiles vdit's TPU kernels (batch 8 sharded over the slice, inside shard_map) for
    q [8, lq, h, d], k, v [8, lk, h, d]; returns the compiled program and compile seconds."""
    spec = jax.P("data")
    sharding = jax.sharding.NamedSharding(mesh, spec)
    q, kv = (jax.ShapeDtypeStruct((8, n, h, d), dtype, sharding=sharding) for n in (lq, lk))
    ids = tuple(jax.ShapeDtypeStruct((8, n), jnp.int32, sharding=sharding) for n in (lq, lk))

    def local(q, k, v, q_ids, kv_ids):
        segs = (q_ids, kv_ids) if segments else ()
        return flash_attention_tpu(q, k, v, *segs, interpret=False)[0]

    fwd = jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 5, out_specs=spec, check_vma=False)
    fn = jax.grad(lambda *a: fwd(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2)) if grad else fwd
    start = time.perf_counter()
    compiled = _compile_uncached(jax.jit(fn).lower(q, kv, kv, *ids))
    assert "tpu_custom_call" in compiled.as_text()  # the Mosaic kernels, not XLA attention
    return compiled, time.perf_counter() - start


def test_tpu_kernels_compile_for_v5p_at_16k(v5p_mesh):
    """Forward and backward of the Mosaic kernels, compiled ahead of time for a v5p slice at
    16k tokens, bf16, head dim 128, with segment ids, on this CPU host."""
    for grad in (False, True):
        compiled, seconds = _compile_on(v5p_mesh, 16384, 16384, 8, 128, jnp.bfloat16, True, grad)
        mem = compiled.memory_analysis()
        print(f"v5p 16k {'fwd+bwd' if grad else 'fwd'}: compile {seconds:.1f} s, per chip "
              f"args {mem.argument_size_in_bytes / 2**20:.0f} MiB, temp "
              f"{mem.temp_size_in_bytes / 2**20:.0f} MiB, out "
              f"{mem.output_size_in_bytes / 2**20:.0f} MiB")
        # Per chip: 1 x 16k x 8 x 128 bf16 = 32 MiB per tensor. Dense [8, 16k, 16k] f32
        # logits would be 8 GiB; a linear-memory kernel needs a few tensors' worth.
        assert mem.temp_size_in_bytes < 1 << 30
    assert jax.default_backend() == "cpu"  # the CPU backend of the other tests is untouched


def test_tpu_kernels_compile_f32_d64_cross_attention(v5p_mesh):
    """The other Mosaic paths: f32, head dim 64, Lq != Lk, lengths off the tiles (padding)."""
    _compile_on(v5p_mesh, 1000, 700, 4, 64, jnp.float32, True, grad=True)


GPU_CASES = [(jnp.bfloat16, 64, None), (jnp.float32, 128, None), (jnp.bfloat16, 128, "pair")]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,d,masking", GPU_CASES)
def test_compiled_gpu_kernel_matches_float64(dtype, d, masking):
    """The Triton-lowered kernels on a real GPU, default tiles, lengths off the tiles."""
    b, lq, lk, h = 2, 1000, 700, 4
    q, k, v, do, dlse = _inputs(5, b, lq, lk, h, d, dtype)
    if masking:
        q_ids, kv_ids, _ = _segments("pair", b, lq, lk)
    else:
        q_ids, kv_ids = np.zeros((b, lq), np.int32), np.zeros((b, lk), np.int32)
    segs = () if masking is None else (jnp.asarray(q_ids), jnp.asarray(kv_ids))
    fn = jax.jit(lambda q, k, v: flash_attention_gpu(q, k, v, *segs, interpret=False))
    assert_matches_reference(fn, q, k, v, q_ids[:, :, None] == kv_ids[:, None, :], do, dlse)


@pytest.mark.gpu
def test_gpu_auto_matches_cudnn_and_xla():
    q, k, v, _, _ = _inputs(6, 1, 2048, 2048, 4, 128, jnp.bfloat16)
    want = attention(q, k, v, impl="xla")
    for impl in ("auto", "cudnn", "pallas"):
        assert rel_err(jax.jit(lambda q, k, v, i=impl: attention(q, k, v, impl=i))(q, k, v),
                       want) < 1e-2, impl


@pytest.mark.gpu
def test_gpu_cudnn_takes_a_key_mask_for_cross_attention():
    """Text cross-attention: 2048 video queries over 32 text keys, the last 9 padded (cuDNN
    wants the mask at full [B, 1, Lq, Lk])."""
    q, k, v, _, _ = _inputs(7, 2, 2048, 32, 4, 128, jnp.bfloat16)
    kv_mask = jnp.arange(32)[None, :] < jnp.array([[23], [32]])
    want = attention(q, k, v, kv_mask=kv_mask, impl="xla")
    for impl in ("auto", "cudnn"):
        got = jax.jit(lambda q, k, v, i=impl: attention(q, k, v, kv_mask=kv_mask, impl=i))(q, k, v)
        assert rel_err(got, want) < 1e-2, impl
