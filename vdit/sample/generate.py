"""Generate videos from prompts with a trained run, and write them as mp4 files and a GIF grid."""

from __future__ import annotations

import json
import re
import warnings
from functools import partial
from pathlib import Path

import jax
import numpy as np

from vdit.config import Config, SampleConfig
from vdit.data.video_io import display_scale, tile, upscale, write_gif, write_mp4
from vdit.diffusion.text_to_video import Stats, TextToVideo


def generate(system: TextToVideo, params, stats: Stats, prompts: list[str], *, num: int,
             seed: int, cfg: SampleConfig) -> np.ndarray:
    """`num` videos per prompt -> uint8 [len(prompts) * num, T, H, W, 3], prompt-major.

    Deterministic for (params, prompts, num, seed, cfg): prompt i uses key fold_in(seed, i).
    """
    for p in prompts:
        unknown = system.tokenizer.unknown_words(p)
        if unknown:
            warnings.warn(f"prompt {p!r}: words outside the vocabulary are ignored: {unknown}",
                          stacklevel=2)
    run = jax.jit(partial(system.generate, steps=cfg.steps, guidance=cfg.guidance,
                          method=cfg.sampler))
    videos = []
    for i, prompt in enumerate(prompts):
        tokens = np.repeat(system.tokenizer.encode(prompt)[None], num, axis=0)
        key = jax.random.fold_in(jax.random.key(seed), i)
        videos.append(np.asarray(run(params, tokens, stats, key)))
    return np.concatenate(videos)


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "prompt"


def write_samples(out_dir: str | Path, videos: np.ndarray, prompts: list[str], num: int,
                  fps: float, *, seed: int) -> list[Path]:
    """One mp4 per video, a GIF grid (a row per prompt) and prompts.json; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scale = display_scale(*videos.shape[2:4])
    paths = []
    for i, video in enumerate(videos):
        p, k = divmod(i, num)
        name = f"{p:02d}_{_slug(prompts[p])}_s{seed}_{k}.mp4"
        paths.append(write_mp4(out / name, upscale(video, scale), fps,
                               metadata={"comment": f"vdit: {prompts[p]}"}))
    grid = tile(np.stack([upscale(v, max(scale // 2, 1)) for v in videos]), columns=num)
    paths.append(write_gif(out / f"grid_s{seed}.gif", grid, fps))
    (out / "prompts.json").write_text(json.dumps(
        {"prompts": prompts, "num_per_prompt": num, "seed": seed,
         "files": [p.name for p in paths]}, indent=2))
    return paths


def sample_run(cfg: Config, system: TextToVideo, params, stats: Stats, out_dir: str | Path,
               prompts: list[str] | None = None, num: int | None = None,
               seed: int | None = None) -> list[Path]:
    """Generate from `prompts` (default: the config's) and write files under out_dir."""
    prompts = list(prompts or cfg.sample.prompts)
    num = num or cfg.sample.num_per_prompt
    seed = cfg.sample.seed if seed is None else seed
    videos = generate(system, params, stats, prompts, num=num, seed=seed, cfg=cfg.sample)
    return write_samples(out_dir, videos, prompts, num, cfg.sample.fps, seed=seed)
