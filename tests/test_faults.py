"""Faults: non-finite steps, preemption notices, corrupt checkpoints, malformed configs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from conftest import tiny_dict
from hypothesis import given, settings
from hypothesis import strategies as st
from state_checks import LIVE_TRAIN, assert_states_equal, checkpoint_state

from vdit.config import ConfigError, from_dict
from vdit.diffusion.text_to_video import TextToVideo
from vdit.train.guards import TrainingStopped
from vdit.train.loop import train
from vdit.train.metrics import read_metrics


class NonFiniteAt(TextToVideo):
    """The DiT system with every parameter poisoned by NaN at the given (0-based) steps: the NaN
    runs through the forward and the backward pass, so the loss and the gradients are NaN."""

    def __init__(self, cfg, bad_steps):
        super().__init__(cfg)
        self.bad_steps = tuple(bad_steps)

    def loss(self, params, batch, stats, key, step=None):
        poison = jnp.where(jnp.isin(step, jnp.asarray(self.bad_steps)), jnp.nan, 0.0)
        params = jax.tree.map(lambda p: p + poison.astype(p.dtype), params)
        return super().loss(params, batch, stats, key, step)


def _cfg(run_dir: Path, **train):
    d = tiny_dict(run_dir)
    d["train"].update(train)
    return from_dict(d)


UNCHANGED = ("params", "ema_params", "opt_state", "rng")  # all of the state but the step


def test_a_non_finite_step_is_skipped_and_counted(tmp_path):
    """Step 2's gradients are NaN: its update is skipped, so params, both Adam moments (and
    Adam's count), EMA and rng after it equal, bit for bit, the state after step 1; the step
    counter and the `skipped` metric move, and step 3 trains again."""
    run = tmp_path / "run"
    cfg = _cfg(run, steps=4, checkpoint_every=1, keep_checkpoints=4, **LIVE_TRAIN)
    train(cfg, system=NonFiniteAt(cfg, [1]), log=lambda *_: None)
    records = {r["step"]: r for r in read_metrics(run / "metrics.jsonl") if "skipped" in r}
    assert [records[s]["skipped"] for s in (1, 2, 3, 4)] == [0, 1, 0, 0]
    assert np.isnan(records[2]["grad_norm"]) and np.isnan(records[2]["loss"])
    assert np.isfinite(records[3]["grad_norm"]) and records[3]["grad_norm"] > 0
    before, skipped, after = (checkpoint_state(run, s) for s in (1, 2, 3))
    assert int(before["step"][""]) == 1 and int(skipped["step"][""]) == 2
    assert_states_equal(skipped, before, parts=UNCHANGED, what="skipped step 2")
    assert not np.array_equal(after["params"]["final/kernel"],
                              skipped["params"]["final/kernel"])  # step 3 trains again
    assert all(np.isfinite(a).all() for part in ("params", "ema_params", "opt_state")
               for a in after[part].values())


def test_a_run_of_non_finite_steps_stops_naming_steps_and_sources_with_a_checkpoint(tmp_path):
    """Steps 3 on have NaN gradients: after 3 in a row the run stops and checkpoints the state,
    which is the last good one (step 2's) in everything but the step counter."""
    run = tmp_path / "run"
    cfg = _cfg(run, steps=12, checkpoint_every=2, max_bad_steps=3, **LIVE_TRAIN)
    with pytest.raises(TrainingStopped, match=r"not finite at steps 3-5 .*Source ids") as err:
        train(cfg, system=NonFiniteAt(cfg, range(2, 12)), log=lambda *_: None)
    assert "checkpointed" in str(err.value)
    skipped = {r["step"]: r["skipped"] for r in read_metrics(run / "metrics.jsonl")
               if "skipped" in r}
    assert [skipped[s] for s in sorted(skipped)] == [0, 0, 1, 1, 1, 1]  # steps 1-6
    good = checkpoint_state(run, 2)
    for step in (4, 6):  # 6: the stop's checkpoint, saved the step after the third bad one
        state = checkpoint_state(run, step)
        assert int(state["step"][""]) == step
        assert_states_equal(state, good, parts=UNCHANGED, what=f"step {step}")
    assert all(np.isfinite(a).all() for a in good["params"].values())


def test_a_corrupt_latest_checkpoint_is_reported_and_the_previous_one_used(tmp_path):
    run = tmp_path / "run"
    train(_cfg(run, steps=4), log=lambda *_: None)
    newest = run / "checkpoints" / "4"
    for f in [p for p in newest.rglob("*") if p.is_file() and p.stat().st_size > 0]:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncated files
    lines: list[str] = []
    summary = train(_cfg(run, steps=6), log=lambda m: lines.append(str(m)))
    assert any("checkpoint step 4" in m and "cannot be read" in m for m in lines), lines
    assert any("resumed" in m and "at step 2" in m for m in lines), lines
    assert (run / "checkpoints" / "corrupt-4").exists()
    assert summary["eval_loss_end"] > 0


def test_sigterm_saves_a_checkpoint_and_exits_zero_then_the_run_resumes(tmp_path, capsys):
    """SIGTERM mid-run: the step finishes, a checkpoint is saved, exit 0. The same command
    (with 2 more steps) resumes at the saved step, not from 0, and ends in the state of a run
    never interrupted: params, Adam moments, EMA, step and rng bit for bit. The learning rate is
    constant (no warm-up, no decay), so raising train.steps changes no step's update."""
    run = tmp_path / "run"
    d = tiny_dict(run)
    d["train"].update(steps=100000, checkpoint_every=100000, eval_every=100000, lr=1e-2,
                      warmup_steps=0, min_lr_ratio=1.0)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(d))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "vdit.cli", "train", str(tmp_path / "cfg.yaml")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and len(
            metrics.read_text().splitlines()) >= 3):
        time.sleep(0.5)  # polling a running process, not waiting for time to pass
    assert proc.poll() is None, proc.stdout.read()
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert time.time() - sent < 30
    assert "preemption notice: stopped at step" in out
    stopped = int(out.split("stopped at step ")[1].split(",")[0])
    steps = [int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()]
    assert stopped in steps
    logged = len(read_metrics(metrics))
    d["train"]["steps"] = stopped + 2
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(d))
    from vdit.cli import main

    capsys.readouterr()
    assert main(["train", str(tmp_path / "cfg.yaml")]) == 0
    assert f"resumed {run} at step {stopped}" in capsys.readouterr().out
    appended = read_metrics(metrics)[logged:]  # what the resumed run logged
    assert [r["step"] for r in appended if "loss" in r] == [stopped + 1, stopped + 2]
    assert min(r["step"] for r in appended) > stopped, appended  # no fresh start at step 0

    straight = tmp_path / "straight"
    d["train"]["run_dir"] = str(straight)
    train(from_dict(d), log=lambda *_: None)
    resumed = checkpoint_state(run, stopped + 2)
    assert int(resumed["step"][""]) == stopped + 2
    assert_states_equal(resumed, checkpoint_state(straight, stopped + 2), what="resumed")


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(-1e3, 1e3),
                     st.text(max_size=8), st.lists(st.integers(-3, 64), max_size=4))
_sections = st.sampled_from(["model", "text", "autoencoder", "data", "diffusion", "sample",
                             "train", "mesh", "bogus"])
_keys = st.sampled_from(["width", "depth", "heads", "patch", "factors", "kind", "frames",
                         "world", "steps", "lr", "shift", "guidance", "data", "rules",
                         "channels", "tile", "chunk_frames", "max_length", "nonsense"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_sections, st.one_of(_scalars, st.dictionaries(_keys, _scalars,
                                                                       max_size=4)),
                       max_size=4))
def test_random_configs_give_a_config_or_a_config_error_never_a_crash(data):
    base = tiny_dict()
    for section, value in data.items():
        base[section] = ({**base.get(section, {}), **value} if isinstance(value, dict)
                         and isinstance(base.get(section), dict) else value)
    try:
        from_dict(base)
    except ConfigError as e:
        assert str(e)  # every refusal says what is wrong


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512), st.integers(0, 10**6))
def test_random_and_truncated_bytes_into_the_record_decoder_give_a_named_error(data, cut):
    from test_shards import make_record

    from vdit.data.shards import ShardRecordError, decode_record, encode_record

    good = encode_record(make_record(3))
    for blob in (data, good[: cut % len(good)], good[:8] + data):
        try:
            decode_record(blob)
        except ShardRecordError as e:
            assert str(e)


@settings(max_examples=25, deadline=None)
@given(st.binary(min_size=0, max_size=4096))
def test_random_bytes_as_a_video_file_give_a_clean_error(tmp_path_factory, data):
    from vdit.data.video_io import read_video

    path = tmp_path_factory.mktemp("fuzz") / "clip.mp4"
    path.write_bytes(data)
    try:
        frames, _ = read_video(path)
    except ValueError as e:
        assert str(e)
    else:
        assert frames.ndim == 4 and frames.dtype == np.uint8


def test_a_failed_save_keeps_the_previous_checkpoint_and_stops_cleanly(tmp_path, monkeypatch):
    import errno

    from vdit.io.checkpoint import Checkpointer

    real_save = Checkpointer.save

    def save(self, step, state, meta):
        if step >= 4:  # the disk fills up after the first checkpoint
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(self, step, state, meta)

    monkeypatch.setattr(Checkpointer, "save", save)
    run = tmp_path / "run"
    with pytest.raises(TrainingStopped, match=r"step 4 failed .*No space left.*step 2\) is kept"):
        train(_cfg(run, steps=6, async_checkpoint=True), log=lambda *_: None)
    monkeypatch.setattr(Checkpointer, "save", real_save)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2"]
    lines: list[str] = []
    train(_cfg(run, steps=6), log=lambda m: lines.append(str(m)))  # resumes from step 2
    assert any("resumed" in m and "at step 2" in m for m in lines), lines
