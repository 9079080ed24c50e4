"""docs/real-data.md, end to end on real footage: a folder of mp4 clips (pans and zooms over
scikit-image's photographs) + captions.jsonl -> `vdit tokenize --text-encoder` (the T5 fixture)
-> `vdit train` packed, stopped and resumed -> `vdit sample --prompt` to mp4 -> `vdit export
--to stablehlo` -> tools/run_exported.py on caption embeddings. Behaviour, not quality."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import yaml
from real_clips import T5_FIXTURE, make_clips
from safetensors.numpy import save_file

from vdit.cli import main

CONFIG = {
    "model": {"width": 32, "depth": 1, "heads": 2, "patch": [1, 2, 2]},
    "text": {"encoder": "precomputed", "width": 32, "max_length": 64},  # bf16 embeddings
    "autoencoder": {"kind": "space_to_depth", "factors": [1, 4, 4]},
    "data": {"world": {"frames": 9, "height": 32, "width": 32}, "source": "shards",
             "batching": "pack", "pack_budget": 288, "pack_clips": 2, "num_eval_clips": 2,
             "stats_clips": 4, "prefetch": 1},
    "diffusion": {"eval_timesteps": [0.5]},
    "sample": {"steps": 2, "guidance": 3.0, "num_per_prompt": 1},
    "train": {"steps": 4, "batch_size": 2, "warmup_steps": 1, "log_every": 1, "eval_every": 100,
              "checkpoint_every": 2, "async_checkpoint": False, "tensorboard": False,
              "sample_at_end": False},
}
PROMPT = "a tabby cat looks at the camera while the view zooms in"


def _run_exported():
    path = Path(__file__).resolve().parents[1] / "tools" / "run_exported.py"
    spec = importlib.util.spec_from_file_location("run_exported", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_real_footage_to_sample_and_export(tmp_path, capsys):
    from vdit.data.captions import CaptionEncoder
    from vdit.data.video_io import read_video
    from vdit.io.hf_t5 import checkpoint_sha256
    from vdit.io.run_dir import run_config
    from vdit.sample.generate import generate
    from vdit.sample.loading import load_for_sampling
    from vdit.train.trainer import load_run

    captions = make_clips(tmp_path)  # clips/*.mp4 (48x48 and 40x64) + captions.jsonl
    encoder = tmp_path / "t5-encoder"  # the user's downloaded encoder folder
    shutil.copytree(T5_FIXTURE, encoder)
    shards, run = tmp_path / "shards", tmp_path / "run"
    config = tmp_path / "real.yaml"
    cfg = json.loads(json.dumps(CONFIG))
    cfg["data"]["shards"], cfg["train"]["run_dir"] = str(shards), str(run)
    config.write_text(yaml.safe_dump(cfg))

    assert main(["tokenize", str(shards), str(config), "--videos", str(tmp_path / "clips"),
                 "--captions", str(captions), "--text-encoder", str(encoder),
                 "--buckets", "9x32x32,9x32x48", "--shard-size", "4"]) == 0
    report = capsys.readouterr().out
    assert "captions truncated to text.max_length 64: 1" in report
    assert "text encoder: 6 captions" in report and "bucket 9x32x48: 3" in report

    # Train packed for 2 steps, resume to 4; an uninterrupted run must end identical.
    for steps in (2, 4):
        assert main(["train", str(config), f"train.steps={steps}"]) == 0
    assert main(["train", str(config), f"train.run_dir={tmp_path / 'straight'}"]) == 0
    (_, _, resumed), (_, _, straight) = load_run(run), load_run(tmp_path / "straight")
    for a, b in zip(*map(lambda s: __import__("jax").tree.leaves(s.params), (resumed, straight)),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(resumed.step) == 4 and resumed.stats["null_text"].shape == (64, 32)
    text = run_config(run).text  # the run names the encoder it needs
    assert text.checkpoint == str(encoder.resolve())
    assert text.checkpoint_sha256 == checkpoint_sha256(encoder)

    # Sample a prompt (with a negative prompt) to mp4.
    capsys.readouterr()
    assert main(["sample", str(run), "--prompt", PROMPT, "--negative-prompt", "blurry",
                 "--seed", "0", "--out", str(tmp_path / "samples")]) == 0
    mp4 = [Path(p) for p in capsys.readouterr().out.split() if p.endswith(".mp4")]
    frames, _ = read_video(mp4[0])
    assert len(mp4) == 1 and frames.shape[0] == 9 and frames.shape[1] == frames.shape[2]
    sidecar = json.loads(Path(f"{mp4[0]}.json").read_text())
    assert sidecar["prompt"] == PROMPT

    # Without its encoder the run cannot read a prompt: the error names path and checksum.
    encoder.rename(tmp_path / "moved")
    assert main(["sample", str(run), "--prompt", PROMPT, "--out", str(tmp_path / "s2")]) == 2
    err = capsys.readouterr().err
    assert str(encoder.resolve()) in err and text.checkpoint_sha256 in err
    (tmp_path / "moved").rename(encoder)

    # Export: the StableHLO sampler takes caption embeddings made by the run's encoder.
    export = tmp_path / "export"
    assert main(["export", str(run), "--to", "stablehlo", "--out", str(export)]) == 0
    info = json.loads((export / "tokenizer.json").read_text())
    assert info["kind"] == "embeddings" and info["text_encoder"]["sha256"] == text.checkpoint_sha256
    caption = CaptionEncoder(str(encoder), 64, "bfloat16").conditioning([PROMPT])
    save_file({"text": caption[0][0], "text_mask": caption[1][0]},
              str(tmp_path / "caption.safetensors"))
    out = tmp_path / "video.npy"
    assert _run_exported().main([str(export), "--embeddings", str(tmp_path / "caption.safetensors"),
                                 "--seed", "0", "--out", str(out)]) == 0
    cfg_, system, params, stats, _ = load_for_sampling(export)
    expected = generate(system, params, stats, [PROMPT], num=1, seed=0, cfg=cfg_.sample)
    np.testing.assert_array_equal(np.load(out), expected)
