"""Attention kernels: forward and forward+backward TFLOP/s and peak memory per sequence length.

    python tools/bench_attention.py                       # GPU/TPU: 4k, 16k, 64k tokens
    python tools/bench_attention.py --lengths 256 512     # CPU smoke check (interpret mode)

Implementations: GPU xla, cudnn, pallas_gpu; TPU xla, splash (JAX's splash attention),
pallas_tpu; CPU xla, pallas_gpu (interpret mode: a smoke check, not a speed). Non-causal
self-attention, q, k, v [B, L, H, D], no mask.

FLOPs (model FLOPs, the FlashAttention convention): forward 4 * B * H * L^2 * D (two matmuls);
backward 2.5x the forward (five matmuls), so forward+backward = 3.5x. A kernel that recomputes
more (vdit's backward does 7 matmuls) gets no credit for it. Peak memory: the device's
`peak_bytes_in_use` (GPU/TPU), measured in a fresh subprocess per (impl, length) so peaks do not
leak between rows; where the device has no memory stats (CPU), XLA's estimate for the compiled
forward+backward program (arguments + outputs + temporaries). Lengths where an implementation
runs out of memory show "OOM".
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from vdit.ops.attention import attention
from vdit.ops.pallas.common import BlockSizes

DEFAULT_IMPLS = {"gpu": ["xla", "cudnn", "pallas_gpu"], "tpu": ["xla", "splash", "pallas_tpu"],
                 "cpu": ["xla", "pallas_gpu"]}
BASELINE = {"gpu": "cudnn", "tpu": "splash", "cpu": "xla"}


def splash(q, k, v):
    """JAX's splash attention (TPU), full mask; it wants [H, L, D] per example and a pre-scaled
    q."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    _, length, heads, d = q.shape
    blk = min(512, length)
    sizes = sk.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk,
                          block_kv_dkv=blk, block_kv_dkv_compute=blk, use_fused_bwd_kernel=True)
    mask = sm.MultiHeadMask([sm.FullMask((length, length))] * heads)
    kernel = sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                interpret=jax.default_backend() != "tpu")
    t = lambda x: x.transpose(0, 2, 1, 3)
    return t(jax.vmap(kernel)(t(q) * d ** -0.5, t(k), t(v)))


def make_fn(impl: str, blocks: BlockSizes | None):
    if impl == "splash":
        return splash
    return lambda q, k, v: attention(q, k, v, impl=impl, blocks=blocks)


def timed(fn, args, warmup: int, iters: int) -> float:
    """Median seconds per call of a compiled function."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(impl: str, length: int, a: argparse.Namespace) -> dict:
    """One row: times, TFLOP/s and peak memory of `impl` at `length` tokens."""
    dtype = jnp.dtype(a.dtype)
    keys = jax.random.split(jax.random.key(0), 4)
    shape = (a.batch, length, a.heads, a.head_dim)
    q, k, v, do = (jax.random.normal(key, shape, dtype) for key in keys)
    blocks = BlockSizes(*a.blocks) if a.blocks else None
    fn = make_fn(impl, blocks)
    fwd_bwd = jax.jit(lambda q, k, v, do: jax.vjp(fn, q, k, v)[1](do))
    row = {"impl": impl, "length": length}
    try:
        compiled = fwd_bwd.lower(q, k, v, do).compile()
        t_fwd = timed(jax.jit(fn).lower(q, k, v).compile(), (q, k, v), a.warmup, a.iters)
        t_all = timed(compiled, (q, k, v, do), a.warmup, a.iters)
    except Exception as e:  # an OOM at 64k is a result, not a crash
        if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
            return row | {"error": "OOM"}
        raise
    flops = 4.0 * a.batch * a.heads * length * length * a.head_dim
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        peak, source = stats["peak_bytes_in_use"], "device"
    else:
        mem = compiled.memory_analysis()
        peak = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
        source = "xla estimate"
    return row | {"fwd_ms": t_fwd * 1e3, "fwd_bwd_ms": t_all * 1e3,
                  "fwd_tflops": flops / t_fwd / 1e12, "fwd_bwd_tflops": 3.5 * flops / t_all / 1e12,
                  "peak_gib": peak / 2**30, "peak_source": source}


def run_isolated(impl: str, length: int, argv: list[str]) -> dict:
    """measure() in a fresh process, so device memory peaks start from zero."""
    cmd = [sys.executable, __file__, *argv, "--one", impl, str(length)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        oom = "RESOURCE_EXHAUSTED" in proc.stderr or "out of memory" in proc.stderr.lower()
        return {"impl": impl, "length": length, "error": "OOM" if oom else tail[0][:80]}
    return json.loads(lines[-1])


def table(rows: list[dict], baseline: str) -> str:
    base = {r["length"]: r for r in rows if r["impl"] == baseline and "error" not in r}
    head = (f"| impl | seq len | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | peak GiB "
            f"| fwd vs {baseline} | fwd+bwd vs {baseline} |")
    out = [head, "|" + "---|" * 9]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['impl']} | {r['length']} | {r['error']} |" + " |" * 6)
            continue
        b = base.get(r["length"])
        ratio = [f"{b[key] / r[key]:.2f}x" if b else "-" for key in ("fwd_ms", "fwd_bwd_ms")]
        out.append(f"| {r['impl']} | {r['length']} | {r['fwd_ms']:.3g} | {r['fwd_tflops']:.3g} "
                   f"| {r['fwd_bwd_ms']:.3g} | {r['fwd_bwd_tflops']:.3g} | {r['peak_gib']:.3g} "
                   f"| {ratio[0]} | {ratio[1]} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    backend = jax.default_backend()
    on_cpu = backend == "cpu"
    p.add_argument("--lengths", type=int, nargs="+",
                   default=[256, 512] if on_cpu else [4096, 16384, 65536])
    p.add_argument("--impls", nargs="+", default=DEFAULT_IMPLS.get(backend, ["xla"]))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=2 if on_cpu else 16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--blocks", type=int, nargs=6, metavar="B",
                   help="Pallas tiles: block_q block_k block_q_dkv block_k_dkv block_q_dq "
                        "block_k_dq (default: BlockSizes.default for the backend)")
    p.add_argument("--warmup", type=int, default=1 if on_cpu else 3)
    p.add_argument("--iters", type=int, default=2 if on_cpu else 10)
    p.add_argument("--in-process", action="store_true",
                   help="no subprocess per row (faster; peaks accumulate across rows)")
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--one", nargs=2, metavar=("IMPL", "LENGTH"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(measure(a.one[0], int(a.one[1]), a)))
        return
    print(f"# {jax.devices()[0].device_kind} ({backend}), jax {jax.__version__}, B={a.batch} "
          f"H={a.heads} D={a.head_dim} {a.dtype}; FLOPs: fwd 4BHL^2D, fwd+bwd 3.5x", flush=True)
    rows = []
    for length in a.lengths:
        for impl in a.impls:
            row = measure(impl, length, a) if a.in_process else run_isolated(impl, length, argv)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(table(rows, BASELINE.get(backend, "xla")))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
