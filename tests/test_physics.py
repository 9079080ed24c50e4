"""The physics world: determinism, conservation laws, rendering, captions, config checks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from vdit.data.physics import (
    GREY,
    PALETTE,
    VOCABULARY,
    Clip,
    WorldConfig,
    kinetic_energy,
    make_caption,
    render,
    simulate,
    step,
    visibility,
)

CFG = WorldConfig()


def _words(caption: str) -> list[str]:
    return caption.replace(";", " ").split()


def _assert_same(a: Clip, b: Clip) -> None:
    np.testing.assert_array_equal(a.frames, b.frames)
    np.testing.assert_array_equal(a.positions, b.positions)
    np.testing.assert_array_equal(a.velocities, b.velocities)
    assert a.caption == b.caption and a.colours == b.colours


def test_same_seed_same_clip_and_different_seed_differs():
    for seed in (0, 7, 123):
        _assert_same(simulate(CFG, seed), simulate(CFG, seed))
    a, b = simulate(CFG, 1), simulate(CFG, 2)
    assert a.positions.shape != b.positions.shape or not np.array_equal(a.positions, b.positions)
    assert not np.array_equal(a.frames, b.frames)


def test_clip_shapes_and_dtypes():
    cfg = WorldConfig(frames=5, height=48, width=80, max_balls=4, occluder_prob=1.0)
    for seed in range(10):
        clip = simulate(cfg, seed)
        n = len(clip.colours)
        assert 1 <= n <= 4 and clip.seed == seed
        assert clip.frames.shape == (5, 48, 80, 3) and clip.frames.dtype == np.uint8
        assert clip.radii.shape == (n,) and clip.radii.dtype == np.float32
        assert clip.positions.shape == (5, n, 2) and clip.positions.dtype == np.float32
        assert clip.velocities.shape == (5, n, 2) and clip.velocities.dtype == np.float32
        assert clip.visible.shape == (5, n) and clip.visible.dtype == bool
        assert clip.occluders.shape == (1, 4) and clip.occluders.dtype == np.float32
        assert set(clip.colours) <= set(PALETTE)
    assert simulate(dataclasses.replace(cfg, occluder_prob=0.0), 0).occluders.shape == (0, 4)


def test_balls_start_apart_and_stay_inside_the_frame():
    cfg = WorldConfig(frames=32, max_balls=6)
    for seed in range(30):
        clip = simulate(cfg, seed)
        p, r = clip.positions, clip.radii
        eps = 1e-3
        assert np.all(p[..., 0] >= r - eps) and np.all(p[..., 0] <= cfg.width - r + eps)
        assert np.all(p[..., 1] >= r - eps) and np.all(p[..., 1] <= cfg.height - r + eps)
        d = np.linalg.norm(p[0, :, None] - p[0, None], axis=-1) + np.eye(len(r)) * 1e9
        assert np.all(d >= r[:, None] + r[None, :])


def _crowd() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Five balls of different sizes aimed at each other and at the walls (pixels)."""
    pos = np.array([[15.0, 32.0], [49.0, 32.0], [32.0, 12.0], [32.0, 52.0], [10.0, 10.0]])
    vel = np.array([[60.0, 3.0], [-55.0, -4.0], [5.0, 70.0], [-2.0, -65.0], [40.0, 45.0]])
    radii = np.array([6.0, 8.0, 5.0, 7.0, 4.0])
    return pos, vel, radii


def test_kinetic_energy_conserved_without_gravity():
    pos, vel, radii = _crowd()
    e0 = kinetic_energy(vel, radii)
    start = vel.copy()
    bounced = np.zeros(len(radii), bool)
    for _ in range(500):
        pos, vel = step(pos, vel, radii, 1 / 64, 0.0, 64, 64)
        assert kinetic_energy(vel, radii) == pytest.approx(e0, rel=1e-6)
        bounced |= np.abs(np.linalg.norm(vel, axis=1) - np.linalg.norm(start, axis=1)) > 1e-3
    assert bounced.any()  # ball-ball collisions changed individual speeds
    assert np.all(pos >= radii[:, None] - 1e-9) and np.all(pos <= 64 - radii[:, None] + 1e-9)


def test_momentum_conserved_in_isolated_collision():
    pos = np.array([[70.0, 100.0], [130.0, 104.0]])
    vel = np.array([[40.0, 0.0], [-25.0, 2.0]])
    radii = np.array([10.0, 6.0])
    m = radii**2
    p0, e0 = (m[:, None] * vel).sum(0), kinetic_energy(vel, radii)
    for _ in range(64):
        pos, vel = step(pos, vel, radii, 1 / 64, 0.0, 400, 400)
    assert vel[0, 0] < 40.0 - 1.0 and vel[1, 0] > 0  # they did collide
    np.testing.assert_allclose((m[:, None] * vel).sum(0), p0, rtol=1e-9, atol=1e-9)
    assert kinetic_energy(vel, radii) == pytest.approx(e0, rel=1e-9)


def test_falling_ball_bounces_off_the_floor():
    pos, vel, radii = np.array([[32.0, 10.0]]), np.zeros((1, 2)), np.array([6.0])
    ys, vys = [], []
    for _ in range(8 * 16):
        pos, vel = step(pos, vel, radii, 1 / 64, 128.0, 64, 64)
        ys.append(pos[0, 1])
        vys.append(vel[0, 1])
        assert 6.0 <= pos[0, 1] <= 58.0
    assert max(ys) == pytest.approx(58.0, abs=2.0)  # reaches the floor
    assert min(vys) < -60.0  # and goes back up
    assert min(ys[-40:]) < 20.0  # elastic: it climbs back near its start height


def test_caption_says_bounces_for_a_dropped_ball():
    hits = 0
    for seed in range(40):
        clip = simulate(WorldConfig(max_balls=1, frames=24), seed)
        y, vy = clip.positions[:, 0, 1], clip.velocities[:, 0, 1]
        if clip.velocities[0, 0, 1] == 0 and y[0] < 0.5 * CFG.height and (vy < 0).any():
            assert "falls and bounces" in clip.caption, clip.caption
            hits += 1
    assert hits >= 3


def test_rolling_ball_stays_on_the_floor_and_caption():
    pos, vel, radii = np.array([[10.0, 58.0]]), np.array([[30.0, 0.0]]), np.array([6.0])
    track, vels = [], []
    for t in range(16):
        if t:
            for _ in range(8):
                pos, vel = step(pos, vel, radii, 1 / 64, 128.0, 64, 64)
        track.append(pos[0].copy())
        vels.append(vel[0].copy())
    track, vels = np.array(track)[:, None], np.array(vels)[:, None]
    assert np.allclose(track[:, 0, 1], 58.0)
    visible = np.ones((16, 1), bool)
    caption = make_caption(["red"], radii, track, vels, visible, 64, 8.0, 2.0)
    assert caption == "a red ball rolls right"
    caption = make_caption(["orange"], [4.0], track, vels, ~visible, 64, 8.0, 2.0)
    assert caption == "a small orange ball rolls right behind a grey bar"


def test_render_draws_ball_colour_and_occluder_on_top():
    radii, colours = np.array([6.0, 5.0]), ["red", "blue"]
    pos = np.array([[16.3, 20.7], [44.0, 40.0]])
    bg = (16, 16, 24)
    frame = render(pos, radii, colours, np.zeros((0, 4)), 64, 64, bg)
    assert frame.shape == (64, 64, 3) and frame.dtype == np.uint8
    for (x, y), c in zip(pos, colours, strict=True):
        assert tuple(frame[int(y), int(x)]) == PALETTE[c]
    assert tuple(frame[0, 63]) == bg
    edge = frame[20, 16 + 6]  # on the rim: a blend of red and background
    assert 16 < edge[0] < 230

    occ = np.array([[38.0, 30.0, 50.0, 50.0]])
    frame = render(pos, radii, colours, occ, 64, 64, bg)
    assert tuple(frame[40, 44]) == GREY
    assert tuple(frame[int(20.7), int(16.3)]) == PALETTE["red"]
    assert visibility(pos[None], occ).tolist() == [[True, False]]


def test_simulated_occlusion_matches_frames():
    cfg = WorldConfig(occluder_prob=1.0, max_balls=3)
    seen = 0
    for seed in range(30):
        clip = simulate(cfg, seed)
        x0, y0, x1, y1 = clip.occluders[0]
        for t, b in zip(*np.nonzero(~clip.visible), strict=True):
            x, y = clip.positions[t, b]
            if x0 + 1 < x < x1 - 1 and y0 + 1 < y < y1 - 1:
                assert tuple(clip.frames[t, int(y), int(x)]) == GREY
                seen += 1
        assert ("behind a grey bar" in clip.caption) == (not clip.visible.all())
    assert seen > 0


def test_captions_use_vocabulary_and_stay_short():
    vocab = set(VOCABULARY)
    motions = set()
    for cfg in (CFG, WorldConfig(gravity=0.0), WorldConfig(max_balls=8, frames=8)):
        for seed in range(40):
            clip = simulate(cfg, seed)
            words = _words(clip.caption)
            assert set(words) <= vocab, clip.caption
            assert not any(ch.isdigit() for ch in clip.caption)
            assert clip.caption.count(";") <= len(clip.colours) - 1
            if cfg.max_balls <= 3:  # the 31-word budget only cuts crowded clips short
                assert clip.caption.count(";") == len(clip.colours) - 1
            assert len(words) <= 31, clip.caption
            motions |= {w for w in words if w in ("falls", "bounces", "rolls", "flies", "moves")}
    assert motions == {"falls", "bounces", "rolls", "flies", "moves"}
    assert all(w == w.lower() for w in VOCABULARY) and "grey" not in PALETTE


def test_validate():
    assert WorldConfig().validate() == []
    bad = {
        "frames": 0, "height": 4, "width": 7, "fps": 0.0, "substeps": 0, "min_balls": 0,
        "max_balls": 9, "radius_range": (0.2, 0.1), "speed_range": (-1.0, 1.0), "gravity": -1.0,
        "occluder_prob": 1.5, "colours": ("red", "pink"), "background": (0, 0, 300),
    }
    for name, value in bad.items():
        problems = WorldConfig(**{name: value}).validate()
        assert problems, name
        assert any(p.startswith(f"{name}:") for p in problems), problems
    assert WorldConfig(radius_range=(0.2, 0.1)).validate() == [
        "radius_range: min must be > 0 and <= max, got (0.2, 0.1)"
    ]
    (msg,) = WorldConfig(colours=("red", "pink")).validate()
    assert msg.startswith("colours: unknown colour 'pink'; allowed: red, green,")
    assert WorldConfig(colours=()).validate() == ["colours: must not be empty"]
    assert WorldConfig(speed_range=(0.0, 1.0)).validate() == []


def test_long_captions_drop_sizes_then_balls():
    t, n = 8, 4
    pos = np.tile(np.array([10.0, 58.0]), (t, n, 1))
    pos[:, :, 0] += np.arange(t)[:, None] * 3.0 + np.arange(n) * 14.0
    vel = np.zeros((t, n, 2))
    vel[..., 0] = 24.0
    hidden = np.zeros((t, n), bool)
    args = (["red", "blue", "green", "white"], [4.0] * n, pos, vel, hidden, 64, 8.0, 2.0)
    full = make_caption(*args, max_words=None)
    assert full.count("a small") == 4 and len(_words(full)) == 40
    assert make_caption(*args, max_words=36) == full.replace("small ", "")
    assert make_caption(*args, max_words=20) == (
        "a red ball rolls right behind a grey bar; a blue ball rolls right behind a grey bar"
    )
