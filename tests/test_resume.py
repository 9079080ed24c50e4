"""Kill and resume: a `vdit train` run killed with SIGKILL mid-training, then resumed by the same
command, ends bit-identical to a run never interrupted.

`tools/chaos.py` kills at random moments, many times; this is one deterministic kill small enough
for `make test`. The victim is the real command (`vdit.cli.main(["train", CONFIG])`) in its own
process, with one hook: it kills itself (SIGKILL, no clean-up) when it writes the training record
of step KILL_AT, i.e. with step KILL_AT + 1 in flight and the asynchronous save of the checkpoint
of step KILL_AT (a multiple of the cadence) possibly still being written.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import tiny_dict
from state_checks import assert_states_equal, checkpoint_state

STEPS, EVERY, KILL_AT = 8, 2, 4


def _config(run_dir: Path) -> dict:
    d = tiny_dict(run_dir)
    d["train"].update(steps=STEPS, checkpoint_every=EVERY, eval_every=1000, lr=1e-2,
                      warmup_steps=0, async_checkpoint=True, keep_checkpoints=2)
    return d


def _losses(run_dir: Path) -> dict[int, float]:
    from vdit.train.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def test_a_run_killed_mid_training_resumes_bit_identical(tmp_path, capsys):
    from vdit.cli import main
    from vdit.config import from_dict
    from vdit.train.loop import train

    run = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_config(run)))
    victim = subprocess.run([sys.executable, __file__, str(config), str(KILL_AT)],
                            env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True,
                            text=True, timeout=600)
    assert victim.returncode == -signal.SIGKILL, victim.stderr[-3000:]
    assert max(_losses(run)) == KILL_AT  # its records end where it was killed
    saved = [int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()]
    assert STEPS not in saved and saved, saved

    capsys.readouterr()
    assert main(["train", str(config)]) == 0  # the same command resumes
    out = capsys.readouterr().out
    resumed_at = int(out.split(f"resumed {run} at step ")[1].split()[0])
    assert 0 < resumed_at <= KILL_AT and resumed_at % EVERY == 0, out

    straight = tmp_path / "straight"
    train(from_dict(_config(straight)), log=lambda *_: None)
    assert_states_equal(checkpoint_state(run, STEPS), checkpoint_state(straight, STEPS),
                        what="killed and resumed")
    got, want = _losses(run), _losses(straight)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert [got[s] for s in range(resumed_at + 1, STEPS + 1)] == [
        want[s] for s in range(resumed_at + 1, STEPS + 1)]


def _victim(config: str, kill_at: int) -> None:
    """`vdit train CONFIG` that SIGKILLs itself when it logs step `kill_at`'s training record."""
    from vdit.cli import main
    from vdit.train.metrics import MetricsWriter

    write = MetricsWriter.write

    def write_then_die(self, step: int, values: dict) -> None:
        write(self, step, values)
        if step == kill_at and "loss" in values:
            os.kill(os.getpid(), signal.SIGKILL)

    MetricsWriter.write = write_then_die
    main(["train", config])


if __name__ == "__main__":
    _victim(sys.argv[1], int(sys.argv[2]))
