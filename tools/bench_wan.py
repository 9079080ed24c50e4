"""Wan 2.1 VAE at full width (random weights, the published config: base_dim 96, z_dim 16,
dim_mult [1, 2, 4, 4], num_res_blocks 2): encode / decode throughput and memory.

    python tools/bench_wan.py cpu [--frames 5] [--size 256] [--tile 128] [--overlap 32]
    python tools/bench_wan.py tpu [--topology v5p-8] [--frames 81] [--height 480] [--width 832]

`cpu`: frames/s of one-shot and tiled (vdit/models/tiling.py: time chunks of 4 frames after the
first, spatial tiles of --tile pixels) encode and decode on this host, after one untimed warm-up
call (compile excluded, reported apart); peak memory as XLA's memory_analysis of the compiled
program (arguments + outputs + temporaries; the largest of the tiled per-chunk programs) and
the process's peak RSS. `tpu`: the one-shot encode of one clip compiled with libtpu for one chip
of a v5p slice, as `vdit plan` compiles (no TPU needed): its per-chip memory_analysis. Prints
one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from vdit.config import AutoencoderConfig
from vdit.models.wan_autoencoder import PUBLISHED, WanAutoencoder

GIB = 2**30


def _autoencoder(tile: int = 256, overlap: int = 64) -> WanAutoencoder:
    cfg = AutoencoderConfig(kind="wan", checkpoint="random", factors=(4, 8, 8),
                            latent_channels=16, chunk_frames=4, tile=tile, tile_overlap=overlap)
    return WanAutoencoder(cfg, PUBLISHED["Wan 2.1"])


def _memory(compiled) -> float:
    m = compiled.memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes) / GIB


def _timed(fn, *args) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0, out


def bench_cpu(frames: int, size: int, tile: int, overlap: int) -> dict:
    """Frames/s and GiB of one-shot and tiled encode/decode of [1, frames, size, size, 3]."""
    from vdit.models import tiling

    ae = _autoencoder(tile, overlap)
    params = ae.init(jax.random.key(0))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    video = jax.random.uniform(jax.random.key(1), (1, frames, size, size, 3), minval=-1,
                               maxval=1)
    out: dict = {"params_m": round(n_params / 1e6, 1), "video": [frames, size, size]}
    enc, dec = jax.jit(ae.encode), jax.jit(ae.decode)
    t0 = time.perf_counter()
    enc_c = enc.lower(params, video).compile()
    latent = enc_c(params, video)
    dec_c = dec.lower(params, latent).compile()
    out["compile_s"] = round(time.perf_counter() - t0, 1)
    out["encode_gib"], out["decode_gib"] = round(_memory(enc_c), 2), round(_memory(dec_c), 2)
    out["encode_gflop"] = round(enc_c.cost_analysis()["flops"] / 1e9, 1)
    out["decode_gflop"] = round(dec_c.cost_analysis()["flops"] / 1e9, 1)
    s, _ = _timed(enc_c, params, video)
    out["encode_fps"] = round(frames / s, 2)
    s, _ = _timed(dec_c, params, latent)
    out["decode_fps"] = round(frames / s, 2)

    tiling.encode_tiled(ae, params, video)  # warm-up: compiles the per-chunk programs
    s, lat_t = _timed(tiling.encode_tiled, ae, params, video)
    out["tiled_encode_fps"] = round(frames / s, 2)
    tiling.decode_tiled(ae, params, lat_t)
    s, _ = _timed(tiling.decode_tiled, ae, params, lat_t)
    out["tiled_decode_fps"] = round(frames / s, 2)
    out["tiled_encode_err"] = float(np.abs(lat_t - np.asarray(latent)).max())
    chunk = video[:, : 1 + 4, :tile, :tile]
    first = jax.jit(lambda p, x: ae.encode_chunk(p, x)[0][0]).lower(params, chunk).compile()
    out["tiled_encode_chunk_gib"] = round(_memory(first), 2)
    lat_chunk = jnp.zeros((1, 2, tile // 8, tile // 8, 16), jnp.float32)
    first_d = jax.jit(lambda p, z: ae.decode_chunk(p, z)[0]).lower(params, lat_chunk).compile()
    out["tiled_decode_chunk_gib"] = round(_memory(first_d), 2)
    out["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    out["tile"], out["overlap"] = tile, overlap
    return out


def bench_tpu(topology: str, frames: int, height: int, width: int) -> dict:
    """Per-chip bytes of one clip's one-shot encode, compiled by libtpu for one chip."""
    import os

    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from vdit.parallel.topologies import parse_target, tpu_devices

    target = parse_target(topology)
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", target.accelerator_type)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    device = tpu_devices(target)[0]
    one = NamedSharding(Mesh(np.array([device]), ("x",)), PartitionSpec())
    ae = _autoencoder()
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=one),
                          ae.param_shapes())
    video = jax.ShapeDtypeStruct((1, frames, height, width, 3), jnp.float32, sharding=one)
    t0 = time.perf_counter()
    compiled = jax.jit(ae.encode).lower(params, video).compile()
    m = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return {"topology": topology, "chip": str(device.device_kind), "video": [frames, height,
                                                                              width],
            "compile_s": round(time.perf_counter() - t0, 1),
            "params_gib": round(m.argument_size_in_bytes / GIB - np.prod(video.shape) * 4 / GIB,
                                3),
            "argument_gib": round(m.argument_size_in_bytes / GIB, 2),
            "output_gib": round(m.output_size_in_bytes / GIB, 3),
            "temp_gib": round(m.temp_size_in_bytes / GIB, 2),
            "peak_gib": round((m.argument_size_in_bytes + m.output_size_in_bytes
                               + m.temp_size_in_bytes) / GIB, 2),
            "tflop": round(float(cost.get("flops", 0.0)) / 1e12, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("cpu")
    c.add_argument("--frames", type=int, default=5)
    c.add_argument("--size", type=int, default=256)
    c.add_argument("--tile", type=int, default=128)
    c.add_argument("--overlap", type=int, default=32)
    t = sub.add_parser("tpu")
    t.add_argument("--topology", default="v5p-8")
    t.add_argument("--frames", type=int, default=81)
    t.add_argument("--height", type=int, default=480)
    t.add_argument("--width", type=int, default=832)
    a = p.parse_args()
    if a.mode == "cpu":
        print(json.dumps(bench_cpu(a.frames, a.size, a.tile, a.overlap)))
    else:
        print(json.dumps(bench_tpu(a.topology, a.frames, a.height, a.width)))


if __name__ == "__main__":
    main()
