"""Kill-and-resume chaos test: does a run killed with SIGKILL at a random moment, then resumed,
end bit-identical to an uninterrupted run?

    python tools/chaos.py --runs 10 --steps 30

Each run trains a tiny DiT in a subprocess (asynchronous checkpoints every few steps, so kills
land during saves too), is SIGKILLed at a random moment, and is resumed with the same command
until it finishes. Per kill it prints the step reached, the checkpoint resumed from (the work
lost) and whether the final params and losses equal the uninterrupted run's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

TINY = {
    "model": {"width": 32, "depth": 2, "heads": 2, "patch": [1, 2, 2]},
    "text": {"width": 16, "depth": 1, "heads": 2, "max_length": 12},
    "autoencoder": {"kind": "space_to_depth", "factors": [1, 4, 4]},
    "data": {"world": {"frames": 4, "height": 16, "width": 16}, "num_eval_clips": 4,
             "stats_clips": 8, "prefetch": 1},
    "diffusion": {"eval_timesteps": [0.25, 0.75]},
    "train": {"batch_size": 4, "warmup_steps": 1, "log_every": 1, "eval_every": 1000,
              "async_checkpoint": True, "tensorboard": False, "sample_at_end": False,
              "keep_checkpoints": 2},
}


def _config(run_dir: Path, steps: int, every: int) -> Path:
    cfg = json.loads(json.dumps(TINY))
    cfg["train"].update(run_dir=str(run_dir), steps=steps, checkpoint_every=every)
    path = run_dir.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(config: Path) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    return subprocess.Popen([sys.executable, "-m", "vdit.cli", "train", str(config)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _last_step(run_dir: Path) -> int:
    from vdit.train.metrics import read_metrics

    path = run_dir / "metrics.jsonl"
    return max((r.get("step", 0) for r in read_metrics(path)), default=0) if path.exists() else 0


def _fingerprint(run_dir: Path) -> tuple[str, list[float]]:
    """SHA-256 of the final params and the per-step training losses (last value per step)."""
    import jax
    import numpy as np

    from vdit.train.trainer import load_run

    state = load_run(run_dir)[2]
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves((state.params, state.ema_params, state.opt_state)):
        digest.update(np.asarray(leaf).tobytes())
    from vdit.train.metrics import read_metrics

    losses = {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}
    return digest.hexdigest(), [losses[k] for k in sorted(losses)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--checkpoint-every", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="vdit-chaos-"))

    base = root / "uninterrupted"
    t0 = time.perf_counter()
    proc = _train(_config(base, args.steps, args.checkpoint_every))
    if proc.wait() != 0:
        sys.exit(f"the uninterrupted run failed:\n{proc.stderr.read()[-2000:]}")
    duration = time.perf_counter() - t0
    want = _fingerprint(base)
    print(f"uninterrupted: {args.steps} steps in {duration:.1f} s")
    print(f"{'run':>4} {'killed at':>10} {'step reached':>13} {'resumed from':>13} "
          f"{'steps lost':>11} {'final state':>12}")
    matched = 0
    for i in range(args.runs):
        run = root / f"run{i}"
        config = _config(run, args.steps, args.checkpoint_every)
        proc = _train(config)
        # A random moment of the run's life: start-up, compile, steps or an async save.
        kill_at = rng.uniform(0.3, 0.95) * duration
        time.sleep(kill_at)  # the chaos itself: a kill at a random wall-clock moment
        proc.kill()
        proc.wait()
        reached = _last_step(run)
        resumed = max([int(p.name) for p in (run / "checkpoints").glob("*") if p.name.isdigit()]
                      if (run / "checkpoints").exists() else [], default=0)
        proc = _train(config)
        if proc.wait() != 0:
            print(f"{i:>4} resume FAILED:\n{proc.stderr.read()[-2000:]}")
            continue
        same = _fingerprint(run) == want
        matched += same
        print(f"{i:>4} {kill_at:>9.1f}s {reached:>13} {resumed:>13} "
              f"{max(reached - resumed, 0):>11} {'identical' if same else 'DIFFERENT':>12}")
    print(f"{matched} of {args.runs} runs ended bit-identical to the uninterrupted run "
          f"(checkpoint every {args.checkpoint_every} steps)")
    return 0 if matched == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
