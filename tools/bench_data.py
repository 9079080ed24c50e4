"""Throughput of the shard pipeline (`data.source: shards`) against what training consumes.

    python tools/bench_data.py [--clips 96] [--seconds 4]

Writes `--clips` records of 16x32x32x16 bf16 latents (512 KiB each) to a temporary shard
directory, then times the Grain pipeline (read, msgpack decode, shuffle, batch) in the bucketed
and the packed mode, and prints samples/s, MB/s and the ratio to one TPU v5p host's appetite
(the arithmetic is printed too). It also packs a mixed-duration, mixed-size set and prints the
packing efficiency (real tokens over the token budget).
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time

import ml_dtypes
import numpy as np

from vdit.data.packing import efficiency
from vdit.data.shard_pipeline import shard_dataset
from vdit.data.shards import ClipRecord, shard_name, write_index, write_shard

LATENT = (16, 32, 32, 16)  # T', H', W', C
PATCH = (1, 2, 2)
# One TPU v5p host: 4 chips x 459 TFLOP/s (bf16, published) at 50 % MFU.
V5P_CHIP_FLOPS, CHIPS, MFU = 459e12, 4, 0.5
# A 1B-parameter DiT: width 2048, depth 24 (12 d^2 per block: 1.2e9 params).
WIDTH, DEPTH, PARAMS = 2048, 24, 1.0e9


def host_appetite(tokens: int) -> tuple[float, list[str]]:
    """Clips/s one v5p host trains on, and the arithmetic as printable lines."""
    dense = 6 * PARAMS * tokens  # forward + backward: 6 FLOPs per parameter per token
    attn = 3 * 4 * DEPTH * tokens**2 * WIDTH  # QK^T and PV, 2 FLOPs/MAC, x3 for backward
    per_clip = dense + attn
    host = V5P_CHIP_FLOPS * CHIPS * MFU
    rate = host / per_clip
    return rate, [
        f"  tokens/clip = {LATENT[0]}/{PATCH[0]} * {LATENT[1]}/{PATCH[1]} * "
        f"{LATENT[2]}/{PATCH[2]} = {tokens}",
        f"  dense: 6 * N * tokens = 6 * {PARAMS:.0e} * {tokens} = {dense:.3e} FLOP",
        f"  attention: 12 * depth * tokens^2 * width = 12 * {DEPTH} * {tokens}^2 * {WIDTH} = "
        f"{attn:.3e} FLOP",
        f"  per clip: {per_clip:.3e} FLOP; host: {CHIPS} x {V5P_CHIP_FLOPS / 1e12:.0f} TFLOP/s "
        f"x {MFU:.0%} MFU = {host:.3e} FLOP/s",
        f"  -> {rate:.1f} clips/s = {rate * np.prod(LATENT) * 2 / 1e6:.1f} MB/s of bf16 latents",
    ]


def write_clips(directory: str, shapes: list[tuple[int, ...]], per_shard: int = 32) -> None:
    rng = np.random.default_rng(0)
    names = [shard_name(i, -(-len(shapes) // per_shard)) for i in
             range(-(-len(shapes) // per_shard))]
    for s, name in enumerate(names):
        recs = [ClipRecord(rng.standard_normal(shape, np.float32).astype(ml_dtypes.bfloat16),
                           np.arange(1, 9, dtype=np.int32), "a red ball falls", f"bench/{i}",
                           8.0, (64, 256, 256), tuple(shape[:3]), "generated")
                for i, shape in enumerate(shapes[s * per_shard: (s + 1) * per_shard])]
        write_shard(directory, name, recs)
    write_index(directory, names, {})


def time_pipeline(ds, seconds: float, clips_of) -> tuple[float, float, list]:
    """(clips/s, MB/s of latent payload, batches) over at least `seconds` after one warm-up."""
    it = iter(ds)
    next(it)
    clips = nbytes = 0
    seen = []
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        b = next(it)
        n, size = clips_of(b)
        clips, nbytes = clips + n, nbytes + size
        seen.append(b)
    dt = time.perf_counter() - t0
    return clips / dt, nbytes / dt / 1e6, seen


def packed_clips(b: dict) -> tuple[int, int]:
    ids = b["segment_ids"]
    real = int((ids > 0).sum())
    return int(sum(len(set(r) - {0}) for r in ids)), real * b["patches"].shape[-1] * 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clips", type=int, default=96)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2, help="record-reading threads per stream")
    args = ap.parse_args()
    tokens = int(np.prod([s // p for s, p in zip(LATENT[:3], PATCH, strict=True)]))
    need, arithmetic = host_appetite(tokens)
    print("one TPU v5p host consumes (1B-param DiT, 16x32x32x16 latents, patch 1x2x2):")
    print("\n".join(arithmetic))

    with tempfile.TemporaryDirectory() as d:
        write_clips(d, [LATENT] * args.clips)
        kw = dict(caption_length=16, seed=0, read_threads=args.threads)
        bucket = shard_dataset(d, batch=args.batch, **kw)
        rate, mbs, _ = time_pipeline(bucket, args.seconds,
                                     lambda b: (len(b["latent"]), b["latent"].nbytes))
        print(f"bucketed: {rate:.0f} clips/s, {mbs:.0f} MB/s -> {rate / need:.1f}x one v5p host")
        packed = shard_dataset(d, batch=args.batch, mode="pack", patch=PATCH,
                               budget=2 * tokens, clips_per_row=4, **kw)
        rate, mbs, _ = time_pipeline(packed, args.seconds, packed_clips)
        print(f"packed (budget {2 * tokens} tokens/row): {rate:.0f} clips/s, {mbs:.0f} MB/s "
              f"-> {rate / need:.1f}x one v5p host")

    # Mixed durations and sizes: 1..16 latent frames, 8..32 latent pixels a side.
    rng = np.random.default_rng(1)
    shapes = [(int(rng.choice([1, 2, 4, 6, 8, 12, 16])), int(rng.choice([8, 16, 32])),
               int(rng.choice([8, 16, 32])), 16) for _ in range(256)]
    with tempfile.TemporaryDirectory() as d:
        write_clips(d, shapes, per_shard=64)
        budget = 4096
        packed = shard_dataset(d, batch=args.batch, caption_length=16, seed=0, mode="pack",
                               patch=PATCH, budget=budget, clips_per_row=64)
        batches = list(itertools.islice(iter(packed), 40))
        eff = float(np.mean([efficiency(b) for b in batches]))
        sizes = sorted({int(np.prod([s // p for s, p in zip(sh[:3], PATCH, strict=True)]))
                        for sh in shapes})
        print(f"packing efficiency on {len(shapes)} mixed clips ({sizes[0]}..{sizes[-1]} tokens "
              f"each), budget {budget}: {100 * eff:.1f} % real tokens over {len(batches)} "
              f"batches of {args.batch} rows")


if __name__ == "__main__":
    main()
