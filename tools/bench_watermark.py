"""Measure the video watermark: invisibility, robustness per attack, false positives, the
smallest frame size that holds, and speed.

Usage: python tools/bench_watermark.py [--clips N] [--fp-clips N] [--sizes 128,256]

Content is physics clips (vdit.data.physics, 16 frames, rendered at 64 px and upscaled by pixel
repetition, as `vdit sample` writes them), plus a few "textured" clips (the balls over a panning
1/f-noise background, a stand-in for natural video) and "noise blocks" (random colours, what an
untrained model samples) to show where the mark is weaker.
False positives: --fp-clips unmarked physics clips of 4 frames at 64 x 64, half with added noise
(small and short to stay fast; the detector resizes every video to the same canonical grid, so
its search is the same), plus --clips full-length clips per size re-encoded at crf 23, plus a
few textured clips. MIN_FRAME_SIZE: 2 x --clips clips per size, re-encoded at crf 23.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

# One BLAS thread: the detector makes small matrix products, and multi-threaded BLAS crawls on
# shared cores. Must be set before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vdit.data.physics import WorldConfig, simulate
from vdit.data.video_io import read_video, upscale, write_mp4
from vdit.provenance import watermark as wm

SWEEP = (32, 48, 64, 96, 128, 192, 256)


def physics(seed: int, size: int, frames: int = 16) -> np.ndarray:
    """uint8 [frames, size, size, 3]: rendered at 64 px and upscaled, or natively if smaller
    or not a multiple of 64."""
    base = 64 if size % 64 == 0 else size
    clip = simulate(WorldConfig(frames=frames, height=base, width=base), seed).frames
    return upscale(clip, size // base)


def textured(seed: int, size: int, frames: int = 16, amplitude: float = 25.0) -> np.ndarray:
    """The physics balls over a panning background of 1/f noise (std `amplitude` grey levels)."""
    rng = np.random.default_rng(seed + 10_000)
    n = 2 * size
    spectrum = np.fft.rfft2(rng.normal(size=(n, n)))
    f = np.hypot(np.fft.fftfreq(n)[:, None], np.fft.rfftfreq(n)[None])
    noise = np.fft.irfft2(spectrum / np.maximum(f, 1 / n), s=(n, n))
    bg = (noise - noise.mean()) / noise.std() * amplitude + 120
    balls = physics(seed, size, frames).astype(np.float32)
    out = np.empty_like(balls)
    for t in range(frames):  # the camera pans 2 px down and 1 px right per frame
        fg = balls[t]
        is_ball = np.abs(fg - fg[0, 0]).sum(-1, keepdims=True) > 10
        out[t] = np.where(is_ball, fg, bg[2 * t: 2 * t + size, t: t + size, None])
    return np.clip(out, 0, 255).astype(np.uint8)


def blocks(seed: int, size: int, frames: int = 4, cells: int = 16) -> np.ndarray:
    """Random colour blocks, cells x cells upscaled to size: what an untrained model samples."""
    rng = np.random.default_rng(seed + 30_000)
    clip = rng.gamma(1.0, 30.0, size=(frames, cells, cells, 3)).clip(0, 255).astype(np.uint8)
    return upscale(clip, size // cells)


def rescale(video: np.ndarray, factor: float) -> np.ndarray:
    h, w = video.shape[1:3]
    size = (max(2, round(w * factor)), max(2, round(h * factor)))
    return np.stack([np.asarray(Image.fromarray(f).resize(size, Image.BICUBIC)) for f in video])


def reencode(video: np.ndarray, crf: int, tmp: Path) -> np.ndarray:
    return read_video(write_mp4(tmp / "bench.mp4", video, fps=8, crf=crf))[0]


def crop_sides(video: np.ndarray, fraction: float) -> np.ndarray:
    h, w = video.shape[1:3]
    dy, dx = round(h * fraction / 2), round(w * fraction / 2)
    return video[:, dy: h - dy, dx: w - dx]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255**2 / mse))


def attacks(tmp: Path) -> dict:
    return {
        "none": lambda v: v,
        "mp4 crf 18": lambda v: reencode(v, 18, tmp),
        "mp4 crf 23": lambda v: reencode(v, 23, tmp),
        "rescale 0.5x": lambda v: rescale(v, 0.5),
        "rescale 0.75x": lambda v: rescale(v, 0.75),
        "rescale 1.5x": lambda v: rescale(v, 1.5),
        "rescale 2x": lambda v: rescale(v, 2.0),
        "crop 5%/side": lambda v: crop_sides(v, 0.10),
        "crop 10% one side": lambda v: v[:, :, : v.shape[2] - round(0.1 * v.shape[2])],
        "crf 23 + 0.5x": lambda v: rescale(reencode(v, 23, tmp), 0.5),
    }


def robustness(content, sizes: list[int], clips: int, tmp: Path, names=None) -> None:
    table = attacks(tmp)
    print(f"{'size':>5} {'attack':<18} {'PSNR dB':>8} {'bit acc':>8} {'detected':>9} "
          f"{'min z':>6}")
    for size in sizes:
        rows: dict[str, list] = {k: [] for k in table if names is None or k in names}
        psnrs, wrong_key = [], 0
        for seed in range(clips):
            clean = content(seed, size)
            payload = wm.make_payload("bench-model", f"run-{seed}")
            marked = wm.embed(clean, payload)
            psnrs.append(psnr(marked, clean))
            for name in rows:
                d = wm.detect(table[name](marked), expected=payload)
                rows[name].append((d.bit_accuracy, d.present and d.payload == payload, d.score))
            wrong_key += wm.detect(marked, key="not-the-key").present
        for name, r in rows.items():
            a = np.array(r, float)
            shown = f"{np.mean(psnrs):8.2f}" if name == "none" else " " * 8
            print(f"{size:5d} {name:<18} {shown} {a[:, 0].mean():8.4f} "
                  f"{a[:, 1].mean():8.1%} {a[:, 2].min():6.1f}")
        print(f"{size:5d} {'(wrong key)':<18} {'':8} {'':8} {wrong_key / clips:8.1%}  "
              f"PSNR min {min(psnrs):.2f} dB")


def false_positives(fp_clips: int, sizes: list[int], clips: int, tmp: Path) -> None:
    sets = {  # name -> (count, clip maker)
        "4x64x64 physics (half + noise)": (fp_clips, noisy),
        "16-frame physics, crf 23": (
            clips * len(sizes),
            lambda s: reencode(physics(90_000 + s, sizes[s % len(sizes)]), 23, tmp)),
        "16x256x256 textured": (max(2, clips // 3), lambda s: textured(70_000 + s, 256)),
    }
    total = hits_all = 0
    for name, (n, make) in sets.items():
        scores, hits = [], 0
        for seed in range(n):
            d = wm.detect(make(seed))
            scores.append(d.score)
            hits += d.present
        z = np.array(scores)
        total, hits_all = total + n, hits_all + hits
        print(f"  {name:<31} {hits:3d}/{n:<4d} detected; sync z max {z.max():.2f}, "
              f"median {np.median(z):.2f}, >= {wm.Z_THRESHOLD}: {(z >= wm.Z_THRESHOLD).sum()} "
              f"(rejected by the CRC)")
    print(f"false positives: {hits_all}/{total} unmarked clips (rate {hits_all / total:.1e})")


def noisy(seed: int) -> np.ndarray:
    """An unmarked 4 x 64 x 64 physics clip; odd seeds get Gaussian noise (sd 2 grey levels),
    like a camera or a codec, so the detector has texture to (fail to) find the mark in."""
    clip = physics(50_000 + seed, 64, frames=4)
    if seed % 2 == 0:
        return clip
    noise = np.random.default_rng(seed).normal(0, 2, clip.shape)
    return np.clip(np.rint(clip + noise), 0, 255).astype(np.uint8)


def min_frame_size(clips: int, tmp: Path) -> int | None:
    print("detection after mp4 crf 23 by frame size (physics, 16 frames):")
    rates = {}
    for size in SWEEP:
        ok = 0
        for seed in range(clips):
            payload = wm.make_payload("bench-model", f"sweep-{seed}")
            d = wm.detect(reencode(wm.embed(physics(20_000 + seed, size), payload), 23, tmp))
            ok += d.present and d.payload == payload
        rates[size] = ok / clips
        print(f"  {size:4d} px: {rates[size]:6.1%}")
    holding = [s for s in SWEEP if all(rates[t] >= 0.99 for t in SWEEP if t >= s)]
    return holding[0] if holding else None


def timing() -> None:
    clip = physics(7, 256)
    marked = wm.embed(clip, 1)
    wm.detect(marked)  # warm the caches for the default key
    for name, fn in (("embed", lambda: wm.embed(clip, 1)),
                     ("detect", lambda: wm.detect(marked))):
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(5):
            fn()
        print(f"{name} 16 x 256 x 256: {(time.perf_counter() - wall) / 5 * 1e3:.0f} ms wall, "
              f"{(time.process_time() - cpu) / 5 * 1e3:.0f} ms CPU")
    wall, cpu = time.perf_counter(), time.process_time()
    wm.detect(marked, key="a-new-key")
    print(f"first detect with a new key (builds its templates): "
          f"{time.perf_counter() - wall:.2f} s wall, {time.process_time() - cpu:.2f} s CPU")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=10, help="marked clips per size and attack")
    p.add_argument("--fp-clips", type=int, default=1000, help="unmarked clips for the FP rate")
    p.add_argument("--sizes", default="128,256", help="frame sizes for the attack table")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    start = time.perf_counter()
    print(f"watermark: {wm.PAYLOAD_BITS}-bit payload + 16-bit CRC, strength "
          f"{wm.DEFAULT_STRENGTH}, z threshold {wm.Z_THRESHOLD}, "
          f"MIN_FRAME_SIZE {wm.MIN_FRAME_SIZE}")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        print(f"\nphysics clips, {args.clips} per size, 16 frames:")
        robustness(physics, sizes, args.clips, tmp)
        n = max(2, args.clips // 3)
        print(f"\ntextured clips (balls over panning 1/f noise, sd 25), {n} at 256 px:")
        robustness(textured, [256], n, tmp,
                   names=("none", "mp4 crf 18", "mp4 crf 23", "rescale 0.5x", "crop 5%/side"))
        print(f"\nnoise blocks (an untrained model's output: 16 x 16 random colours, 4 frames), "
              f"{n} per size:")
        robustness(blocks, sizes, n, tmp)
        print("\nunmarked clips:")
        false_positives(args.fp_clips, sizes, args.clips, tmp)
        print()
        found = min_frame_size(2 * args.clips, tmp)
    verdict = "matches" if found == wm.MIN_FRAME_SIZE else "DIFFERS from"
    print(f"smallest size with >= 99% detection after crf 23 (and all larger): {found} px; "
          f"{verdict} MIN_FRAME_SIZE = {wm.MIN_FRAME_SIZE}")
    print()
    timing()
    print(f"\nbenchmark took {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
