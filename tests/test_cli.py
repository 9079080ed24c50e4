"""The `vdit` command end to end on a tiny config: train, resume, sample, errors."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import tiny_dict

from vdit.cli import main
from vdit.config import from_dict
from vdit.data.video_io import read_video
from vdit.train.metrics import read_metrics


def _write_config(tmp_path, **train):
    d = tiny_dict(tmp_path / "run")
    d["train"].update(sample_at_end=True, tensorboard=True, **train)
    d["sample"].update(steps=2, num_per_prompt=2)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(d))
    return path, tmp_path / "run"


def test_train_resume_and_sample_end_to_end(tmp_path, capsys):
    config, run = _write_config(tmp_path)
    assert main(["train", str(config)]) == 0
    out = capsys.readouterr().out
    assert "step 0: eval loss" in out and "% of the start" in out

    # The run directory holds everything the README promises.
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["width"] == 32 and saved["train"]["steps"] == 4
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [
        "2", "4"]
    records = read_metrics(run / "metrics.jsonl")
    assert {r["step"] for r in records if "loss" in r} == {1, 2, 3, 4}
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 2, 4]
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
    assert {"mfu", "tokens_per_s", "flops_per_s"} <= set(records[1])
    # Every timed step has real throughput, step 2 (evaluated right after it ran) too, and
    # tokens/s x s/step is the batch's tokens. The last step's record has no timing.
    timed = [r for r in records if "tokens_per_s" in r]
    assert [r["step"] for r in timed] == [1, 2, 3]
    assert all(r["mfu"] > 0 and r["flops_per_s"] > 0 for r in timed)
    cfg = from_dict(yaml.safe_load(config.read_text()))
    tokens = cfg.train.batch_size * cfg.num_tokens()
    assert [r["tokens_per_s"] * r["step_time_s"] for r in timed] == pytest.approx([tokens] * 3)
    assert (run / "loss.png").stat().st_size > 1000
    assert list((run / "tb").iterdir())
    mp4s = sorted((run / "samples").glob("*.mp4"))
    assert len(mp4s) == 2 and (run / "samples" / "grid_s0.gif").exists()
    frames, _ = read_video(mp4s[0])
    assert frames.shape[0] == 4 and frames.shape[1] >= 256  # upscaled for viewing

    # Resume: more steps continue from the last checkpoint instead of starting over.
    assert main(["train", str(config), "train.steps=6", "train.sample_at_end=false"]) == 0
    out = capsys.readouterr().out
    assert "resumed" in out and "at step 4" in out
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]

    # A config that changes the experiment is refused, naming the key.
    assert main(["train", str(config), "model.depth=3"]) == 2
    assert "model.depth" in capsys.readouterr().err

    # A checkpoint step the run does not have is refused, naming the steps it has.
    assert main(["sample", str(run), "--step", "5", "--out", str(tmp_path / "s5")]) == 2
    assert "no checkpoint of step 5" in capsys.readouterr().err

    # Sampling from the run: files, determinism for a seed.
    out_dir = tmp_path / "samples"
    args = ["sample", str(run), "--prompt", "a blue ball rolls right", "--num", "2",
            "--seed", "3", "--out", str(out_dir)]
    assert main(args) == 0
    listing = json.loads((out_dir / "prompts.json").read_text())
    assert listing["prompts"] == ["a blue ball rolls right"] and listing["seed"] == 3
    video = next(out_dir.glob("*_0.mp4"))
    first = read_video(video)[0]
    # Earlier samples are never replaced silently: refused, unless --overwrite.
    capsys.readouterr()
    assert main(args) == 2
    assert "already holds samples" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    np.testing.assert_array_equal(first, read_video(video)[0])
    # Without --out, a run's next samples go beside the end-of-training ones.
    assert main(["sample", str(run), "--num", "1"]) == 0
    assert (run / "samples" / "grid_s0.gif").exists()
    assert (run / "samples-2" / "prompts.json").exists()

    # Every video is marked: a sidecar says AI-generated, and the pixels carry the watermark
    # (the difference to an unmarked render is the faint pattern, >= 40 dB PSNR).
    record = json.loads(video.with_name(video.name + ".json").read_text())
    assert record["ai_generated"] is True and record["seed"] == 3
    assert record["prompt"] == "a blue ball rolls right"
    assert record["watermark_payload"].startswith("0x")
    capsys.readouterr()
    assert main([*args[:-1], str(tmp_path / "plain"), "--no-watermark"]) == 0
    assert "NO invisible watermark" in capsys.readouterr().err
    plain_path = next((tmp_path / "plain").glob("*_0.mp4"))
    assert "DISABLED" in json.loads(plain_path.with_name(plain_path.name + ".json").read_text())[
        "watermark"]
    plain = read_video(plain_path)[0].astype(float)
    mse = np.mean((first.astype(float) - plain) ** 2)
    assert mse > 0 and 10 * np.log10(255**2 / mse) >= 40


def test_detect_finds_the_mark_on_written_samples(tmp_path, capsys):
    """`vdit detect` on videos written by the sampler's writer (physics-world content)."""
    from vdit.data.physics import WorldConfig, simulate
    from vdit.sample.generate import Marking, write_samples

    world = WorldConfig(frames=8, height=32, width=32)
    videos = np.stack([simulate(world, seed).frames for seed in range(2)])
    marked = write_samples(tmp_path / "m", videos, ["a red ball falls"], 2, 8.0, seed=0,
                           model_hash="ab" * 32, marking=Marking(run_id="run@1"))
    plain = write_samples(tmp_path / "p", videos, ["a red ball falls"], 2, 8.0, seed=0,
                          model_hash="ab" * 32, marking=Marking(watermark=False))
    record = json.loads(marked[0].with_name(marked[0].name + ".json").read_text())
    assert main(["detect", str(marked[0]), "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["watermark"] is True and found["payload"] == record["watermark_payload"]
    assert found["sidecar"]["prompt"] == "a red ball falls"
    assert main(["detect", str(plain[0])]) == 1
    assert "not found" in capsys.readouterr().out
    assert main(["detect", str(marked[0]), "--key", "someone-else"]) == 1


def test_config_errors_exit_2_and_name_the_key(tmp_path, capsys):
    config, run = _write_config(tmp_path)
    assert main(["train", str(config), "model.depht=3"]) == 2
    err = capsys.readouterr().err
    assert "model.depht" in err and "depth" in err
    assert not run.exists()  # nothing was written for a bad config
    assert main(["sample", str(tmp_path / "nowhere")]) == 2
    assert "not a vdit run directory" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["bench", "--steps", "0"], "argument --steps: must be >= 1, got 0"),
    (["bench", "--warmup", "-1"], "argument --warmup: must be >= 0, got -1"),
    (["sample", "run", "--num", "0"], "argument --num: must be >= 1, got 0"),
    (["eval-ae", "ae", "--clips", "many"], "argument --clips: expected int, got 'many'"),
    (["tokenize", "out", "--physics", "3", "--fps", "0"], "argument --fps: must be > 0, got 0"),
])
def test_bad_numeric_options_exit_2_and_name_the_option(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_tokenize_refuses_a_process_number_outside_the_process_count(tmp_path, capsys):
    argv = ["tokenize", str(tmp_path / "shards"), "--physics", "2", "--processes", "2"]
    assert main([*argv, "--process", "2"]) == 2
    assert "process 2 of 2: the process number must be in 0..1" in capsys.readouterr().err
    assert not (tmp_path / "shards").exists()


def test_console_script_is_installed():
    vdit = Path(sys.executable).parent / "vdit"
    out = subprocess.run([str(vdit), "--help"], capture_output=True, text=True, check=True)
    assert "train" in out.stdout and "sample" in out.stdout
