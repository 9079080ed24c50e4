"""LoRA files for the Wan DiT (vdit/io/wan_lora.py, vdit/models/lora.py) against diffusers'
own loading of the same files: the diffusers / PEFT form with alpha in its header metadata and
without (diffusers then takes alpha = rank), ComfyUI's `diffusion_model.*.lora_down/up/alpha`
and musubi-tuner's `lora_unet_*`; at multipliers 1 and 0.5; written back in both namings.

Fixtures: tests/fixtures/wan_lora/, written by `tools/make_reference_fixtures.py wan_lora`
(diffusers 0.42.1 + PEFT 0.21.2): a rank-2, alpha-4 LoRA (scale 2) on q/k/v/o of both
attentions and both FFN linears of tests/fixtures/wan_pipeline/wan21/transformer.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from vdit.config import TextConfig
from vdit.io import wan_lora, wan_transformer
from vdit.io.hf_folder import CheckpointFormatError
from vdit.models import lora
from vdit.models.wan_dit import WanDiT

FIXTURES = Path(__file__).parent / "fixtures"
LORAS = FIXTURES / "wan_lora"
REF = load_file(str(LORAS / "reference.safetensors"))
SPEC, BASE = wan_transformer.load_params(FIXTURES / "wan_pipeline" / "wan21" / "transformer")


def _forward(params) -> np.ndarray:
    x = jnp.asarray(REF["hidden_states"]).transpose(0, 2, 3, 4, 1)
    module = WanDiT(SPEC.model, TextConfig(encoder="precomputed", width=SPEC.text_dim),
                    (*x.shape[1:4], SPEC.in_channels), time_scale=1.0)
    out = module.apply({"params": params}, x, jnp.asarray(REF["timestep"]),
                       jnp.asarray(REF["encoder_hidden_states"]))
    return np.asarray(out).transpose(0, 4, 1, 2, 3)


def _merged(path: Path, multiplier: float) -> dict:
    loaded = wan_lora.read_lora(path, SPEC)
    assert not loaded.unmatched, loaded.unmatched
    return lora.merge(BASE, loaded.adapters, lora.targets_of(loaded.adapters, BASE), multiplier)


def test_base_matches():
    np.testing.assert_allclose(_forward(BASE), REF["out_base"], atol=1e-5)


@pytest.mark.parametrize("name", ["lora_diffusers", "lora_comfyui", "lora_musubi"])
@pytest.mark.parametrize("multiplier", [1.0, 0.5])
def test_every_naming_gives_diffusers_output(name, multiplier):
    loaded = wan_lora.read_lora(LORAS / f"{name}.safetensors", SPEC)
    assert len(loaded.adapters) == 10 and loaded.rank == 2
    assert set(loaded.scales.values()) == {2.0}  # alpha 4 / rank 2, from tensors or header
    want = REF["out_lora" if multiplier == 1.0 else "out_lora_scale_0.5"]
    got = _forward(_merged(LORAS / f"{name}.safetensors", multiplier))
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), name
    assert np.abs(want - REF["out_base"]).max() > 0.5  # the LoRA matters


def test_without_metadata_alpha_is_rank_as_in_diffusers():
    got = _forward(_merged(LORAS / "lora_diffusers_nometa.safetensors", 1.0))
    np.testing.assert_allclose(got, REF["out_lora_scale_0.5"], atol=1e-5)


def test_merged_weights_match_diffusers_fuse():
    merged = _merged(LORAS / "lora_comfyui.safetensors", 1.0)
    leaves = wan_transformer.leaves(SPEC)
    from flax import traverse_util

    flat = traverse_util.flatten_dict(merged)
    for module in ("blocks.0.attn1.to_q", "blocks.0.attn2.to_k", "blocks.0.ffn.net.0.proj"):
        key = next(k for k, leaf in leaves.items()
                   if leaf.name.format(i=0) == module + ".weight")
        torch_layout = wan_transformer.to_torch(leaves[key], np.asarray(flat[key])[0])
        np.testing.assert_allclose(torch_layout, REF[f"merged/{module}.weight"], atol=1e-6)


@pytest.mark.parametrize("naming", ["diffusers", "comfyui"])
def test_written_files_read_back_to_the_same_model(tmp_path, naming):
    loaded = wan_lora.read_lora(LORAS / "lora_diffusers.safetensors", SPEC)
    tensors = wan_lora.lora_tensors(loaded.adapters, SPEC, naming)
    save_file(tensors, str(tmp_path / "x.safetensors"))
    prefix = "transformer.blocks.0.attn1.to_q.lora_A" if naming == "diffusers" else (
        "diffusion_model.blocks.0.self_attn.q.lora_down")
    assert f"{prefix}.weight" in tensors
    got = _forward(_merged(tmp_path / "x.safetensors", 1.0))
    np.testing.assert_allclose(got, REF["out_lora"], atol=1e-5)


def test_unmatched_keys_are_reported_and_nothing_matching_is_refused(tmp_path):
    tensors = load_file(str(LORAS / "lora_comfyui.safetensors"))
    tensors["diffusion_model.blocks.0.img_attn.q.lora_down.weight"] = np.zeros((2, 24),
                                                                                np.float32)
    save_file(tensors, str(tmp_path / "extra.safetensors"))
    loaded = wan_lora.read_lora(tmp_path / "extra.safetensors", SPEC)
    assert loaded.unmatched == ["diffusion_model.blocks.0.img_attn.q.lora_down.weight"]
    save_file({"unet.down.lora_A.weight": np.zeros((2, 3), np.float32)},
              str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointFormatError, match="no tensor matches"):
        wan_lora.read_lora(tmp_path / "other.safetensors", SPEC)
    bad = load_file(str(LORAS / "lora_comfyui.safetensors"))
    bad["diffusion_model.blocks.0.self_attn.q.lora_down.weight"] = np.zeros((2, 7), np.float32)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointFormatError, match=r"blocks\.0\.attn1\.to_q has down \(2, 7\)"):
        wan_lora.read_lora(tmp_path / "bad.safetensors", SPEC)


def test_targets_regex_matching_nothing_lists_the_modules():
    with pytest.raises(ValueError, match=r"match no module; the modules are: .*attn1/to_q"):
        lora.find_targets(BASE, r"nonexistent")
    targets = lora.find_targets(BASE, lora.DEFAULT_TARGETS["wan"])
    assert sorted(t.name for t in targets) == sorted(
        [f"blocks/{a}/{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out")]
        + ["blocks/ffn_in", "blocks/ffn_out"])


def test_vdit_sample_pipeline_with_loras(tmp_path, capsys):
    """--lora FILE[:SCALE] folds each file into the transformer before sampling: the video
    changes, the sidecar records the files and scales, and a file that is not there is
    refused naming the flag."""
    import json

    from vdit.cli import main
    from vdit.data.video_io import read_video

    base = ["sample", "--pipeline", str(FIXTURES / "wan_pipeline" / "wan21"), "--prompt", "a",
            "--frames", "5", "--height", "32", "--width", "48", "--steps", "2",
            "--text-length", "24", "--no-watermark", "--out"]
    assert main([*base, str(tmp_path / "plain")]) == 0
    assert main([*base, str(tmp_path / "lora"), "--lora",
                 f"{LORAS / 'lora_comfyui.safetensors'}:0.5", "--lora",
                 str(LORAS / "lora_diffusers.safetensors")]) == 0
    assert "LoRA" in capsys.readouterr().out
    plain = read_video(next((tmp_path / "plain").glob("*.mp4")))[0]
    video = next((tmp_path / "lora").glob("*.mp4"))
    assert np.abs(read_video(video)[0].astype(int) - plain).max() > 10
    record = json.loads(video.with_name(video.name + ".json").read_text())
    assert [x[1] for x in record["pipeline"]["loras"]] == [0.5, 1.0]
    assert main([*base, str(tmp_path / "x"), "--lora", "missing.safetensors:0.5"]) == 2
    assert "--lora: missing.safetensors is not a file" in capsys.readouterr().err
