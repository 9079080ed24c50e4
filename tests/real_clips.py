"""Real-content test clips: slow pans and zooms over scikit-image's sample photographs (shipped
in its wheel, no download), written as mp4 with PyAV, plus a captions.jsonl.

Used by tests/test_real_data.py and tests/test_captions.py; docs/real-data.md follows the same
folder layout: clips/*.mp4 + captions.jsonl with `path` and `caption` per line.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

T5_FIXTURE = Path(__file__).parent / "fixtures" / "t5" / "t5_v11"

# (photograph, caption): real captions, with words far outside the physics vocabulary.
PHOTOS = (
    ("astronaut", "a slow camera pan over a portrait of an astronaut in a white suit"),
    ("chelsea", "a tabby cat looks at the camera while the view zooms in"),
    ("coffee", "a cup of coffee on a saucer, seen from above, drifting to the right"),
    ("rocket", "a rocket stands on the launch pad under a blue sky"),
    ("immunohistochemistry", "microscope image of stained tissue, the camera pans down"),
    ("colorwheel", "a colour wheel slowly rotating into view, 1080p, très lent"),
)


def photo(name: str) -> np.ndarray:
    """uint8 [H, W, 3] of a scikit-image sample photograph."""
    import skimage.data

    image = getattr(skimage.data, name)()
    return np.ascontiguousarray(image[..., :3])


def pan_zoom(image: np.ndarray, frames: int, size: tuple[int, int], seed: int) -> np.ndarray:
    """uint8 [frames, h, w, 3]: a crop that moves and shrinks across the photograph (a camera
    pan with a slow zoom), resized by nearest-neighbour sampling."""
    rng = np.random.default_rng(seed)
    big_h, big_w = image.shape[:2]
    h, w = size
    zoom0, zoom1 = rng.uniform(0.6, 0.9), rng.uniform(0.35, 0.55)
    start, end = rng.uniform(0, 1, 2), rng.uniform(0, 1, 2)
    out = np.empty((frames, h, w, 3), np.uint8)
    for f in range(frames):
        a = f / max(frames - 1, 1)
        z = zoom0 + a * (zoom1 - zoom0)
        ch, cw = max(int(big_h * z), h), max(int(big_w * z * w / h * big_h / big_w), w)
        ch, cw = min(ch, big_h), min(cw, big_w)
        y0 = int((start[0] + a * (end[0] - start[0])) * (big_h - ch))
        x0 = int((start[1] + a * (end[1] - start[1])) * (big_w - cw))
        ys = y0 + (np.arange(h) * ch // h)
        xs = x0 + (np.arange(w) * cw // w)
        out[f] = image[ys[:, None], xs[None, :]]
    return out


def make_clips(folder: Path, *, frames: int = 12, sizes=((48, 48), (40, 64)),
               long_caption: bool = True) -> Path:
    """Write one mp4 per photograph under folder/clips (alternating the `sizes`) and
    folder/captions.jsonl; -> the captions file. With `long_caption`, the last caption is far
    longer than any small text.max_length (it gets truncated)."""
    from vdit.data.video_io import write_mp4

    clips = folder / "clips"
    clips.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (name, caption) in enumerate(PHOTOS):
        video = pan_zoom(photo(name), frames, sizes[i % len(sizes)], seed=i)
        write_mp4(clips / f"{name}.mp4", video, 8.0)
        if long_caption and i == len(PHOTOS) - 1:
            caption = " ".join([caption] * 6)
        rows.append({"path": f"{name}.mp4", "caption": caption, "license": "scikit-image "
                     "sample data (BSD-3-Clause / public domain)"})
    captions = folder / "captions.jsonl"
    captions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return captions
