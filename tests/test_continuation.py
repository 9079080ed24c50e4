"""Continuation: training with clean, loss-free context frames, and `vdit sample --context`."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_dict

from vdit.config import ConfigError, from_dict
from vdit.data.physics import simulate
from vdit.data.pipeline import fixed_batch
from vdit.data.video_io import read_video, upscale, write_mp4
from vdit.diffusion.text_to_video import TextToVideo
from vdit.sample.continuation import continue_videos, fit_context, method_for


def _config(tmp_path, k: int):
    d = tiny_dict(tmp_path / "run")
    d["diffusion"]["context_frames"] = k
    return from_dict(d)


class _Probe:
    """Stands in for the DiT: records its input and returns the velocity it is given."""

    def __init__(self):
        self.seen = {}

    def apply(self, variables, x, t, tokens):
        self.seen.update(x=x, t=t)
        return variables["params"]["v"]


def test_continuation_training_keeps_context_frames_clean_with_zero_loss_there(tmp_path):
    k = 1
    cfg = _config(tmp_path, k)
    system = TextToVideo(cfg)
    batch = fixed_batch(cfg.data, system.tokenizer, "train", 2)
    stats = system.initial_stats(batch["video"])
    x0 = system.batch_latent(batch, stats)
    probe = system.dit = _Probe()
    v = jnp.full(x0.shape, 0.3)
    key = jax.random.key(0)
    loss, _ = system.loss({"v": v}, batch, stats, key)
    np.testing.assert_array_equal(probe.seen["x"][:, :k], x0[:, :k])  # clean context
    assert not np.allclose(probe.seen["x"][:, k:], x0[:, k:])  # the rest is noised
    per_frame = (x0.shape[2] // 2) * (x0.shape[3] // 2)  # tokens per latent frame, patch 1x2x2
    t = np.asarray(probe.seen["t"])
    assert t.shape == (2, x0.shape[1] * per_frame)
    assert np.all(t[:, : k * per_frame] == 0) and np.all(t[:, k * per_frame:] > 0)
    grad = jax.grad(lambda v: system.loss({"v": v}, batch, stats, key)[0])(v)
    assert np.all(grad[:, :k] == 0) and np.all(grad[:, k:] != 0)  # no loss on the context
    assert np.isfinite(float(loss))


def test_context_frames_are_validated_by_name(tmp_path):
    for bad in (-1, 4):  # TINY has 4 latent frames: at least one must be left to generate
        with pytest.raises(ConfigError, match=r"diffusion\.context_frames"):
            _config(tmp_path, bad)
    d = tiny_dict(tmp_path)
    d["diffusion"]["context_frames"] = 1
    d["data"].update(source="shards", shards="x", batching="pack")
    with pytest.raises(ConfigError, match="bucket"):
        from_dict(d)


def test_continuations_keep_their_context_exactly_clean_or_by_replacement(tmp_path):
    k = 2
    cfg = _config(tmp_path, k)  # trained for 2 context frames: clean context
    plain = dataclasses.replace(cfg, diffusion=dataclasses.replace(cfg.diffusion,
                                                                  context_frames=0))
    clip = simulate(cfg.data.world, 5)
    for c, method in ((cfg, "clean"), (plain, "replacement")):
        system = TextToVideo(c)
        assert method_for(c) == method
        params = nn.unbox(jax.jit(system.init)(jax.random.key(0)))["params"]
        stats = system.initial_stats(clip.frames[None])
        out = continue_videos(system, params, stats, clip.frames[None], [clip.caption], k=k,
                              key=jax.random.key(1), cfg=c.sample)
        assert out.shape == clip.frames[None].shape
        # space_to_depth is lossless: the given frames come back to within rounding.
        assert np.abs(out[0, :k].astype(int) - clip.frames[:k]).max() <= 1
        assert np.abs(out[0, k:].astype(int) - clip.frames[k:]).mean() > 5


def test_vdit_sample_with_context_returns_the_context_first(tiny_run, tmp_path, capsys):
    from vdit.cli import main

    cfg = from_dict(tiny_dict())  # what tiny_run was made with
    clip = simulate(cfg.data.world, 11)
    video = write_mp4(tmp_path / "context.mp4", upscale(clip.frames, 4), fps=8)
    given = fit_context(read_video(video)[0], cfg, 2)  # area-averaged back to 16x16
    out = tmp_path / "out"
    args = ["sample", str(tiny_run), "--context", str(video), "--context-frames", "2",
            "--num", "1", "--no-watermark", "--prompt", clip.caption, "--out", str(out)]
    assert main(args) == 0
    assert "by replacement" in capsys.readouterr().out
    frames = read_video(next(out.glob("*.mp4")))[0].astype(np.float32)
    s = frames.shape[1] // 16
    frames = frames.reshape(len(frames), 16, s, 16, s, 3).mean(axis=(2, 4))
    first = np.abs(frames[:2] - given[:2]).mean()
    rest = np.abs(frames[2:] - clip.frames[2:]).mean()
    assert first < 6 < rest, (first, rest)  # mp4 coding is the only loss in the context

    # Bad inputs: too few frames, K beyond the clip, K without a video, a missing file.
    short = write_mp4(tmp_path / "short.mp4", clip.frames[:1], fps=8)
    for extra, message in ((["--context", str(short), "--context-frames", "2"], "1 frames"),
                           (["--context", str(video), "--context-frames", "4"], "[1, 3]"),
                           (["--context-frames", "2"], "needs --context"),
                           (["--context", str(tmp_path / "none.mp4"), "--context-frames", "1"],
                            "cannot decode")):
        assert main(["sample", str(tiny_run), "--out", str(out), *extra]) == 2
        assert message in capsys.readouterr().err
