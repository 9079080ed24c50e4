"""Compile time of the train step against depth, scanned versus unrolled layers.

    python tools/bench_compile.py [--depths 4 28] [--width 256]

Scanned layers (`model.scan_layers=true`) compile one block whatever the depth; the acceptance
figure is the 28-layer / 4-layer compile-time ratio of the scanned model (target <= 1.5).
The persistent compilation cache is disabled here so every figure is a real compile.
"""

from __future__ import annotations

import argparse
import time

import jax

from vdit.config import load_config
from vdit.data.pipeline import fixed_batch
from vdit.train.trainer import build_trainer


def compile_seconds(overrides: list[str]) -> float:
    cfg = load_config(None, overrides)
    trainer = build_trainer(cfg)
    host = fixed_batch(cfg.data, trainer.system.tokenizer, "train", cfg.train.batch_size)
    batch = trainer.device_batch(host)
    with trainer.context():
        t0 = time.perf_counter()
        trainer.step_fn.lower(trainer.state, batch).compile()
        return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 28])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--unrolled", action="store_true", help="also time unrolled layers")
    args = parser.parse_args()
    jax.config.update("jax_enable_compilation_cache", False)
    # The shape its figures were taken at (the default before it moved to the causal VAE): the
    # DiT's compile time alone, with no autoencoder in the step.
    base = [f"model.width={args.width}", "train.batch_size=2", "data.stats_clips=2",
            "autoencoder.kind=space_to_depth", "autoencoder.factors=[1,4,4]",
            "data.world.frames=8", "model.patch=[1,2,2]"]
    modes = [True, False] if args.unrolled else [True]
    results: dict[tuple[bool, int], float] = {}
    print(f"{'layers':>6} {'scan':>6} {'compile s':>10}")
    for scan in modes:
        for depth in args.depths:
            s = compile_seconds([*base, f"model.depth={depth}", f"model.scan_layers={scan}"])
            results[scan, depth] = s
            print(f"{depth:>6} {scan!s:>6} {s:>10.2f}", flush=True)
    lo, hi = min(args.depths), max(args.depths)
    for scan in modes:
        ratio = results[scan, hi] / results[scan, lo]
        print(f"scan={scan}: compile({hi} layers) / compile({lo} layers) = {ratio:.2f}")


if __name__ == "__main__":
    main()
