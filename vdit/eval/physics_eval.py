"""`vdit eval-physics RUN_DIR`: did the model learn physics, or copy its data?

Held-out simulations are given to the model as context (their first K latent frames) and it
continues them under their caption; the tracker (vdit/eval/tracker.py) follows every ball in the
continuation and the metrics (vdit/eval/physics_metrics.py) compare it with the simulator. The
same is done on the ground-truth clips (the tracker's floor, near zero) and on their autoencoder
reconstructions (the ceiling a DiT on that latent can reach). Splits: in-distribution, and out of
distribution (faster balls, larger balls, unseen colour-size combinations; `split_worlds`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from vdit.config import Config, ConfigError
from vdit.data.physics import Clip, WorldConfig, make_caption, simulate
from vdit.data.pipeline import clip_seed
from vdit.eval.physics_metrics import clip_metrics, split_mean
from vdit.eval.tracker import track
from vdit.io.run_dir import check_output_dir

SOURCES = ("ground truth", "autoencoder", "model")
METRICS = ("velocity_error", "gravity_error", "radius_drift", "permanence_failure",
           "count_error", "reemergence_error", "energy_error")
# Held-out physics clips: "eval" seeds far past the eval-loss clips (never training seeds).
_FIRST_INDEX = 1_000_000


def split_worlds(world: WorldConfig) -> dict[str, WorldConfig | str]:
    """The evaluation worlds, each a training world with other ranges (or a reason it is
    skipped): speeds above the training range (up to 1.5x its top), radii above it (up to 1.5x,
    capped so a ball fits the frame), and each colour-coupled colour given another's radius
    range (worlds with `colour_radius`; without it every combination was seen in training)."""
    hi = world.speed_range[1]
    r_hi = world.radius_range[1]
    r_cap = min(world.height, world.width) / (2 * world.height)
    out: dict[str, WorldConfig | str] = {
        "in_distribution": world,
        "ood_speed": dataclasses.replace(world, speed_range=(hi, 1.5 * hi if hi else 0.5)),
    }
    out["ood_radius"] = (dataclasses.replace(world, radius_range=(r_hi, min(1.5 * r_hi, r_cap)))
                         if r_hi < r_cap else "training radii already reach the frame's limit")
    pairs = world.colour_radius
    ranges = {(a, b) for _, a, b in pairs}
    if len(ranges) < 2:
        out["ood_combo"] = ("every colour-size combination was seen in training (the world "
                            "couples no colour to a size: data.world.colour_radius)")
    else:
        swapped = tuple((c, *pairs[(i + 1) % len(pairs)][1:]) for i, (c, _, _) in
                        enumerate(pairs))
        out["ood_combo"] = dataclasses.replace(
            world, colours=tuple(c for c, _, _ in pairs), colour_radius=swapped)
    return out


def held_out(world: WorldConfig, train_world: WorldConfig, data_seed: int, split: int,
             count: int) -> list[Clip]:
    """`count` clips of one split's world, captioned in the training world's words."""
    clips = []
    for i in range(count):
        clip = simulate(world, clip_seed(data_seed, "eval", _FIRST_INDEX + 10_000 * split + i))
        clip.caption = make_caption(clip.colours, clip.radii, clip.positions, clip.velocities,
                                    clip.visible, world.height, world.fps, world.gravity,
                                    train_world.radius_range)
        clips.append(clip)
    return clips


def default_context_frames(cfg: Config) -> int:
    """About a third of the latent frames, at least one, leaving at least one to generate."""
    latent_t = cfg.latent_shape()[0]
    k = cfg.diffusion.context_frames or max(1, math.ceil(latent_t / 3))
    return min(k, latent_t - 1)


def _summarise(per_clip: list[dict]) -> dict:
    """Split-level numbers from per-clip metrics (gravity: the median, a few-point fit can be
    wild; events pooled over clips)."""
    def mean(key):
        vals = [m[key] for m in per_clip if np.isfinite(m[key])]
        return float(np.mean(vals)) if vals else float("nan")

    gravity = [m["gravity_error"] for m in per_clip if np.isfinite(m["gravity_error"])]
    reemerge = [e for m in per_clip for e in m["reemergence_errors"]]
    energy = [e for m in per_clip for e in m["energy_errors"]]
    return {
        "found": mean("found"),
        "velocity_error": mean("velocity_error"),
        "speed_ratio": mean("speed_ratio"),
        "gravity_error": float(np.median(gravity)) if gravity else float("nan"),
        "gravity_fits": len(gravity),
        "radius_drift": mean("radius_drift"),
        "permanence_failure": float(np.mean([m["failure"] for m in per_clip])),
        "count_error": mean("count_error"),
        "vanished": int(sum(m["vanished"] for m in per_clip)),
        "appeared": int(sum(m["appeared"] > 0 for m in per_clip)),
        "reemergence_error": float(np.mean(reemerge)) if reemerge else float("nan"),
        "reemergence_events": len(reemerge) + sum(m["reemergence_missed"] for m in per_clip),
        "reemergence_missed": int(sum(m["reemergence_missed"] for m in per_clip)),
        "energy_error": float(np.mean(energy)) if energy else float("nan"),
        "collisions": len(energy),
        "clips": len(per_clip),
    }


BOOTSTRAP = 1000  # resamples of a split's clips for the 95 % intervals
CI_KEYS = ("found", "velocity_error", "speed_ratio", "gravity_error", "radius_drift",
           "permanence_failure", "count_error", "reemergence_error", "energy_error")


def bootstrap_intervals(per_clip: list[dict], n: int = BOOTSTRAP, seed: int = 0) -> dict:
    """{"KEY_ci": [lo, hi]}: 95 % percentile intervals of each split-level metric of
    `_summarise`, from `n` resamples of the clips with replacement (the same statistic on each,
    so medians and pooled events are resampled as they are computed); [nan, nan] without data."""
    rng = np.random.default_rng(seed)
    draws = np.array([[_summarise([per_clip[i] for i in idx])[k] for k in CI_KEYS]
                      for idx in rng.integers(0, len(per_clip), (n, len(per_clip)))])
    out = {}
    for j, key in enumerate(CI_KEYS):
        col = draws[:, j][np.isfinite(draws[:, j])]
        # A resample without data for the metric is not evidence of a value: left out.
        lo, hi = np.percentile(col, [2.5, 97.5]) if len(col) else (np.nan, np.nan)
        out[f"{key}_ci"] = [float(lo), float(hi)]
    return out


# One system (and so one set of compiled programs) per model shape: the runs of a sweep differ
# only in `train` (steps, lr, run_dir), which the sampler never reads.
_SYSTEMS: dict = {}


def shape_key(cfg: Config) -> Config:
    """What a run's compiled sampler depends on: its config without the `train` section."""
    return dataclasses.replace(cfg, train=type(cfg.train)())


def shared_system(system: Any) -> Any:
    """The first-loaded system of `system`'s shape (its jitted programs are already compiled)."""
    return _SYSTEMS.setdefault(shape_key(system.cfg), system)


@functools.cache
def _recon_fn(system: Any) -> Any:
    return jax.jit(lambda v, s: system.decode(system.encode(v, s), s))


def evaluate_run(run_dir: str | Path, *, clips: int = 8, context_frames: int | None = None,
                 seed: int = 0, raw: bool = False, progress: bool = True) -> tuple[dict, dict]:
    """(result, traces) for one DiT run: result is the JSON table; traces holds, per split,
    the clips and the model's tracks for plotting."""
    from vdit.sample.continuation import (
        check_context_frames,
        continue_videos,
        describe_method,
        video_frames_for,
    )
    from vdit.sample.loading import load_for_sampling

    run_dir = Path(run_dir)
    if clips < 1:
        raise ConfigError(f"--clips: must be >= 1, got {clips}")
    # An explicit step: reading a run must never move a checkpoint aside (Checkpointer.restore
    # does that to an unreadable newest one when asked for "the latest").
    cfg, system, params, stats, step = load_for_sampling(run_dir, _latest_step(run_dir),
                                                         raw=raw)
    system = shared_system(system)
    k = default_context_frames(cfg) if context_frames is None else context_frames
    check_context_frames(cfg, k)  # before the autoencoder pass, not after it
    start = video_frames_for(cfg, k)
    world = cfg.data.world
    worlds = split_worlds(world)
    active = [(name, w) for name, w in worlds.items() if isinstance(w, WorldConfig)]
    data = {name: held_out(w, world, cfg.data.seed, i, clips)
            for i, (name, w) in enumerate(active)}
    recon_fn = _recon_fn(system)
    videos: dict[str, dict[str, np.ndarray]] = {s: {} for s in SOURCES}
    bar = tqdm(total=len(active) * (2 + 3 * clips), desc=f"eval-physics {run_dir.name}",
               dynamic_ncols=True, disable=not progress)
    for i, (name, _) in enumerate(active):
        frames = np.stack([c.frames for c in data[name]])
        videos["ground truth"][name] = frames
        videos["autoencoder"][name] = np.asarray(recon_fn(frames, stats))
        bar.update()
        key = jax.random.fold_in(jax.random.key(seed), i)
        videos["model"][name] = continue_videos(
            system, params, stats, frames, [c.caption for c in data[name]], k=k, key=key,
            cfg=cfg.sample)
        bar.update()
    rows, traces = [], {}
    for source in SOURCES:
        for name, w in active:
            per_clip, tracks = [], []
            for clip, video in zip(data[name], videos[source][name], strict=True):
                t = track(video, clip.colours, w.background, clip.occluders, reference=start)
                per_clip.append(clip_metrics(t, clip, start, w.height, w.fps, w.gravity))
                tracks.append(t)
                bar.update()
            rows.append({"source": source, "split": name, **_summarise(per_clip),
                         **bootstrap_intervals(per_clip, seed=seed)})
            if source == "model":
                traces[name] = (data[name], tracks)
    bar.close()
    # The first clip of every split, true and continued, for the continuation strips.
    traces["continuations"] = {name: (videos["ground truth"][name][0], videos["model"][name][0])
                               for name, _ in active}
    result = {
        "run": str(run_dir), "step": step, "weights": "raw" if raw else "ema",
        "context_frames": k, "context_video_frames": start, "frames": world.frames,
        "method": describe_method(cfg, k), "sampler": dataclasses.asdict(cfg.sample),
        "clips_per_split": clips, "seed": seed,
        "splits": {n: (w if isinstance(w, str) else
                       {"speed_range": list(w.speed_range), "radius_range": list(w.radius_range),
                        "colour_radius": [list(p) for p in w.colour_radius]})
                   for n, w in worlds.items()},
        "rows": rows,
    }
    result["flops"], result["params"] = _training_cost(run_dir, cfg, step)
    return result, traces


def format_table(result: dict) -> str:
    """The rows as a fixed-width text table."""
    cols = [("found", "found", "{:.2f}"), ("velocity_error", "vel h/s", "{:.3f}"),
            ("speed_ratio", "speed x", "{:.2f}"),
            ("gravity_error", "grav rel", "{:.2f}"), ("radius_drift", "r drift", "{:.3f}"),
            ("permanence_failure", "perm fail", "{:.2f}"), ("count_error", "count", "{:.2f}"),
            ("reemergence_error", "reemerge h", "{:.3f}"), ("energy_error", "energy", "{:.3f}")]
    head = f"{'source':<13}{'split':<17}" + "".join(f"{h:>11}" for _, h, _ in cols)
    lines = [f"{result['run']} @ step {result['step']}: {result['clips_per_split']} clips per "
             f"split, {result['context_video_frames']} of {result['frames']} frames given",
             result["method"], head]
    for row in result["rows"]:
        cells = "".join(f"{(fmt.format(v) if np.isfinite(v) else '-'):>11}"
                        for k, _, fmt in cols for v in [row.get(k, np.nan)])
        lines.append(f"{row['source']:<13}{row['split']:<17}{cells}")
    skipped = [f"{n}: skipped, {w}" for n, w in result["splits"].items() if isinstance(w, str)]
    return "\n".join(lines + skipped)


def _training_cost(run_dir: Path, cfg: Config, step: int) -> tuple[float, int]:
    """(training FLOPs, parameters) of a run: its sweep ledger row, else the analytic count
    x steps and the parameters counted from shapes."""
    from vdit.scaling.flops import train_flops_per_step
    from vdit.scaling.ledger import count_params, read_ledger

    ledger = run_dir.parent / "ledger.jsonl"
    if ledger.exists():
        for row in read_ledger(ledger):
            if Path(row["run_dir"]).name == run_dir.name:
                return float(row["flops"]), int(row["params"])
    return train_flops_per_step(cfg) * step, count_params(cfg)


def format_compute_table(results: list[dict]) -> str:
    """Markdown: the model's errors per run against training FLOPs (in-distribution | mean of
    the out-of-distribution splits), calibration rows first."""
    keys = (("found", "{:.2f}"), ("velocity_error", "{:.2f}"), ("gravity_error", "{:.2f}"),
            ("radius_drift", "{:.2f}"), ("permanence_failure", "{:.2f}"))

    def cell(v: float, fmt: str) -> str:
        return fmt.format(v) if np.isfinite(v) else "-"

    lines = ["| run | params | train FLOPs | " + " | ".join(
        f"{k.replace('_', ' ')} (ID / OOD)" for k, _ in keys) + " |",
        "|---|---:|---:|" + "---:|" * len(keys)]
    first = results[0]
    for source in ("ground truth", "autoencoder"):
        lines.append(f"| *{source}* | | | " + " | ".join(
            f"{cell(split_mean(first, source, False, k), f)} / "
            f"{cell(split_mean(first, source, True, k), f)}" for k, f in keys) + " |")
    for r in sorted(results, key=lambda r: r["flops"]):
        lines.append(f"| {Path(r['run']).name} | {r['params']:,} | {r['flops']:.2e} | "
                     + " | ".join(f"{cell(split_mean(r, 'model', False, k), f)} / "
                                  f"{cell(split_mean(r, 'model', True, k), f)}"
                                  for k, f in keys) + " |")
    return "\n".join(lines)


def _grouped(run_dirs: list[str]) -> list[int]:
    """Indices of `run_dirs`, runs of one model shape next to each other (in first-seen order),
    so each shape's compiled sampler serves all its runs before the next shape's is built."""
    from vdit.io.run_dir import run_config

    first: dict = {}
    keys = []
    for i, run in enumerate(run_dirs):
        try:
            key = shape_key(run_config(run))
        except (OSError, ConfigError):  # an export or param checkpoint: left in its place
            key = i
        keys.append(first.setdefault(key, i))
    return sorted(range(len(run_dirs)), key=lambda i: keys[i])


def _latest_step(run_dir: str | Path) -> int | None:
    """The run's newest committed checkpoint step (None: not a run with checkpoints)."""
    from vdit.scaling.ledger import checkpoint_steps

    return max(checkpoint_steps(Path(run_dir)), default=None)


def _reusable(previous: dict, run_dir: str, settings: dict) -> dict | None:
    """A result of an earlier call with the same --out for this run, if it was made at the
    run's current checkpoint with the same settings (clips, seed, context, raw) and every
    metric of this version (a result from before a metric was added is made again)."""
    result = previous.get(str(run_dir))
    if result is None or result.get("step") != _latest_step(run_dir):
        return None
    if any(k not in row for row in result.get("rows", []) for k in CI_KEYS):
        return None
    same = all(result.get(k) == v for k, v in settings.items())
    return result if same else None


def _save_continuations(path: Path, results: list) -> None:
    """The first clip of every split, true and continued, of every run (uint8, compressed):
    what the continuation strips of later calls draw for runs they reuse."""
    arrays = {}
    if path.exists():
        with np.load(path) as old:
            arrays.update({k: old[k] for k in old.files})
    for result, traces in results:
        for split, (truth, model) in (traces or {}).get("continuations", {}).items():
            arrays[f"{result['run']}|{split}|true"] = truth
            arrays[f"{result['run']}|{split}|model"] = model
    tmp = path.with_name(path.name + ".part.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)


def _load_continuations(path: Path, run: str) -> dict | None:
    if not path.exists():
        return None
    with np.load(path) as saved:
        splits = sorted({k.split("|")[1] for k in saved.files if k.startswith(run + "|")})
        return {"continuations": {s: (saved[f"{run}|{s}|true"], saved[f"{run}|{s}|model"])
                                  for s in splits}} if splits else None


def run_eval_physics(run_dirs: list[str], *, clips: int = 8, out: str | None = None,
                     context_frames: int | None = None, seed: int = 0, raw: bool = False,
                     progress: bool = True) -> dict:
    """Evaluate one or more runs; writes physics.json and the plots under `out` (default
    RUN_DIR/physics for one run; needed for several, which also get physics_vs_compute.*).

    Incremental: a run already in OUT/physics.json, evaluated at its current checkpoint with
    the same settings, is reused, not evaluated again, so a sweep's runs can be evaluated as
    they finish; OUT/continuations.npz keeps each run's strips for later calls."""
    from vdit.eval.physics_plots import (
        pick_by_compute,
        plot_continuations,
        plot_errors_by_split,
        plot_trajectories,
        plot_vs_compute,
    )

    if len(run_dirs) > 1 and not out:
        raise ConfigError("--out: needed when evaluating several runs")
    out_dir = Path(out) if out else Path(run_dirs[0]) / "physics"
    if out:  # refused before minutes of evaluation; the default is checked with its run
        check_output_dir(out_dir, "--out")
    previous = {}
    if (out_dir / "physics.json").exists():
        previous = {r["run"]: r for r in json.loads((out_dir / "physics.json").read_text())
                    .get("runs", [])}
    settings = {"clips_per_split": clips, "seed": seed, "weights": "raw" if raw else "ema"}
    if context_frames is not None:
        settings["context_frames"] = context_frames
    reused = {i: _reusable(previous, run, settings) for i, run in enumerate(run_dirs)}
    results: list = [None] * len(run_dirs)
    continuations = out_dir / "continuations.npz"
    for i in _grouped(run_dirs):  # each shape's runs together: its programs stay cached
        if reused[i]:
            results[i] = (reused[i], _load_continuations(continuations, reused[i]["run"]))
            tqdm.write(f"{run_dirs[i]}: reused from {out_dir / 'physics.json'} (step "
                       f"{reused[i]['step']})")
            continue
        result, traces = evaluate_run(run_dirs[i], clips=clips, context_frames=context_frames,
                                      seed=seed, raw=raw, progress=progress)
        tqdm.write(format_table(result))
        results[i] = (result, traces)
    # Created once every run has been read: a RUN_DIR that is not a run gets no physics/.
    out_dir.mkdir(parents=True, exist_ok=True)
    _save_continuations(continuations, results)
    # Plots of one run: the only one, or the one trained with the most compute. Its
    # trajectories need this call's tracks: a reused best run keeps the plot made when it was
    # evaluated (the best run only changes when a better one is evaluated, so it is its plot).
    best, traces = max(results, key=lambda rt: rt[0]["flops"])
    plots = [plot_errors_by_split(best, out_dir / "error_by_split.png")]
    if traces and "in_distribution" in traces:
        plots.append(plot_trajectories(best, traces, out_dir / "trajectories.png"))
    summary = {"runs": [r for r, _ in results], "plots_of": best["run"]}
    # Small, medium and large compute (one run: just it); runs reused from a file written
    # before continuations were kept have none to draw.
    drawable = [rt for rt in results if rt[1] and rt[1].get("continuations")]
    if drawable:
        plots.append(plot_continuations(pick_by_compute(drawable),
                                        out_dir / "continuations.png"))
    if len(results) > 1:
        plots.append(plot_vs_compute(summary["runs"], out_dir / "physics_vs_compute.png"))
        table = format_compute_table(summary["runs"])
        (out_dir / "physics_vs_compute.md").write_text(table + "\n")
        tqdm.write(table)
    summary["plots"] = [p.name for p in plots]
    (out_dir / "physics.json").write_text(json.dumps(summary, indent=1, allow_nan=True))
    return summary
