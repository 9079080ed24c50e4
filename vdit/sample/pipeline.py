"""`vdit sample --pipeline PATH`: text-to-video with a diffusers WanPipeline folder (Wan 2.1,
Wan 2.2 A14B's two experts, Wan 2.2 TI2V-5B without an image), as diffusers' `WanPipeline`
runs it:

    prompt -> prompt_clean -> UMT5 (padded to 512 tokens with zeros, nothing masked)
    noise [B, T', H', W', z] -> scheduler (UniPC or flow-match Euler, from scheduler_config.json)
       each step: the expert for t (transformer while t >= boundary_ratio * 1000, else
       transformer_2), CFG v = v_neg + w (v_pos - v_neg) with w = guidance (or guidance_2)
    -> latent * std + mean -> Wan VAE decode -> marked mp4s (vdit/sample/generate.py)

The folder is read once (`io/wan_pipeline.resolve_pipeline`); the whole denoising loop is one
jitted `lax.scan` (`diffusion/sampler.integrate`), the expert chosen per step by `lax.cond`.
"""

from __future__ import annotations

import dataclasses
import html
import re
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vdit.config import AutoencoderConfig, ConfigError, TextConfig
from vdit.diffusion.sampler import integrate
from vdit.diffusion.schedulers import Schedule, schedule_from_config
from vdit.diffusion.text_to_video import to_uint8
from vdit.io.wan_pipeline import RECIPE, PipelineSpec
from vdit.models.wan_dit import WanDiT


def prompt_clean(text: str) -> str:
    """diffusers' `prompt_clean` without ftfy: HTML entities unescaped twice, whitespace
    collapsed."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text)).strip()).strip()


@dataclass(frozen=True)
class PipelineSettings:
    """One generation's settings; None fields come from the folder or the published recipe."""

    frames: int = RECIPE["frames"]
    height: int = RECIPE["height"]
    width: int = RECIPE["width"]
    steps: int = RECIPE["steps"]
    guidance: float = RECIPE["guidance"]
    guidance_2: float | None = None  # Wan 2.2 A14B low-noise expert; None: = guidance
    text_length: int = RECIPE["max_sequence_length"]
    dtype: str = "float32"
    fps: float = RECIPE["fps"]
    # LoRA files (diffusers / PEFT or ComfyUI / musubi naming) as (path, multiplier), folded into
    # the transformer (`loras`) and, for Wan 2.2 A14B, transformer_2 (`loras_2`)
    loras: tuple[tuple[str, float], ...] = ()
    loras_2: tuple[tuple[str, float], ...] = ()


def check_settings(spec: PipelineSpec, s: PipelineSettings) -> list[str]:
    """Problems with sizes and options for this pipeline, each naming the flag."""
    ft = spec.vae_factors[0]
    p = []
    for problem in spec.clip_problems(s.frames, s.height, s.width):  # the one size rule
        flag = next(f for f in ("height", "width", "frames") if f in problem)
        hint = (f" (try {max(1, round((s.frames - 1) / ft) * ft + 1)})" if flag == "frames"
                else "")
        p.append(f"--{flag}: {problem}{hint}")
    if s.guidance_2 is not None and spec.transformer_2 is None:
        p.append("--guidance-2: this pipeline has one transformer (no boundary_ratio); "
                 "guidance_2 is for Wan 2.2 A14B's low-noise expert")
    if s.steps < 1:
        p.append(f"--steps: must be >= 1, got {s.steps}")
    if s.loras_2 and spec.transformer_2 is None:
        p.append("--lora-2: this pipeline has no transformer_2")
    if s.dtype not in ("float32", "bfloat16"):
        p.append(f"--dtype: float32 or bfloat16, got {s.dtype!r}")
    return p


@dataclass
class LoadedPipeline:
    """The parts of a pipeline in memory: caption encoder, VAE, experts (params + modules)."""

    spec: PipelineSpec
    encoder: Any  # data.captions.CaptionEncoder
    vae: Any
    vae_params: Any
    stats: dict[str, np.ndarray]
    experts: list[tuple[WanDiT, Any]]

    def params(self) -> list[Any]:
        return [p for _, p in self.experts]


def load_pipeline(spec: PipelineSpec, settings: PipelineSettings) -> LoadedPipeline:
    """Load every part of `spec` (weights on the default device)."""
    from vdit.data.captions import CaptionEncoder
    from vdit.io.autoencoders import load_wan
    from vdit.io.wan_transformer import load_params

    encoder = CaptionEncoder(str(spec.text_encoder), settings.text_length, "float32")
    z = spec.transformer.in_channels
    ae_cfg = AutoencoderConfig(kind="wan", checkpoint=str(spec.vae), factors=spec.vae_factors,
                               latent_channels=z)
    vae, vae_params, stats = load_wan(ae_cfg)
    experts = []
    for folder, loras in zip(spec.expert_folders(), (settings.loras, settings.loras_2),
                             strict=False):
        tspec, params = load_params(folder)
        params = apply_loras(params, tspec, loras)
        model = dataclasses.replace(tspec.model, dtype=settings.dtype)
        module = WanDiT(model, TextConfig(encoder="precomputed", width=tspec.text_dim),
                        latent_shape=(0, 0, 0, z), time_scale=1.0)
        experts.append((module, jax.tree.map(jnp.asarray, params)))
    return LoadedPipeline(spec, encoder, vae, jax.tree.map(jnp.asarray, vae_params), stats,
                          experts)


def apply_loras(params: dict, spec, loras: tuple[tuple[str, float], ...]) -> dict:
    """params with each LoRA file folded in at its multiplier (vdit/io/wan_lora.py); tensors
    of a file that match no module are reported by name."""
    from vdit.io.wan_lora import read_lora
    from vdit.models.lora import merge, targets_of

    for path, multiplier in loras:
        lora = read_lora(path, spec)
        if lora.unmatched:
            print(f"warning: {path}: {len(lora.unmatched)} tensor(s) match no module of the "
                  "transformer and are not applied: " + ", ".join(lora.unmatched[:10])
                  + (" ..." if len(lora.unmatched) > 10 else ""), flush=True)
        print(f"LoRA {path}: {len(lora.adapters)} modules, rank {lora.rank}, "
              f"{lora.naming} naming, x{multiplier}", flush=True)
        params = jax.tree.map(np.asarray, merge(params, lora.adapters,
                                                targets_of(lora.adapters, params), multiplier))
    return params


def latent_shape(spec: PipelineSpec, s: PipelineSettings) -> tuple[int, int, int, int]:
    """(T', H', W', z) of a video of the settings' size."""
    ft, fh, fw = spec.vae_factors
    return (1 + (s.frames - 1) // ft, s.height // fh, s.width // fw, spec.transformer.in_channels)


def embed_prompts(loaded: LoadedPipeline, prompts: list[str], dtype: str) -> np.ndarray:
    """Prompts -> UMT5 embeddings [B, text_length, E], zeros after each prompt's tokens (the
    pipeline's padding), rounded to the transformer's dtype."""
    emb, _, _, truncated = loaded.encoder.embed([prompt_clean(p) for p in prompts])
    if truncated:
        print(f"warning: {truncated} prompt(s) longer than {loaded.encoder.max_length} tokens "
              "were cut", flush=True)
    return np.asarray(jnp.asarray(emb, jnp.dtype(dtype)).astype(jnp.float32))


def denoise(experts: list[WanDiT], params: list[Any], noise: jax.Array, text: jax.Array,
            negative: jax.Array, schedule: Schedule, *, guidance: float, guidance_2: float,
            boundary: float | None, trajectory: bool = False) -> jax.Array:
    """noise [B, T', H', W', z], text / negative [B, S, E] -> latent (or [steps, ...] with
    `trajectory`). Expert 0 runs at timesteps >= boundary (None: always), expert 1 below."""
    cfg_on = guidance > 1.0  # diffusers: classifier-free guidance only when guidance > 1

    def guided(i: int, w: float):
        def v(x, t):
            tb = jnp.full((x.shape[0],), t)
            apply = partial(experts[i].apply, {"params": params[i]})
            cond = apply(x, tb, text)
            if not cfg_on:
                return cond
            uncond = apply(x, tb, negative)
            return uncond + w * (cond - uncond)
        return v

    high, low = guided(0, guidance), (guided(1, guidance_2) if len(experts) > 1 else None)

    def v_fn(x, sigma, t):
        if low is None or boundary is None:
            return high(x, t)
        return jax.lax.cond(t >= boundary, high, low, x, t)

    return integrate(v_fn, noise, schedule, trajectory=trajectory)


def decode(vae, vae_params, stats: dict[str, Any], latent: jax.Array) -> jax.Array:
    """Latent [B, T', H', W', z] -> video float [B, T, H, W, 3] in [-1, 1] (as diffusers:
    latent / (1 / std) + mean, then the VAE)."""
    mean, std = (jnp.asarray(stats[k], jnp.float32) for k in ("mean", "std"))
    return vae.decode(vae_params, latent / (1.0 / std) + mean)


def generate(loaded: LoadedPipeline, prompts: list[str], negative_prompt: str | None, *,
             num: int, seed: int, settings: PipelineSettings,
             noise: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`num` videos per prompt -> (uint8 [P * num, T, H, W, 3], final latents [P * num, T',
    H', W', z]). Prompt i draws its noise from fold_in(seed, i) unless `noise` [P * num, ...]
    is given (to reproduce another tool's run)."""
    spec = loaded.spec
    problems = check_settings(spec, settings)
    if problems:
        raise ConfigError("\n  ".join(["the pipeline cannot run these settings:", *problems]))
    schedule = schedule_from_config(spec.scheduler, settings.steps,
                                    where=str(spec.path / "scheduler/scheduler_config.json"))
    boundary = (None if spec.boundary_ratio is None else
                spec.boundary_ratio * float(spec.scheduler.get("num_train_timesteps", 1000)))
    shape = latent_shape(spec, settings)
    modules = [m for m, _ in loaded.experts]
    run = jax.jit(partial(denoise, modules, schedule=schedule, guidance=settings.guidance,
                          guidance_2=(settings.guidance if settings.guidance_2 is None
                                      else settings.guidance_2), boundary=boundary))
    to_video = jax.jit(partial(decode, loaded.vae))
    negative = embed_prompts(loaded, [negative_prompt or ""], settings.dtype)
    videos, latents = [], []
    for i, prompt in enumerate(prompts):
        text = np.repeat(embed_prompts(loaded, [prompt], settings.dtype), num, axis=0)
        x = (jax.random.normal(jax.random.fold_in(jax.random.key(seed), i), (num, *shape))
             if noise is None else jnp.asarray(noise[i * num:(i + 1) * num], jnp.float32))
        latent = run(loaded.params(), x, jnp.asarray(text),
                     jnp.asarray(np.repeat(negative, num, axis=0)))
        latents.append(np.asarray(latent))
        videos.append(np.asarray(to_uint8(to_video(loaded.vae_params, loaded.stats, latent))))
    return np.concatenate(videos), np.concatenate(latents)


def run_pipeline(spec: PipelineSpec, prompts: list[str], negative_prompt: str | None, *,
                 num: int, seed: int, settings: PipelineSettings, out_dir, marking,
                 overwrite: bool = False, rewrite=None) -> list:
    """Generate and write marked mp4s, sidecars (with the pipeline's settings) and a GIF grid
    under out_dir (vdit/sample/generate.py write_samples); returns the paths. `rewrite`
    (RewriteConfig): each prompt is first rewritten by its endpoint (vdit/sample/rewrite.py),
    budgeted by the UMT5 tokenizer at settings.text_length tokens."""
    from pathlib import Path

    from vdit.sample.generate import check_unused, params_hash, write_samples

    problems = check_settings(spec, settings)
    if problems:
        raise ConfigError("\n  ".join(["the pipeline cannot run these settings:", *problems]))
    if not overwrite:
        check_unused(Path(out_dir), prompts, num, seed)
    rewrites = None
    if rewrite is not None:  # before anything loads or is generated
        from vdit.sample.rewrite import rewrite_prompts, token_budget

        text = TextConfig(encoder="t5", checkpoint=str(spec.text_encoder),
                          max_length=settings.text_length)
        rewrites = rewrite_prompts(prompts, rewrite, token_budget(text))
        prompts = [r.text for r in rewrites]
    loaded = load_pipeline(spec, settings)
    videos, _ = generate(loaded, prompts, negative_prompt, num=num, seed=seed,
                         settings=settings)
    extra = {"pipeline": {"path": str(spec.path), "experts": len(loaded.experts),
                          "boundary_ratio": spec.boundary_ratio,
                          "negative_prompt": negative_prompt,
                          **dataclasses.asdict(settings)}}
    return write_samples(out_dir, videos, prompts, num, settings.fps, seed=seed,
                         model_hash=params_hash(loaded.params()), marking=marking,
                         rewrites=rewrites, extra=extra)
