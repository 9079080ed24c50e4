"""What the samplers buy vdit's own DiT: `vdit eval-physics`'s velocity error and seconds per
batch at several step counts, for every `sample.sampler`.

Usage: python tools/bench_samplers.py RUN_DIR [--clips 16] [--steps 10 20 50]
           [--samplers euler heun unipc flow_euler] [--reference 200] [--seed 0] [--repeats 2]

Each row continues the same held-out clips with the same noise (`vdit eval-physics`'s
in-distribution split and its clips, keys and metrics: vdit/eval/physics_eval.py), so the rows
differ only by the sampler. Columns: model evaluations per clip (CFG's two passes counted);
velocity error (half-heights per second) with its 95 % bootstrap interval over clips; its
difference from a `--reference`-step Heun solve of the same ODE, paired per clip, with its
interval (what the sampler's own error costs in physics); the mean absolute pixel difference
from that reference (the sampler's error itself); and the seconds of one warm call for the
batch, the fastest of `--repeats` (each sampler is compiled and run once before it is timed).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np


def evaluations(sampler: str, steps: int, guidance: float) -> int:
    """Model calls per clip: Heun skips its second call at the last step; CFG doubles."""
    calls = 2 * steps - 1 if sampler == "heun" else steps
    return calls * (1 if guidance == 1.0 else 2)


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--clips", type=int, default=16, help="held-out clips (default 16)")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50])
    parser.add_argument("--samplers", nargs="+", default=["euler", "heun", "unipc",
                                                          "flow_euler"])
    parser.add_argument("--reference", type=int, default=200,
                        help="Heun steps of the reference solve (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2,
                        help="warm calls timed per row; the fastest is shown (default 2)")
    args = parser.parse_args()

    import jax

    from vdit.eval import physics_eval as pe
    from vdit.eval.physics_metrics import clip_metrics
    from vdit.eval.tracker import track
    from vdit.sample.continuation import continue_videos, video_frames_for
    from vdit.sample.loading import load_for_sampling

    cfg, system, params, stats, step = load_for_sampling(args.run_dir,
                                                         pe._latest_step(args.run_dir))
    k = pe.default_context_frames(cfg)
    start = video_frames_for(cfg, k)
    world = cfg.data.world
    clips = pe.held_out(world, world, cfg.data.seed, 0, args.clips)  # eval-physics' split 0
    frames = np.stack([c.frames for c in clips])
    captions = [c.caption for c in clips]
    key = jax.random.fold_in(jax.random.key(args.seed), 0)

    def per_clip(videos):
        return [clip_metrics(track(v, c.colours, world.background, c.occluders,
                                   reference=start), c, start, world.height, world.fps,
                             world.gravity) for c, v in zip(clips, videos, strict=True)]

    def velocity(rows):
        """eval-physics' split velocity error and its bootstrap interval."""
        return (pe._summarise(rows)["velocity_error"],
                pe.bootstrap_intervals(rows, seed=args.seed)["velocity_error_ci"])

    def paired(rows, ref_rows):
        """The same statistic of the per-clip differences (nan where either is)."""
        return velocity([{**m, "velocity_error": m["velocity_error"] - r["velocity_error"]}
                         for m, r in zip(rows, ref_rows, strict=True)])

    def sample(sampler, steps, timed=True):
        scfg = dataclasses.replace(cfg.sample, sampler=sampler, steps=steps)
        run = lambda: continue_videos(system, params, stats, frames, captions,
                                      k=k, key=key, cfg=scfg)
        t0 = time.perf_counter()
        videos = run()  # compiles
        compiled = time.perf_counter() - t0
        if not timed:
            return videos, compiled, compiled
        warm = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            videos = run()
            warm.append(time.perf_counter() - t0)
        return videos, min(warm), compiled

    print(f"{args.run_dir} @ step {step}: {args.clips} held-out in-distribution clips, "
          f"{k} latent frames of context, guidance {cfg.sample.guidance}, shift "
          f"{system.shift:g}; {jax.devices()[0].device_kind}", flush=True)
    truth, _ = velocity(per_clip(frames))
    recon, _ = velocity(per_clip(np.asarray(pe._recon_fn(system)(frames, stats))))
    print(f"velocity error: ground truth {truth:.3f}, autoencoder {recon:.3f} h/s", flush=True)
    reference = ref_rows = None
    if args.reference:
        reference, ref_s, _ = sample("heun", args.reference, timed=False)
        ref_rows = per_clip(reference)
        vel, ci = velocity(ref_rows)
        print(f"reference heun {args.reference}: velocity error {vel:.3f} "
              f"[{ci[0]:.3f}, {ci[1]:.3f}] ({ref_s:.0f} s with compilation)", flush=True)
    print(f"\n| sampler | steps | model calls | velocity error [95 % CI] | minus reference "
          f"[95 % CI] | pixel diff vs ref | s / batch of {args.clips} | compile s |\n"
          "|---|---:|---:|---|---|---:|---:|---:|", flush=True)
    for steps in args.steps:
        for sampler in args.samplers:
            videos, seconds, compiled = sample(sampler, steps)
            rows = per_clip(videos)
            vel, ci = velocity(rows)
            delta = diff = "-"
            if reference is not None:
                d, dci = paired(rows, ref_rows)
                delta = f"{d:+.3f} [{dci[0]:+.3f}, {dci[1]:+.3f}]"
                diff = f"{np.abs(videos.astype(np.float32) - reference).mean():.2f}"
            print(f"| {sampler} | {steps} | {evaluations(sampler, steps, cfg.sample.guidance)} "
                  f"| {vel:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] | {delta} | {diff} | {seconds:.2f} "
                  f"| {compiled - seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
