"""A Wan LoRA run end to end (issue 34): started from the tiny WanPipeline fixture
(`train.init_from: PIPELINE`, its transformer as the frozen bf16 base), trained two steps on
physics clips tokenized with the pipeline's UMT5 and VAE, then exported as LoRA files in both
namings (`vdit export --to lora --format diffusers | comfyui`) that vdit's reader of other
tools' files (vdit/io/wan_lora.py, checked against diffusers in tests/test_wan_lora.py) reads
back to the run's own merged model, merged into a diffusers transformer (`--merge`), and
sampled (validation samples during training, `vdit sample RUN`, and with other tools' LoRA
files: `--lora FILE[:SCALE]`).

The interop proof is a committed fixture (tests/fixtures/lora_export/): such a run's LoRA files
(tools/make_lora_export_sample.py, vdit's venv) that diffusers 0.42.1 loaded with
`WanPipeline.load_lora_weights` and ran (tools/fixtures/lora_export.py, the torch env)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import yaml
from flax import traverse_util
from safetensors.numpy import load_file, save_file
from wan_tool import TOOL

from vdit.cli import main
from vdit.io import wan_lora
from vdit.io import wan_transformer as wt

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "tests" / "fixtures" / "wan_pipeline" / "wan21"
LORAS = ROOT / "tests" / "fixtures" / "wan_lora"
RANK, ALPHA = 2, 6.0


def _quiet(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue()


def _flat(tree) -> dict[str, np.ndarray]:
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    tool = TOOL
    tmp = tmp_path_factory.mktemp("lora_run")
    d = tool.run_config(tmp / "run", tmp / "shards")
    d["model"]["depth"] = 1  # the pipeline fixture's transformer
    d["train"].update(steps=2, lr=1e-2, init_from=str(PIPELINE), sample_every=2,
                      lora={"rank": RANK, "alpha": ALPHA})
    config = tmp / "run.yaml"
    config.write_text(yaml.safe_dump(d))
    tool.tokenize(tmp / "shards", 4, config)
    code, log = _quiet(["train", str(config)])
    assert code == 0 and "init_from:" in log, log
    return tmp / "run"


def _state(run: Path) -> dict:
    from vdit.io.checkpoint import Checkpointer

    ckpt = Checkpointer(run / "checkpoints", async_save=False)
    state, _ = ckpt.restore_raw()
    ckpt.close()
    return state


def test_the_run_adapts_the_pipelines_transformer(run):
    from vdit.io.hf_folder import folder_sha256

    record = json.loads((run / "init_from.json").read_text())
    assert record["kind"] == "pipeline" and record["init_from"] == str(PIPELINE)
    assert record["sha256"] == {"transformer": folder_sha256(PIPELINE / "transformer",
                                                             wt.WEIGHTS)}
    state = _state(run)
    _, published = wt.load_params(PIPELINE / "transformer")
    base = _flat(state["stats"]["base"])
    assert base.keys() == _flat(published).keys()
    for k, v in _flat(published).items():
        np.testing.assert_array_equal(base[k], v.astype(ml_dtypes.bfloat16), err_msg=k)
    b = [v for k, v in _flat(state["ema_params"]).items() if k.endswith("/b")]
    assert len(b) == 10 and all(np.abs(x).max() > 0 for x in b)  # every adapter moved
    for step in (0, 2):  # validation samples run the adapted model too
        assert len(list((run / "samples" / f"step_{step}").glob("*.mp4"))) == 1


def _merged_run(run: Path) -> dict:
    from vdit.io.run_dir import load_dit_weights

    return load_dit_weights(run)[1]  # EMA adapters folded into the base, float32


@pytest.mark.parametrize("fmt", ["diffusers", "comfyui"])
def test_exported_lora_files_read_back_to_the_runs_model(run, tmp_path, fmt):
    from vdit.models import lora

    out = tmp_path / fmt
    assert _quiet(["export", str(run), "--to", "lora", "--format", fmt, "--out", str(out)])[0] == 0
    path = out / f"lora_{fmt}.safetensors"
    tensors = load_file(str(path))
    if fmt == "diffusers":
        assert "transformer.blocks.0.attn1.to_q.lora_A.weight" in tensors
        assert tensors["transformer.blocks.0.ffn.net.0.proj.lora_B.weight"].shape == (32, RANK)
        assert not any(k.endswith(".alpha") for k in tensors)
    else:
        assert tensors["diffusion_model.blocks.0.self_attn.q.lora_down.weight"].shape == (RANK, 24)
        assert "diffusion_model.blocks.0.cross_attn.o.lora_up.weight" in tensors
        alphas = {float(v) for k, v in tensors.items() if k.endswith(".alpha")}
        assert alphas == {float(RANK)}  # alpha / rank is folded into up
    assert len([k for k in tensors if "lora_A" in k or "lora_down" in k]) == 10
    info = json.loads((out / "vdit_export.json").read_text())
    assert (info["rank"], info["alpha"], info["scale_in_b"]) == (RANK, ALPHA, ALPHA / RANK)

    spec = wt.read_spec(PIPELINE / "transformer")
    loaded = wan_lora.read_lora(path, spec)
    assert not loaded.unmatched and set(loaded.scales.values()) == {1.0}
    base = {k: v.astype(np.float32) for k, v in _flat(_state(run)["stats"]["base"]).items()}
    base = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in base.items()})
    got = _flat(lora.merge(base, loaded.adapters, lora.targets_of(loaded.adapters, base), 1.0))
    want = _flat(_merged_run(run))
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-6, err_msg=k)
    assert max(np.abs(want[k] - base_v).max() for k, base_v in _flat(base).items()) > 1e-3


def test_merge_writes_the_merged_transformer(run, tmp_path):
    assert _quiet(["export", str(run), "--to", "lora", "--merge", "--out",
                   str(tmp_path / "merged")])[0] == 0
    _, params = wt.load_params(tmp_path / "merged" / "transformer")
    want = _flat(_merged_run(run))
    got = _flat(params)
    assert got.keys() == want.keys()
    assert all(np.array_equal(got[k], want[k]) for k in want)
    # --to diffusers of a LoRA run is the same folder.
    assert _quiet(["export", str(run), "--to", "diffusers", "--out", str(tmp_path / "d")])[0] == 0
    for f in (tmp_path / "merged" / "transformer").iterdir():
        assert (tmp_path / "d" / "transformer" / f.name).read_bytes() == f.read_bytes()


def test_vdit_sample_a_lora_run_with_other_tools_loras(run, tmp_path, capsys):
    from vdit.data.video_io import read_video

    base = ["sample", str(run), "--prompt", "a red ball", "--no-watermark", "--out"]
    assert main([*base, str(tmp_path / "plain")]) == 0
    tensors = load_file(str(LORAS / "lora_comfyui.safetensors"))
    tensors["diffusion_model.blocks.0.img_attn.q.lora_down.weight"] = np.zeros((2, 24),
                                                                                np.float32)
    other = tmp_path / "other.safetensors"
    save_file(tensors, str(other))
    capsys.readouterr()
    assert main([*base, str(tmp_path / "lora"), "--lora", f"{other}:0.5", "--lora",
                 str(LORAS / "lora_diffusers.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "1 tensor(s) match no module" in out and "img_attn.q.lora_down" in out, out
    plain = read_video(next((tmp_path / "plain").glob("*.mp4")))[0]
    video = next((tmp_path / "lora").glob("*.mp4"))
    assert np.abs(read_video(video)[0].astype(int) - plain).max() > 10
    record = json.loads(video.with_name(video.name + ".json").read_text())
    assert [(Path(x["file"]).name, x["scale"]) for x in record["loras"]] == [
        ("other.safetensors", 0.5), ("lora_diffusers.safetensors", 1.0)]


def test_refusals_name_the_problem(run, tmp_path, capsys):
    from conftest import tiny_dict

    from vdit.config import from_dict, to_dict
    from vdit.io.run_dir import run_config, save_config

    full = tmp_path / "full"
    cfg = run_config(run)
    d = to_dict(cfg)
    d["train"]["lora"] = {"rank": 0}
    save_config(full, from_dict(d))
    assert main(["export", str(full), "--to", "lora"]) == 2
    assert "train.lora.rank 0" in capsys.readouterr().err
    assert main(["export", str(run), "--format", "comfyui"]) == 2
    assert "--format and --merge go with --to lora" in capsys.readouterr().err
    assert main(["export", str(run), "--to", "lora", "--dtype", "bfloat16"]) == 2
    assert "without --merge" in capsys.readouterr().err
    own = tmp_path / "own"
    save_config(own, from_dict(tiny_dict(own)))
    assert main(["export", str(own), "--to", "lora"]) == 2
    assert "model.kind 'dit'" in capsys.readouterr().err


# --- the committed interop fixture ---------------------------------------------------------

EXPORT_FIXTURE = ROOT / "tests" / "fixtures" / "lora_export"


def _fixture_config(tmp: Path):
    from vdit.config import from_dict

    d = json.loads((EXPORT_FIXTURE / "sample.json").read_text())["config"]
    for section, key in (("autoencoder", "checkpoint"), ("text", "checkpoint"),
                         ("train", "init_from")):
        d[section][key] = str(ROOT / d[section][key])
    d["data"]["shards"], d["train"]["run_dir"] = str(tmp / "unused"), str(tmp / "run")
    return from_dict(d)


def _fixture_adapters() -> dict:
    stored = load_file(str(EXPORT_FIXTURE / "adapters.safetensors"))
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in stored.items()})


def test_diffusers_loads_the_committed_lora_exports_as_vdit_applies_them(tmp_path):
    """diffusers 0.42.1 (+ PEFT) loaded the committed `vdit export --to lora` files, both
    namings, with `WanPipeline.load_lora_weights` onto the published transformer and ran it;
    vdit's fold of the run's adapters into that transformer gives the same output today."""
    from vdit.models import lora

    record = json.loads((EXPORT_FIXTURE / "diffusers_outputs.json").read_text())
    assert record["diffusers"] == "0.42.1"
    vdit = load_file(str(EXPORT_FIXTURE / "vdit_outputs.safetensors"))
    theirs = load_file(str(EXPORT_FIXTURE / "diffusers_outputs.safetensors"))
    scale = np.abs(vdit["sample"]).max()
    assert np.abs(vdit["sample"] - vdit["base"]).max() / scale > 0.05  # the LoRA matters
    for fmt in ("diffusers", "comfyui"):
        entry = record["files"][f"lora_{fmt}.safetensors"]
        assert len(entry["lora_modules"]) == 10 and entry["max_rel_diff"] <= 1e-5, entry
        assert np.abs(theirs[fmt] - vdit["sample"]).max() / scale <= 1e-5, fmt
    cfg = _fixture_config(tmp_path)
    _, base = wt.load_params(PIPELINE / "transformer")
    merged = lora.fold(base, _fixture_adapters(), cfg.train.lora.scale())
    inputs = {k: vdit[k] for k in ("hidden_states", "timestep", "encoder_hidden_states",
                                   "text_mask")}
    ours = TOOL.vdit_output(cfg, merged, inputs)
    assert np.abs(ours - vdit["sample"]).max() / scale <= 1e-6


@pytest.mark.parametrize("fmt", ["diffusers", "comfyui"])
def test_committed_lora_files_are_todays_export_of_their_adapters(tmp_path, fmt):
    """The committed files are, tensor for tensor, what `--to lora` writes today from the
    committed adapters, so a change in names, layout or the alpha folded into B shows here."""
    from vdit.export.lora import adapter_tensors

    cfg = _fixture_config(tmp_path)
    _, base = wt.load_params(PIPELINE / "transformer")
    got = adapter_tensors(cfg, _fixture_adapters(), base, fmt)
    want = load_file(str(EXPORT_FIXTURE / f"lora_{fmt}.safetensors"))
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
