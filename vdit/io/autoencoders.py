"""Frozen autoencoders from their files: the Wan VAE (`autoencoder.kind: wan`) from a diffusers
AutoencoderKLWan folder, built behind vdit's autoencoder interface.

`build_autoencoder(cfg)` is the model alone (its architecture from the folder's config.json);
`load_wan(cfg)` adds the weights and the latent statistics (config.json's per-channel
`latents_mean` / `latents_std`). A config whose `factors` or `latent_channels` differ from the
checkpoint's is refused naming both values (ConfigError): the config states them so that its
shape checks need no files, and a silent override would train a DiT of another shape than the
YAML says.

A folder that is not on this machine: `build_autoencoder` falls back to the published Wan 2.1
or 2.2 architecture of the config's shape (with a warning), so `vdit plan` works before the
download and a run whose frozen weights travel in its checkpoint samples without the folder.
Loading weights always needs the folder.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from vdit.config import AutoencoderConfig, ConfigError
from vdit.io.hf_folder import CheckpointFormatError, read_config
from vdit.io.run_dir import resolve_autoencoder_path
from vdit.models.autoencoder import Autoencoder, make_autoencoder
from vdit.models.wan_autoencoder import WanAutoencoder, published_spec, spec_mismatch
from vdit.models.wan_vae import WanVAESpec


def is_wan_folder(path: str | Path) -> bool:
    """Whether `path` is a diffusers AutoencoderKLWan folder (its config.json says so)."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        return False
    try:
        return read_config(folder).get("_class_name") == "AutoencoderKLWan"
    except (CheckpointFormatError, OSError, ValueError):
        return False


def wan_config(folder: str | Path) -> AutoencoderConfig:
    """The `autoencoder` section that describes a Wan folder (kind, checkpoint, factors,
    latent_channels), e.g. for `vdit eval-ae FOLDER`."""
    spec = _spec(Path(folder))
    return AutoencoderConfig(kind="wan", checkpoint=str(folder), factors=spec.factors,
                             latent_channels=spec.z_dim)


@functools.cache
def _spec_cached(folder: str, mtime: float) -> WanVAESpec:
    try:
        return WanVAESpec.from_diffusers_config(read_config(Path(folder)))
    except ValueError as e:
        raise CheckpointFormatError(f"{folder}: {e}") from None


def _spec(folder: Path) -> WanVAESpec:
    """The folder's spec (read once per version of its config.json)."""
    config = folder / "config.json"
    if not config.is_file():
        read_config(folder)  # raises, naming what is missing
    return _spec_cached(str(folder), config.stat().st_mtime)


def wan_spec(cfg: AutoencoderConfig) -> WanVAESpec:
    """The architecture of `cfg.checkpoint` (checked against the config), or the published one
    of the config's shape when the folder is absent (warned)."""
    try:
        folder = resolve_autoencoder_path(cfg.checkpoint)
    except ConfigError as e:
        known = published_spec(cfg)
        if known is None:
            raise ConfigError(f"{e}; and factors {list(cfg.factors)} with latent_channels "
                              f"{cfg.latent_channels} are no published Wan VAE (Wan 2.1: "
                              "[4, 8, 8] x 16, Wan 2.2: [4, 16, 16] x 48)") from None
        warnings.warn(f"autoencoder.checkpoint {cfg.checkpoint!r} is not here: using the "
                      f"published {known[0]} architecture (weights must come from elsewhere)",
                      stacklevel=2)
        return known[1]
    try:
        spec = _spec(folder)
    except (CheckpointFormatError, FileNotFoundError) as e:
        raise ConfigError(f"autoencoder.checkpoint: {e}") from None
    bad = spec_mismatch(cfg, spec)
    if bad:
        raise ConfigError(f"autoencoder.checkpoint {cfg.checkpoint!r} does not match the "
                          "config:\n  " + "\n  ".join(bad))
    return spec


def build_autoencoder(cfg: AutoencoderConfig) -> Autoencoder:
    """`make_autoencoder(cfg)`, with the Wan architecture read from its checkpoint."""
    return WanAutoencoder(cfg, wan_spec(cfg)) if cfg.kind == "wan" else make_autoencoder(cfg)


def load_wan(cfg: AutoencoderConfig) -> tuple[Autoencoder, dict[str, Any], dict[str, np.ndarray]]:
    """(autoencoder, float32 params, stats {"mean" [C], "std" [C]}) of `autoencoder.kind: wan`;
    the folder must exist, and agree with the config."""
    from vdit.io.diffusers_wan import load_wan_vae

    folder = resolve_autoencoder_path(cfg.checkpoint)
    ae = build_autoencoder(cfg)
    try:
        _, params, stats = load_wan_vae(folder)
    except CheckpointFormatError as e:
        raise ConfigError(f"autoencoder.checkpoint: {e}") from None
    return ae, params, stats
