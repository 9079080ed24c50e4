"""Real-content clips for `vdit eval-ae --videos`: slow pans and zooms over the photographs that
scikit-image ships (no download), written as mp4, plus one still image per photograph.

    python tools/photo_clips.py OUT [--frames 17] [--size 128x128] [--size 96x160] [--still 256x384]

Clips alternate the --size values; the stills (png, from the same photographs, a larger size)
exercise the image path and, above `autoencoder.tile`, tiling. The pan/zoom is
tests/real_clips.py's, which the tests use too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def _size(text: str) -> tuple[int, int]:
    h, w = text.lower().split("x")
    return int(h), int(w)


def make(out: Path, frames: int, sizes: list[tuple[int, int]], still: tuple[int, int]) -> None:
    """Write OUT/NAME.mp4 (frames x size) and OUT/NAME.png (still) for each photograph."""
    from PIL import Image

    sys.path.insert(0, str(ROOT / "tests"))
    from real_clips import pan_zoom, photo

    from vdit.data.video_io import write_mp4

    out.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(PHOTOS):
        image = photo(name)
        write_mp4(out / f"{name}.mp4", pan_zoom(image, frames, sizes[i % len(sizes)], seed=i),
                  8.0, crf=12)
        Image.fromarray(pan_zoom(image, 1, still, seed=10 + i)[0]).save(out / f"{name}.png")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--size", type=_size, action="append", default=None)
    p.add_argument("--still", type=_size, default=(256, 384))
    a = p.parse_args()
    make(Path(a.out), a.frames, a.size or [(128, 128), (96, 160)], a.still)


if __name__ == "__main__":
    main()
