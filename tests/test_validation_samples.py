"""Validation samples during training (`train.sample_every`, vdit/train/validation.py).

One tiny run samples every 2 steps of 4 and is stopped by a preemption notice at step 2 (at a
sample step, before it samples) and resumed; another trains the same 4 steps without samples.
Checked: the sample sets appear at steps 0, 2 and 4 (the resumed run makes the stopped step's),
marked, with sidecars naming the step and the EMA params of that step; they are exactly what
`vdit sample` makes from that step's checkpoint with the config's seed; TensorBoard holds a
marked image per sample step; the two runs' states and losses are bit-identical; each run
process traced the sampler once. A tiny `model.kind: wan` run (UMT5 captions, Wan VAE) samples
at every step with one sampler and its caption encoder loaded once.
"""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import tiny_dict
from state_checks import assert_states_equal, checkpoint_state

from vdit.provenance.manifest import WATERMARK_SCHEME

STEPS, EVERY, STOP_AT = 4, 2, 2
SAMPLE_STEPS = [0, 2, 4]


class _Counting:
    """Counts calls of a class's method while active (`TextToVideo.generate` runs once per
    trace of a jitted sampler)."""

    def __init__(self, cls, name: str):
        self.cls, self.name, self.calls = cls, name, 0
        self.real = getattr(cls, name)

    def __enter__(self):
        real = self.real

        def counted(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        setattr(self.cls, self.name, counted)
        return self

    def __exit__(self, *exc):
        setattr(self.cls, self.name, self.real)


def _config(run: Path, **train) -> dict:
    d = tiny_dict(run)
    d["train"].update(steps=STEPS, checkpoint_every=2, keep_checkpoints=3, **train)
    return d


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(config, sampled run, plain run, traces per leg of the sampled run)."""
    from test_wan_run import _preempted_after

    from vdit.config import from_dict
    from vdit.diffusion.text_to_video import TextToVideo
    from vdit.train.loop import train

    tmp = tmp_path_factory.mktemp("validation")
    sampled, plain = tmp / "sampled", tmp / "plain"
    cfg = from_dict(_config(sampled, sample_every=EVERY, tensorboard=True))
    logs, traces = [], []
    for leg in range(2):
        with _Counting(TextToVideo, "generate") as count:
            if leg == 0:
                with _preempted_after(STOP_AT - 1):  # the notice arrives while step 2 runs
                    train(cfg, log=logs.append)
            else:
                train(cfg, log=logs.append)
        traces.append(count.calls)
    assert any(f"resumed {sampled} at step {STOP_AT}" in line for line in logs), logs
    train(from_dict(_config(plain)), log=lambda *_: None)
    return cfg, sampled, plain, traces


def _sample_steps(run: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("step_")) for p in (run / "samples").glob("step_*"))


def test_sample_sets_appear_at_the_sample_steps_marked_with_sidecars(runs):
    from vdit.provenance import make_payload, read_sidecar
    from vdit.sample.generate import params_hash

    cfg, run, plain, _ = runs
    assert _sample_steps(run) == SAMPLE_STEPS  # step 2 made after the resume, at its start
    assert not (plain / "samples").exists()
    for step in SAMPLE_STEPS:
        out = run / "samples" / f"step_{step}"
        mp4s = sorted(out.glob("*.mp4"))
        assert len(mp4s) == len(cfg.sample.prompts) * cfg.sample.num_per_prompt
        assert (out / f"grid_s{cfg.sample.seed}.gif").exists()
        index = json.loads((out / "prompts.json").read_text())
        assert index["train_step"] == step and index["seed"] == cfg.sample.seed
        record = read_sidecar(mp4s[0])
        assert record["train_step"] == step and record["run"] == f"{run.name}@{step}"
        assert record["watermark"] == WATERMARK_SCHEME and record["seed"] == cfg.sample.seed
        if step:  # the EMA params of that step made them
            ema = checkpoint_state(run, step)["ema_params"]
            assert record["model_hash"] == params_hash(list(ema.values()))
        # The mark's payload names that model and run step (vdit detect reads it back: the
        # writer's own tests, on physics content; these noise-like tiny videos mark weakly).
        payload = make_payload(record["model_hash"], record["run"])
        assert record["watermark_payload"] == f"{payload:#010x}"


def test_samples_are_vdit_samples_of_that_checkpoint_with_the_configs_seed(runs, tmp_path):
    """Keys come from sample.seed alone: `vdit sample RUN --step 4` makes the same frames."""
    from vdit.cli import main
    from vdit.data.video_io import read_video

    _, run, _, _ = runs
    assert main(["sample", str(run), "--step", str(STEPS), "--out", str(tmp_path)]) == 0
    ours = sorted((run / "samples" / f"step_{STEPS}").glob("*.mp4"))
    theirs = sorted(tmp_path.glob("*.mp4"))
    assert [p.name for p in ours] == [p.name for p in theirs]
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(read_video(a)[0], read_video(b)[0], err_msg=a.name)


def _tensorboard_images(tb: Path) -> dict[int, np.ndarray]:
    """{step: image} of the `samples` image summaries in a TensorBoard folder's event files
    (TFRecord framing: u64 length, u32 crc, Event proto, u32 crc)."""
    from PIL import Image
    from tensorboardX.proto import event_pb2

    images = {}
    for path in sorted(tb.glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for value in event.summary.value:
                if value.tag == "samples" and value.HasField("image"):
                    png = value.image.encoded_image_string
                    images[event.step] = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    return images


def test_tensorboard_gets_a_marked_frame_grid_per_sample_step(runs):
    """The image at step 4 is, pixel for pixel, the marked grid of first, middle and last
    frames of the videos generated from that step's checkpoint."""
    from vdit.provenance import read_sidecar
    from vdit.sample.generate import Marking, generate
    from vdit.sample.loading import load_for_sampling
    from vdit.train.validation import frame_grid

    cfg, run, _, _ = runs
    images = _tensorboard_images(run / "tb")
    assert sorted(images) == SAMPLE_STEPS
    _, system, params, stats, _ = load_for_sampling(run, STEPS)
    s = cfg.sample
    videos = generate(system, params, stats, list(s.prompts), num=s.num_per_prompt,
                      seed=s.seed, cfg=s)
    record = read_sidecar(next((run / "samples" / f"step_{STEPS}").glob("*.mp4")))
    payload = int(record["watermark_payload"], 16)
    np.testing.assert_array_equal(images[STEPS], frame_grid(videos, Marking(), payload))
    assert not np.array_equal(images[STEPS],
                              frame_grid(videos, Marking(watermark=False), payload))


def test_the_frame_grid_is_marked_and_laid_out_a_row_per_video(tiny_config):
    """On physics clips (the sampled noise above marks too weakly to read back)."""
    from vdit.data.pipeline import fixed_batch
    from vdit.data.video_io import display_scale
    from vdit.diffusion.text_to_video import TextToVideo
    from vdit.provenance import detect
    from vdit.sample.generate import Marking
    from vdit.train.validation import frame_grid

    cfg = tiny_config
    videos = fixed_batch(cfg.data, TextToVideo(cfg).tokenizer, "eval", 2)["video"]
    n, t, h, w, _ = videos.shape
    image = frame_grid(videos, Marking(), 0x12345678)
    k = display_scale(h, w)
    assert image.shape == (n * (h * k + 2) - 2, 3 * (w * k + 2) - 2, 3)  # 2-pixel gaps
    plain = frame_grid(videos, Marking(watermark=False), 0)
    for col, frame in enumerate((0, t // 2, t - 1)):  # first, middle and last frames
        tile_ = plain[h * k + 2:2 * h * k + 2, col * (w * k + 2):col * (w * k + 2) + w * k]
        np.testing.assert_array_equal(tile_[::k, ::k], videos[1, frame])
    found = detect(image[None])
    assert found.present and found.payload == 0x12345678, found


def test_training_is_bit_identical_with_and_without_samples(runs):
    from vdit.train.metrics import read_metrics

    _, run, plain, _ = runs
    for step in (STOP_AT, STEPS):  # params, optimizer state, EMA, step and training rng
        assert_states_equal(checkpoint_state(run, step), checkpoint_state(plain, step),
                            what=f"step {step}")

    def metrics(r: Path) -> dict:
        return {(m["step"], k): v for m in read_metrics(r / "metrics.jsonl")
                for k, v in m.items() if k == "loss" or k.startswith("eval_")}

    got, want = metrics(run), metrics(plain)
    assert got == want and len(want) >= STEPS


def test_one_compiled_sampler_per_run(runs):
    """Leg 1 sampled step 0, leg 2 steps 2 and 4: one trace of the sampler each."""
    *_, traces = runs
    assert traces == [1, 1], traces


def test_sample_every_must_not_be_negative():
    from vdit.config import ConfigError, from_dict

    d = tiny_dict()
    d["train"]["sample_every"] = -1
    with pytest.raises(ConfigError, match="sample_every"):
        from_dict(d)


def test_a_wan_run_samples_with_one_sampler_and_one_caption_encoder(tmp_path):
    """`model.kind: wan` with UMT5 captions (tests/test_wan_run.py's tiny run and helpers):
    sample sets at steps 0, 1, 2 from one trace, the caption encoder loaded once."""
    from test_wan_run import TOOL

    from vdit.config import from_dict
    from vdit.data.captions import CaptionEncoder
    from vdit.diffusion.text_to_video import TextToVideo
    from vdit.provenance import read_sidecar
    from vdit.train.loop import train

    shards, run = tmp_path / "shards", tmp_path / "run"
    d = TOOL.run_config(run, shards)
    d["train"].update(steps=2, sample_every=1, eval_every=2)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(d))
    TOOL.tokenize(shards, 4, config)
    with _Counting(CaptionEncoder, "__init__") as loads, \
            _Counting(TextToVideo, "generate") as traces:
        train(from_dict(d), log=lambda *_: None)
    assert _sample_steps(run) == [0, 1, 2]
    assert traces.calls == 1 and loads.calls == 1, (traces.calls, loads.calls)
    record = read_sidecar(next((run / "samples" / "step_2").glob("*.mp4")))
    assert record["train_step"] == 2 and record["watermark"] == WATERMARK_SCHEME
