"""The causal video autoencoder: causality, the one-frame path, chunked = one-shot, odd sizes,
the KL term, training, and the DiT consuming a trained autoencoder."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdit.config import AutoencoderConfig, ConfigError, from_dict
from vdit.models.autoencoder import CausalAutoencoder, valid_size
from vdit.models.causal_vae import kl_divergence
from vdit.models.tiling import _tiled, decode_tiled, encode_tiled

SMALL = AutoencoderConfig(channels=(8, 16, 16), latent_channels=4, chunk_frames=4, tile=64,
                          tile_overlap=16)


@pytest.fixture(scope="module")
def ae_and_params():
    ae = CausalAutoencoder(SMALL)
    video = jnp.zeros((1, 5, 16, 16, 3))
    params = ae.init(jax.random.key(0), video)
    # Zero-initialised branches would hide most of the network: perturb every weight.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    leaves = [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)]
    return ae, jax.tree.unflatten(tree, leaves)


def _video(key: int, frames: int, size: int = 16) -> jax.Array:
    return jax.random.uniform(jax.random.key(key), (1, frames, size, size, 3), minval=-1,
                              maxval=1)


def test_latent_of_frame_k_depends_only_on_frames_up_to_k(ae_and_params):
    ae, params = ae_and_params
    video = _video(2, 13)  # latents: frame 0, then chunks 1-4, 5-8, 9-12
    base = ae.encode(params, video)
    assert base.shape == (1, 4, 2, 2, 4)
    for k, chunk in ((6, 2), (9, 3), (1, 1)):
        changed = ae.encode(params, video.at[:, k].add(0.5))
        diff = np.abs(np.asarray(changed - base)).max(axis=(0, 2, 3, 4))
        assert np.all(diff[:chunk] == 0.0), (k, diff)
        assert diff[chunk] > 1e-4, (k, diff)
    # The decoder is causal too: latent j changes no frame before 1 + 4 (j - 1).
    frames = ae.decode(params, base)
    moved = ae.decode(params, base.at[:, 2].add(1.0))
    diff = np.abs(np.asarray(moved - frames)).max(axis=(0, 2, 3, 4))
    assert np.all(diff[:5] == 0.0) and diff[5] > 1e-4


def test_first_frame_is_encoded_alone_and_a_still_image_is_a_one_frame_video(ae_and_params):
    ae, params = ae_and_params
    video = _video(3, 9)
    image = video[:, :1]
    latent_image = ae.encode(params, image)
    assert latent_image.shape == (1, 1, 2, 2, 4)
    np.testing.assert_allclose(latent_image[:, 0], ae.encode(params, video)[:, 0], atol=1e-5)
    assert ae.decode(params, latent_image).shape == (1, 1, 16, 16, 3)


def test_time_chunked_encode_and_decode_equal_one_shot(ae_and_params):
    ae, params = ae_and_params
    video = _video(4, 17)
    one_shot = ae.encode(params, video)
    chunked = encode_tiled(ae, params, video)  # chunks of 1 + 4, then 4 frames
    assert chunked.shape == one_shot.shape == (1, 5, 2, 2, 4)
    np.testing.assert_allclose(chunked, one_shot, atol=1e-4)
    np.testing.assert_allclose(decode_tiled(ae, params, one_shot), ae.decode(params, one_shot),
                               atol=1e-4)


def test_spatial_tiles_blend_to_the_input_for_a_pointwise_function():
    x = np.random.default_rng(0).normal(size=(1, 2, 40, 56, 3)).astype(np.float32)
    # Any pointwise map commutes with tiling, so blending must reproduce it exactly.
    out = _tiled(lambda t: 2.0 * t, x, tile=16, overlap=8, scale=1.0)
    np.testing.assert_allclose(out, 2.0 * x, rtol=1e-6)


def test_odd_frame_counts_and_sizes_are_padded_with_a_warning_and_cropped_back(ae_and_params):
    ae, params = ae_and_params
    assert valid_size(7, 20, 28, (4, 8, 8)) == (9, 24, 32)
    video = _video(5, 7, 20)[:, :, :, :12]  # 7 frames of 20 x 12
    with pytest.warns(UserWarning, match="padded to 9 frames of 24x16"):
        latent = ae.encode(params, video)
    assert latent.shape == (1, 3, 3, 2, 4)
    assert ae.decode(params, latent, size=(7, 20, 12)).shape == (1, 7, 20, 12, 3)


def test_kl_term_is_zero_at_the_prior_positive_elsewhere_and_scaled_per_element():
    zeros = jnp.zeros((2, 3, 4))
    assert float(kl_divergence(zeros, zeros)) == 0.0
    # KL(N(1, 1) || N(0, 1)) = 1/2 per element, averaged (not summed) over elements.
    assert float(kl_divergence(jnp.ones((2, 3, 4)), zeros)) == pytest.approx(0.5)
    rng = np.random.default_rng(0)
    mean, logvar = rng.normal(size=(64,)), rng.normal(size=(64,))
    expected = 0.5 * np.mean(mean**2 + np.exp(logvar) - 1 - logvar)
    assert float(kl_divergence(jnp.asarray(mean), jnp.asarray(logvar))) == pytest.approx(
        expected, rel=1e-5)
    assert expected > 0


def ae_dict(run_dir) -> dict:
    return {
        "autoencoder": {"kind": "causal_vae", "channels": [8, 16, 16], "latent_channels": 4,
                        "ssim_weight": 0.2, "disc_weight": 0.1, "disc_start": 2},
        "data": {"world": {"frames": 5, "height": 16, "width": 16}, "num_eval_clips": 2,
                 "stats_clips": 4, "prefetch": 1},
        "train": {"run_dir": str(run_dir), "steps": 4, "batch_size": 2, "lr": 3e-3,
                  "warmup_steps": 1, "log_every": 1, "eval_every": 2, "checkpoint_every": 2,
                  "async_checkpoint": False, "tensorboard": False, "sample_at_end": False},
    }


def test_training_steps_lower_the_reconstruction_error_with_the_discriminator_on(tmp_path):
    from vdit.data.physics import physics_tokenizer
    from vdit.data.pipeline import fixed_batch
    from vdit.train.autoencoder_system import AutoencoderSystem
    from vdit.train.trainer import build_trainer

    cfg = from_dict(ae_dict(tmp_path / "ae"))
    system = AutoencoderSystem(cfg)
    trainer = build_trainer(cfg, system)
    batch = trainer.device_batch(fixed_batch(cfg.data, physics_tokenizer(12), "train", 2))
    error = jax.jit(lambda p: system.evaluate(p, batch, {}, jax.random.key(0))["l1"])
    state = trainer.state
    with trainer.context():
        before = float(error(state.params))
        for _ in range(6):
            state, metrics = trainer.step_fn(state, batch)
        after = float(error(state.params))
    assert after < 0.9 * before, (before, after)
    # The discriminator trains from disc_start = 2 on, beside the autoencoder.
    assert "disc" in state.params and float(metrics["d_loss"]) > 0


def test_train_ae_eval_ae_export_and_a_dit_on_the_trained_latent(tmp_path, capsys):
    import json

    import yaml
    from conftest import tiny_dict

    from vdit.cli import main

    ae_dir = tmp_path / "ae"
    (tmp_path / "ae.yaml").write_text(yaml.safe_dump(ae_dict(ae_dir)))
    assert main(["train-ae", str(tmp_path / "ae.yaml")]) == 0
    assert (ae_dir / "reconstructions.gif").exists()
    assert main(["eval-ae", str(ae_dir), "--clips", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 < result["psnr_db"] < 100 and -1 <= result["ssim"] <= 1
    assert result["latent"] == [2, 2, 2, 4]
    assert main(["export", str(ae_dir), "--out", str(tmp_path / "ae_export")]) == 0

    dit = tiny_dict(tmp_path / "dit")
    dit["autoencoder"] = {"kind": "causal_vae", "channels": [8, 16, 16], "latent_channels": 4,
                          "checkpoint": str(tmp_path / "ae_export")}
    dit["data"]["world"] = {"frames": 5, "height": 16, "width": 16}
    dit["model"]["patch"] = [1, 1, 1]
    dit["train"]["steps"] = 2
    (tmp_path / "dit.yaml").write_text(yaml.safe_dump(dit))
    assert main(["train", str(tmp_path / "dit.yaml")]) == 0

    # Stats travel with the DiT: they are the autoencoder's, and so are its params.
    from vdit.io.run_dir import load_autoencoder
    from vdit.train.trainer import load_run

    _, ae_params, ae_stats = load_autoencoder(tmp_path / "ae_export")
    _, _, state = load_run(tmp_path / "dit")
    np.testing.assert_array_equal(state.stats["mean"], ae_stats["mean"])
    np.testing.assert_array_equal(state.stats["autoencoder"]["encoder"]["stem"]["kernel"],
                                  ae_params["encoder"]["stem"]["kernel"])

    # An architecture that does not match the checkpoint is refused, naming the field.
    dit["autoencoder"]["latent_channels"] = 8
    dit["train"]["run_dir"] = str(tmp_path / "dit2")
    (tmp_path / "dit2.yaml").write_text(yaml.safe_dump(dit))
    assert main(["train", str(tmp_path / "dit2.yaml")]) == 2
    assert "autoencoder.latent_channels: config 8, checkpoint 4" in capsys.readouterr().err

    # The DiT checkpoint holds the autoencoder's params, so the run samples after its
    # autoencoder export is gone.
    (tmp_path / "ae_export").rename(tmp_path / "ae_export_moved")
    assert main(["sample", str(tmp_path / "dit"), "--num", "1", "--out",
                 str(tmp_path / "samples")]) == 0
    assert list((tmp_path / "samples").glob("*.mp4"))
    # ... and resumes: the checkpoint brings the autoencoder back.
    assert main(["train", str(tmp_path / "dit.yaml"), "train.steps=3"]) == 0
    _, _, state = load_run(tmp_path / "dit")
    assert int(state.step) == 3
    np.testing.assert_array_equal(state.stats["autoencoder"]["encoder"]["stem"]["kernel"],
                                  ae_params["encoder"]["stem"]["kernel"])


def test_config_refuses_frame_counts_the_causal_autoencoder_cannot_take():
    from conftest import tiny_dict

    d = tiny_dict()
    d["autoencoder"] = {"kind": "causal_vae", "checkpoint": "x"}
    d["data"]["world"] = {"frames": 8, "height": 16, "width": 16}
    with pytest.raises(ConfigError, match=r"data.world.frames: .* needs 1 \+ 4k frames"):
        from_dict(d)
