"""Physics metrics of one tracked clip against the simulator's ground truth.

A continuation is given the first `start` video frames and generates the rest; a quantity counts
when the newest frame it uses is generated, so the given frames serve only as initial conditions.
Units are the world's: lengths in frame heights (h), time in seconds.

- found: the fraction of generated ball-frames in which the tracker found the ball at all.
- velocity error: |v_tracked - v_true| per ball and frame pair, finite differences of centres
  (h/s), over pairs where the tracker saw the ball whole in both frames.
- speed ratio: sum |v_tracked| / sum |v_true| over the same pairs: below 1, the generated balls
  move slower than the simulator's (a model that pulls unseen speeds back to its training
  range); NaN if the true balls barely move there.
- gravity: one curvature shared by every free-flight arc of the clip (arcs from the ground
  truth: no wall, ball or floor contact), each arc with its own offset and slope, fitted by
  least squares to the tracked heights; error |g_fit - g| / g.
- radius drift: |r_t / r_given - 1| averaged over generated frames, r_given the tracked radius
  in the given frames (the tracker's own bias cancels).
- object permanence: a ball missing in a generated frame is hidden when its last sighting lies
  within its radius + `HIDE_REACH` of the occluder, else it vanished; blobs of colours that are
  not the clip's balls appeared. Either is a permanence failure.
- re-emergence error: where the tracked ball is, the first frame the true one is clear of the
  occluder again after hiding behind it (h); a ball not found there has not re-emerged.
- energy change across collisions: kinetic energy (m ~ r^2) of the balls in a collision, from
  finite differences just before and after it; error |dE/E tracked - dE/E true|.
"""

from __future__ import annotations

import numpy as np

from vdit.data.physics import Clip, masses
from vdit.eval.tracker import MISSING, VISIBLE, Tracks

HIDE_REACH = 0.25  # frame heights a hidden ball may have travelled from the occluder's edge
_SUPPORTED = 1e-3  # px: a centre this close to radius-above-the-floor rests on the floor


def _rect_distance(p: np.ndarray, rects: np.ndarray) -> np.ndarray:
    """Distance from points p [..., 2] to the nearest rectangle of rects [k, 4]; inf if k = 0."""
    if not len(rects):
        return np.full(p.shape[:-1], np.inf)
    x0, y0, x1, y1 = (rects[:, i] for i in range(4))
    dx = np.maximum(np.maximum(x0 - p[..., 0, None], 0), p[..., 0, None] - x1)
    dy = np.maximum(np.maximum(y0 - p[..., 1, None], 0), p[..., 1, None] - y1)
    return np.hypot(dx, dy).min(axis=-1)


def contact_windows(clip: Clip, height: int, fps: float, gravity: float) -> np.ndarray:
    """bool [T, n]: True at frame t (1 <= t < T-1) where ball b's true motion over (t-1, t+1)
    is not free fall (or rest on the floor): a collision with a wall, the floor or a ball."""
    pos = np.asarray(clip.positions, np.float64)
    g = gravity * height / fps**2  # px per frame^2
    acc = pos[2:] - 2 * pos[1:-1] + pos[:-2]  # [T-2, n, 2]
    floor = height - clip.radii.astype(np.float64)
    on_floor = (pos[:-2, :, 1] >= floor - _SUPPORTED) & (pos[2:, :, 1] >= floor - _SUPPORTED)
    expect_y = np.where(on_floor & (pos[1:-1, :, 1] >= floor - _SUPPORTED), 0.0, g)
    dev = np.hypot(acc[..., 0], acc[..., 1] - expect_y)
    out = np.zeros(pos.shape[:2], bool)
    out[1:-1] = dev > 0.05 * g + 0.02
    return out


def _fd(p: np.ndarray) -> np.ndarray:
    return p[1:] - p[:-1]


def _generated_pairs_seen_whole(tracks: Tracks, start: int) -> np.ndarray:
    """[T-1, balls]: frame pairs (t, t+1) with t+1 generated and the ball seen whole in both."""
    ok = (tracks.state[1:] == VISIBLE) & (tracks.state[:-1] == VISIBLE)
    ok[: max(start - 1, 0)] = False
    return ok


def velocity_error(tracks: Tracks, clip: Clip, start: int, height: int, fps: float) -> float:
    """Mean |v_tracked - v_true| in h/s over generated frame pairs seen whole; NaN if none."""
    ok = _generated_pairs_seen_whole(tracks, start)
    err = np.linalg.norm(_fd(tracks.centres) - _fd(clip.positions.astype(np.float64)), axis=-1)
    return float(err[ok].mean() * fps / height) if ok.any() else float("nan")


def speed_ratio(tracks: Tracks, clip: Clip, start: int) -> float:
    """sum |v_tracked| / sum |v_true| over generated frame pairs seen whole; NaN if none, or
    if the true balls move less than a pixel per frame in total there."""
    ok = _generated_pairs_seen_whole(tracks, start)
    tracked = np.linalg.norm(_fd(tracks.centres), axis=-1)[ok].sum()
    true = np.linalg.norm(_fd(clip.positions.astype(np.float64)), axis=-1)[ok].sum()
    return float(tracked / true) if true >= 1.0 else float("nan")


def fit_gravity(tracks: Tracks, clip: Clip, start: int, height: int, fps: float,
                gravity: float) -> float:
    """Fitted downward acceleration in h/s^2 from free-flight arcs; NaN without a usable arc."""
    contact = contact_windows(clip, height, fps, gravity)
    floor = height - clip.radii.astype(np.float64)
    rows, ys, arcs = [], [], 0
    t_all = np.arange(len(contact), dtype=np.float64)
    for b in range(contact.shape[1]):
        free = ~contact[:, b]
        free[0] = free[-1] = False  # window centres only
        free &= clip.positions[:, b, 1] < floor[b] - _SUPPORTED  # resting balls carry no g
        centres = np.flatnonzero(free)
        if not len(centres):
            continue
        for run in np.split(centres, np.flatnonzero(np.diff(centres) > 1) + 1):
            frames = np.arange(run[0] - 1, run[-1] + 2)
            frames = frames[(frames >= start - 2) & (tracks.state[frames, b] == VISIBLE)]
            if len(frames) < 3 or frames.max() < start:
                continue
            for f in frames:
                row = np.zeros(1 + 2 * (arcs + 1))
                row[0], row[1 + 2 * arcs], row[2 + 2 * arcs] = t_all[f] ** 2 / 2, 1.0, t_all[f]
                rows.append(row)
                ys.append(tracks.centres[f, b, 1])
            arcs += 1
    if not arcs:
        return float("nan")
    width = 1 + 2 * arcs
    a = np.stack([np.pad(r, (0, width - len(r))) for r in rows])
    coef, *_ = np.linalg.lstsq(a, np.asarray(ys), rcond=None)
    return float(coef[0] * fps**2 / height)


def permanence(tracks: Tracks, clip: Clip, start: int, height: int) -> dict:
    """{"vanished": balls missing unexplained by the occluder, "appeared": most extra blobs in a
    generated frame, "count_error": mean |balls accounted for - n| + extra per generated frame,
    "failure": either happened}."""
    n = tracks.state.shape[1]
    vanished, accounted = set(), []
    for t in range(start, len(tracks.state)):
        here = 0
        for b in range(n):
            if tracks.state[t, b] != MISSING:
                here += 1
                continue
            seen = np.flatnonzero(tracks.state[:t, b] != MISSING)
            if len(seen):
                reach = tracks.radii[seen[-1], b] + HIDE_REACH * height
                if _rect_distance(tracks.centres[seen[-1], b], clip.occluders) <= reach:
                    here += 1
                    continue
            vanished.add(b)
        accounted.append(abs(here - n) + int(tracks.extra[t]))
    appeared = int(tracks.extra[start:].max()) if len(tracks.extra) > start else 0
    return {"vanished": len(vanished), "appeared": appeared,
            "count_error": float(np.mean(accounted)) if accounted else float("nan"),
            "failure": bool(vanished or appeared)}


def reemergence(tracks: Tracks, clip: Clip, start: int, height: int) -> tuple[list[float], int]:
    """(errors in h of re-emerged balls, count not re-emerged) over true occlusion events whose
    clear-again frame is generated."""
    errors, missed = [], 0
    clear = _rect_distance(clip.positions.astype(np.float64), clip.occluders) > clip.radii
    for b in range(clip.positions.shape[1]):
        hidden = np.flatnonzero(~clip.visible[:, b])
        for run in np.split(hidden, np.flatnonzero(np.diff(hidden) > 1) + 1) if len(hidden) else []:
            after = np.flatnonzero(clear[run[-1] + 1:, b])
            if not len(after) or run[-1] + 1 + after[0] < start:
                continue
            f = run[-1] + 1 + after[0]
            if tracks.state[f, b] == MISSING:
                missed += 1
            else:
                errors.append(float(np.linalg.norm(tracks.centres[f, b] - clip.positions[f, b])
                                    / height))
    return errors, missed


def energy_errors(tracks: Tracks, clip: Clip, start: int, height: int, fps: float,
                  gravity: float) -> list[float]:
    """|dE/E tracked - dE/E true| per collision whose after-frame is generated."""
    contact = contact_windows(clip, height, fps, gravity)
    m = masses(clip.radii)
    true = clip.positions.astype(np.float64)
    t_len, out = len(contact), []
    events = np.flatnonzero(contact.any(axis=1))
    for run in np.split(events, np.flatnonzero(np.diff(events) > 1) + 1) if len(events) else []:
        # Velocities over (before - 1, before) and (after, after + 1): free flight on both sides.
        before, after = run[0] - 1, run[-1] + 1
        if before < 1 or after + 1 >= t_len or after + 1 < start:
            continue
        balls = np.flatnonzero(contact[run].any(axis=0))
        frames = [before - 1, before, after, after + 1]
        if np.any(tracks.state[np.ix_(frames, balls)] != VISIBLE):
            continue
        tracked = _energy_change(tracks.centres, m, balls, before, after)
        out.append(abs(tracked - _energy_change(true, m, balls, before, after)))
    return out


def _energy_change(p: np.ndarray, m: np.ndarray, balls: np.ndarray, before: int,
                   after: int) -> float:
    """Relative change of sum(m |v|^2) of `balls` from (before-1, before) to (after, after+1)."""
    v0, v1 = p[before, balls] - p[before - 1, balls], p[after + 1, balls] - p[after, balls]
    e0 = np.sum(m[balls] * np.sum(v0 * v0, -1))
    return float((np.sum(m[balls] * np.sum(v1 * v1, -1)) - e0) / max(e0, 1e-9))


def clip_metrics(tracks: Tracks, clip: Clip, start: int, height: int, fps: float,
                 gravity: float) -> dict:
    """All metrics of one clip (see the module docstring); NaN where a metric had no data."""
    g_fit = fit_gravity(tracks, clip, start, height, fps, gravity)
    drift = []
    for b in range(tracks.state.shape[1]):
        ref = tracks.radii[:start, b][tracks.state[:start, b] == VISIBLE]
        gen = tracks.radii[start:, b][tracks.state[start:, b] == VISIBLE]
        if len(ref) and len(gen):
            drift.extend(np.abs(gen / np.median(ref) - 1).tolist())
    re_err, re_missed = reemergence(tracks, clip, start, height)
    energy = energy_errors(tracks, clip, start, height, fps, gravity)
    return {
        "found": float(np.mean(tracks.state[start:] != MISSING)),
        "velocity_error": velocity_error(tracks, clip, start, height, fps),
        "speed_ratio": speed_ratio(tracks, clip, start),
        "gravity_fit": g_fit,
        "gravity_error": abs(g_fit - gravity) / gravity if gravity > 0 else abs(g_fit),
        "radius_drift": float(np.mean(drift)) if drift else float("nan"),
        **permanence(tracks, clip, start, height),
        "reemergence_errors": re_err, "reemergence_missed": re_missed,
        "energy_errors": energy,
    }


def split_mean(result: dict, source: str, ood: bool, key: str) -> float:
    """A metric of one source, in-distribution or averaged over the out-of-distribution
    splits (those with data)."""
    vals = [r[key] for r in result["rows"] if r["source"] == source
            and (r["split"] != "in_distribution") == ood and np.isfinite(r[key])]
    return float(np.mean(vals)) if vals else float("nan")
