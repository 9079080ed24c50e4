"""`vdit export --to safetensors`: round trip, bit-identical sampling, refusal of bad files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from conftest import tiny_dict

from vdit.cli import main
from vdit.io.safetensors_io import ExportError, flatten, read_export
from vdit.sample.generate import generate
from vdit.sample.loading import load_for_sampling


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A 2-step run whose weights matter: at lr 0.05 from the first step, Adam moves every
    parameter (the zero-initialised gates and final layer included) by about 0.05 per step, so
    the exported model's output, and the frames it samples, depend on every tensor."""
    tmp = tmp_path_factory.mktemp("export")
    d = tiny_dict(tmp / "run")
    d["train"].update(steps=2, lr=0.05, warmup_steps=0)
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(d))
    assert main(["train", str(tmp / "cfg.yaml")]) == 0
    assert main(["export", str(tmp / "run"), "--out", str(tmp / "export")]) == 0
    return tmp


def _saved_state(run_dir):
    from vdit.io.checkpoint import Checkpointer

    ckpt = Checkpointer(run_dir / "checkpoints", async_save=False)
    state, _ = ckpt.restore_raw()
    ckpt.close()
    return state


def _assert_same_tensors(got: dict, want: dict) -> None:
    got, want = flatten(got), flatten(want)
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_exported_tensors_are_the_runs_ema_or_raw_params_exactly(exported, tmp_path):
    state = _saved_state(exported / "run")
    tensors, info = read_export(exported / "export")
    assert info["kind"] == "dit" and info["weights"] == "ema" and info["step"] == 2
    _assert_same_tensors(tensors, {"params": state["ema_params"], "stats": state["stats"]})
    assert main(["export", str(exported / "run"), "--raw", "--out", str(tmp_path / "raw")]) == 0
    tensors, info = read_export(tmp_path / "raw")
    assert info["weights"] == "raw"
    _assert_same_tensors(tensors, {"params": state["params"], "stats": state["stats"]})
    # The EMA and the raw params differ, so the two checks are not the same check.
    assert not np.array_equal(state["params"]["final"]["kernel"],
                              state["ema_params"]["final"]["kernel"])


def test_export_round_trips_and_samples_bit_identically(exported):
    import jax
    import jax.numpy as jnp

    cfg, system, params, stats, step = load_for_sampling(exported / "run")
    cfg2, system2, params2, stats2, step2 = load_for_sampling(exported / "export")
    assert (cfg2, step2) == (cfg, step)
    tensors, _ = read_export(exported / "export")
    names = set(_names(tensors))
    assert "params/patch_embed/kernel" in names and "stats/mean" in names
    kwargs = dict(num=1, seed=3, cfg=cfg.sample)
    a = generate(system, params, stats, ["a red ball falls"], **kwargs)
    b = generate(system2, params2, stats2, ["a red ball falls"], **kwargs)
    np.testing.assert_array_equal(a, b)
    # The frames depend on the weights' exact values: rounding them to bfloat16 changes them.
    rounded = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16).astype(x.dtype), params)
    c = generate(system, rounded, stats, ["a red ball falls"], **kwargs)
    assert not np.array_equal(a, c)


def test_stablehlo_sampler_runs_without_vdit_and_matches_vdit_sample(exported, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    import jax

    out = tmp_path / "shlo"
    assert main(["export", str(exported / "run"), "--to", "stablehlo", "--out", str(out)]) == 0
    cfg, system, params, stats, _ = load_for_sampling(exported / "run")
    want = generate(system, params, stats, ["a red ball falls"], num=3, seed=5, cfg=cfg.sample)
    tool = Path(__file__).resolve().parents[1] / "tools" / "run_exported.py"
    # The tool runs in a fresh interpreter; it must not import vdit.
    args = [str(out), "--prompt", "a red ball falls", "--seed", "5", "--num", "3", "--out",
            str(tmp_path / "v.npy")]
    check = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('run_exported', {str(tool)!r})\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        f"mod.main({args!r})\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'vdit'], 'imported vdit'\n"
    )
    subprocess.run([sys.executable, "-c", check], check=True, cwd=tmp_path)
    np.testing.assert_array_equal(np.load(tmp_path / "v.npy"), want)
    # One program for any batch size (symbolic b), for cpu, cuda and tpu.
    exp = jax.export.deserialize(bytearray((out / "sampler.stablehlo").read_bytes()))
    assert set(exp.platforms) == {"cpu", "cuda", "tpu"}


def test_params_route_restores_on_one_host_and_samples(exported, capsys):
    out = exported / "params_only"
    assert main(["export", str(exported / "run"), "--to", "params", "--out", str(out)]) == 0
    # An earlier export is not written over unless asked.
    capsys.readouterr()
    assert main(["export", str(exported / "run"), "--to", "params", "--out", str(out)]) == 2
    assert "is not empty (an earlier export?)" in capsys.readouterr().err
    assert main(["export", str(exported / "run"), "--to", "params", "--out", str(out),
                 "--overwrite"]) == 0
    _, _, params, _, _ = load_for_sampling(out)
    _, _, params_run, _, _ = load_for_sampling(exported / "run")
    _assert_same_tensors(params, params_run)
    capsys.readouterr()
    assert main(["sample", str(out), "--num", "1", "--out", str(exported / "s")]) == 0
    assert any(p.endswith(".mp4") for p in capsys.readouterr().out.split())


def _names(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _names(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}"


def test_tampered_weights_and_mismatched_configs_are_refused(exported, tmp_path, capsys):
    import shutil

    bad = tmp_path / "tampered"
    shutil.copytree(exported / "export", bad)
    with open(bad / "model.safetensors", "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\x00\x01\x02\x03\x04\x05\x06\x07")
    with pytest.raises(ExportError, match=r"SHA-256 .* does not match"):
        read_export(bad)
    assert main(["sample", str(bad)]) == 2
    assert "corrupt or altered" in capsys.readouterr().err

    other = tmp_path / "mismatch"
    shutil.copytree(exported / "export", other)
    info = json.loads((other / "config.json").read_text())
    info["config"]["model"]["width"] = 64
    (other / "config.json").write_text(json.dumps(info))
    with pytest.raises(ExportError, match="do not match the config's model"):
        load_for_sampling(other)
