"""The Wan DiT (vdit/models/wan_dit.py) against diffusers' WanTransformer3DModel, and its weight
files (vdit/io/wan_transformer.py): diffusers folders (one file, sharded), the original Wan /
ComfyUI naming, export -> import, and the refusals.

Fixtures: tests/fixtures/wan_dit/, written by `tools/make_reference_fixtures.py wan_dit` with
diffusers 0.42.1 (two odd configs: 3 heads of 10, 2 heads of 20 without the cross-attention
norm; a 3 x 4 x 6 latent; zero-padded text; tables and norms away from their init).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from vdit.config import TextConfig
from vdit.io import wan_transformer as wt
from vdit.io.hf_folder import CheckpointFormatError
from vdit.models.wan_dit import WanDiT

FIXTURES = Path(__file__).parent / "fixtures" / "wan_dit"
REF = load_file(str(FIXTURES / "reference.safetensors"))
META = json.loads((FIXTURES / "reference.json").read_text())


def _model(spec, dtype="float32", **model_kw):
    import dataclasses

    m = dataclasses.replace(spec.model, dtype=dtype, **model_kw)
    latent = (*META["latent_shape_fhw"], spec.in_channels)
    return WanDiT(m, TextConfig(encoder="precomputed", width=spec.text_dim), latent,
                  time_scale=1.0)


def _forward(name: str, k: int, params=None, dtype="float32", **model_kw):
    spec, loaded = wt.load_params(FIXTURES / name)
    params = loaded if params is None else params
    x = jnp.asarray(REF[f"{name}/hidden_states"]).transpose(0, 2, 3, 4, 1)  # -> [B, F, H, W, C]
    out = _model(spec, dtype, **model_kw).apply(
        {"params": params}, x, jnp.asarray(REF[f"{name}/t{k}/timestep"]),
        jnp.asarray(REF[f"{name}/encoder_hidden_states"]))  # no mask: Wan attends to the zeros
    return np.asarray(out).transpose(0, 4, 1, 2, 3)


@pytest.mark.parametrize("name", ["a", "b"])
@pytest.mark.parametrize("k", [0, 1])
def test_forward_matches_diffusers(name, k):
    want = REF[f"{name}/t{k}/sample"]
    got = _forward(name, k)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err <= 1e-5, f"{name} t{k}: relative max error {err:.2e}"


def test_bfloat16_within_its_bound():
    """bf16 matmuls (norms, modulation and time path stay f32): within 5 % of the output scale."""
    want = REF["a/t0/sample"]
    err = np.abs(_forward("a", 0, dtype="bfloat16") - want).max() / np.abs(want).max()
    assert err <= 5e-2, err


def test_unrolled_and_remat_agree_with_scan():
    base = _forward("a", 1)
    for kw in ({"scan_layers": False}, {"remat": "full"}):
        spec, params = wt.load_params(FIXTURES / "a")
        if not kw.get("scan_layers", True):  # unrolled blocks are named blocks_0, blocks_1
            blocks = params.pop("blocks")
            for i in range(spec.model.depth):
                params[f"blocks_{i}"] = jax.tree.map(lambda a, i=i: a[i], blocks)
        np.testing.assert_allclose(_forward("a", 1, params=params, **kw), base, atol=1e-6)


def test_rope_tables_match_diffusers():
    from vdit.models.patch import grid_positions
    from vdit.models.rope import rope_tables, wan_split

    for name, hd in (("a", 10), ("b", 20)):
        cos, sin = rope_tables(grid_positions((3, 2, 3)), hd, split=wan_split(hd))
        # diffusers repeats each pair's value twice: [c0, c0, c1, c1, ...]
        np.testing.assert_array_equal(REF[f"{name}/rope_cos"][0, :, 0, 0::2], cos)
        np.testing.assert_array_equal(REF[f"{name}/rope_sin"][0, :, 0, 1::2], sin)


def test_original_comfyui_naming_loads_the_same_params(tmp_path):
    _, diffusers = wt.load_params(FIXTURES / "a")
    folder = FIXTURES / "wan_original.safetensors"
    naming = json.loads((FIXTURES / "naming.json").read_text())
    assert wt.is_original_naming([naming["prefix"] + o for _, o in naming["pairs"]])
    assert not wt.is_original_naming([d for d, _ in naming["pairs"]])
    renamed = {wt.diffusers_name(naming["prefix"] + orig): d for d, orig in naming["pairs"]}
    assert all(k == v for k, v in renamed.items()), [k for k, v in renamed.items() if k != v]
    # the single file's architecture comes from a config.json beside it
    shutil.copy(folder, tmp_path / "wan_original.safetensors")
    shutil.copy(FIXTURES / "a" / "config.json", tmp_path / "config.json")
    _, original = wt.load_params(tmp_path / "wan_original.safetensors")
    assert jax.tree.all(jax.tree.map(np.array_equal, diffusers, original))


def test_export_then_import_is_bit_identical(tmp_path):
    spec, params = wt.load_params(FIXTURES / "b")  # b is sharded; written back as shards too
    wt.write_folder(tmp_path / "t", spec, params, max_shard_bytes=30_000)
    assert len(list((tmp_path / "t").glob("*.safetensors"))) > 1
    _, again = wt.load_params(tmp_path / "t")
    assert jax.tree.all(jax.tree.map(np.array_equal, params, again))
    # and the tensors are diffusers' own, name for name and bit for bit
    ours = {}
    for f in (tmp_path / "t").glob("*.safetensors"):
        ours.update(load_file(str(f)))
    theirs = {}
    for f in (FIXTURES / "b").glob("*.safetensors"):
        theirs.update(load_file(str(f)))
    assert sorted(ours) == sorted(theirs)
    assert all(np.array_equal(ours[k], theirs[k]) for k in ours)


def test_sharded_targets_read_their_slices():
    """With target shardings each leaf is assembled from per-device slices; the values equal
    the unsharded load (one CPU device here: the slicing logic is tested by cutting blocks)."""
    spec, params = wt.load_params(FIXTURES / "a")
    index_leaves = wt.leaves(spec)
    import contextlib

    with contextlib.ExitStack() as handles:
        files = wt.weight_files(FIXTURES / "a", wt.WEIGHTS)
        index = wt.TensorIndex(files, spec, FIXTURES / "a", handles)
        flat = traverse_util.flatten_dict(params)
        for key, leaf in index_leaves.items():
            full = np.asarray(flat[key])
            # every axis cut in two where it can be: as FSDP x tensor shards would
            cuts = [(slice(0, n // 2), slice(n // 2, n)) if n > 1 else (slice(0, n),)
                    for n in full.shape]
            import itertools

            for idx in itertools.product(*cuts):
                np.testing.assert_array_equal(wt._read_block(index, leaf, idx), full[idx],
                                              err_msg=f"{key} {idx}")


def _broken_copy(tmp_path, name="a") -> Path:
    dst = tmp_path / name
    shutil.copytree(FIXTURES / name, dst)
    return dst


def test_refuses_another_architecture(tmp_path):
    folder = _broken_copy(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["_class_name"] = "AutoencoderKLWan"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointFormatError, match=r"AutoencoderKLWan.*not a WanTransformer3D"):
        wt.load_params(folder)


def test_refuses_missing_shard(tmp_path):
    folder = _broken_copy(tmp_path, "b")
    shard = sorted(folder.glob("*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointFormatError, match=f"missing: .*{shard.name}"):
        wt.load_params(folder)


@pytest.mark.parametrize("how", ["shape", "dtype", "missing"])
def test_refuses_wrong_tensors_naming_file_and_tensor(tmp_path, how):
    folder = _broken_copy(tmp_path)
    path = folder / wt.WEIGHTS
    tensors = load_file(str(path))
    name = "blocks.1.attn2.to_k.weight"
    if how == "shape":
        tensors[name] = tensors[name][:, :-1].copy()
    elif how == "dtype":
        tensors[name] = tensors[name].astype(np.int32)
    else:
        del tensors[name]
    save_file(tensors, str(path))
    expected = {"shape": f"{name} \\({wt.WEIGHTS}\\): expected shape",
                "dtype": f"{name} \\({wt.WEIGHTS}\\): dtype I32",
                "missing": f"missing tensor {name}"}[how]
    with pytest.raises(CheckpointFormatError, match=expected):
        wt.load_params(folder)


def test_refuses_truncated_weights(tmp_path):
    folder = _broken_copy(tmp_path)
    path = folder / wt.WEIGHTS
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointFormatError, match=f"{wt.WEIGHTS}.*truncated or damaged"):
        wt.load_params(folder)


def test_refuses_image_conditioning(tmp_path):
    folder = _broken_copy(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["image_dim"] = 1280
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointFormatError, match=r"image_dim=1280.*I2V"):
        wt.load_params(folder)


def test_layouts_load_sharded_and_match_one_device():
    """tests/wan_layouts.py on 8 fake devices: fixture b loaded straight onto FSDP x tensor and
    data x FSDP x ring-context shardings equals the plain load, and the forward loss and
    gradient under each layout match one device's."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")
           + " --xla_force_host_platform_device_count=8"}
    out = subprocess.run([sys.executable, str(Path(__file__).parent / "wan_layouts.py")],
                         env=env, capture_output=True, text=True, timeout=600)
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    result = json.loads(lines[0].removeprefix("RESULT "))
    assert set(result) == {"fsdp_tp", "ring"}
    for name, r in result.items():
        assert r["loaded_equal"] and r["sharded"], (name, r)
        assert r["loss_err"] < 1e-5 and r["grad_err"] < 1e-5, (name, r)
