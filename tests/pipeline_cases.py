"""A reference pipeline run that diffusers wrote (tools/fixtures/wan_pipeline.py, wan_ti2v.py):
its settings, the layout converters, and vdit's trajectory from the same initial latents, shared
by tests/test_wan_pipeline.py and tests/test_wan_ti2v.py."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

from vdit.sample import pipeline as wp


def reference_case(folder: Path):
    """(folder, reference tensors, reference.json, PipelineSettings of diffusers' call)."""
    ref = load_file(str(folder / "reference.safetensors"))
    meta = json.loads((folder / "reference.json").read_text())
    call = meta["call"]
    settings = wp.PipelineSettings(frames=call["num_frames"], height=call["height"],
                                   width=call["width"], steps=call["num_inference_steps"],
                                   guidance=call["guidance_scale"],
                                   guidance_2=call.get("guidance_scale_2"),
                                   text_length=call["max_sequence_length"])
    return folder, ref, meta, settings


def ncthw(x) -> np.ndarray:
    """[B, T, H, W, C] -> diffusers' [B, C, T, H, W]."""
    return np.moveaxis(np.asarray(x), -1, 1)


def bthwc(x: np.ndarray) -> jnp.ndarray:
    """diffusers' [B, C, T, H, W] -> vdit's [B, T, H, W, C]."""
    return jnp.asarray(np.moveaxis(x, 1, -1))


def trajectory(loaded, ref, meta, settings):
    """(text, negative, the latents after every step [steps, C, T, H, W]) of vdit's denoising
    loop from diffusers' initial latents; the schedule's timesteps must equal diffusers'."""
    from vdit.diffusion.schedulers import schedule_from_config

    schedule = schedule_from_config(loaded.spec.scheduler, settings.steps)
    np.testing.assert_array_equal(schedule.timesteps, np.asarray(meta["timesteps"], np.float32))
    text = jnp.asarray(wp.embed_prompts(loaded, [meta["prompt"]], "float32"))
    negative = jnp.asarray(wp.embed_prompts(loaded, [meta["negative_prompt"]], "float32"))
    boundary = None if meta["boundary_timestep"] is None else float(meta["boundary_timestep"])
    steps = wp.denoise(
        [m for m, _ in loaded.experts], loaded.params(), bthwc(ref["latents_init"]), text,
        negative, schedule, guidance=settings.guidance,
        guidance_2=settings.guidance_2 or settings.guidance, boundary=boundary, trajectory=True)
    steps = np.asarray(steps)
    return text, negative, ncthw(steps.reshape(-1, *steps.shape[2:]))
