"""The learning-rate schedule at every run length: a run shorter than its warm-up (down to one
step) must build, train, and never exceed train.lr (issue #23: `vdit train train.steps=1`
crashed in optax)."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdit.config import TrainConfig
from vdit.train.state import lr_schedule, make_optimizer

WARMUP = TrainConfig().warmup_steps  # the default config's warm-up (100)


def _cases() -> list[tuple[int, int]]:
    """(steps, warmup_steps): 1, 2, the warm-up and one past it, for several warm-ups."""
    out = []
    for warmup in (0, 1, 5, WARMUP):
        out += [(steps, warmup) for steps in sorted({1, 2, max(warmup, 1), warmup + 1})]
    return out


@pytest.mark.parametrize("steps,warmup", _cases())
def test_every_run_length_has_a_sane_schedule(steps, warmup):
    cfg = TrainConfig(steps=steps, warmup_steps=warmup, lr=1e-3, min_lr_ratio=0.1)
    schedule = lr_schedule(cfg)
    # The step function reads the schedule at the optimizer count, 0 .. steps - 1.
    lrs = np.array([float(schedule(s)) for s in range(steps)])
    assert np.all(np.isfinite(lrs)) and np.all(lrs >= 0), lrs
    assert lrs.max() <= cfg.lr * (1 + 1e-6), lrs
    assert lrs.max() > 0, "no step would train"
    assert lrs[-1] >= cfg.lr * cfg.min_lr_ratio * (1 - 1e-6)  # decays no lower than the floor
    warm = min(warmup, steps - 1)  # a short run warms up for at most its own length
    if warm:
        assert lrs[0] == 0 and lrs[warm] == pytest.approx(cfg.lr)
    else:
        assert lrs[0] == pytest.approx(cfg.lr)
    # The optimizer built on it updates parameters with finite values.
    tx = make_optimizer(cfg)
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros((2,))}
    opt = tx.init(params)
    for _ in range(min(steps, 3)):
        updates, opt = tx.update(jax.tree.map(jnp.ones_like, params), opt, params)
        assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


def test_longer_runs_keep_their_schedule():
    """Runs longer than the warm-up: linear to lr at `warmup_steps`, cosine to the floor."""
    cfg = TrainConfig(steps=1000, warmup_steps=100, lr=1e-3, min_lr_ratio=0.1)
    schedule = lr_schedule(cfg)
    assert float(schedule(0)) == 0.0
    assert float(schedule(50)) == pytest.approx(5e-4)
    assert float(schedule(100)) == pytest.approx(1e-3)
    assert float(schedule(1000)) == pytest.approx(1e-4)


# The default config (experiments/default.yaml: the shipped causal VAE, its world) at a tiny DiT
# so the step compiles in seconds; train.steps=1 with the default warm-up of 100 is the case.
SMALL_DIT = ["model.width=32", "model.depth=1", "model.heads=2", "text.width=16", "text.depth=1",
             "text.heads=2", "text.max_length=12", "data.stats_clips=4", "data.num_eval_clips=2",
             "data.prefetch=1", "train.batch_size=2", "train.tensorboard=false",
             "train.sample_at_end=false"]


def test_vdit_train_one_step_from_the_default_config(tmp_path, capsys):
    from vdit.cli import main

    run = tmp_path / "run"
    assert main(["train", *SMALL_DIT, "train.steps=1", f"train.run_dir={run}"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if "loss" in r]
    assert [r["step"] for r in trained] == [1]
    assert math.isfinite(trained[0]["loss"]) and trained[0]["lr"] == pytest.approx(1e-3)
    assert (run / "checkpoints" / "1").is_dir()
    assert "Traceback" not in capsys.readouterr().err
