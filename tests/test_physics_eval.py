"""Physics evaluation: the tracker against the simulator's truth, the metrics on clips with known
defects (a vanished ball, reversed gravity), the out-of-distribution worlds, and
`vdit eval-physics` end to end on an untrained tiny run."""

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from vdit.config import ConfigError, from_dict
from vdit.data.physics import WorldConfig, render_frames, simulate
from vdit.eval.physics_eval import split_worlds
from vdit.eval.physics_metrics import clip_metrics, permanence
from vdit.eval.tracker import VISIBLE, track

SMALL = WorldConfig(frames=12, height=32, width=32)


def _clear(clip, t: int, b: int, margin: float = 3.0) -> bool:
    """Ball b at frame t is away from the occluder and from every other ball."""
    p, r = clip.positions[t, b], clip.radii[b]
    for x0, y0, x1, y1 in clip.occluders:
        if np.hypot(max(x0 - p[0], 0, p[0] - x1), max(y0 - p[1], 0, p[1] - y1)) < r + margin:
            return False
    others = [o for o in range(len(clip.radii)) if o != b]
    return all(np.linalg.norm(clip.positions[t, o] - p) >= r + clip.radii[o] + margin
               for o in others)


def test_tracker_recovers_true_trajectories_within_half_a_pixel():
    checked = 0
    for seed in range(12):
        clip = simulate(SMALL, seed)
        tracks = track(clip.frames, clip.colours, SMALL.background, clip.occluders)
        for t in range(SMALL.frames):
            for b in range(len(clip.colours)):
                if not _clear(clip, t, b):
                    continue
                assert tracks.state[t, b] == VISIBLE, (seed, t, b)
                assert np.linalg.norm(tracks.centres[t, b] - clip.positions[t, b]) < 0.5
                assert abs(tracks.radii[t, b] - clip.radii[b]) < 0.5
                checked += 1
    assert checked > 150  # most ball-frames are clear: the bound is tested broadly


def test_ground_truth_clips_score_near_zero_and_hidden_balls_are_not_failures():
    world = dataclasses.replace(SMALL, occluder_prob=1.0)
    hidden = 0
    for seed in range(8):
        clip = simulate(world, seed)
        tracks = track(clip.frames, clip.colours, world.background, clip.occluders)
        m = clip_metrics(tracks, clip, 3, world.height, world.fps, world.gravity)
        hidden += int((~clip.visible[3:]).any())
        assert not m["failure"], seed
        assert m["velocity_error"] < 0.02  # frame heights per second
        assert m["speed_ratio"] == pytest.approx(1.0, abs=0.03)
        assert not np.isfinite(m["gravity_error"]) or m["gravity_error"] < 0.05
        assert all(e < 0.02 for e in m["reemergence_errors"])
    assert hidden >= 2  # balls did pass behind the bar


def test_a_ball_deleted_for_some_frames_is_an_object_permanence_failure():
    world = dataclasses.replace(SMALL, min_balls=2, max_balls=2, occluder_prob=0.0)
    clip = simulate(world, 3)
    frames = clip.frames.copy()
    gone = slice(5, 9)  # ball 0 is not drawn in frames 5-8
    frames[gone] = render_frames(clip.positions[gone, 1:], clip.radii[1:], clip.colours[1:],
                                 clip.occluders, world.height, world.width, world.background)
    intact = track(clip.frames, clip.colours, world.background, clip.occluders)
    deleted = track(frames, clip.colours, world.background, clip.occluders)
    assert not permanence(intact, clip, 3, world.height)["failure"]
    result = permanence(deleted, clip, 3, world.height)
    assert result["failure"] and result["vanished"] == 1 and result["count_error"] > 0


def test_balls_drawn_at_half_their_speed_give_a_speed_ratio_of_one_half():
    """Each generated frame halfway between the last given one and the truth: every generated
    displacement is half the simulator's (one ball, no occluder: tracked whole throughout)."""
    world = dataclasses.replace(SMALL, min_balls=1, max_balls=1, occluder_prob=0.0)
    start, ratios = 3, []
    for seed in range(6):
        clip = simulate(world, seed)
        slow = clip.positions.copy()
        slow[start:] = slow[start - 1] + 0.5 * (slow[start:] - slow[start - 1])
        frames = render_frames(slow, clip.radii, clip.colours, clip.occluders, world.height,
                               world.width, world.background)
        tracks = track(frames, clip.colours, world.background, clip.occluders)
        m = clip_metrics(tracks, clip, start, world.height, world.fps, world.gravity)
        if np.isfinite(m["speed_ratio"]):
            ratios.append(m["speed_ratio"])
    assert len(ratios) >= 4 and max(abs(r - 0.5) for r in ratios) < 0.05


def test_a_clip_rendered_with_reversed_gravity_gives_a_large_gravity_error():
    world = dataclasses.replace(SMALL, occluder_prob=0.0)
    errors, reversed_errors = [], []
    for seed in range(6):
        clip = simulate(world, seed)
        up = clip.positions.copy()
        up[..., 1] = world.height - up[..., 1]  # mirrored: every ball falls upward
        frames = render_frames(up, clip.radii, clip.colours, clip.occluders, world.height,
                               world.width, world.background)
        for video, out in ((clip.frames, errors), (frames, reversed_errors)):
            tracks = track(video, clip.colours, world.background, clip.occluders)
            out.append(clip_metrics(tracks, clip, 3, world.height, world.fps,
                                    world.gravity)["gravity_error"])
    assert np.nanmax(errors) < 0.05
    assert np.nanmin(reversed_errors) > 1.5  # g_fit ~ -g: a relative error of ~2


def test_colour_radius_couples_sizes_and_leaves_default_seeds_unchanged():
    # The default world renders what it rendered before colour_radius existed.
    digest = hashlib.sha256(simulate(WorldConfig(), 7).frames.tobytes()).hexdigest()
    assert digest == "89049dda0ae1f7dec2a8151e79ef2e1da0813f51d259cda2af7689e26ecbe63b"
    coupled = WorldConfig(frames=2, colours=("red", "blue"),
                          colour_radius=(("red", 0.06, 0.08), ("blue", 0.12, 0.14)))
    for seed in range(10):
        clip = simulate(coupled, seed)
        for colour, r in zip(clip.colours, clip.radii / coupled.height, strict=True):
            lo, hi = (0.06, 0.08) if colour == "red" else (0.12, 0.14)
            assert lo * 0.9**10 <= r <= hi + 1e-6  # placement may shrink a ball by 0.9 steps
    combo = split_worlds(coupled)["ood_combo"]
    assert combo.colour_radius == (("red", 0.12, 0.14), ("blue", 0.06, 0.08))
    # Seen from a config file; a bad colour is refused by name.
    cfg = from_dict({"data": {"world": {"frames": 17, "colour_radius": [["red", 0.06, 0.08]]}}})
    assert cfg.data.world.colour_radius == (("red", 0.06, 0.08),)
    with pytest.raises(ConfigError, match=r"data\.world\.colour_radius"):
        from_dict({"data": {"world": {"frames": 17, "colour_radius": [["pink", 0.06, 0.08]]}}})


def test_out_of_distribution_worlds_lie_outside_the_training_ranges():
    world = WorldConfig(frames=8, height=16, width=16, radius_range=(0.09, 0.16))
    splits = split_worlds(world)
    assert splits["ood_speed"].speed_range[0] >= world.speed_range[1]
    assert splits["ood_radius"].radius_range[0] >= world.radius_range[1]
    assert isinstance(splits["ood_combo"], str)  # no coupling: every combination was seen
    assert not splits["ood_radius"].validate()


def test_eval_physics_end_to_end_on_a_tiny_run(tiny_run, tmp_path, capsys):
    from vdit.cli import main

    out = tmp_path / "physics"
    assert main(["eval-physics", str(tiny_run), "--clips", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "replacement" in printed.out + printed.err
    result = json.loads((out / "physics.json").read_text())["runs"][0]
    rows = {(r["source"], r["split"]): r for r in result["rows"]}
    assert {s for s, _ in rows} == {"ground truth", "autoencoder", "model"}
    assert {"in_distribution", "ood_speed", "ood_radius"} <= {s for _, s in rows}
    truth = rows["ground truth", "in_distribution"]
    assert truth["permanence_failure"] == 0 and truth["velocity_error"] < 0.05
    for name in ("error_by_split.png", "trajectories.png", "continuations.png"):
        assert (out / name).stat().st_size > 5000
    assert main(["eval-physics", str(tmp_path / "nowhere")]) == 2
    assert "not a vdit run directory" in capsys.readouterr().err


def test_bootstrap_intervals_cover_the_clip_mean_and_shrink_with_clips():
    from vdit.eval.physics_eval import bootstrap_intervals

    rng = np.random.default_rng(0)

    def clips(n):
        return [{"found": 1.0, "velocity_error": v, "gravity_error": np.nan, "radius_drift": 0.0,
                 "speed_ratio": 1.0, "failure": bool(v > 1.2), "count_error": 0.0,
                 "vanished": 0, "appeared": 0,
                 "reemergence_errors": [], "reemergence_missed": 0, "energy_errors": []}
                for v in rng.normal(1.0, 0.3, n)]

    small, big = bootstrap_intervals(clips(16)), bootstrap_intervals(clips(256))
    for ci in (small, big):
        assert ci["velocity_error_ci"][0] < 1.0 < ci["velocity_error_ci"][1]
        assert np.isnan(ci["gravity_error_ci"]).all()  # no data: no interval
    width = {k: v["velocity_error_ci"][1] - v["velocity_error_ci"][0]
             for k, v in (("s", small), ("b", big))}
    assert width["b"] < 0.5 * width["s"] and width["b"] > 0.02  # ~1/sqrt(n), not a point


def test_eval_physics_compiles_one_sampler_per_model_shape(tiny_run, tmp_path, monkeypatch):
    """Two runs of one shape (a sweep's points differ only in `train`): the second is evaluated
    without lowering any program again."""
    import jax

    from vdit.config import to_dict
    from vdit.eval import physics_eval
    from vdit.eval.physics_eval import evaluate_run
    from vdit.io.checkpoint import load_params, save_params

    # Start cold: earlier tests in this process may have evaluated the same shape already.
    monkeypatch.setattr(physics_eval, "_SYSTEMS", {})
    physics_eval._recon_fn.cache_clear()
    jax.clear_caches()

    tensors, info = load_params(tiny_run)
    cfg = from_dict(info["config"])
    other = to_dict(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=99,
                                                                        lr=3e-4)))
    second = save_params(tmp_path / "second", tensors, {**info, "config": other})
    lowered = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, _, **kw: lowered.append(event)
        if event == "/jax/core/compile/jaxpr_to_mlir_module_duration" else None)
    evaluate_run(tiny_run, clips=1, progress=False)
    first = len(lowered)
    result, _ = evaluate_run(second, clips=1, progress=False)
    assert first > 0 and len(lowered) == first, (first, len(lowered))
    assert all(len(r["velocity_error_ci"]) == 2 for r in result["rows"])


def test_continuation_grid_puts_truth_on_top_and_runs_by_compute():
    """The strips of `vdit eval-physics`: runs picked at least, middle and most compute, the
    true clip on the top row and each run's continuation below, splits side by side."""
    from vdit.eval.physics_plots import continuation_grid, pick_by_compute

    t, h, w = 3, 4, 5

    def run(flops: float, shade: int) -> tuple:
        truth = np.full((t, h, w, 3), 10, np.uint8)
        truth[:, :, :, 0] = np.arange(t)[:, None, None]  # frame index in red: order is visible
        model = np.full((t, h, w, 3), shade, np.uint8)
        return ({"run": f"x{shade}", "flops": flops, "context_video_frames": 1},
                {"continuations": {"a": (truth, model), "b": (truth, model + 1)}})

    runs = [run(f, s) for f, s in ((1e13, 30), (1e12, 20), (1e14, 50), (3e13, 40), (2e12, 25))]
    picked = pick_by_compute(runs)
    assert [r["flops"] for r, _ in picked] == [1e12, 1e13, 1e14]
    grid = continuation_grid(picked, gap=2)
    assert grid.shape == (4 * h, 2 * t * w + 2, 3)
    assert (grid[:h, : t * w, 0].reshape(h, t, w) == np.arange(t)[None, :, None]).all()
    for row, shade in enumerate((20, 30, 50), start=1):
        assert (grid[row * h:(row + 1) * h, : t * w] == shade).all()
        assert (grid[row * h:(row + 1) * h, t * w + 2:] == shade + 1).all()
    assert (grid[:, t * w: t * w + 2] == 255).all()
    assert len(pick_by_compute(runs[:2])) == 2


def test_continuation_strips_are_written(tmp_path):
    from vdit.eval.physics_plots import plot_continuations

    video = np.zeros((9, 32, 32, 3), np.uint8)
    results = [({"run": "x1-C1e12", "flops": 1e12, "context_video_frames": 5},
                {"continuations": {s: (video, video) for s in ("in_distribution", "ood_speed")}})]
    path = plot_continuations(results, tmp_path / "continuations.png")
    assert path.stat().st_size > 2000


def test_eval_physics_reuses_runs_already_in_its_output(tiny_run, tmp_path, monkeypatch):
    """A sweep's runs are evaluated as they finish: a run in OUT/physics.json at its current
    checkpoint and with the same settings is not evaluated again; a newer checkpoint or other
    settings are. Strips of reused runs come from OUT/continuations.npz."""
    from vdit.eval import physics_eval
    from vdit.eval.physics_eval import evaluate_run, run_eval_physics

    real, traces = evaluate_run(tiny_run, clips=1, progress=False)
    runs = {}
    for name, flops in (("a", 1e12), ("b", 3e12), ("c", 2e12)):
        (tmp_path / name / "checkpoints" / "5").mkdir(parents=True)
        runs[str(tmp_path / name)] = flops
    calls = []

    def fake_evaluate(run_dir, *, clips, context_frames, seed, raw, progress):
        calls.append(Path(run_dir).name)
        return ({**real, "run": str(run_dir), "step": physics_eval._latest_step(run_dir),
                 "flops": runs[str(run_dir)], "clips_per_split": clips, "seed": seed,
                 "weights": "raw" if raw else "ema"},
                traces)

    monkeypatch.setattr(physics_eval, "evaluate_run", fake_evaluate)
    out = tmp_path / "out"
    a, b, c = runs
    run_eval_physics([a, b], clips=1, out=str(out), progress=False)
    assert calls == ["a", "b"]
    first = json.loads((out / "physics.json").read_text())
    calls.clear()
    (tmp_path / "a" / "checkpoints" / "9").mkdir()  # a trained on: evaluated again
    summary = run_eval_physics([a, b, c], clips=1, out=str(out), progress=False)
    assert calls == ["a", "c"]
    assert summary["runs"][1] == first["runs"][1] and summary["runs"][0]["step"] == 9
    assert summary["plots_of"] == b and "continuations.png" in summary["plots"]
    with np.load(out / "continuations.npz") as saved:
        assert {k.split("|")[0] for k in saved.files} == {a, b, c}
    calls.clear()
    run_eval_physics([a, b, c], clips=2, out=str(out), progress=False)  # other settings
    assert calls == ["a", "b", "c"]
    saved = json.loads((out / "physics.json").read_text())
    for row in saved["runs"][1]["rows"]:  # b evaluated before a metric was added
        del row["speed_ratio"]
    (out / "physics.json").write_text(json.dumps(saved, allow_nan=True))
    calls.clear()
    run_eval_physics([a, b, c], clips=2, out=str(out), progress=False)
    assert calls == ["b"]
