"""Inputs of `vdit tokenize`: a folder of video files with captions (CSV or JSONL), a TFDS
dataset read with `tfds.data_source` (no TensorFlow), or the physics world. Each source is a
random-access list: `len(src)` items, `src.load(i)` -> RawClip, raising SkipClip (or any
error, counted as `unreadable`) for an input that cannot become a clip."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vdit.config import ConfigError
from vdit.data.buckets import SkipClip

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")  # still images: one-frame clips


def read_image(path: Path) -> np.ndarray:
    """uint8 [1, H, W, 3] of a still image (Pillow; EXIF rotation applied, alpha dropped)."""
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))[None]


@dataclass
class RawClip:
    frames: np.ndarray  # uint8 [T, H, W, 3]
    fps: float  # 0: a still image (one frame)
    caption: str
    source_id: str
    license: str


def _read_captions(path: Path) -> dict[str, dict]:
    """CSV with a header (`path`, `caption`, optional `license`) or JSONL with those keys."""
    rows: list[dict] = []
    if not path.is_file():
        raise ValueError(f"{path}: " + ("a folder, not a captions file" if path.is_dir()
                                        else "no such file"))
    if path.suffix == ".jsonl":
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not JSON: {e}") from None
    elif path.suffix == ".csv":
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        raise ValueError(f"{path}: captions must be .csv or .jsonl")
    if rows and not {"path", "caption"} <= set(rows[0]):
        raise ValueError(f"{path}: needs columns 'path' and 'caption', has {sorted(rows[0])}")
    if not rows:  # every video would be skipped as uncaptioned: refuse rather than write nothing
        raise ValueError(f"{path}: no captions in it")
    return {str(r["path"]): r for r in rows}


class FolderSource:
    """Every video file and still image under `root` (sorted), captioned by `captions` (path
    relative to root -> caption, licence). An image is a one-frame clip (fps 0)."""

    def __init__(self, root: str | Path, captions: str | Path, default_license: str = "unknown"):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: not a folder")
        self.captions = _read_captions(Path(captions))
        self.files = sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*")
                            if p.suffix.lower() in VIDEO_SUFFIXES + IMAGE_SUFFIXES)
        self.default_license = default_license

    def __len__(self) -> int:
        return len(self.files)

    def load(self, i: int) -> RawClip:
        from vdit.data.video_io import read_video

        name = self.files[i]
        row = self.captions.get(name)
        if row is None or not str(row.get("caption") or "").strip():
            raise SkipClip("missing_caption", name)
        try:
            if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                frames, fps = read_image(self.root / name), 0.0
            else:
                frames, fps = read_video(self.root / name)
        except ValueError as e:
            reason = "zero_frames" if str(e).endswith("no frames") else "unreadable"
            raise SkipClip(reason, str(e)) from None
        return RawClip(frames, fps, str(row["caption"]), name,
                       str(row.get("license") or self.default_license))


class TfdsSource:
    """A split of a TFDS dataset in array_record format, read without TensorFlow."""

    def __init__(self, name: str, data_dir: str | None, split: str = "train", *,
                 video_key: str = "frames", caption_key: str = "caption", fps: float = 8.0,
                 default_license: str = "unknown"):
        import tensorflow_datasets as tfds

        self.name, self.split = name, split
        try:
            self.source = tfds.data_source(name, split=split, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError:
            # tfds's own message lists every registered dataset: hundreds of lines.
            raise ConfigError(f"--tfds {name}: no TFDS dataset of that name (registered, or "
                              f"built under {data_dir or tfds.core.constants.DATA_DIR})"
                              ) from None
        self.video_key, self.caption_key, self.fps = video_key, caption_key, fps
        self.default_license = default_license

    def __len__(self) -> int:
        return len(self.source)

    def load(self, i: int) -> RawClip:
        ex = self.source[i]
        caption = ex.get(self.caption_key, b"")
        caption = caption.decode() if isinstance(caption, bytes) else str(caption)
        if not caption.strip():
            raise SkipClip("missing_caption", f"{self.name}[{i}]")
        frames = np.asarray(ex[self.video_key], np.uint8)
        fps = float(ex["fps"]) if "fps" in ex else self.fps
        return RawClip(frames, fps, caption, f"tfds:{self.name}/{self.split}[{i}]",
                       self.default_license)


class PhysicsSource:
    """Clips 0..n-1 of the physics world's training split (the data set vdit ships)."""

    def __init__(self, world, seed: int, num_clips: int):
        self.world, self.seed, self.num_clips = world, seed, num_clips

    def __len__(self) -> int:
        return self.num_clips

    def load(self, i: int) -> RawClip:
        from vdit.data.physics import simulate
        from vdit.data.pipeline import clip_seed

        seed = clip_seed(self.seed, "train", i)
        clip = simulate(self.world, seed)
        return RawClip(clip.frames, self.world.fps, clip.caption, f"physics:{seed}",
                       "vdit physics world (generated; Apache-2.0)")
