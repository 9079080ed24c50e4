"""Video continuation: generate the rest of a clip from its first K latent frames.

A model trained with `diffusion.context_frames` sees its context clean (t = 0 on those tokens);
any other model is continued by the replacement method (the context overwritten at every step by
the ground truth noised to the current time). `method_for` names which one a run gets, so that
every caller can say so in its output.
"""

from __future__ import annotations

import functools
from functools import partial

import jax
import numpy as np

from vdit.config import Config, ConfigError, SampleConfig
from vdit.diffusion.text_to_video import Stats, TextToVideo


def method_for(cfg: Config) -> str:
    """'clean' for a run trained with diffusion.context_frames > 0, else 'replacement'."""
    return "clean" if cfg.diffusion.context_frames > 0 else "replacement"


def describe_method(cfg: Config, k: int) -> str:
    """One line for the user: which conditioning a run gets, and why."""
    if method_for(cfg) == "clean":
        trained = cfg.diffusion.context_frames
        note = "" if k == trained else f" (trained with {trained}; {k} asked)"
        return f"context: {k} latent frames given clean (trained for continuation{note})"
    return (f"context: {k} latent frames by replacement (this model was trained without "
            "diffusion.context_frames; the context is re-noised to each step's time)")


def video_frames_for(cfg: Config, k: int) -> int:
    """Video frames that latent frames [0, k) encode: 1 + ft (k - 1) for the causal VAE (frame 0
    is encoded alone), ft k for space_to_depth."""
    ft = cfg.autoencoder.factors[0]
    return 1 + ft * (k - 1) if cfg.autoencoder.kind in ("causal_vae", "wan") else ft * k


def check_context_frames(cfg: Config, k: int) -> None:
    """Refuse a K the run cannot continue from, naming the limits."""
    latent_t = cfg.latent_shape()[0]
    if not 1 <= k < latent_t:
        raise ConfigError(f"--context-frames: must be in [1, {latent_t - 1}] (the clip has "
                          f"{latent_t} latent frames and at least one must be generated), "
                          f"got {k}")
    pt = cfg.model.patch[0]
    if method_for(cfg) == "clean" and k % pt:
        raise ConfigError(f"--context-frames: must be a multiple of model.patch[0]={pt} for "
                          f"clean context, got {k}")


def fit_context(frames: np.ndarray, cfg: Config, k: int, source: str = "context") -> np.ndarray:
    """A context video uint8 [F, H*s, W*s, 3] (s >= 1: an upscaled copy, such as `vdit sample`
    writes, is area-averaged back) -> a clip-length uint8 [T, H, W, 3] whose first
    `video_frames_for(k)` frames are the context's (the rest repeat its last frame and do not
    reach the first k latent frames: the encoders are causal or frame-local)."""
    check_context_frames(cfg, k)
    world = cfg.data.world
    t, h, w = world.frames, world.height, world.width
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ConfigError(f"{source}: expected RGB frames [T, H, W, 3], got {frames.shape}")
    fh, fw = frames.shape[1:3]
    s = fh // h
    if s < 1 or (fh, fw) != (h * s, w * s):
        raise ConfigError(f"{source}: frames are {fh}x{fw}; this run makes {h}x{w} (or an "
                          "integer multiple of it)")
    need = video_frames_for(cfg, k)
    if frames.shape[0] < need:
        raise ConfigError(f"{source}: {frames.shape[0]} frames, but {k} latent frames need "
                          f"{need} video frames")
    frames = frames[: min(need, t)].astype(np.float32)
    if s > 1:
        frames = frames.reshape(-1, h, s, w, s, 3).mean(axis=(2, 4))
    frames = np.rint(frames).astype(np.uint8)
    return np.concatenate([frames, np.repeat(frames[-1:], t - len(frames), axis=0)])


def continue_videos(system: TextToVideo, params, stats: Stats, contexts: np.ndarray,
                    prompts: list[str], *, k: int, key: jax.Array, cfg: SampleConfig) -> np.ndarray:
    """Continue clip-length contexts uint8 [B, T, H, W, 3] (see `fit_context`) from their first
    k latent frames under one prompt each -> uint8 [B, T, H, W, 3]; deterministic for key."""
    check_context_frames(system.cfg, k)
    if len(prompts) != len(contexts):
        raise ValueError(f"{len(prompts)} prompts for {len(contexts)} contexts")
    tokens = _captions(system, tuple(prompts))
    encode, run = _compiled(system, cfg)
    latent = encode(np.asarray(contexts, np.uint8), stats)[:, :k]
    return np.asarray(run(params, tokens, stats, key, context=latent))


def _captions(system: TextToVideo, prompts: tuple[str, ...]):
    """The prompts as the DiT takes them: word tokens [B, S], or for a run with a pretrained
    text encoder (every `model.kind: wan` run has one) its embeddings and mask, from the encoder
    the run names (checked against text.checkpoint_sha256)."""
    if not system.embedded:
        return np.stack([system.tokenizer.encode(p) for p in prompts])
    t = system.cfg.text
    return _caption_encoder(t.checkpoint, t.max_length, t.dtype,
                            t.checkpoint_sha256).conditioning(list(prompts))


@functools.lru_cache(maxsize=1)
def _caption_encoder(path: str, max_length: int, dtype: str, sha: str):
    """One loaded encoder for the splits and clips of an evaluation."""
    from vdit.data.captions import CaptionEncoder

    return CaptionEncoder(path, max_length, dtype, sha)


@functools.lru_cache(maxsize=4)
def _compiled(system: TextToVideo, cfg: SampleConfig):
    """Jitted (encode, generate) of a system, kept so that repeated calls (splits, prompts)
    reuse the compiled programs."""
    generate = partial(system.generate, steps=cfg.steps, guidance=cfg.guidance,
                       method=cfg.sampler, clean_context=method_for(system.cfg) == "clean")
    return jax.jit(system.encode), jax.jit(generate)
