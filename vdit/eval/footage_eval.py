"""`vdit eval-ae PATH --videos DIR | --shards DIR`: reconstruction quality on the user's footage.

PATH is a trained vdit autoencoder (run directory or export) or a diffusers AutoencoderKLWan
folder. Clips come from a folder of videos and still images (each at its own resolution, the
first `frames` frames; a size the autoencoder cannot take is padded and cropped back, see
vdit/models/autoencoder.py) or from the clips behind a shard directory (each source re-read and
fitted to its record's bucket, as `vdit tokenize` did). A clip larger than `autoencoder.tile`
is encoded and decoded tiled (vdit/models/tiling.py), in bounded memory.

Metrics: PSNR and SSIM (vdit/eval/quality.py) on uint8 frames, per clip and their mean/min.
No perceptual metric: LPIPS and its relatives need network weights downloaded at first use,
which vdit does not do. Writes eval_ae.json (the physics evaluation's keys, plus per-clip rows)
and eval_ae.gif (the first clips beside their reconstructions).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from vdit.config import ConfigError
from vdit.data.buckets import prepare_clip
from vdit.data.sources import IMAGE_SUFFIXES, VIDEO_SUFFIXES, read_image
from vdit.data.video_io import display_scale, tile, upscale, write_gif
from vdit.eval.quality import psnr, ssim
from vdit.io.autoencoders import is_wan_folder, load_wan, wan_config
from vdit.io.run_dir import check_output_dir, load_autoencoder
from vdit.models.autoencoder import make_autoencoder
from vdit.models.tiling import decode_tiled, encode_tiled

GIF_CLIPS = 4


def load_any(path: str | Path):
    """(autoencoder, params) of a vdit autoencoder or a Wan folder."""
    if is_wan_folder(path):
        ae, params, _ = load_wan(wan_config(path))
    else:
        cfg, params, _ = load_autoencoder(path)
        ae = make_autoencoder(cfg.autoencoder)
    return ae, jax.tree.map(jnp.asarray, params)


def folder_clips(root: str | Path, frames: int | None,
                 skipped: list[str]) -> Iterator[tuple[str, np.ndarray, float]]:
    """(name, uint8 [T, H, W, 3], fps) of every video and image under `root`, sorted; videos
    cut to their first `frames` frames (None: all). Unreadable files are appended to
    `skipped` (with the reason) and passed over."""
    from vdit.data.video_io import read_video

    root = Path(root)
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                   if p.suffix.lower() in VIDEO_SUFFIXES + IMAGE_SUFFIXES)
    if not names:
        raise FileNotFoundError(f"--videos: no video or image files under {root}")
    for name in names:
        try:
            if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                video, fps = read_image(root / name), 8.0
            else:
                video, fps = read_video(root / name)
        except Exception as e:  # one bad file never stops the evaluation
            skipped.append(f"{name}: {type(e).__name__}: {e}")
            continue
        yield name, video[:frames], fps


def shard_clips(directory: str | Path, limit: int | None) -> Iterator[tuple[str, np.ndarray,
                                                                            float]]:
    """The clips behind a shard directory written from a folder (`vdit tokenize --videos`):
    each record's source file re-read and fitted to its record's bucket, as tokenize did."""
    from vdit.data.shards import decode_record, read_index, read_shard, shard_paths
    from vdit.data.video_io import read_video

    index = read_index(directory)
    if index.get("source") != "folder":
        raise ValueError(f"--shards: {directory} was tokenized from a {index.get('source')!r} "
                         "source; eval-ae re-reads the files of a folder source only (for "
                         "physics clips run `vdit eval-ae PATH` without --shards)")
    root, count = Path(index["videos"]), 0
    for path in shard_paths(directory, index):
        for data in read_shard(path):
            if limit is not None and count >= limit:
                return
            rec = decode_record(data)
            file = root / rec.source_id
            frames, fps = ((read_image(file), 0.0) if file.suffix.lower() in IMAGE_SUFFIXES
                           else read_video(file))
            video, _ = prepare_clip(frames, fps, index.get("fps"), [tuple(rec.bucket)])
            count += 1
            yield rec.source_id, video, rec.fps or 8.0


def reconstruct(ae, params, video: np.ndarray) -> tuple[np.ndarray, bool]:
    """uint8 [T, H, W, 3] -> (its uint8 reconstruction, whether it went tiled)."""
    x = jnp.asarray(video[None], jnp.float32) / 127.5 - 1.0
    size = video.shape[:3]
    tiled = max(size[1:]) > ae.cfg.tile
    if tiled:
        recon = decode_tiled(ae, params, encode_tiled(ae, params, x), size=size)
    else:
        latent = jax.jit(ae.encode)(params, x)
        recon = jax.jit(ae.decode, static_argnums=2)(params, latent, tuple(size))
    out = np.clip(np.round((np.asarray(recon[0]) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return out, tiled


def evaluate_footage(path: str | Path, *, videos: str | None = None, shards: str | None = None,
                     frames: int | None = 17, clips: int | None = None,
                     tile: int | None = None, out: str | Path | None = None) -> dict:
    """PSNR / SSIM of the autoencoder at PATH on the clips of `videos` or `shards` (the first
    `clips` of them; all when None), tiled above `tile` pixels (default: the autoencoder's
    `tile`; overlap a quarter of it); writes eval_ae.json and eval_ae.gif to `out` (default
    ./eval-ae-NAME)."""
    out = Path(out) if out is not None else Path(f"eval-ae-{Path(path).name}")
    check_output_dir(out, "--out")
    ae, params = load_any(path)
    if tile is not None:
        f = ae.cfg.factors[1]
        if tile % f:
            raise ConfigError(f"--tile: must be a multiple of the spatial factor {f}, got {tile}")
        ae.cfg = dataclasses.replace(ae.cfg, tile=tile, tile_overlap=tile // 4 // f * f)
    skipped: list[str] = []
    source = (folder_clips(videos, frames, skipped) if videos is not None
              else shard_clips(shards, clips))
    rows, pairs, fps0 = [], [], None
    t0 = time.perf_counter()
    for name, video, fps in source:
        if clips is not None and len(rows) >= clips:
            break
        recon, tiled = reconstruct(ae, params, video)
        a, b = jnp.asarray(video[None]), jnp.asarray(recon[None])
        rows.append({"clip": name, "video": list(video.shape[:3]), "tiled": tiled,
                     "psnr_db": float(psnr(a, b)[0]), "ssim": float(ssim(a, b)[0])})
        if len(pairs) < GIF_CLIPS:
            pairs.append(np.concatenate([video, recon], axis=2))  # original | reconstruction
            fps0 = fps0 or fps
    seconds = time.perf_counter() - t0
    psnrs, ssims = [r["psnr_db"] for r in rows], [r["ssim"] for r in rows]
    result = {
        "autoencoder": str(path), "clips": len(rows), "source": videos or shards,
        "video": rows[0]["video"], "factors": list(ae.cfg.factors), "tile": ae.cfg.tile,
        "psnr_db": float(np.mean(psnrs)), "psnr_db_min": float(np.min(psnrs)),
        "ssim": float(np.mean(ssims)), "ssim_min": float(np.min(ssims)),
        "perceptual": None,  # no maintained metric without downloaded weights
        "seconds": round(seconds, 2), "per_clip": rows, "skipped": skipped,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_ae.json").write_text(json.dumps(result, indent=2))
    write_gif(out / "eval_ae.gif", _gif(pairs), fps0 or 8.0)
    return result


def _gif(pairs: list[np.ndarray]) -> np.ndarray:
    """Side-by-side pairs of different sizes and lengths -> one [T, H, W, 3] video: each pair
    padded to the largest, looped to the longest, stacked a row each, scaled for viewing."""
    t = max(len(p) for p in pairs)
    h = max(p.shape[1] for p in pairs)
    w = max(p.shape[2] for p in pairs)
    padded = [np.pad(p[np.arange(t) % len(p)], ((0, 0), (0, h - p.shape[1]),
                                                 (0, w - p.shape[2]), (0, 0))) for p in pairs]
    grid = tile(np.stack(padded), columns=1)
    return upscale(grid, display_scale(*grid.shape[1:3], target=128))
