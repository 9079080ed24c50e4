"""The embedded default (experiments/default.yaml: `make demo`, a bare `vdit train`) runs on the
learned causal VAE shipped in checkpoints/autoencoder-4x8x8."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from vdit.config import ConfigError, load_config
from vdit.io.run_dir import load_autoencoder, resolve_autoencoder_path

# The default at a tiny DiT: the same autoencoder, world and latent, a model that compiles fast.
TINY_DIT = ["model.width=32", "model.depth=1", "model.heads=2", "text.width=16", "text.depth=1",
            "text.heads=2", "text.max_length=12", "data.stats_clips=4", "data.num_eval_clips=2",
            "data.prefetch=1", "train.batch_size=4", "train.warmup_steps=1", "train.lr=3e-3"]


def test_the_default_names_the_shipped_vae_and_finds_it_from_any_directory(tmp_path,
                                                                           monkeypatch):
    from vdit.io.safetensors_io import is_export

    cfg = load_config()
    assert cfg.autoencoder.kind == "causal_vae"
    assert cfg.latent_shape() == (3, 4, 4, 16) and cfg.data.world.frames == 9
    shipped = resolve_autoencoder_path(cfg.autoencoder.checkpoint).resolve()
    assert is_export(shipped)
    # A relative path that is not under the working directory is looked up in the checkout.
    monkeypatch.chdir(tmp_path)
    assert resolve_autoencoder_path(cfg.autoencoder.checkpoint) == shipped
    # A path found nowhere is refused, naming where it was looked for.
    with pytest.raises(ConfigError, match=r"checkpoints/missing-ae does not exist .*"
                                          + str(tmp_path)):
        resolve_autoencoder_path("checkpoints/missing-ae")


def test_the_default_trains_a_dit_on_the_shipped_vaes_normalised_latents(tmp_path):
    from vdit.data.pipeline import fixed_batch
    from vdit.train.trainer import build_trainer

    cfg = load_config(None, [*TINY_DIT, f"train.run_dir={tmp_path / 'run'}"])
    trainer = build_trainer(cfg)
    state, system = trainer.state, trainer.system
    # The DiT's statistics and frozen encoder are the export's.
    _, ae_params, ae_stats = load_autoencoder(cfg.autoencoder.checkpoint)
    np.testing.assert_array_equal(state.stats["mean"], ae_stats["mean"])
    np.testing.assert_array_equal(state.stats["std"], ae_stats["std"])
    np.testing.assert_array_equal(state.stats["autoencoder"]["encoder"]["stem"]["kernel"],
                                  ae_params["encoder"]["stem"]["kernel"])

    host = fixed_batch(cfg.data, system.tokenizer, "train", cfg.train.batch_size)
    batch = trainer.device_batch(host)
    with trainer.context():
        # Normalised latents of training clips are near zero-mean, unit-std per channel.
        z = np.asarray(jax.jit(system.encode)(batch["video"], state.stats))
        assert z.shape == (4, 3, 4, 4, 16)
        assert np.abs(z.mean((0, 1, 2, 3))).max() < 1.0
        std = z.std((0, 1, 2, 3))
        assert std.min() > 0.3 and std.max() < 3.0, std
        losses = []
        for _ in range(3):
            state, metrics = trainer.step_fn(state, batch)
            losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all() and int(state.step) == 3, losses
