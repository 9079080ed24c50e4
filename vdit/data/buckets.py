"""Fitting a decoded video to a bucket of (frames, height, width): resample the frame rate,
choose the bucket nearest in aspect ratio among those the clip is long enough for, scale to
cover it and centre-crop (never stretch).

Still images are one-frame clips and go to one-frame buckets (`1x256x256`); videos go to the
buckets of more than one frame, or, when only one-frame buckets are listed, give their first
frame (image-only pretraining from video)."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

Bucket = tuple[int, int, int]


class SkipClip(ValueError):
    """An input that cannot become a clip; `reason` is the key it is counted under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def parse_buckets(text: str) -> list[Bucket]:
    """"16x32x32,8x32x64" -> [(16, 32, 32), (8, 32, 64)] (frames x height x width)."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        dims = part.lower().split("x")
        if len(dims) != 3 or not all(d.isdigit() and int(d) > 0 for d in dims):
            raise ValueError(f"bucket {part!r}: expected FRAMESxHEIGHTxWIDTH, e.g. 16x32x32")
        out.append(tuple(int(d) for d in dims))
    if not out:
        raise ValueError("no buckets given")
    return out  # type: ignore[return-value]


def resample_fps(frames: np.ndarray, fps_in: float, fps_out: float) -> np.ndarray:
    """[T, H, W, 3] at fps_in -> frames at fps_out (nearest earlier frame; no blending, so
    motion stays sharp). Frame k of the output shows time k / fps_out."""
    if fps_in <= 0:
        raise SkipClip("unknown_fps", f"source fps {fps_in}")
    duration = len(frames) / fps_in
    count = max(math.floor(duration * fps_out + 1e-6), 0)
    idx = np.minimum(np.floor(np.arange(count) * fps_in / fps_out + 1e-6).astype(int),
                     len(frames) - 1)
    return frames[idx]


def choose_bucket(frames: int, height: int, width: int, buckets: list[Bucket],
                  still: bool = False) -> Bucket:
    """The bucket nearest in aspect ratio (log scale) among those with at most `frames`
    frames; ties go to the longest, then the largest. A `still` image takes one-frame buckets
    only; a video takes the others, if any are listed."""
    videos = [b for b in buckets if b[0] > 1]
    if still:
        buckets = [b for b in buckets if b[0] == 1]
        if not buckets:
            raise SkipClip("no_image_bucket", "a still image needs a one-frame bucket, e.g. "
                           "1x256x256")
    elif videos:
        buckets = videos
    fits = [b for b in buckets if b[0] <= frames]
    if not fits:
        raise SkipClip("too_short", f"{frames} frames, shortest bucket has "
                       f"{min(b[0] for b in buckets)}")
    aspect = math.log(width / height)
    return min(fits, key=lambda b: (round(abs(math.log(b[2] / b[1]) - aspect), 6),
                                    -b[0], -b[1] * b[2]))


def fit_to_bucket(frames: np.ndarray, bucket: Bucket) -> np.ndarray:
    """uint8 [T, H, W, 3] -> uint8 [F, Hb, Wb, 3]: the first F frames, scaled (keeping the
    aspect ratio) to cover Hb x Wb, centre-cropped."""
    f, hb, wb = bucket
    t, h, w, _ = frames.shape
    if t < f:
        raise SkipClip("too_short", f"{t} frames < {f}")
    scale = max(hb / h, wb / w)
    sh, sw = max(hb, round(h * scale)), max(wb, round(w * scale))
    top, left = (sh - hb) // 2, (sw - wb) // 2
    out = np.empty((f, hb, wb, 3), np.uint8)
    for i in range(f):
        img = Image.fromarray(frames[i])
        if (sh, sw) != (h, w):
            img = img.resize((sw, sh), Image.Resampling.BICUBIC, reducing_gap=2.0)
        out[i] = np.asarray(img)[top: top + hb, left: left + wb]
    return out


def prepare_clip(frames: np.ndarray, fps_in: float, fps_out: float | None,
                 buckets: list[Bucket]) -> tuple[np.ndarray, Bucket]:
    """Resample (if fps_out), choose the bucket, fit: -> (uint8 [F, Hb, Wb, 3], bucket).
    fps_in 0 marks a still image (one frame, vdit/data/sources.py): never resampled."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise SkipClip("zero_frames" if frames.size == 0 else "bad_shape", str(frames.shape))
    still = fps_in == 0 and len(frames) == 1
    if fps_out is not None and not still and abs(fps_in - fps_out) > 1e-6:
        frames = resample_fps(frames, fps_in, fps_out)
    bucket = choose_bucket(*frames.shape[:3], buckets, still=still)
    return fit_to_bucket(frames, bucket), bucket
