"""Whole diffusers WanPipeline folders (vdit/io/wan_pipeline.py, vdit/sample/pipeline.py) against
diffusers' own run of the same folder: the prompt embeddings, the UniPC trajectory with CFG and
a negative prompt, the final latents and the decoded frames; Wan 2.2's two experts switching at
diffusers' step; and `vdit sample --pipeline` end to end to marked mp4s.

Fixtures: tests/fixtures/wan_pipeline/{wan21,wan22}/, written by
`tools/make_reference_fixtures.py wan_pipeline` (diffusers 0.42.1): tiny UMT5 + Wan VAE +
transformer(s) + UniPC (flow_shift 3 / 12), 6 steps at 5 x 32 x 48, fixed initial latents.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from pipeline_cases import bthwc, ncthw, reference_case, trajectory

from vdit.io.hf_folder import CheckpointFormatError
from vdit.io.wan_pipeline import resolve_pipeline
from vdit.sample import pipeline as wp

FIXTURES = Path(__file__).parent / "fixtures" / "wan_pipeline"


def _case(name: str):
    return reference_case(FIXTURES / name)


@pytest.fixture(scope="module")
def wan21():
    folder, ref, meta, settings = _case("wan21")
    loaded = wp.load_pipeline(resolve_pipeline(folder), settings)
    return loaded, ref, meta, settings


_ncthw, _bthwc, _trajectory = ncthw, bthwc, trajectory


def test_prompt_embeddings_match_the_pipeline(wan21):
    loaded, ref, meta, _ = wan21
    for key, prompt in (("prompt_embeds", meta["prompt"]),
                        ("negative_prompt_embeds", meta["negative_prompt"])):
        got = wp.embed_prompts(loaded, [prompt], "float32")
        np.testing.assert_allclose(got, ref[key], atol=2e-5, err_msg=key)
        n = meta["seq_lens"]["prompt" if key == "prompt_embeds" else "negative"]
        assert not got[0, n:].any() and got[0, :n].any()  # zero-padded after the real tokens


def test_latents_and_frames_match_diffusers(wan21):
    loaded, ref, meta, settings = wan21
    _, _, steps = _trajectory(loaded, ref, meta, settings)
    scale = np.abs(ref["latents_final"]).max()
    for i in range(settings.steps):  # every step, so a wrong step is named
        err = np.abs(steps[i] - ref["latents_steps"][i, 0]).max() / scale
        assert err <= 1e-4, f"step {i}: {err:.2e}"
    videos, latents = wp.generate(loaded, [meta["prompt"]], meta["negative_prompt"], num=1,
                                  seed=0, settings=settings,
                                  noise=np.moveaxis(ref["latents_init"], 1, -1))
    err = np.abs(_ncthw(latents) - ref["latents_final"]).max() / scale
    assert err <= 1e-4, err
    frames = wp.decode(loaded.vae, loaded.vae_params, loaded.stats,
                       jnp.asarray(np.moveaxis(ref["latents_final"], 1, -1)))
    frames01 = np.clip(np.asarray(frames) / 2 + 0.5, 0, 1)
    assert np.abs(frames01 - ref["frames"]).max() <= 1e-3
    # the uint8 videos written are those frames, rounded
    assert np.abs(videos.astype(np.float32) / 255 - ref["frames"]).max() <= 1e-3 + 0.5 / 255


def test_zero_padding_to_512_tokens_matters_and_matches(wan21):
    """At the recipe's 512 tokens the padding is attended (Wan masks nothing): the final
    latents differ from the 24-token run, and match diffusers' 512-token run."""
    loaded, ref, meta, settings = wan21
    import dataclasses

    long = dataclasses.replace(settings, text_length=512)
    loaded512 = dataclasses.replace(loaded, encoder=type(loaded.encoder)(
        str(loaded.spec.text_encoder), 512, "float32"))
    _, latents = wp.generate(loaded512, [meta["prompt"]], meta["negative_prompt"], num=1,
                             seed=0, settings=long, noise=np.moveaxis(ref["latents_init"], 1, -1))
    scale = np.abs(ref["len512/latents_final"]).max()
    assert np.abs(_ncthw(latents) - ref["len512/latents_final"]).max() / scale <= 1e-4
    assert np.abs(ref["len512/latents_final"] - ref["latents_final"]).max() > 0.05


def test_wan22_experts_switch_at_diffusers_step():
    folder, ref, meta, settings = _case("wan22")
    spec = resolve_pipeline(folder)
    assert spec.transformer_2 is not None and spec.boundary_ratio == meta["boundary_ratio"]
    loaded = wp.load_pipeline(spec, settings)
    schedule_t = np.asarray(meta["timesteps"])
    experts = (schedule_t < spec.boundary_ratio * 1000).astype(int)
    np.testing.assert_array_equal(experts, ref["expert"].astype(int))
    assert 0 < meta["switch_step"] < settings.steps  # both experts run
    _, _, steps = _trajectory(loaded, ref, meta, settings)
    scale = np.abs(ref["latents_final"]).max()
    for i in range(settings.steps):
        err = np.abs(steps[i] - ref["latents_steps"][i, 0]).max() / scale
        assert err <= 1e-4, f"step {i} (expert {experts[i]}): {err:.2e}"


def test_refuses_wrong_folders(tmp_path):
    with pytest.raises(CheckpointFormatError, match=r"has no model_index\.json"):
        resolve_pipeline(FIXTURES)
    folder = tmp_path / "p"
    shutil.copytree(FIXTURES / "wan21", folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(
        {**index, "_class_name": "WanImageToVideoPipeline"}))
    with pytest.raises(CheckpointFormatError, match="image-to-video"):
        resolve_pipeline(folder)
    (folder / "model_index.json").write_text(json.dumps(index))
    shutil.rmtree(folder / "vae")
    with pytest.raises(CheckpointFormatError, match="vae/ is missing"):
        resolve_pipeline(folder)


def test_settings_are_checked_naming_the_flag():
    spec = resolve_pipeline(FIXTURES / "wan21")
    bad = wp.check_settings(spec, wp.PipelineSettings(frames=6, height=30, width=48,
                                                      guidance_2=2.0))
    assert any(p.startswith("--frames") and "try 5" in p for p in bad)
    assert any(p.startswith("--height") and "multiple of 16" in p for p in bad)
    assert any(p.startswith("--guidance-2") for p in bad)


def test_vdit_sample_pipeline_writes_marked_mp4s(tmp_path, capsys):
    from vdit.cli import main
    from vdit.data.video_io import read_video

    args = ["sample", "--pipeline", str(FIXTURES / "wan21"), "--prompt", "a red ball",
            "--negative-prompt", "grey wall", "--frames", "5", "--height", "32", "--width",
            "48", "--steps", "3", "--text-length", "24", "--out"]
    assert main([*args, str(tmp_path / "m")]) == 0
    videos = sorted((tmp_path / "m").glob("*.mp4"))
    assert len(videos) == 1 and (tmp_path / "m" / "grid_s0.gif").exists()
    record = json.loads(videos[0].with_name(videos[0].name + ".json").read_text())
    assert record["ai_generated"] is True and record["prompt"] == "a red ball"
    assert record["watermark_payload"].startswith("0x")
    assert record["pipeline"]["steps"] == 3 and record["pipeline"]["negative_prompt"] == (
        "grey wall")
    # the pixels carry the mark: a faint difference to the same video unmarked (noisy tiny
    # frames re-encode less cleanly than physics clips: >= 30 dB)
    assert main([*args, str(tmp_path / "p"), "--no-watermark"]) == 0
    plain = read_video(next((tmp_path / "p").glob("*.mp4")))[0].astype(float)
    marked = read_video(videos[0])[0].astype(float)
    mse = np.mean((marked - plain) ** 2)
    assert mse > 0 and 10 * np.log10(255 ** 2 / mse) >= 30
    # a run's flags are refused with --pipeline, and the two sources exclude each other
    assert main([*args, str(tmp_path / "x"), "--raw"]) == 2
    assert "--raw" in capsys.readouterr().err
    assert main(["sample", "--frames", "5", str(FIXTURES)]) == 2
    assert "--frames is for --pipeline" in capsys.readouterr().err
