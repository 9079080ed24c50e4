"""A seeded 2D world of bouncing balls: the default training data, and a physics reference.

Balls (colour, radius, position, velocity) move under gravity and collide elastically with the
four walls and with each other (equal-density discs, mass ~ r**2). An optional grey occluder bar
is drawn on top, so balls pass behind it. Each clip keeps its ground-truth trajectories and a
caption derived from them (`make_caption`), which evaluation code can also apply to trajectories
tracked in generated videos.

Units: the config is in frame heights (and seconds); everything else is in pixels, with x to
the right, y pointing down, and the frame spanning [0, width] x [0, height]. Pixel (i, j) has
its centre at (j + 0.5, i + 0.5).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from vdit.config.world import GREY, PALETTE, WorldConfig
from vdit.models.text import WordTokenizer

__all__ = ["GREY", "PALETTE", "VOCABULARY", "WorldConfig", "physics_tokenizer", "simulate"]

_SIZES = ("small", "medium", "large")
_COUNTS = {1: "once", 2: "twice", 3: "three times"}
# Every word a caption can contain. Ball descriptions are joined with "; ", so the words of a
# caption are `caption.replace(";", " ").split()`.
_WORDS = """a an ball behind grey bar and falls bounces once twice three times many rolls flies
up down moves left right rests"""
VOCABULARY: tuple[str, ...] = tuple(sorted(set(_WORDS.split()) | set(_SIZES) | set(PALETTE)))


def physics_tokenizer(max_length: int) -> WordTokenizer:
    """The word tokenizer over the physics world's caption vocabulary."""
    return WordTokenizer(VOCABULARY, max_length)


@dataclass
class Clip:
    """One simulated clip with its ground truth (n balls, T frames, k occluders)."""

    frames: np.ndarray  # uint8 [T, H, W, 3]
    caption: str
    colours: list[str]  # per ball
    radii: np.ndarray  # float32 [n] in pixels
    positions: np.ndarray  # float32 [T, n, 2] centres (x, y) in pixels, y down
    velocities: np.ndarray  # float32 [T, n, 2] pixels per second
    visible: np.ndarray  # bool [T, n]: False where the centre is behind an occluder
    occluders: np.ndarray  # float32 [k, 4] (x0, y0, x1, y1) in pixels, k in {0, 1}
    seed: int


def masses(radii: np.ndarray) -> np.ndarray:
    """Masses of equal-density discs: r**2, shape [n]."""
    return np.asarray(radii, np.float64) ** 2


def kinetic_energy(vel: np.ndarray, radii: np.ndarray) -> float:
    """Total kinetic energy sum(m |v|^2) / 2 with m = r**2; vel [n, 2], radii [n]."""
    vel = np.asarray(vel, np.float64)
    return float(0.5 * np.sum(masses(radii) * np.sum(vel * vel, axis=-1)))


@functools.cache
def _pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Index arrays (i, j), i < j, of all ball pairs; [n (n - 1) / 2] each."""
    return np.triu_indices(n, k=1)


def _collide(
    pos: np.ndarray, vel: np.ndarray, r: np.ndarray, ii: list[int], jj: list[int]
) -> None:
    """In place: elastic impulse and positional separation for the overlapping pairs (i, j)."""
    m = masses(r)
    for i, j in zip(ii, jj, strict=True):
        d = pos[j] - pos[i]
        dist = float(np.hypot(d[0], d[1]))
        normal = d / dist if dist > 1e-12 else np.array([1.0, 0.0])
        total = m[i] + m[j]
        vn = float(np.dot(vel[j] - vel[i], normal))
        if vn < 0:  # approaching: elastic impulse along the normal
            vel[i] += (2 * m[j] / total * vn) * normal
            vel[j] -= (2 * m[i] / total * vn) * normal
        overlap = r[i] + r[j] - dist
        if overlap > 0:
            pos[i] -= (overlap * m[j] / total) * normal
            pos[j] += (overlap * m[i] / total) * normal


def step(
    pos: np.ndarray, vel: np.ndarray, radii: np.ndarray, dt: float, gravity: float,
    width: float, height: float,
) -> tuple[np.ndarray, np.ndarray]:
    """One substep: semi-implicit Euler, then elastic ball-ball and wall collisions.

    pos, vel: [n, 2] pixels and pixels/second (x, y), y down; radii: [n] pixels; gravity in
    px/s^2 (down). Returns new float64 (pos, vel), [n, 2] each. Ball pairs that overlap while
    approaching exchange the elastic impulse along their normal (mass ~ r**2) and are pushed
    apart (centre of mass kept); walls mirror the position and reflect the normal velocity.
    Both conserve kinetic energy exactly, so with gravity=0 it changes only by rounding.
    A ball lying on the floor with a residual vertical speed below ~gravity*dt is put to rest
    there (no jitter), which only happens when gravity > 0.
    """
    pos = np.array(pos, np.float64)
    vel = np.array(vel, np.float64)
    r = np.asarray(radii, np.float64)
    if gravity:
        vel[:, 1] += gravity * dt
    pos += vel * dt

    if len(r) > 1:
        ii, jj = _pairs(len(r))
        d = pos[jj] - pos[ii]
        hits = np.flatnonzero(np.einsum("pk,pk->p", d, d) < (r[ii] + r[jj]) ** 2)
        if hits.size:
            _collide(pos, vel, r, ii[hits].tolist(), jj[hits].tolist())

    lo = r[:, None]  # [n, 1]
    hi = np.array([width, height], np.float64) - lo  # [n, 2]
    below, above = pos < lo, pos > hi
    if below.any() or above.any():
        pos = np.where(below, 2 * lo - pos, np.where(above, 2 * hi - pos, pos))
        vel = np.where(below, np.abs(vel), np.where(above, -np.abs(vel), vel))
        pos = np.maximum(np.minimum(pos, hi), lo)

    if gravity > 0:
        floor = height - r
        resting = (pos[:, 1] >= floor - 2 * gravity * dt * dt) & (
            np.abs(vel[:, 1]) <= 1.5 * gravity * dt
        )
        pos[:, 1] = np.where(resting, floor, pos[:, 1])
        vel[:, 1] = np.where(resting, 0.0, vel[:, 1])
    return pos, vel


def render_frames(
    positions: np.ndarray, radii: np.ndarray, colours: list[str], occluders: np.ndarray,
    height: int, width: int, background: tuple[int, int, int],
) -> np.ndarray:
    """Anti-aliased frames, uint8 [T, H, W, 3], from positions [T, n, 2] (pixels).

    Balls are composited in order with coverage clip(r - d + 0.5, 0, 1), d the distance from
    the pixel centre; occluders [k, 4] (x0, y0, x1, y1) are drawn on top in grey.
    """
    positions = np.asarray(positions, np.float32)
    xs = np.arange(width, dtype=np.float32) + 0.5
    ys = np.arange(height, dtype=np.float32) + 0.5
    out = np.empty((positions.shape[0], height, width, 3), np.float32)
    out[...] = np.asarray(background, np.float32)
    for b, (r, name) in enumerate(zip(np.asarray(radii, np.float32), colours, strict=True)):
        colour = np.asarray(PALETTE[name], np.float32)
        for t, (cx, cy) in enumerate(positions[:, b].tolist()):
            # Only the ball's bounding box (plus the half-pixel soft edge) is touched.
            x0, x1 = max(int(cx - r - 1), 0), min(int(cx + r + 2), width)
            y0, y1 = max(int(cy - r - 1), 0), min(int(cy + r + 2), height)
            if x0 >= x1 or y0 >= y1:
                continue
            dx, dy = xs[None, x0:x1] - cx, ys[y0:y1, None] - cy
            cover = np.clip(r + 0.5 - np.sqrt(dx * dx + dy * dy), 0.0, 1.0)[..., None]
            box = out[t, y0:y1, x0:x1]
            box += cover * (colour - box)
    for x0, y0, x1, y1 in np.asarray(occluders, np.float32).reshape(-1, 4):
        inside = np.minimum(
            np.minimum(xs - x0, x1 - xs)[None, :], np.minimum(ys - y0, y1 - ys)[:, None]
        )
        cover = np.clip(inside + 0.5, 0.0, 1.0)[None, :, :, None]
        out += cover * (np.asarray(GREY, np.float32) - out)
    return np.rint(out).astype(np.uint8)


def render(
    positions_t: np.ndarray, radii: np.ndarray, colours: list[str], occluders: np.ndarray,
    height: int, width: int, background: tuple[int, int, int],
) -> np.ndarray:
    """One frame, uint8 [H, W, 3], from ball centres positions_t [n, 2] in pixels."""
    pos = np.asarray(positions_t, np.float32)[None]
    return render_frames(pos, radii, colours, occluders, height, width, background)[0]


def visibility(positions: np.ndarray, occluders: np.ndarray) -> np.ndarray:
    """bool [T, n]: True unless the ball centre (positions [T, n, 2]) is inside an occluder."""
    positions = np.asarray(positions)
    hidden = np.zeros(positions.shape[:2], bool)
    for x0, y0, x1, y1 in np.asarray(occluders).reshape(-1, 4):
        x, y = positions[..., 0], positions[..., 1]
        hidden |= (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
    return ~hidden


def _direction(d: np.ndarray) -> str:
    """'left'/'right'/'up'/'down' for the dominant travel of per-frame steps d [T-1, 2]."""
    travel = np.abs(d).sum(axis=0)
    axis = 0 if travel[0] >= travel[1] else 1
    plus, minus = d[:, axis].clip(min=0).sum(), (-d[:, axis]).clip(min=0).sum()
    return (("right", "left"), ("down", "up"))[axis][0 if plus >= minus else 1]


def describe_motion(
    pos: np.ndarray, vel: np.ndarray, radius: float, height: int, fps: float, gravity: float
) -> str:
    """The motion phrase for one ball from its track pos, vel [T, 2] (pixels, pixels/s).

    A floor bounce is a down->up flip of the vertical velocity between consecutive frames while
    the ball is close enough to have touched the floor in that interval; it counts when the ball
    was at least 0.15 height above the floor since the previous flip (small hops from collisions
    on the floor do not). Only the sign of gravity matters.
    """
    dt = 1.0 / fps
    steps = np.diff(pos, axis=0)
    path = float(np.hypot(steps[:, 0], steps[:, 1]).sum())
    near = max(1.0, 0.05 * height)  # px: "not going anywhere" / "touching the floor"
    if path < near:
        return "rests"
    if gravity <= 0:
        return f"moves {_direction(steps)}"
    vy = vel[:, 1]
    gap = height - (pos[:, 1] + radius)  # [T] distance from the floor
    slow, rise = 0.05 * height, 0.15 * height  # px/s, px
    flips = (vy[:-1] > slow) & (vy[1:] < -slow)
    flips &= np.minimum(gap[:-1], gap[1:]) <= (np.abs(vy[:-1]) + np.abs(vy[1:])) * dt + 1.0
    bounces, since = 0, 0
    for t in np.flatnonzero(flips).tolist():
        bounces += int(gap[since : t + 1].max() >= rise)
        since = t + 1
    if gap[0] <= near and gap.max() < rise:
        return f"rolls {_direction(steps * np.array([1.0, 0.0]))}"
    thrown = vy[0] < -slow and pos[0, 1] - pos[:, 1].min() > 0.03 * height
    if thrown or gap[0] <= near:
        return "flies up and falls"
    if bounces:
        return f"falls and bounces {_COUNTS.get(bounces, 'many times')}"
    if vy.max() > slow:
        return "falls"
    return f"moves {_direction(steps)}"


def make_caption(
    colours: list[str], radii: np.ndarray, positions: np.ndarray, velocities: np.ndarray,
    visible: np.ndarray, height: int, fps: float, gravity: float,
    radius_range: tuple[float, float] = (0.06, 0.14), max_words: int | None = 31,
) -> str:
    """Caption from trajectories: per ball "a {small|large} {colour} ball {motion}", "; "-joined.

    radii [n] pixels; positions, velocities [T, n, 2] pixels and pixels/s; visible bool [T, n].
    Sizes split radius_range (fractions of height) in thirds; medium balls get no size word.
    " behind a grey bar" is appended for a ball hidden in some frame. Words: VOCABULARY.
    Over max_words words (the text encoder's budget), size words are dropped, then trailing
    balls, so that the caption stays a true (if partial) description.
    """
    positions, velocities = np.asarray(positions, np.float64), np.asarray(velocities, np.float64)
    lo, hi = radius_range
    balls = []
    for b, colour in enumerate(colours):
        frac = (float(radii[b]) / height - lo) / max(hi - lo, 1e-9)
        size = _SIZES[0] if frac < 1 / 3 else _SIZES[2] if frac > 2 / 3 else ""
        motion = describe_motion(
            positions[:, b], velocities[:, b], float(radii[b]), height, fps, gravity
        )
        hidden = "" if np.all(visible[:, b]) else "behind a grey bar"
        balls.append((size, colour, f"ball {motion} {hidden}".strip()))

    def join(sized: bool, n: int) -> str:
        texts = [" ".join(w for w in (s if sized else "", c, rest) if w) for s, c, rest in balls]
        return "; ".join(("an " if t[0] in "aeiou" else "a ") + t for t in texts[:n])

    for sized, n in [(True, len(balls)), *((False, k) for k in range(len(balls), 0, -1))]:
        caption = join(sized, n)
        if max_words is None or len(caption.replace(";", " ").split()) <= max_words:
            break
    return caption


def _initial_state(
    cfg: WorldConfig, rng: np.random.Generator
) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """colours, radii [n], pos [n, 2], vel [n, 2] in pixels; balls inside and not overlapping."""
    h, w = float(cfg.height), float(cfg.width)
    n = int(rng.integers(cfg.min_balls, cfg.max_balls + 1))
    colours = [str(c) for c in rng.choice(cfg.colours, n, replace=n > len(cfg.colours))]
    radii = rng.uniform(*cfg.radius_range, size=n) * h
    if cfg.colour_radius:  # the same draw, mapped into the colour's range: no extra rng calls
        lo, hi = cfg.radius_range
        u = (radii / h - lo) / max(hi - lo, 1e-9)
        for b, c in enumerate(colours):
            for name, clo, chi in cfg.colour_radius:
                if name == c:
                    radii[b] = (clo + u[b] * (chi - clo)) * h
    slo, shi = cfg.speed_range
    pos, vel = np.zeros((n, 2)), np.zeros((n, 2))
    for b in range(n):
        kind = rng.choice(["roll", "drop", "throw", "rest"], p=[0.3, 0.35, 0.25, 0.1])
        speed = rng.uniform(slo, shi) * h
        sign = rng.choice([-1.0, 1.0])
        for attempt in range(400):
            r = radii[b] = radii[b] * (0.9 if attempt and attempt % 40 == 0 else 1.0)
            x = rng.uniform(r, max(r, w - r))
            if cfg.gravity <= 0:
                y = rng.uniform(r, max(r, h - r))
                angle = rng.uniform(0, 2 * np.pi)
                v = speed * np.array([np.cos(angle), np.sin(angle)]) * (kind != "rest")
            elif kind in ("roll", "rest"):
                y, v = h - r, np.array([sign * speed * (kind == "roll"), 0.0])
            elif kind == "drop":
                y = rng.uniform(r, max(r, 0.5 * h))
                v = np.array([sign * speed * rng.uniform(0, 0.5), 0.0])
            else:
                y = rng.uniform(max(r, 0.5 * h), h - r)
                up = rng.uniform(slo + 0.5 * (shi - slo), shi) * h
                v = np.array([sign * speed * rng.uniform(0, 0.5), -up])
            gaps = np.hypot(pos[:b, 0] - x, pos[:b, 1] - y) - radii[:b] - r
            if np.all(gaps > 0.5):
                break
        pos[b], vel[b] = (x, y), v
    return colours, radii, pos, vel


def _occluder(cfg: WorldConfig, rng: np.random.Generator) -> np.ndarray:
    """float32 [k, 4] rectangles, k in {0, 1}: a vertical or horizontal grey bar."""
    if rng.random() >= cfg.occluder_prob:
        return np.zeros((0, 4), np.float32)
    h, w = float(cfg.height), float(cfg.width)
    if rng.random() < 0.7:  # vertical bar
        bw, bh = rng.uniform(0.08, 0.16) * w, rng.uniform(0.5, 1.0) * h
    else:
        bw, bh = rng.uniform(0.4, 0.8) * w, rng.uniform(0.08, 0.16) * h
    x0, y0 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
    return np.array([[x0, y0, x0 + bw, y0 + bh]], np.float32)


def simulate(cfg: WorldConfig, seed: int) -> Clip:
    """Simulate and render one clip; deterministic in (cfg, seed) via np.random.default_rng."""
    rng = np.random.default_rng(seed)
    colours, radii, pos, vel = _initial_state(cfg, rng)
    occluders = _occluder(cfg, rng)
    h, w = cfg.height, cfg.width
    dt = 1.0 / (cfg.fps * cfg.substeps)
    g = cfg.gravity * h
    positions = np.empty((cfg.frames, len(radii), 2))
    velocities = np.empty_like(positions)
    for t in range(cfg.frames):
        if t:
            for _ in range(cfg.substeps):
                pos, vel = step(pos, vel, radii, dt, g, w, h)
        positions[t], velocities[t] = pos, vel
    positions, velocities = positions.astype(np.float32), velocities.astype(np.float32)
    radii = radii.astype(np.float32)
    visible = visibility(positions, occluders)
    caption = make_caption(
        colours, radii, positions, velocities, visible, h, cfg.fps, cfg.gravity, cfg.radius_range
    )
    frames = render_frames(positions, radii, colours, occluders, h, w, cfg.background)
    return Clip(frames, caption, colours, radii, positions, velocities, visible, occluders, seed)
