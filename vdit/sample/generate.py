"""Generate videos from prompts with a trained run, and write them as marked mp4 files, JSON
provenance sidecars and a GIF grid."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import jax
import numpy as np

from vdit import __version__
from vdit.config import Config, ConfigError, SampleConfig
from vdit.config.sections import RewriteConfig
from vdit.data.video_io import display_scale, tile, upscale, write_gif, write_mp4
from vdit.diffusion.text_to_video import Stats, TextToVideo
from vdit.provenance import manifest, watermark


def default_key() -> str:
    """$VDIT_WATERMARK_KEY if set, else the public key that anyone can detect with."""
    return os.environ.get("VDIT_WATERMARK_KEY") or watermark.DEFAULT_KEY


@dataclass(frozen=True)
class Marking:
    """How generated videos are marked. `watermark=False` is recorded in every sidecar."""

    watermark: bool = True
    key: str = field(default_factory=default_key)
    run_id: str = ""
    c2pa_cert: str | None = None
    c2pa_key: str | None = None


def params_hash(params) -> str:
    """SHA-256 over the parameter bytes (in tree order): identifies the model that made a video."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        h.update(np.ascontiguousarray(jax.device_get(leaf)).tobytes())
    return h.hexdigest()


class Sampler:
    """The jitted sampler (ODE with guidance, then decode) of `system` at `cfg`'s steps,
    guidance and method, and for a run with a pretrained text encoder that encoder (the run's
    text.checkpoint, checked against text.checkpoint_sha256), both built once: `generate` makes
    one per call, a training run (train.sample_every) one for the whole run, so every call with
    the same shapes reuses one compiled program. `out_shardings` (training: replicated) lets
    every process of a multi-host run read the videos."""

    def __init__(self, system: TextToVideo, cfg: SampleConfig, out_shardings=None):
        self.system = system
        self.run = jax.jit(partial(system.generate, steps=cfg.steps, guidance=cfg.guidance,
                                   method=cfg.sampler), out_shardings=out_shardings)
        self.encoder = None
        if system.embedded:
            from vdit.data.captions import CaptionEncoder

            t = system.cfg.text
            self.encoder = CaptionEncoder(t.checkpoint, t.max_length, t.dtype,
                                          t.checkpoint_sha256)

    def conditioning(self, prompts: list[str], num: int,
                     negative_prompt: str | None = None) -> list[dict]:
        """Each prompt's caption repeated `num` times, as the sampler takes it: word tokens, or
        the encoder's (embeddings, mask) with the `negative_prompt`'s (default: the empty
        caption) as `uncond`. Fixed prompts are encoded once and sampled many times."""
        def rows(x):
            return np.repeat(x, num, axis=0)

        if self.encoder is None:
            if negative_prompt is not None:
                raise ConfigError("--negative-prompt needs a run with a pretrained text encoder "
                                  "(text.encoder t5 or precomputed)")
            tokenizer = self.system.tokenizer
            for p in prompts:
                unknown = tokenizer.unknown_words(p)
                if unknown:
                    warnings.warn(f"prompt {p!r}: words outside the vocabulary are ignored: "
                                  f"{unknown}", stacklevel=3)
            return [{"tokens": rows(tokenizer.encode(p)[None])} for p in prompts]
        uncond = tuple(rows(x) for x in self.encoder.conditioning([negative_prompt or ""]))
        return [{"tokens": tuple(rows(x) for x in self.encoder.conditioning([p])),
                 "uncond": uncond} for p in prompts]

    def __call__(self, params, stats: Stats, conditioning: list[dict], seed: int) -> np.ndarray:
        """uint8 [len(conditioning) * num, T, H, W, 3], prompt-major; prompt i uses key
        fold_in(key(seed), i), whatever else the caller's program holds."""
        videos = []
        for i, cond in enumerate(conditioning):
            key = jax.random.fold_in(jax.random.key(seed), i)
            videos.append(np.asarray(self.run(params, cond["tokens"], stats, key,
                                              uncond=cond.get("uncond"))))
        return np.concatenate(videos)


def generate(system: TextToVideo, params, stats: Stats, prompts: list[str], *, num: int,
             seed: int, cfg: SampleConfig, negative_prompt: str | None = None) -> np.ndarray:
    """`num` videos per prompt -> uint8 [len(prompts) * num, T, H, W, 3], prompt-major.

    Deterministic for (params, prompts, num, seed, cfg): prompt i uses key fold_in(seed, i).
    A run with a pretrained text encoder runs it (the run's text.checkpoint, checked against
    text.checkpoint_sha256) on each prompt and on `negative_prompt` (default: the empty one).
    """
    sampler = Sampler(system, cfg)
    return sampler(params, stats, sampler.conditioning(prompts, num, negative_prompt), seed)


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "prompt"


def write_samples(out_dir: str | Path, videos: np.ndarray, prompts: list[str], num: int,
                  fps: float, *, seed: int, model_hash: str,
                  marking: Marking = Marking(), rewrites: list | None = None,
                  extra: dict | None = None) -> list[Path]:
    """One marked mp4 (+ VIDEO.json sidecar) per video, a GIF grid (a row per prompt) and
    prompts.json; returns the video paths. Frames are upscaled (nearest) for viewing first.
    `prompts` are those the model saw; with `rewrites` (vdit.sample.rewrite.RewriteResult per
    prompt) files are named after the user's prompts and every record keeps both. `extra`
    (JSON-able, e.g. a pipeline's settings) goes into every sidecar and prompts.json."""
    out = Path(out_dir)
    rewritten = [r.record() for r in rewrites] if rewrites else None
    names = [r.prompt for r in rewrites] if rewrites else prompts
    out.mkdir(parents=True, exist_ok=True)
    scale = display_scale(*videos.shape[2:4])
    payload = watermark.make_payload(model_hash, marking.run_id)
    size = (videos.shape[2] * scale, videos.shape[3] * scale)
    if marking.watermark and watermark.is_weak(*size):
        print(f"warning: {size[0]}x{size[1]} frames are below {watermark.MIN_FRAME_SIZE} px: the "
              "watermark is weak and may not survive re-encoding", file=sys.stderr)
    paths, shown = [], []
    for i, video in enumerate(videos):
        p, k = divmod(i, num)
        frames = upscale(video, scale)
        if marking.watermark:
            frames = watermark.embed(frames, payload, marking.key)
        record = manifest.provenance_record(
            model_hash=model_hash, prompt=prompts[p], seed=seed, watermark=marking.watermark,
            payload=payload if marking.watermark else None, vdit_version=__version__,
            extra={"run": marking.run_id, "video_index": k, "fps": fps,
                   **({"prompt_rewrite": rewritten[p]} if rewritten else {}), **(extra or {})})
        path = write_mp4(out / _video_name(p, names[p], seed, k), frames, fps,
                         metadata=manifest.mp4_metadata(record))
        manifest.write_sidecar(path, record)
        if marking.c2pa_cert and marking.c2pa_key:
            manifest.sign_c2pa(path, record, marking.c2pa_cert, marking.c2pa_key)
        paths.append(path)
        shown.append(frames[:, ::2, ::2] if scale > 1 else frames)
    grid = out / f"grid_s{seed}.gif"
    preview = tile(np.stack(shown), columns=num)
    if marking.watermark:  # the grid as a whole carries the mark too (tiles alone are too small)
        preview = watermark.embed(preview, payload, marking.key)
    write_gif(grid, preview, fps)
    (out / "prompts.json").write_text(json.dumps(
        {"prompts": prompts, "num_per_prompt": num, "seed": seed, "model_hash": model_hash,
         "watermark": marking.watermark, "files": [p.name for p in [*paths, grid]],
         **({"user_prompts": names, "prompt_rewrite": rewritten} if rewritten else {}),
         **(extra or {})},
        indent=2))
    return [*paths, grid]


def continue_prompts(system: TextToVideo, params, stats: Stats, prompts: list[str],
                     context: np.ndarray, k: int, *, num: int, seed: int,
                     cfg: SampleConfig) -> np.ndarray:
    """Like `generate`, each video continuing `context` (uint8 [F, H, W, 3], see
    `continuation.fit_context`) from its first k latent frames: [len(prompts) * num, T, H, W, 3].
    """
    from vdit.sample.continuation import continue_videos, fit_context

    clip = fit_context(context, system.cfg, k)
    return np.concatenate([
        continue_videos(system, params, stats, np.repeat(clip[None], num, axis=0), [p] * num,
                        k=k, key=jax.random.fold_in(jax.random.key(seed), i), cfg=cfg)
        for i, p in enumerate(prompts)])


def free_samples_dir(run_dir: str | Path) -> Path:
    """RUN/samples, or the first of RUN/samples-2, samples-3, ... that holds no sample set
    (prompts.json): where a run's next samples go without replacing earlier ones."""
    run_dir = Path(run_dir)
    out, n = run_dir / "samples", 1
    while (out / "prompts.json").exists():
        n += 1
        out = run_dir / f"samples-{n}"
    return out


def check_unused(out: Path, prompts: list[str], num: int, seed: int) -> None:
    """Refuse to write over an earlier sample set or over videos of the same names."""
    taken = [out / "prompts.json"] + [out / _video_name(p, prompt, seed, k)
                                     for p, prompt in enumerate(prompts) for k in range(num)]
    taken = [path.name for path in taken if path.exists()]
    if taken:
        raise ConfigError(f"{out} already holds samples ({', '.join(taken[:3])}"
                          f"{', ...' if len(taken) > 3 else ''}); choose another --out, or pass "
                          "--overwrite to replace them")


def _video_name(p: int, prompt: str, seed: int, k: int) -> str:
    return f"{p:02d}_{_slug(prompt)}_s{seed}_{k}.mp4"


def sample_run(cfg: Config, system: TextToVideo, params, stats: Stats, out_dir: str | Path,
               prompts: list[str] | None = None, num: int | None = None,
               seed: int | None = None, marking: Marking = Marking(),
               context: np.ndarray | None = None, context_frames: int = 0,
               overwrite: bool = False, negative_prompt: str | None = None,
               rewrite: RewriteConfig | None = None, extra: dict | None = None) -> list[Path]:
    """Generate from `prompts` (default: the config's) and write files under out_dir; with
    `context` (uint8 frames), continue it from its first `context_frames` latent frames.
    An earlier sample set in out_dir is refused (ConfigError) unless `overwrite`. With
    `rewrite` each prompt is first rewritten by its endpoint (vdit/sample/rewrite.py).
    `extra` (JSON-able: the LoRA files folded in) goes into every sidecar."""
    prompts = list(prompts or cfg.sample.prompts)
    num = num or cfg.sample.num_per_prompt
    seed = cfg.sample.seed if seed is None else seed
    if not overwrite:  # checked before the (long) generation
        check_unused(Path(out_dir), prompts, num, seed)
    rewrites = None
    if rewrite is not None:  # before anything is generated; a failure may stop here
        from vdit.sample.rewrite import rewrite_prompts, token_budget

        rewrites = rewrite_prompts(prompts, rewrite, token_budget(cfg.text))
        prompts = [r.text for r in rewrites]
    if context is None:
        videos = generate(system, params, stats, prompts, num=num, seed=seed, cfg=cfg.sample,
                          negative_prompt=negative_prompt)
    else:
        videos = continue_prompts(system, params, stats, prompts, context, context_frames,
                                  num=num, seed=seed, cfg=cfg.sample)
    return write_samples(out_dir, videos, prompts, num, cfg.sample.fps, seed=seed,
                         model_hash=params_hash(params), marking=marking, rewrites=rewrites,
                         extra=extra)
