"""Track the physics world's balls in any video by colour: centroid and radius per frame.

Every ball of a clip has its own palette colour, and the renderer blends it over the background
with an anti-aliased edge. A pixel is therefore (close to) background + a * (colour -
background) for one colour, a in [0, 1] its coverage: the tracker projects each pixel onto every
palette colour's line, assigns it to the colour it lies closest to, and takes the coverage-
weighted centroid of the largest connected blob of that colour. The covered area gives the
radius: a disc of radius r with the renderer's one-pixel ramp covers pi (r^2 + 1/12) pixels.

Occlusion: the grey occluder bar is found from the frames themselves (pixels that are grey in
most frames). A ball whose blob touches it, or whose area drops well below its usual area, is
PARTIAL (centroid biased, not used for velocities); a ball not found is MISSING, which the
metrics then judge as hidden (near the occluder) or vanished.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from vdit.data.physics import GREY, PALETTE

MISSING, PARTIAL, VISIBLE = 0, 1, 2
_MIN_COVER = 0.2  # a blob's seed pixels; its soft edge joins through one dilation
_MIN_AREA = 1.0  # px of coverage below which a colour counts as absent
_EIGHT = np.ones((3, 3), bool)


@dataclass
class Tracks:
    """What the tracker saw, for n balls over T frames (pixels; x right, y down)."""

    centres: np.ndarray  # float64 [T, n, 2]; NaN where MISSING
    radii: np.ndarray  # float64 [T, n]; NaN where MISSING
    area: np.ndarray  # float64 [T, n] covered pixels; 0 where MISSING
    state: np.ndarray  # int8 [T, n]: VISIBLE, PARTIAL or MISSING
    extra: np.ndarray  # int64 [T]: blobs of palette colours that are not the clip's balls
    occluder: np.ndarray  # bool [H, W]: the occluder as found in the frames


def coverage(frames: np.ndarray, background: tuple[int, int, int]
             ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(names, label [T, H, W] int index into names or -1, cover [T, H, W] in [0, 1]).

    names are the palette colours then "grey"; each pixel of uint8 frames [T, H, W, 3] goes to
    the colour whose background-to-colour line passes closest (within a tolerance), with its
    position along that line as coverage.
    """
    names = [*PALETTE, "grey"]
    bg = np.asarray(background, np.float32)
    f = np.asarray(frames, np.float32) - bg  # [T, H, W, 3]
    dirs = np.asarray([*PALETTE.values(), GREY], np.float32) - bg  # [K, 3]
    norm2 = np.sum(dirs * dirs, axis=-1)  # [K]
    a = np.einsum("thwc,kc->thwk", f, dirs) / norm2  # [T, H, W, K]
    resid = np.linalg.norm(f[..., None, :] - a[..., None] * dirs, axis=-1)  # [T, H, W, K]
    # Outside a in (0.05, 1.3) a colour cannot explain the pixel; the tolerance scales with the
    # colour's distance from the background so dim blends of bright colours still count.
    tol = np.maximum(24.0, 0.2 * np.sqrt(norm2))
    ok = (a > 0.05) & (a < 1.3) & (resid < tol)
    score = np.where(ok, resid / tol, np.inf)
    best = np.argmin(score, axis=-1)
    found = np.isfinite(np.take_along_axis(score, best[..., None], -1)[..., 0])
    label = np.where(found, best, -1)
    cover = np.clip(np.take_along_axis(a, best[..., None], -1)[..., 0], 0.0, 1.0) * found
    return names, label, cover


def _blob(mask: np.ndarray, seed: np.ndarray, cover: np.ndarray) -> np.ndarray | None:
    """The largest (by coverage) 8-connected blob of seed [H, W], grown by one pixel into
    mask [H, W] (its soft edge); None when there is none."""
    labels, count = ndimage.label(seed, structure=_EIGHT)
    if not count:
        return None
    mass = ndimage.sum(cover, labels, index=np.arange(1, count + 1))
    blob = labels == 1 + int(np.argmax(mass))
    return ndimage.binary_dilation(blob, structure=_EIGHT) & mask


def find_occluder(label: np.ndarray, cover: np.ndarray) -> np.ndarray:
    """bool [H, W]: pixels that are mostly grey in at least half of the frames [T, H, W]."""
    grey = (label == len(PALETTE)) & (cover > 0.5)
    return grey.mean(axis=0) >= 0.5


def rasterize(rects: np.ndarray, height: int, width: int) -> np.ndarray:
    """bool [H, W]: pixels a rectangle of rects [k, 4] (x0, y0, x1, y1) covers at least half."""
    ys, xs = np.mgrid[:height, :width] + 0.5
    out = np.zeros((height, width), bool)
    for x0, y0, x1, y1 in np.asarray(rects, np.float64).reshape(-1, 4):
        out |= (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)
    return out


def track(frames: np.ndarray, colours: list[str], background: tuple[int, int, int],
          occluders: np.ndarray | None = None, partial_ratio: float = 0.6,
          reference: int = 0) -> Tracks:
    """Track the balls `colours` (one ball per colour, as the world draws them) in uint8 frames
    [T, H, W, 3]. `occluders` [k, 4]: where the occluder is (a continuation keeps its given
    one); None finds it in the frames, which is ambiguous where a grey bar covers part of a
    ball (grey lies on the line from the background to white). A found ball is PARTIAL when its
    blob comes within two pixels of the occluder or its area is below `partial_ratio` of its
    median unoccluded area, taken over the first `reference` frames when they show it (a
    continuation's given frames: generated specks must not set the scale), else over all."""
    names, label, cover = coverage(frames, background)
    t, n = len(frames), len(colours)
    occluder = (find_occluder(label, cover) if occluders is None
                else rasterize(occluders, *frames.shape[1:3]))
    near_occluder = ndimage.binary_dilation(occluder, structure=_EIGHT, iterations=2)
    ys, xs = np.mgrid[: frames.shape[1], : frames.shape[2]] + 0.5
    centres = np.full((t, n, 2), np.nan)
    area = np.zeros((t, n))
    touching = np.zeros((t, n), bool)
    extra = np.zeros(t, np.int64)
    wanted = {names.index(c) for c in colours}
    for i in range(t):
        for b, colour in enumerate(colours):
            mask = label[i] == names.index(colour)
            blob = _blob(mask, mask & (cover[i] >= _MIN_COVER), cover[i])
            if blob is None:
                continue
            w = cover[i] * blob
            if w.sum() < _MIN_AREA:
                continue
            area[i, b] = w.sum()
            centres[i, b] = (np.sum(w * xs) / area[i, b], np.sum(w * ys) / area[i, b])
            touching[i, b] = bool(np.any(blob & near_occluder))
        # Balls that appear from nowhere: blobs of other palette colours as big as a small ball.
        # Not next to the occluder, where a ball's edge blended with grey can pass for another
        # colour.
        for k in set(range(len(PALETTE))) - wanted:
            mask = (label[i] == k) & (cover[i] >= _MIN_COVER) & ~near_occluder
            if mask.sum() >= 3:
                blob = _blob(label[i] == k, mask, cover[i])
                extra[i] += int(blob is not None and (cover[i] * blob).sum() >= 3.0)
    found = area > 0
    state = np.where(found, VISIBLE, MISSING).astype(np.int8)
    for b in range(n):
        clear = found[:, b] & ~touching[:, b]
        if clear[:reference].any():
            clear[reference:] = False
        ref = np.median(area[clear, b]) if clear.any() else np.nan
        shrunk = area[:, b] < partial_ratio * ref if np.isfinite(ref) else False
        state[found[:, b] & (touching[:, b] | shrunk), b] = PARTIAL
    radii = np.where(found, np.sqrt(np.maximum(area / np.pi - 1 / 12, 0.0)), np.nan)
    return Tracks(centres, radii, area, state, extra, occluder)
