"""Video files: mp4 through PyAV (bundled libx264), GIF grids through Pillow."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from vdit.io.atomic import atomic_path


def upscale(frames: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling of uint8 [T, H, W, 3] by an integer factor."""
    if factor <= 1:
        return frames
    return frames.repeat(factor, axis=1).repeat(factor, axis=2)


def display_scale(height: int, width: int, target: int = 256) -> int:
    """The integer factor that brings the short side to at least `target` pixels."""
    return max(1, math.ceil(target / min(height, width)))


def write_mp4(path: str | Path, frames: np.ndarray, fps: float, *, crf: int = 18,
              metadata: dict[str, str] | None = None) -> Path:
    """Write uint8 [T, H, W, 3] (H, W even) as H.264 mp4. Written to a temp name, then renamed,
    so a crash never leaves a half-written file under the final name."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"write_mp4 expects uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"H.264 needs even height and width, got {frames.shape[1:3]}")
    path = Path(path)
    with atomic_path(path) as tmp, av.open(str(tmp), mode="w", format="mp4") as container:
        for k, v in (metadata or {}).items():
            container.metadata[k] = v
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def read_video(path: str | Path) -> tuple[np.ndarray, float]:
    """Decode a video file -> (uint8 [T, H, W, 3], fps). Raises ValueError if unreadable."""
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.base_rate or 0)
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    except (av.error.FFmpegError, IndexError) as e:
        raise ValueError(f"{path}: cannot decode video: {e}") from None
    if not frames:
        raise ValueError(f"{path}: no frames")
    return np.stack(frames), fps


def tile(videos: np.ndarray, columns: int, gap: int = 2) -> np.ndarray:
    """uint8 [N, T, H, W, 3] -> one video [T, rows*(H+gap)-gap, cols*(W+gap)-gap, 3]."""
    n, t, h, w, _ = videos.shape
    rows = math.ceil(n / columns)
    out = np.full((t, rows * (h + gap) - gap, columns * (w + gap) - gap, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        out[:, r * (h + gap): r * (h + gap) + h, c * (w + gap): c * (w + gap) + w] = videos[i]
    return out


def write_gif(path: str | Path, frames: np.ndarray, fps: float) -> Path:
    """uint8 [T, H, W, 3] -> looping GIF."""
    images = [Image.fromarray(f) for f in frames]
    path = Path(path)
    with atomic_path(path) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:],
                       duration=max(round(1000 / fps), 20), loop=0)
    return path
