"""A `model.kind: wan` run end to end (issue 33): physics clips tokenized with the tiny
WanPipeline fixture's UMT5 and Wan VAE (`vdit tokenize --text-encoder PIPELINE/text_encoder`),
trained from perturbed params, stopped and resumed bit-identical to an uninterrupted run,
sampled (`vdit sample`, also continuing a clip), and exported to diffusers (`vdit export --to
diffusers`, with and without `--pipeline`) bit-identically; an own-DiT run is refused.

The interop proof is a committed fixture (tests/fixtures/wan_export/): a tiny wan run's export
(tools/make_wan_export_sample.py, vdit's venv) that diffusers 0.42.1 loaded and ran
(tools/fixtures/wan_export.py, the torch env); here vdit's output on the same inputs is checked
against diffusers' and the committed export against a re-export of its stored params.

The run's helpers (its config, `seed_run`, the fixed inputs) are the fixture tool's own."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import yaml
from flax import traverse_util
from safetensors.numpy import load_file
from state_checks import (
    assert_every_parameter_reached_the_loss,
    assert_states_equal,
    checkpoint_state,
)
from wan_tool import TOOL

from vdit.cli import main
from vdit.io import wan_transformer as wt

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "tests" / "fixtures" / "wan_pipeline" / "wan21"
EXPORT_FIXTURE = ROOT / "tests" / "fixtures" / "wan_export"
STEPS, STOP_AT = 4, 2


def _config_file(tmp: Path, name: str, shards: Path, **train) -> Path:
    d = TOOL.run_config(tmp / name, shards)
    d["train"].update(steps=STEPS, checkpoint_every=2, eval_every=2, async_checkpoint=True,
                      keep_checkpoints=3, **train)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def _train(config: Path, *overrides: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["train", str(config), *overrides]) == 0
    return out.getvalue()


@contextlib.contextmanager
def _preempted_after(step: int):
    """A preemption notice (SIGTERM to this process) when the loop writes the training record
    of `step`: the loop finishes the step in flight, saves it and returns, as on a spot VM."""
    from vdit.train.metrics import MetricsWriter

    write = MetricsWriter.write

    def write_then_notice(self, at: int, values: dict) -> None:
        write(self, at, values)
        if at == step and "loss" in values:
            os.kill(os.getpid(), signal.SIGTERM)

    MetricsWriter.write = write_then_notice
    try:
        yield
    finally:
        MetricsWriter.write = write


def _losses(run: Path, key: str = "loss") -> dict[int, float]:
    from vdit.train.metrics import read_metrics

    return {r["step"]: r[key] for r in read_metrics(run / "metrics.jsonl") if key in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(tmp, straight run, stopped-and-resumed run): 8 physics clips (5 x 32 x 32) tokenized
    with the pipeline fixture's UMT5 and VAE; both runs seeded with the same perturbed params
    (`seed_run`: at init biases are 0 and norm gains 1), 4 steps at lr 1e-3, asynchronous
    checkpoints; one straight (sampling at the end), one stopped by a preemption notice at
    step 2 and resumed by the same command (the same train.steps: the lr schedule's length)."""
    tmp = tmp_path_factory.mktemp("wan_run")
    shards = tmp / "shards"
    straight = _config_file(tmp, "straight", shards, sample_at_end=True)
    resumed = _config_file(tmp, "resumed", shards)
    TOOL.tokenize(shards, 8, straight)
    for config in (straight, resumed):
        TOOL.seed_run(yaml.safe_load(config.read_text()))
    _train(straight)
    with _preempted_after(STOP_AT - 1):  # the notice arrives while step STOP_AT runs
        log = _train(resumed)
    assert f"stopped at step {STOP_AT}, checkpoint saved" in log, log
    log = _train(resumed)  # the same command resumes
    assert f"resumed {tmp / 'resumed'} at step {STOP_AT}" in log, log
    return tmp, tmp / "straight", tmp / "resumed"


def test_resumed_wan_run_is_bit_identical_to_an_uninterrupted_one(runs):
    _, straight, resumed = runs
    want = checkpoint_state(straight, STEPS)
    assert_every_parameter_reached_the_loss(want)  # the perturbed start hides no layer
    assert_states_equal(checkpoint_state(resumed, STEPS), want, what="stopped and resumed")
    for key in ("loss", "eval_loss_ema"):
        got, expected = _losses(resumed, key), _losses(straight, key)
        assert sorted(got) == sorted(expected) and got == expected, key
    # The run names the encoder and VAE it needs; the end-of-training samples were written.
    from vdit.io.hf_t5 import checkpoint_sha256
    from vdit.io.run_dir import run_config

    cfg = run_config(resumed)
    assert cfg.model.kind == "wan" and cfg.autoencoder.kind == "wan"
    assert cfg.text.checkpoint_sha256 == checkpoint_sha256(PIPELINE / "text_encoder")
    assert len(list((straight / "samples").glob("*.mp4"))) == 1


def test_vdit_sample_a_wan_run_and_continue_a_clip(runs, capsys):
    from vdit.data.video_io import read_video
    from vdit.provenance import read_sidecar

    tmp, _, run = runs
    capsys.readouterr()
    assert main(["sample", str(run), "--prompt", "a green ball bounces", "--negative-prompt",
                 "blurry", "--seed", "3", "--out", str(tmp / "samples")]) == 0
    mp4 = [Path(p) for p in capsys.readouterr().out.split() if p.endswith(".mp4")]
    assert len(mp4) == 1
    frames, _ = read_video(mp4[0])
    assert frames.shape[0] == 5 and frames.shape[1] == frames.shape[2]
    sidecar = read_sidecar(mp4[0])
    assert sidecar["ai_generated"] and sidecar["watermark"] == "vdit-ss-luma-v1"
    assert sidecar["prompt"] == "a green ball bounces" and sidecar["seed"] == 3
    # Continuation runs the run's caption encoder too (vdit/sample/continuation.py).
    assert main(["sample", str(run), "--prompt", "a green ball bounces", "--context",
                 str(mp4[0]), "--context-frames", "1", "--out", str(tmp / "continued")]) == 0
    continued = [Path(p) for p in capsys.readouterr().out.split() if p.endswith(".mp4")]
    first, _ = read_video(continued[0])
    assert first.shape == frames.shape


def test_in_step_umt5_pads_captions_with_zeros_as_stored_ones(runs):
    """text.encoder t5 (the frozen UMT5 run inside the step on the stored ids): past a short
    caption's real tokens the embeddings are zero, as `vdit tokenize` stores them and as Wan's
    pipeline pads them; the Wan DiT attends to that padding, so it must not carry T5's outputs
    at the pad positions."""
    from vdit.config import from_dict
    from vdit.data.captions import CaptionEncoder, resolve_text, text_stats
    from vdit.diffusion.text_to_video import TextToVideo

    tmp = runs[0]
    d = TOOL.run_config(tmp / "t5", tmp / "shards")
    d["text"].update(encoder="t5", checkpoint=str(PIPELINE / "text_encoder"))
    cfg = resolve_text(from_dict(d))
    system, stats = TextToVideo(cfg), text_stats(cfg)
    encoder = CaptionEncoder(str(PIPELINE / "text_encoder"), 8, "bfloat16")
    ids, mask, _ = encoder.tokenize(["a ball", "a red ball falls down, fast"])
    assert 0 < mask.sum() < mask.size  # one caption is padded
    emb, got_mask = jax.jit(system.batch_text)({"tokens": ids}, stats)
    emb = np.asarray(emb)
    np.testing.assert_array_equal(np.asarray(got_mask), mask > 0)
    assert not emb[mask == 0].any()
    stored = encoder.embed_ids(ids, mask).astype(np.float32)
    np.testing.assert_allclose(emb, stored, rtol=1e-2, atol=1e-3)  # bf16 rounding of either


def _flat(tree) -> dict:
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def test_export_to_diffusers_then_import_is_bit_identical(runs, capsys):
    from vdit.io.hf_folder import folder_sha256
    from vdit.io.wan_pipeline import resolve_pipeline

    tmp, _, run = runs
    state = checkpoint_state(run)
    assert main(["export", str(run), "--to", "diffusers", "--out", str(tmp / "ema")]) == 0
    spec, params = wt.load_params(tmp / "ema" / "transformer")
    got = _flat(params)
    assert got.keys() == state["ema_params"].keys()
    for name, want in state["ema_params"].items():  # the EMA, bit for bit
        np.testing.assert_array_equal(got[name], want, err_msg=name)
    assert spec.model.width == 24 and spec.text_dim == 16 and spec.in_channels == 4
    info = json.loads((tmp / "ema" / "vdit_export.json").read_text())
    assert (info["weights"], info["dtype"], info["step"]) == ("ema", "float32", STEPS)

    # --raw --dtype bfloat16 --pipeline: a whole pipeline folder, the raw params rounded.
    out = tmp / "pipeline"
    assert main(["export", str(run), "--to", "diffusers", "--raw", "--dtype", "bfloat16",
                 "--pipeline", str(PIPELINE), "--out", str(out)]) == 0
    _, raw = wt.load_params(out / "transformer")
    for name, value in _flat(raw).items():
        want = state["params"][name].astype(ml_dtypes.bfloat16).astype(np.float32)
        np.testing.assert_array_equal(value, want, err_msg=name)
    pipe = resolve_pipeline(out)  # a WanPipeline folder vdit (and diffusers) read
    assert pipe.transformer.model.depth == 2 and pipe.transformer_2 is None
    assert json.loads((out / "model_index.json").read_text()) == json.loads(
        (PIPELINE / "model_index.json").read_text())
    for part, weights in (("text_encoder", "model.safetensors"),
                          ("vae", "diffusion_pytorch_model.safetensors")):
        assert folder_sha256(out / part, weights) == folder_sha256(PIPELINE / part, weights)
    for part in ("tokenizer", "scheduler"):
        for f in (PIPELINE / part).iterdir():
            assert (out / part / f.name).read_bytes() == f.read_bytes()
    assert not (out / "reference.safetensors").exists()  # only the pipeline's parts
    # Written over (--overwrite), the export is the same.
    assert main(["export", str(run), "--to", "diffusers", "--out", str(tmp / "ema")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["export", str(run), "--to", "diffusers", "--out", str(tmp / "ema"),
                 "--overwrite"]) == 0
    np.testing.assert_array_equal(wt.load_params(tmp / "ema" / "transformer")[1]["proj_out"][
        "kernel"], params["proj_out"]["kernel"])


def _damaged_pipeline(tmp: Path, part: str) -> Path:
    folder = tmp / f"other-{part}"
    shutil.copytree(PIPELINE, folder)
    if part == "vae":  # another VAE's statistics: the same architecture, other latents
        config = json.loads((folder / "vae" / "config.json").read_text())
        config["latents_std"] = [s * 1.5 for s in config["latents_std"]]
        (folder / "vae" / "config.json").write_text(json.dumps(config))
    else:  # another text encoder of the same shape
        from safetensors.numpy import save_file

        path = folder / "text_encoder" / "model.safetensors"
        tensors = load_file(str(path))
        name = sorted(tensors)[0]
        tensors[name] = tensors[name] * 2
        save_file(tensors, str(path))
    return folder


@pytest.mark.parametrize("part", ["text_encoder", "vae"])
def test_export_refuses_a_pipeline_the_run_did_not_train_with(runs, capsys, part):
    tmp, _, run = runs
    other = _damaged_pipeline(tmp, part)
    capsys.readouterr()
    code = main(["export", str(run), "--to", "diffusers", "--pipeline", str(other),
                 "--out", str(tmp / f"refused-{part}")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("vdit export: error: --pipeline") and "Traceback" not in err
    assert f"{part}/" in err and "not the pipeline this run trained with" in err, err
    assert not (tmp / f"refused-{part}" / "model_index.json").exists()


def test_own_dit_run_is_refused(tmp_path, capsys):
    from conftest import tiny_dict

    from vdit.config import from_dict
    from vdit.io.run_dir import save_config

    run = tmp_path / "dit"
    save_config(run, from_dict(tiny_dict(run)))
    assert main(["export", str(run), "--to", "diffusers"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vdit export: error: --to diffusers:")
    assert "model.kind 'dit'" in err and "model.kind 'wan'" in err, err
    assert main(["export", str(run), "--to", "safetensors", "--dtype", "bfloat16"]) == 2
    assert "--dtype and --pipeline go with --to diffusers" in capsys.readouterr().err


# --- the committed interop fixture ---------------------------------------------------------

def _fixture_config():
    from vdit.config import from_dict

    sample = json.loads((EXPORT_FIXTURE / "sample.json").read_text())
    d = sample["config"]
    d["autoencoder"]["checkpoint"] = str(ROOT / d["autoencoder"]["checkpoint"])
    d["text"]["checkpoint"] = str(ROOT / d["text"]["checkpoint"])
    d["data"]["shards"] = "unused"
    return from_dict(d), sample


def test_diffusers_runs_the_committed_export_as_vdit_does():
    """diffusers 0.42.1 loaded the committed `vdit export --to diffusers` folder (sharded, with
    its index) and ran it on zero-padded captions without a mask; vdit's training-time call
    (`apply_dit`: embeddings and mask) on the imported weights gives the same output."""
    cfg, _ = _fixture_config()
    inputs = load_file(str(EXPORT_FIXTURE / "vdit_outputs.safetensors"))
    theirs = load_file(str(EXPORT_FIXTURE / "diffusers_outputs.safetensors"))["sample"]
    record = json.loads((EXPORT_FIXTURE / "diffusers_outputs.json").read_text())
    assert record["diffusers"] == "0.42.1" and record["max_rel_diff"] <= 1e-5
    _, params = wt.load_params(EXPORT_FIXTURE / "transformer")
    ours = TOOL.vdit_output(cfg, params, inputs)
    scale = np.abs(theirs).max()
    assert scale > 0.5 and np.abs(ours - theirs).max() / scale <= 1e-5
    assert np.abs(ours - inputs["sample"]).max() / scale <= 1e-6  # what the tool recorded
    # The zero padding matters in diffusers: vdit must not mask it either.
    cut = {**inputs, "text_mask": np.ones_like(inputs["text_mask"])}
    np.testing.assert_array_equal(TOOL.vdit_output(cfg, params, cut), ours)


def test_committed_export_is_a_re_export_of_its_params(tmp_path):
    """The committed transformer/ is, file for file and byte for byte, what the export code
    writes today from the params it was made from (and imports back to them), so a change in
    the export's layout or config shows here; non-contiguous params export the same."""
    from vdit.export.diffusers import write_transformer

    cfg, sample = _fixture_config()
    stored = load_file(str(EXPORT_FIXTURE / "params.safetensors"))
    params = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in stored.items()})
    _, imported = wt.load_params(EXPORT_FIXTURE / "transformer")
    assert _flat(imported).keys() == stored.keys()
    assert all(np.array_equal(_flat(imported)[k], v) for k, v in stored.items())
    committed = sorted(p.name for p in (EXPORT_FIXTURE / "transformer").iterdir())
    for name, tree in (("c", params), ("fortran", jax.tree.map(np.asfortranarray, params))):
        out = write_transformer(tmp_path / name, cfg, tree,
                                max_shard_bytes=sample["max_shard_bytes"])
        assert sorted(p.name for p in out.iterdir()) == committed
        for f in committed:
            assert (out / f).read_bytes() == (EXPORT_FIXTURE / "transformer" / f).read_bytes(), (
                name, f)
