"""The autoencoder training system (`vdit train-ae`): the causal VAE, its loss and its metrics.

Loss = l1_weight * L1 + mse_weight * MSE + ssim_weight * (1 - SSIM) + kl_weight * KL
[+ disc_weight * adversarial after disc_start steps]. Params are {"vae": ..., ["disc": ...]}:
one optimizer updates both, with the discriminator's gradient taken from its own hinge loss
(the VAE's gradient never sees it).

`stats` carries the per-channel latent mean and std [C] over `data.stats_clips` training clips,
recomputed with the EMA params at every checkpoint, so each checkpoint holds the statistics a
DiT needs to normalise this autoencoder's latents.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vdit.config import Config
from vdit.data.video_io import display_scale, tile, upscale
from vdit.diffusion.text_to_video import to_float, to_uint8
from vdit.eval.quality import psnr, ssim
from vdit.models.autoencoder import CausalAutoencoder
from vdit.models.causal_vae import kl_divergence
from vdit.models.discriminator import PatchDiscriminator, hinge_d_loss

Stats = dict[str, jax.Array]


class AutoencoderSystem:
    """Static parts of autoencoder training; every method is a pure function of its inputs."""

    kind = "autoencoder"
    primary_metric = ("psnr", "dB", "higher")  # what progress lines and summaries report

    def __init__(self, cfg: Config):
        if cfg.autoencoder.kind != "causal_vae":
            raise ValueError(f"vdit train-ae trains autoencoder.kind 'causal_vae', got "
                             f"{cfg.autoencoder.kind!r}")
        self.cfg = cfg
        self.ae = CausalAutoencoder(cfg.autoencoder)
        self.disc = PatchDiscriminator() if cfg.autoencoder.disc_weight > 0 else None
        w = cfg.data.world
        self.video_shape = (w.frames, w.height, w.width, 3)

    def init(self, key: jax.Array) -> dict:
        video = jnp.zeros((1, *self.video_shape), jnp.float32)
        k_vae, k_disc = jax.random.split(key)
        params = {"vae": self.ae.init(k_vae, video)}
        if self.disc is not None:
            params["disc"] = self.disc.init(k_disc, video)["params"]
        return {"params": params}

    # --- latent statistics ------------------------------------------------------------------
    def initial_stats(self, videos: np.ndarray) -> Stats:
        c = self.cfg.autoencoder.latent_channels
        return {"mean": jnp.zeros((c,), jnp.float32), "std": jnp.ones((c,), jnp.float32)}

    def sharded_stats(self) -> dict:
        return {}

    def stats_shapes(self) -> Stats:
        channels = jax.ShapeDtypeStruct((self.cfg.autoencoder.latent_channels,), jnp.float32)
        return {"mean": channels, "std": channels}

    def latent_stats(self, params: dict, videos: jax.Array) -> Stats:
        """Per-channel mean and std [C] of the posterior means of uint8 videos [B, T, H, W, 3]."""
        lat = self.ae.encode(params["vae"], to_float(videos))
        axes = tuple(range(lat.ndim - 1))
        return {"mean": lat.mean(axes), "std": jnp.maximum(lat.std(axes), 1e-3)}

    # --- training objective -----------------------------------------------------------------
    def loss(self, params: dict, batch: dict, stats: Stats, key: jax.Array, step: jax.Array):
        """(loss, metrics) on batch {"video": uint8 [B, T, H, W, 3], ...}."""
        cfg = self.cfg.autoencoder
        x = to_float(batch["video"])
        recon, mean, logvar = self.ae.module.apply({"params": params["vae"]}, x, key)
        l1 = jnp.mean(jnp.abs(recon - x))
        mse = jnp.mean((recon - x) ** 2)
        structural = jnp.mean(ssim(recon, x, data_range=2.0))
        kl = kl_divergence(mean, logvar)
        total = (cfg.l1_weight * l1 + cfg.mse_weight * mse + cfg.ssim_weight * (1.0 - structural)
                 + cfg.kl_weight * kl)
        metrics = {"l1": l1, "mse": mse, "ssim": structural, "kl": kl}
        if self.disc is not None:
            on = (step >= cfg.disc_start).astype(jnp.float32)
            disc_params = jax.lax.stop_gradient(params["disc"])
            g_adv = -jnp.mean(self.disc.apply({"params": disc_params}, recon))
            d_loss = hinge_d_loss(
                self.disc.apply({"params": params["disc"]}, x),
                self.disc.apply({"params": params["disc"]}, jax.lax.stop_gradient(recon)))
            total = total + on * (cfg.disc_weight * g_adv + d_loss)
            metrics.update(g_adv=g_adv, d_loss=d_loss)
        return total, metrics

    # --- evaluation ---------------------------------------------------------------------------
    def evaluate(self, params: dict, batch: dict, stats: Stats, key: jax.Array) -> dict:
        """Reconstruction quality of the posterior mean on a fixed batch, in uint8 space."""
        return {k: jnp.mean(v) for k, v in self.evaluate_per_clip(params, batch["video"]).items()}

    def evaluate_per_clip(self, params: dict, videos: jax.Array) -> dict:
        """{"psnr": [B] dB, "ssim": [B], "l1": [B] (uint8 levels)} of the reconstructions of
        uint8 videos [B, T, H, W, 3]."""
        recon = self.reconstruct(params, videos)
        err = jnp.abs(recon.astype(jnp.float32) - videos.astype(jnp.float32))
        return {"psnr": psnr(recon, videos), "ssim": ssim(recon, videos),
                "l1": err.mean(axis=(1, 2, 3, 4))}

    def reconstruct(self, params: dict, videos: jax.Array) -> jax.Array:
        """uint8 [B, T, H, W, 3] -> its uint8 reconstruction through the posterior mean."""
        latent = self.ae.encode(params["vae"], to_float(videos))
        return to_uint8(self.ae.decode(params["vae"], latent, size=videos.shape[1:4]))



def side_by_side(system: AutoencoderSystem, params: dict, videos) -> np.ndarray:
    """uint8 [N, T, H, W, 3] -> one video: each original beside its reconstruction, a row each,
    upscaled (nearest) for viewing: [T, H', W', 3]."""
    videos = np.asarray(videos)
    recon = np.asarray(jax.jit(system.reconstruct)(params, jnp.asarray(videos)))
    pairs = np.stack([videos, recon], axis=1).reshape(-1, *videos.shape[1:])
    grid = tile(pairs, columns=2)
    return upscale(grid, display_scale(*videos.shape[2:4], target=128))
