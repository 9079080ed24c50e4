"""Loading a diffusers `AutoencoderKLWan` folder (Wan 2.1 / 2.2 video VAE) without PyTorch.

The folder holds `config.json` and `diffusion_pytorch_model.safetensors` (or its shards and
`.index.json`), read through vdit/io/hf_folder.py. Tensor names map to the Flax tree by rule:
diffusers `decoder.up_blocks.0.resnets.1.conv1.weight` is Flax
`params["decoder"]["up_blocks_0"]["resnets_1"]["conv1"]["kernel"]`; layouts go from torch's
OITHW (OIHW for 2D) to THWIO (HWIO), RMS-norm gammas from [C, 1, 1(, 1)] to [C]. The expected
names and shapes come from the Flax model the config describes, so a checkpoint with a missing,
extra or wrongly shaped tensor is refused naming it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
from flax import traverse_util

from vdit.io.hf_folder import (
    CheckpointFormatError,
    check_tensors,
    folder_sha256,
    read_config,
    read_tensors,
)
from vdit.models.wan_vae import WanVAE, WanVAESpec

WEIGHTS = "diffusion_pytorch_model.safetensors"


def _diffusers_name(path: tuple[str, ...]) -> str:
    """Flax path -> diffusers tensor name: `down_blocks_3` -> `down_blocks.3`, kernel -> weight."""
    *modules, leaf = path
    parts = [re.sub(r"_(\d+)$", r".\1", m) for m in modules]
    return ".".join([*parts, "weight" if leaf == "kernel" else leaf])


def _torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape diffusers stores for the Flax parameter at `path` of `shape`."""
    leaf = path[-1]
    if leaf == "kernel":  # THWIO -> OITHW, HWIO -> OIHW
        *space, i, o = shape
        return (o, i, *space)
    if leaf == "gamma":
        # WanRMS_norm: [C, 1, 1] in attention blocks (named `norm`), else [C, 1, 1, 1].
        return (shape[0], 1, 1) if path[-2] == "norm" else (shape[0], 1, 1, 1)
    return tuple(shape)


def _to_flax(tensor: np.ndarray, leaf: str) -> np.ndarray:
    t = np.asarray(tensor, dtype=np.float32)
    if leaf == "kernel":
        return np.ascontiguousarray(np.moveaxis(t, (0, 1), (-1, -2)))
    if leaf == "gamma":
        return t.reshape(-1)
    return t


def load_wan_vae(path: str | Path) -> tuple[WanVAESpec, dict[str, Any], dict[str, np.ndarray]]:
    """(spec, params, stats) of a diffusers AutoencoderKLWan folder.

    params: the Flax tree of float32 numpy arrays for `WanVAE(spec)`; stats: {"mean": [z],
    "std": [z]} float32, config.json's `latents_mean` / `latents_std` (normalise a latent as
    (z - mean) / std). Raises CheckpointFormatError naming the file, key or tensor at fault."""
    folder = Path(path)
    config = read_config(folder)
    try:
        spec = WanVAESpec.from_diffusers_config(config)
    except ValueError as e:
        raise CheckpointFormatError(f"{folder}: {e}") from None
    flat = traverse_util.flatten_dict(WanVAE(spec).param_shapes())
    names = {p: _diffusers_name(p) for p in flat}
    expected = {names[p]: _torch_shape(p, tuple(s.shape)) for p, s in flat.items()}
    found = read_tensors(folder, WEIGHTS)
    check_tensors(found, expected, folder)
    params = traverse_util.unflatten_dict(
        {p: _to_flax(found[names[p]], p[-1]) for p in flat})
    stats = {"mean": np.asarray(spec.latents_mean, np.float32),
             "std": np.asarray(spec.latents_std, np.float32)}
    return spec, params, stats


def checkpoint_sha256(path: str | Path) -> str:
    """The fingerprint of a Wan VAE folder (`hf_folder.folder_sha256`)."""
    return folder_sha256(path, WEIGHTS)
