"""`autoencoder.kind: wan` behind vdit's interface: tokenize (videos and still images) -> shards
-> packed training -> sample, eval-ae on footage, tiling / time chunks equal to one shot, and
the config refusals. Uses the tiny Wan 2.1 fixture (tests/fixtures/wan/wan21: 4x8x8, 4 channels).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from PIL import Image
from real_clips import pan_zoom, photo

from vdit.cli import main
from vdit.config import AutoencoderConfig, ConfigError, from_dict
from vdit.data.buckets import SkipClip, choose_bucket, prepare_clip

WAN21 = Path(__file__).parent / "fixtures" / "wan" / "wan21"
AE = {"kind": "wan", "checkpoint": str(WAN21), "factors": [4, 8, 8], "latent_channels": 4,
      "chunk_frames": 4, "tile": 32, "tile_overlap": 16}
CONFIG = {
    "model": {"width": 32, "depth": 1, "heads": 2, "patch": [1, 2, 2]},
    "text": {"max_length": 8},
    "autoencoder": AE,
    "data": {"world": {"frames": 5, "height": 32, "width": 32}, "source": "shards",
             "batching": "pack", "pack_budget": 24, "pack_clips": 4, "num_eval_clips": 2,
             "stats_clips": 2, "prefetch": 1},
    "diffusion": {"eval_timesteps": [0.5]},
    "sample": {"steps": 2, "guidance": 2.0, "num_per_prompt": 1},
    "train": {"steps": 2, "batch_size": 1, "warmup_steps": 1, "log_every": 1,
              "eval_every": 100, "checkpoint_every": 2, "async_checkpoint": False,
              "tensorboard": False, "sample_at_end": False},
}
CAPTION = "a red ball falls"


def _footage(folder: Path) -> Path:
    """folder/clips: two 5-frame mp4 pans (32x32, 32x40), a png, a jpg and a webp photograph
    (other sizes) and a file that is no image; -> captions.jsonl."""
    from vdit.data.video_io import write_mp4

    clips = folder / "clips"
    clips.mkdir(parents=True)
    write_mp4(clips / "astronaut.mp4", pan_zoom(photo("astronaut"), 5, (32, 32), 0), 8.0)
    write_mp4(clips / "coffee.mp4", pan_zoom(photo("coffee"), 5, (32, 40), 1), 8.0)
    for name, source, size in (("chelsea.png", "chelsea", (48, 40)),
                               ("rocket.jpg", "rocket", (36, 36)),
                               ("astro.webp", "astronaut", (40, 56))):
        Image.fromarray(pan_zoom(photo(source), 1, size, 2)[0]).save(clips / name)
    (clips / "broken.png").write_bytes(b"not an image")
    names = ["astronaut.mp4", "coffee.mp4", "chelsea.png", "rocket.jpg", "astro.webp",
             "broken.png"]
    captions = folder / "captions.jsonl"
    captions.write_text("".join(json.dumps({"path": n, "caption": CAPTION}) + "\n"
                                for n in names))
    return captions


def test_tokenize_videos_and_images_train_packed_sample_and_eval(tmp_path, capsys):
    from vdit.data.shard_pipeline import shard_dataset
    from vdit.data.video_io import read_video

    captions = _footage(tmp_path)
    shards, run = tmp_path / "shards", tmp_path / "run"
    cfg = json.loads(json.dumps(CONFIG))
    cfg["data"]["shards"], cfg["train"]["run_dir"] = str(shards), str(run)
    config = tmp_path / "wan.yaml"
    config.write_text(yaml.safe_dump(cfg))

    assert main(["tokenize", str(shards), str(config), "--videos", str(tmp_path / "clips"),
                 "--captions", str(captions), "--buckets", "5x32x32,1x32x32",
                 "--dtype", "float32"]) == 0
    index = json.loads((shards / "index.json").read_text())
    assert index["buckets"] == {"1x32x32": 3, "5x32x32": 2}
    assert index["skipped"] == {"unreadable": 1}
    assert index["autoencoder"]["kind"] == "wan"

    # A packed row holds both kinds: a video's 2x4x4 latent is 8 tokens, an image's 1x4x4 4.
    rows = shard_dataset(str(shards), batch=1, caption_length=8, seed=0, mode="pack",
                         budget=24, clips_per_row=4, read_ahead=0)
    ids = next(iter(rows))["segment_ids"][0]
    sizes = sorted(int((ids == s).sum()) for s in set(ids.tolist()) - {0})
    assert 4 in sizes and 8 in sizes, sizes

    assert main(["train", str(config)]) == 0
    capsys.readouterr()
    assert main(["sample", str(run), "--prompt", CAPTION, "--seed", "0",
                 "--out", str(tmp_path / "samples")]) == 0
    mp4 = [p for p in capsys.readouterr().out.split() if p.endswith(".mp4")]
    frames, _ = read_video(mp4[0])
    assert frames.shape[0] == 5 and frames.shape[1] == frames.shape[2]  # upscaled for view

    # eval-ae on the footage, each file at its own size (images as one-frame clips).
    out = tmp_path / "eval"
    assert main(["eval-ae", str(WAN21), "--videos", str(tmp_path / "clips"), "--frames", "5",
                 "--tile", "48", "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    shapes = {r["clip"]: r["video"] for r in result["per_clip"]}
    assert shapes["coffee.mp4"] == [5, 32, 40] and shapes["chelsea.png"] == [1, 48, 40]
    assert [r["tiled"] for r in result["per_clip"] if r["clip"] == "astro.webp"] == [True]
    assert len(result["skipped"]) == 1 and result["skipped"][0].startswith("broken.png")
    assert result["clips"] == 5 and 0 < result["ssim_min"] <= result["ssim"] <= 1
    assert np.isfinite(result["psnr_db"]) and result["perceptual"] is None
    assert (out / "eval_ae.gif").stat().st_size > 0
    assert json.loads((out / "eval_ae.json").read_text())["psnr_db"] == result["psnr_db"]

    # eval-ae on the clips behind the shards: each file re-read and fitted to its record's
    # bucket, as tokenize did, so the coffee pan is scored at 5x32x32, not at 5x32x40.
    assert main(["eval-ae", str(WAN21), "--shards", str(shards), "--tile", "48", "--out",
                 str(tmp_path / "eval-shards"), "--json"]) == 0
    on_shards = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    shapes = {r["clip"]: r["video"] for r in on_shards["per_clip"]}
    assert on_shards["clips"] == 5 and on_shards["source"] == str(shards)
    assert shapes["coffee.mp4"] == [5, 32, 32] and shapes["chelsea.png"] == [1, 32, 32]
    assert 0 < on_shards["ssim_min"] <= on_shards["ssim"] <= 1


def test_tiled_and_time_chunked_encode_decode_equal_one_shot():
    from vdit.io.autoencoders import load_wan
    from vdit.models.tiling import decode_tiled, encode_tiled

    # 9 frames: chunks of 1 + 4, then 4; one 16-pixel tile (exact, as for the causal VAE).
    ae, params, _ = load_wan(AutoencoderConfig(**{**AE, "tile": 16, "tile_overlap": 8}))
    video = jax.random.uniform(jax.random.key(0), (1, 9, 16, 16, 3), minval=-1, maxval=1)
    one_shot = np.asarray(ae.encode(params, video))
    np.testing.assert_allclose(encode_tiled(ae, params, video), one_shot, atol=1e-4)
    np.testing.assert_allclose(decode_tiled(ae, params, one_shot),
                               np.asarray(ae.decode(params, one_shot)), atol=1e-4)


def _cfg(**ae):
    base = json.loads(json.dumps(CONFIG))
    base["autoencoder"].update(ae)
    base["data"]["shards"] = "unused"
    return from_dict(base)


@pytest.mark.parametrize("change, named", [
    ({"latent_channels": 16}, "autoencoder.latent_channels: config 16, checkpoint 4"),
    ({"factors": [4, 16, 16]}, "autoencoder.factors: config [4, 16, 16], checkpoint [4, 8, 8]"),
])
def test_a_config_that_disagrees_with_the_checkpoint_is_refused_naming_both(change, named):
    from vdit.diffusion.text_to_video import TextToVideo

    with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace("]", r"\]")):
        TextToVideo(_cfg(**change))


def test_a_missing_folder_plans_with_the_published_architecture_or_is_refused(tmp_path):
    from vdit.io.autoencoders import build_autoencoder, load_wan

    gone = str(tmp_path / "Wan2.1-T2V-14B-Diffusers" / "vae")
    wan21 = AutoencoderConfig(kind="wan", checkpoint=gone, factors=(4, 8, 8), latent_channels=16)
    with pytest.warns(UserWarning, match="published Wan 2.1"):
        assert build_autoencoder(wan21).spec.base_dim == 96
    with pytest.raises(ConfigError, match="does not exist"):
        load_wan(wan21)  # weights always need the folder
    odd = AutoencoderConfig(kind="wan", checkpoint=gone, factors=(4, 8, 8), latent_channels=4)
    with warnings.catch_warnings(), pytest.raises(ConfigError, match="no published Wan VAE"):
        build_autoencoder(odd)
    with pytest.raises(ValueError, match=r"autoencoder\.checkpoint: autoencoder\.kind 'wan'"):
        _cfg(checkpoint="")


def test_images_take_one_frame_buckets_and_videos_the_others():
    buckets = [(5, 32, 32), (1, 32, 32), (1, 32, 64)]
    assert choose_bucket(1, 300, 600, buckets, still=True) == (1, 32, 64)
    assert choose_bucket(9, 300, 600, buckets) == (5, 32, 32)  # not the wider image bucket
    assert choose_bucket(9, 30, 60, [(1, 32, 32)]) == (1, 32, 32)  # image-only training
    for frames in (1, 3):  # a video too short for every video bucket is no still image
        with pytest.raises(SkipClip, match="too_short"):
            choose_bucket(frames, 32, 32, buckets)
    with pytest.raises(SkipClip, match="no_image_bucket"):
        choose_bucket(1, 32, 32, [(5, 32, 32)], still=True)
    image = np.zeros((1, 40, 60, 3), np.uint8)  # no frame-rate resampling for a still
    video, bucket = prepare_clip(image, 0.0, 8.0, buckets)
    assert video.shape == (1, 32, 64, 3) and bucket == (1, 32, 64)
    for frames, fps_out in ((1, None), (2, 4.0)):  # a one-frame video is still a video
        with pytest.raises(SkipClip, match="too_short"):
            prepare_clip(np.zeros((frames, 32, 64, 3), np.uint8), 8.0, fps_out, buckets)


def test_latent_statistics_and_frozen_params_come_from_the_checkpoint():
    from vdit.diffusion.text_to_video import TextToVideo

    config = json.loads((WAN21 / "config.json").read_text())
    system = TextToVideo(_cfg())
    stats = system.initial_stats(np.zeros((0,), np.float32))
    np.testing.assert_allclose(stats["mean"], config["latents_mean"], rtol=1e-6)
    np.testing.assert_allclose(stats["std"], config["latents_std"], rtol=1e-6)
    shapes = jax.tree.map(lambda x: x.shape, system.stats_shapes()["autoencoder"])
    assert jax.tree.map(lambda x: x.shape, stats["autoencoder"]) == shapes
