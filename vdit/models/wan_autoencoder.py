"""`autoencoder.kind: wan` behind vdit's autoencoder interface (vdit/models/autoencoder.py).

The architecture is the checkpoint's config.json (`WanVAESpec`), read by vdit/io/autoencoders.py
and passed in here: models/ reads no files. The config section keeps `factors` and
`latent_channels` because every shape check of a config (latent shape, patch divisibility,
token counts) is a pure function of the YAML; `spec_mismatch` names any disagreement with the
checkpoint, and the loader refuses it.

Two published architectures are known by their shape, for planning (`vdit plan`) and for
building a model whose checkpoint folder is not on this machine (its weights then come from a
run's TrainState.stats): Wan 2.1 (4x8x8, 16 channels; diffusers' defaults) and Wan 2.2
(TI2V-5B: 4x16x16, 48 channels).
"""

from __future__ import annotations

from vdit.config import AutoencoderConfig
from vdit.models.wan_vae import WanVAE, WanVAESpec

PUBLISHED = {
    "Wan 2.1": WanVAESpec(),
    "Wan 2.2": WanVAESpec(base_dim=160, decoder_base_dim=256, z_dim=48,
                          latents_mean=(0.0,) * 48, latents_std=(1.0,) * 48,
                          is_residual=True, patch_size=2),
}


def published_spec(cfg: AutoencoderConfig) -> tuple[str, WanVAESpec] | None:
    """(name, spec) of the published Wan VAE with the config's factors and channels, or None."""
    for name, spec in PUBLISHED.items():
        if spec.factors == tuple(cfg.factors) and spec.z_dim == cfg.latent_channels:
            return name, spec
    return None


def spec_mismatch(cfg: AutoencoderConfig, spec: WanVAESpec) -> list[str]:
    """Lines naming each of `factors` / `latent_channels` where config and checkpoint differ."""
    bad = []
    if tuple(cfg.factors) != spec.factors:
        bad.append(f"autoencoder.factors: config {list(cfg.factors)}, checkpoint "
                   f"{list(spec.factors)}")
    if cfg.latent_channels != spec.z_dim:
        bad.append(f"autoencoder.latent_channels: config {cfg.latent_channels}, checkpoint "
                   f"{spec.z_dim}")
    return bad


class WanAutoencoder(WanVAE):
    """The Wan VAE with the config section the rest of vdit reads (`cfg.factors`, tiling's
    `cfg.chunk_frames` / `tile` / `tile_overlap`). Video float [B, T, H, W, 3] in [-1, 1] <->
    latent [B, 1 + (T - 1) / 4, H / f, W / f, z_dim]; `encode` is the posterior mean."""

    def __init__(self, cfg: AutoencoderConfig, spec: WanVAESpec):
        bad = spec_mismatch(cfg, spec)
        if bad:
            raise ValueError(f"autoencoder.checkpoint {cfg.checkpoint!r} does not match the "
                             "config:\n  " + "\n  ".join(bad))
        super().__init__(spec)
        self.cfg = cfg
