"""Kill-and-resume chaos test: does a run killed with SIGKILL at a random moment, then resumed,
end bit-identical to an uninterrupted run?

    python tools/chaos.py --runs 10 --steps 30
    python tools/chaos.py --runs 3 --steps 12 --set train.lora.rank=4   # a LoRA run

Each run trains a tiny DiT in a subprocess (asynchronous checkpoints every few steps, so kills
land during saves too). It is SIGKILLed a random delay (under two step times) after
metrics.jsonl shows a random training step, so every kill lands in training rather than in
start-up or after the end; sometimes the resumed run is killed again in its first steps. Then it
is resumed with the same command until it finishes. Per kill it prints the step reached, whether
a checkpoint save was in flight, the checkpoint resumed from (the work lost) and whether the
final params and losses equal the uninterrupted run's. It fails unless every kill landed before
the last step and every run ended bit-identical.
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
from dataclasses import dataclass
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


def _config(run_dir: Path, steps: int, every: int, overrides: list[str]) -> Path:
    """TINY with `--set` overrides (e.g. train.lora.rank=4), then this run's keys."""
    from vdit.config import parse_overrides

    cfg = _merge(json.loads(json.dumps(TINY)), parse_overrides(overrides))
    cfg["train"].update(run_dir=str(run_dir), steps=steps, checkpoint_every=every)
    path = run_dir.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg))
    return path


def _merge(base: dict, extra: dict) -> dict:
    for k, v in extra.items():
        base[k] = _merge(base.get(k, {}), v) if isinstance(v, dict) else v
    return base


def _train(config: Path, log: Path) -> subprocess.Popen:
    """`vdit train CONFIG` in a subprocess; its stderr goes to `log` (a pipe nobody reads while
    the run is watched would fill up and stall the run)."""
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    with log.open("a") as err:
        return subprocess.Popen([sys.executable, "-m", "vdit.cli", "train", str(config)],
                                env=env, stdout=subprocess.DEVNULL, stderr=err)


def _records(path: Path, offset: int = 0) -> list[dict]:
    """The whole lines of metrics.jsonl from byte `offset` on (a line being written is skipped)."""
    if not path.exists():
        return []
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read()
    out = []
    for line in data.split(b"\n")[:-1]:  # the part after the last newline may be torn
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _saved_steps(run: Path) -> list[int]:
    ckpts = run / "checkpoints"
    return sorted(int(p.name) for p in ckpts.glob("*") if p.name.isdigit()) \
        if ckpts.exists() else []


def _saves_in_flight(run: Path) -> set[str]:
    """Orbax writes a checkpoint under a temporary name and renames it when complete."""
    ckpts = run / "checkpoints"
    return {p.name for p in ckpts.glob("*.orbax-checkpoint-tmp*")} if ckpts.exists() else set()


@dataclass
class Kill:
    """Where one SIGKILL landed."""

    target: int  # the training step whose metrics line the kill waited for
    delay: float  # seconds slept after that line appeared
    alive: bool = False  # the run was still running when the signal went out
    reached: int = 0  # the last step in metrics.jsonl when it died
    mid_save: bool = False  # an asynchronous checkpoint save was being written
    resumed_from: int = 0  # the newest complete checkpoint left behind

    def mid_training(self, steps: int) -> bool:
        return self.alive and self.reached < steps


def _kill_after_step(proc: subprocess.Popen, run: Path, target: int, delay: float,
                     offset: int, start: int, timeout: float) -> Kill:
    """SIGKILL `proc` `delay` seconds after this launch logged training step `target` (records
    before byte `offset` of metrics.jsonl belong to earlier launches; it resumed at `start`)."""
    kill = Kill(target, delay)
    metrics, before = run / "metrics.jsonl", _saves_in_flight(run)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if any("loss" in r and r["step"] >= target for r in _records(metrics, offset)):
            time.sleep(delay)  # the chaos itself: a random moment within the next steps
            break
        time.sleep(0.005)
    kill.alive = proc.poll() is None
    proc.kill()
    proc.wait()
    # This launch's lines only: an earlier, killed launch may have logged further.
    kill.reached = max((r.get("step", 0) for r in _records(metrics, offset)), default=start)
    kill.mid_save = bool(_saves_in_flight(run) - before)
    kill.resumed_from = max(_saved_steps(run), default=0)
    return kill


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
    parser.add_argument("--rekill", type=float, default=0.5,
                        help="chance of killing the resumed run again in its first steps")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every run, repeatable: e.g. "
                        "--set train.lora.rank=4 checks a LoRA run (docs/fine-tuning.md)")
    args = parser.parse_args()
    if args.steps < 4:
        parser.error("--steps: need at least 4 (a kill waits for a step before the last two)")
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="vdit-chaos-"))
    wall0 = time.perf_counter()

    base = root / "uninterrupted"
    t0 = time.perf_counter()
    proc = _train(_config(base, args.steps, args.checkpoint_every, args.set),
                  root / "uninterrupted.log")
    if proc.wait() != 0:
        sys.exit(f"the uninterrupted run failed; see {root / 'uninterrupted.log'}")
    duration = time.perf_counter() - t0
    want = _fingerprint(base)
    step_times = sorted(r["step_time_s"] for r in _records(base / "metrics.jsonl")
                        if "step_time_s" in r)
    step_s = step_times[len(step_times) // 2]
    print(f"uninterrupted: {args.steps} steps in {duration:.1f} s ({step_s * 1e3:.0f} ms/step); "
          f"runs in {root}")
    print(f"{'run':>4} {'kill':>4} {'after step':>10} {'+delay':>7} {'step reached':>13} "
          f"{'mid-save':>8} {'resumed from':>13} {'steps lost':>11} {'final state':>12}")
    matched, kills = 0, []
    # Kills wait for a step at most steps - 3 and sleep under two step times, so even with a
    # checkpoint save in between they land before the last step; a miss is reported, not hidden.
    last_target = args.steps - 3
    for i in range(args.runs):
        run = root / f"run{i}"
        config = _config(run, args.steps, args.checkpoint_every, args.set)
        log = root / f"run{i}.log"
        rows, start_step, ok = [], 0, True
        for attempt in range(2):
            if attempt and (start_step + 1 > last_target or rng.random() >= args.rekill):
                break
            # The first kill lands anywhere in training; a second one hits the resumed run in
            # its first steps (right after restore and the data iterator's fast-forward).
            target = (rng.randint(1, last_target) if not attempt
                      else min(start_step + rng.randint(1, 2), last_target))
            delay = rng.uniform(0.0, 2.0 * step_s)
            offset = _size(run / "metrics.jsonl")
            kill = _kill_after_step(_train(config, log), run, target, delay, offset,
                                    start_step, timeout=10 * duration)
            kills.append(kill)
            rows.append(kill)
            start_step = kill.resumed_from
        proc = _train(config, log)
        if proc.wait() != 0:
            ok = False
        same = ok and _fingerprint(run) == want
        matched += same
        for n, k in enumerate(rows):
            verdict = "" if n < len(rows) - 1 else (
                "identical" if same else "DIFFERENT" if ok else "resume FAILED")
            print(f"{i:>4} {n + 1:>4} {k.target:>10} {k.delay:>6.2f}s "
                  f"{k.reached if k.alive else 'finished':>13} {'yes' if k.mid_save else '':>8} "
                  f"{k.resumed_from:>13} {max(k.reached - k.resumed_from, 0):>11} {verdict:>12}",
                  flush=True)
        if not ok:
            print(f"     see {log}")
    mid = sum(k.mid_training(args.steps) for k in kills)
    saves = sum(k.mid_save and k.mid_training(args.steps) for k in kills)
    print(f"{len(kills)} kills: {mid} landed mid-training ({saves} of them during a checkpoint "
          f"save), {len(kills) - mid} after the last step")
    print(f"{matched} of {args.runs} runs ended bit-identical to the uninterrupted run "
          f"(checkpoint every {args.checkpoint_every} steps); wall time "
          f"{time.perf_counter() - wall0:.0f} s")
    return 0 if matched == args.runs and mid == len(kills) else 1


if __name__ == "__main__":
    sys.exit(main())
